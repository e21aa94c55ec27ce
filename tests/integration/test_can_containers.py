"""AUTOSAR container messages and signal names shared by multiplexer branches; cantools the oracle.

Fixtures written for these tests: ``tests/data/arxml/container.arxml`` (a container frame with two
short-header PDUs next to a plain frame) and ``tests/data/kcd/radio_mux.kcd`` (``Station`` in three
branches of one multiplexer, the third signed).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import can
import cantools
import pytest
from can_support import wait_for

from daq_agent.cli import main
from daq_agent.core.sample import Sample
from daq_agent.decode.can_decoder import CanDecoder
from daq_agent.decode.dbc import load_database
from daq_agent.pipeline.ring_buffer import RingBuffer
from daq_agent.readers import CanReader, ReaderState

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "data"
CONTAINER = DATA / "arxml" / "container.arxml"
RADIO = DATA / "kcd" / "radio_mux.kcd"

DOOR = bytes.fromhex("000101020135")  # header 0x000101, 2 bytes: DoorOpen 1, Window 0x35
LIGHTS = bytes.fromhex("0002020106")  # header 0x000202, 1 byte: Headlight 2, Brake 1
STRAY = bytes.fromhex("0A0B0C01FF")  # a header the database does not define
FRAMES = [DOOR + LIGHTS, LIGHTS, LIGHTS + DOOR, DOOR + STRAY, STRAY]


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    yield
    leaked = [t.name for t in threading.enumerate() if t.name.startswith("daq-reader[")]
    assert not leaked, f"leaked reader threads: {leaked}"


def _oracle(db: Any, data: bytes) -> list[tuple[str, dict[str, Any]]]:
    """cantools' decode_containers=True, known PDUs only, as (flow suffix, signals)."""
    decoded = db.decode_message(0x300, data, decode_containers=True, decode_choices=False)
    return [(m.name, dict(values)) for m, values in decoded if not isinstance(m, int)]


def test_container_pdus_decode_into_their_own_flows_like_cantools() -> None:
    """Each known PDU is a sample of its contained message's flow, with cantools' values."""
    db = cantools.database.load_file(str(CONTAINER))
    decoder = CanDecoder("body", [load_database(CONTAINER)])
    assert [f.name for f in decoder.flows] == ["body.Plain", "body.DoorStatus", "body.Lights"]
    assert decoder.warnings == []
    channels = {f.name: [c.name for c in f.channels] for f in decoder.flows}
    for data in FRAMES:
        got = decoder.decode(0x300, False, data, 7)
        oracle = _oracle(db, data)
        if not oracle:
            assert got is None  # no PDU it knows: an unknown frame
            continue
        assert isinstance(got, tuple)
        assert len(got) == len(oracle)
        for sample, (name, values) in zip(got, oracle, strict=True):
            assert sample.flow == f"body.{name}"
            assert sample.timestamp_ns == 7
            named = dict(zip(channels[sample.flow], sample.values, strict=True))
            assert named == {
                k: bool(v) if isinstance(named[k], bool) else v for k, v in values.items()
            }
    plain = decoder.decode(0x100, False, b"\x2a", 1)
    assert isinstance(plain, Sample)
    assert plain.values == (42,)


def test_a_reader_counts_container_pdus_and_stays_balanced() -> None:
    """On a virtual bus: PDUs become samples, unknown headers are counted, the frames balance."""
    decoder = CanDecoder("body", [load_database(CONTAINER)])
    channel = f"cont-{uuid.uuid4().hex[:8]}"
    ring: RingBuffer[Sample] = RingBuffer(1000, "block")
    reader = CanReader("body", {"interface": "virtual", "channel": channel}, decoder, ring)
    with reader, can.Bus(channel, interface="virtual") as bus:
        assert reader.wait_state(ReaderState.RUNNING, timeout=5)
        for data in FRAMES:
            bus.send(can.Message(arbitration_id=0x300, is_extended_id=False, data=data, is_fd=True))
        assert wait_for(lambda: reader.counters.get("received") == len(FRAMES), timeout=10)
    c = reader.counters
    samples = ring.get_batch(1000, timeout=0)
    assert [s.flow for s in samples] == [
        "body.DoorStatus",
        "body.Lights",
        "body.Lights",
        "body.Lights",
        "body.DoorStatus",
        "body.DoorStatus",
    ]
    assert (c.get("decoded"), c.get("unknown"), c.get("extra_samples")) == (4, 1, 2)
    assert c.get("unknown_pdus") == 2
    assert c.get("decoded") + c.get("extra_samples") == len(samples)
    assert c.get("received") == c.get("decoded") + c.get("unknown") + c.get("decode_errors")


def test_decode_command_prints_each_pdu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``decode`` prints one line per contained PDU and names the unknown header."""
    log = tmp_path / "body.log"
    log.write_text(f"(1.0) can0 300##0{(DOOR + STRAY + LIGHTS).hex().upper()}\n")
    assert main(["decode", "--json", str(CONTAINER), str(log)]) == 0
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert [(r["container"], r["message"], r["flow"]) for r in records] == [
        ("BodyContainer", "DoorStatus", "can0.DoorStatus"),
        ("BodyContainer", "Lights", "can0.Lights"),
    ]
    assert records[1]["signals"] == {"Headlight": 2, "Brake": 1}
    assert "BodyContainer: unknown PDU header 0x0A0B0C" in captured.err


def test_a_name_shared_by_multiplexer_branches_is_one_channel() -> None:
    """``Station`` in branches 1 and 2 is one channel; the signed branch 3 cannot share it."""
    db = cantools.database.load_file(str(RADIO))
    decoder = CanDecoder("ifo", [load_database(RADIO)])
    message = decoder.messages[0]
    assert message.channel_names == ("RadioMux", "Volume", "Station", "Station_2", "Band", "Mute")
    assert message.signal_names == ("RadioMux", "Volume", "Station", "Station", "Band", "Mute")
    assert any("Station_2" in w for w in decoder.warnings)
    for data, station in [
        (bytes([0, 9, 0, 0x80]), None),
        (bytes([1, 7, 0, 0]), 7),
        (bytes([2, 8, 3, 0]), 8),
        (bytes([3, 0xFE, 0, 0]), None),
    ]:
        oracle = db.decode_message(0x79A, data)
        got = message.signals(data)
        sample = decoder.decode(0x79A, False, data, 0)
        assert isinstance(sample, Sample)
        assert sample.values[2] == station
        if station is not None:
            assert got == oracle
        elif data[0] == 3:
            assert got["Station_2"] == oracle["Station"] == -2
        assert len(sample.values) == len(message.flow.channels)
