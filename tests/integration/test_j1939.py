"""J1939: PGN matching, source-address channels, BAM/CMDT reassembly, timeouts, aborts and DM1.

cantools is the oracle for the values of single-frame messages and of reassembled payloads; the
fixture ``tests/data/dbc/j1939_truck.dbc`` was written for these tests (ProtocolType J1939; EEC1,
CCVS1, ET1 single frames with source address 0xFE in the DBC, TSC1 a PDU1, BatteryCells 20 bytes).
Frames go through real readers on python-can virtual buses; the timeout tests feed the decoder
session frames with chosen timestamps (a virtual bus stamps frames with the host clock).
"""

from __future__ import annotations

import json
import random
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
from daq_agent.core.errors import DecodeError
from daq_agent.core.sample import Sample
from daq_agent.decode.can_decoder import CanDecoder
from daq_agent.decode.dbc import load_database
from daq_agent.decode.j1939 import T1_NS, T3_NS, DtcCode, dm1_payload, transport_frames
from daq_agent.pipeline.ring_buffer import RingBuffer
from daq_agent.pipeline.status import SourceStats
from daq_agent.readers import CanReader, ReaderState
from daq_agent.readers.base import ReaderCounters
from daq_agent.sim.can import CanSimulator

pytestmark = pytest.mark.integration

DBC = Path(__file__).resolve().parents[1] / "data" / "dbc" / "j1939_truck.dbc"
MS = 1_000_000


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    yield
    leaked = [t.name for t in threading.enumerate() if t.name.startswith("daq-reader[")]
    assert not leaked, f"leaked reader threads: {leaked}"


@pytest.fixture(scope="module")
def oracle() -> Any:
    return cantools.database.load_file(str(DBC))


def _decoder(**kwargs: Any) -> CanDecoder:
    return CanDecoder("truck", [load_database(DBC)], **kwargs)


def _counters() -> ReaderCounters:
    return ReaderCounters(keyed=CanReader.KEYED_COUNTERS)


def _named(decoder: CanDecoder, sample: Sample) -> dict[str, Any]:
    flow = next(f for f in decoder.flows if f.name == sample.flow)
    return {c.name: v for c, v in zip(flow.channels, sample.values, strict=True) if v is not None}


def _expect(oracle: Any, name: str, data: bytes) -> dict[str, Any]:
    return dict(oracle.get_message_by_name(name).decode(data, decode_choices=False))


def _run_reader(decoder: CanDecoder, frames: list[can.Message]) -> tuple[CanReader, list[Sample]]:
    channel = f"j1939-{uuid.uuid4().hex[:8]}"
    ring: RingBuffer[Sample] = RingBuffer(10_000, "block")
    reader = CanReader("truck", {"interface": "virtual", "channel": channel}, decoder, ring)
    with reader, can.Bus(channel, interface="virtual") as bus:
        assert reader.wait_state(ReaderState.RUNNING, timeout=5)
        for frame in frames:
            bus.send(frame)
        assert wait_for(lambda: reader.counters.get("received") == len(frames), timeout=20)
    return reader, ring.get_batch(10_000, timeout=0)


def _stats(reader: CanReader) -> SourceStats:
    c = reader.counters
    errors = sum(c.get(n) for n in ("decode_errors", "error_frames", "remote_frames"))
    return SourceStats(
        "truck",
        "can",
        "stopped",
        c.get("received"),
        c.get("decoded"),
        c.get("unknown"),
        errors,
        counters=c.snapshot(),
    )


def test_pgn_matches_whatever_source_address_and_priority(oracle: Any) -> None:
    """EEC1 from any SA and priority decodes like cantools; SA and PDU1 DA are channels."""
    decoder = _decoder()
    assert decoder.j1939
    rng = random.Random(3)
    frames, expected = [], []
    for _ in range(40):
        priority, sa = rng.randrange(8), rng.randrange(254)
        data = bytes(rng.randrange(256) for _ in range(8))
        frames.append(can.Message(arbitration_id=priority << 26 | 0xF004 << 8 | sa, data=data))
        expected.append(("truck.EEC1", {**_expect(oracle, "EEC1", data), "source_address": sa}))
    tsc1 = bytes([1, 0x40, 0x1F, 0, 0, 0, 0, 0])
    frames.append(can.Message(arbitration_id=0x0C00F103, data=tsc1))  # PDU1: DA 0xF1, SA 0x03
    expected.append(
        (
            "truck.TSC1",
            {**_expect(oracle, "TSC1", tsc1), "source_address": 3, "destination_address": 0xF1},
        )
    )
    frames.append(can.Message(arbitration_id=0x18FFAA21, data=bytes(8)))  # a PGN nobody defines
    frames.append(can.Message(arbitration_id=0x100, is_extended_id=False, data=b"\x07"))
    expected.append(("truck.ToolHeartbeat", {"Alive": 7}))
    reader, samples = _run_reader(decoder, frames)
    assert [(s.flow, _named(decoder, s)) for s in samples] == expected
    c = reader.counters
    assert (c.get("decoded"), c.get("unknown")) == (len(expected), 1)
    assert c.keyed("unknown_pgns").snapshot() == {"0FFAA": 1}
    assert _stats(reader).balanced


def test_bam_and_cmdt_reassemble_a_20_byte_pgn(oracle: Any) -> None:
    """A BAM and a CMDT (two CTS windows) each give one BatteryCells sample equal to cantools'."""
    decoder = _decoder()
    payload = bytes(random.Random(5).randrange(256) for _ in range(20))
    bam = [
        can.Message(arbitration_id=i, data=d) for i, d in transport_frames(0xFF10, payload, 0x80)
    ]
    # connection mode, 0x81 -> 0x17: RTS, CTS(2 from 1), DT1, DT2, CTS(1 from 3), DT3, EOM ACK
    pgn = (0xFF10).to_bytes(3, "little")
    cm_to, cm_back = 0x1CEC1781, 0x1CEC8117
    dt = [bytes([n + 1]) + (payload + b"\xff")[7 * n : 7 * n + 7] for n in range(3)]
    cmdt = [
        (cm_to, bytes([16, 20, 0, 3, 0xFF]) + pgn),
        (cm_back, bytes([17, 2, 1, 0xFF, 0xFF]) + pgn),
        (0x1CEB1781, dt[0]),
        (0x1CEB1781, dt[1]),
        (cm_back, bytes([17, 1, 3, 0xFF, 0xFF]) + pgn),
        (0x1CEB1781, dt[2]),
        (cm_back, bytes([19, 20, 0, 3, 0xFF]) + pgn),
    ]
    frames = bam + [can.Message(arbitration_id=i, data=d) for i, d in cmdt]
    reader, samples = _run_reader(decoder, frames)
    want = _expect(oracle, "BatteryCells", payload)
    assert [_named(decoder, s) for s in samples] == [
        {**want, "source_address": 0x80},
        {**want, "source_address": 0x81},
    ]
    c = reader.counters
    assert c.get("transport_frames") == len(frames) - 2
    assert c.get("decoded") == 2
    assert (c.get("tp_timeouts"), c.get("tp_aborts"), c.get("decode_errors")) == (0, 0, 0)
    assert _stats(reader).balanced


def test_timeouts_and_aborts_are_counted_per_pgn() -> None:
    """A stalled BAM (T1), an RTS never answered (T3) and an aborted CMDT are counted."""
    decoder = _decoder()
    counters = _counters()
    session: Any = decoder.session(counters)
    payload = bytes(range(20))
    bam = transport_frames(0xFF10, payload, 0x80)
    t = 1_000 * MS
    assert session.decode(bam[0][0], True, bam[0][1], t) == ()
    assert session.decode(bam[1][0], True, bam[1][1], t + 50 * MS) == ()
    # packet 2 never comes; packet 3 after more than T1 since packet 1: the transfer is gone
    late = t + 50 * MS + T1_NS + MS
    with pytest.raises(DecodeError, match="without an announced transfer"):
        session.decode(bam[3][0], True, bam[3][1], late)
    assert counters.get("tp_timeouts") == 1
    pgn = (0xFF10).to_bytes(3, "little")
    assert session.decode(0x1CEC1781, True, bytes([16, 20, 0, 3, 0xFF]) + pgn, late) == ()
    heartbeat = can.Message(arbitration_id=0x18FEF1FE, data=bytes(8))
    got = session.decode(heartbeat.arbitration_id, True, bytes(heartbeat.data), late + T3_NS + MS)
    assert isinstance(got, Sample)  # the frame that noticed the timeout still decodes
    assert counters.get("tp_timeouts") == 2
    assert (
        session.decode(0x1CEC1781, True, bytes([16, 20, 0, 3, 0xFF]) + pgn, late + 2 * T3_NS) == ()
    )
    abort = bytes([255, 3, 0xFF, 0xFF, 0xFF]) + pgn
    assert session.decode(0x1CEC8117, True, abort, late + 2 * T3_NS + MS) == ()
    assert counters.get("tp_aborts") == 1
    assert counters.keyed("tp_error_pgns").snapshot() == {"0FF10": 3}
    stats = SourceStats("truck", "can", "running", 0, 0, 0, 0, counters=counters.snapshot())
    assert stats.errors_by_kind == {"tp_timeouts": 2, "tp_aborts": 1}


def test_dm1_single_frame_and_bam(oracle: Any) -> None:
    """DM1 with one DTC (one frame) and with three (a BAM): lamps, count, SPN/FMI/OC/CM."""
    decoder = _decoder(dm1_dtcs=2)
    dm1 = next(f for f in decoder.flows if f.name == "truck.DM1")
    assert [c.name for c in dm1.channels][:9] == [
        "mil",
        "rsl",
        "awl",
        "pl",
        "count",
        "spn_0",
        "fmi_0",
        "oc_0",
        "cm_0",
    ]
    one = dm1_payload([DtcCode(523, 4, 1)], (1, 0, 0, 0))
    three = dm1_payload(
        [DtcCode(100, 1, 3), DtcCode(0x7FFF0, 31, 126, cm=True), DtcCode(190, 2, 5)], (0, 1, 1, 3)
    )
    frames = [can.Message(arbitration_id=0x18FECA00, data=one)]
    frames += [can.Message(arbitration_id=i, data=d) for i, d in transport_frames(0xFECA, three, 3)]
    frames.append(can.Message(arbitration_id=0x18FECA11, data=dm1_payload([])))
    reader, samples = _run_reader(decoder, frames)
    got = [_named(decoder, s) for s in samples]
    assert got[0] == {
        "mil": 1,
        "rsl": 0,
        "awl": 0,
        "pl": 0,
        "count": 1,
        "spn_0": 523,
        "fmi_0": 4,
        "oc_0": 1,
        "cm_0": False,
        "source_address": 0,
    }
    assert got[1] == {
        "mil": 0,
        "rsl": 1,
        "awl": 1,
        "pl": 3,
        "count": 3,
        "spn_0": 100,
        "fmi_0": 1,
        "oc_0": 3,
        "cm_0": False,
        "spn_1": 0x7FFF0,
        "fmi_1": 31,
        "oc_1": 126,
        "cm_1": True,
        "source_address": 3,
    }
    assert got[2]["count"] == 0
    assert "spn_0" not in got[2]
    assert _stats(reader).balanced


def test_simulator_sends_j1939_with_bam_and_dm1_that_decode(oracle: Any) -> None:
    """The simulator's J1939 traffic (BatteryCells as BAM, DM1 as BAM) decodes completely."""
    databases = [load_database(DBC)]
    sim = CanSimulator(databases, seed=4, dm1=[DtcCode(100, 1), DtcCode(110, 2)], dm1_source=0x21)
    frames = [frame for _, frame in sim.frames(duration=1.05)]
    cells = [f for f in frames if f.arbitration_id & 0x3FF0000 == 0xEC0000]
    announced = [bytes(f.data[5:8]) for f in cells]
    assert announced.count(b"\x10\xff\x00") >= 2  # BatteryCells (500 ms) as BAMs
    assert announced.count(b"\xca\xfe\x00") >= 1  # DM1 with two DTCs: a BAM too
    decoder = CanDecoder("truck", databases)
    reader, samples = _run_reader(decoder, frames)
    by_flow: dict[str, int] = {}
    for sample in samples:
        by_flow[sample.flow] = by_flow.get(sample.flow, 0) + 1
    assert by_flow["truck.BatteryCells"] == announced.count(b"\x10\xff\x00")
    assert by_flow["truck.DM1"] == announced.count(b"\xca\xfe\x00")
    dm1 = _named(decoder, next(s for s in samples if s.flow == "truck.DM1"))
    assert (dm1["count"], dm1["spn_1"], dm1["source_address"]) == (2, 110, 0x21)
    c = reader.counters
    assert (c.get("unknown"), c.get("decode_errors"), c.get("tp_timeouts")) == (0, 0, 0)
    assert _stats(reader).balanced


PLAIN_DBC = """VERSION ""
NS_ :
BS_:
BU_: ECU
BO_ 2566847742 Fuel: 8 ECU
 SG_ FuelLevel : 8|8@1+ (0.4,0) [0|100] "%" ECU
"""


def test_protocol_j1939_on_the_bus_in_config(tmp_path: Path) -> None:
    """``protocol: j1939`` makes an unmarked DBC's 29-bit messages J1939; a bad value is named."""
    from daq_agent.agent import plan_agent
    from daq_agent.config import load_config
    from daq_agent.core.errors import ConfigError

    (tmp_path / "fuel.dbc").write_text(PLAIN_DBC)
    text = (
        "asset: truck\nbuses:\n  - name: j1\n    interface: virtual\n    channel: v\n"
        "    dbc: fuel.dbc\n    protocol: {protocol}\n"
    )
    config_path = tmp_path / "agent.yaml"
    config_path.write_text(text.format(protocol="j1939"))
    plan = plan_agent(load_config(config_path, env={}))
    names = {f.name: [c.name for c in f.channels] for f in plan.flows}
    assert names["j1.Fuel"] == ["FuelLevel", "source_address"]
    assert "j1.DM1" in names
    decoder = plan.sources[0].decoder
    assert decoder is not None
    sample = decoder.decode(0x18FEFC17, True, bytes([0, 250, 0, 0, 0, 0, 0, 0]), 1)
    assert isinstance(sample, Sample)
    assert sample.values == (100.0, 0x17)
    config_path.write_text(text.format(protocol="can"))
    plain = plan_agent(load_config(config_path, env={}))
    assert [f.name for f in plain.flows] == ["j1.Fuel"]  # plain CAN: exact ids, no DM1
    config_path.write_text(text.format(protocol="j1708"))
    with pytest.raises(ConfigError, match="protocol"):
        load_config(config_path, env={})


def test_decode_command_on_plain_candump_j1939(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], oracle: Any
) -> None:
    """``decode`` matches by PGN, reassembles a BAM, decodes DM1 and counts TP frames."""
    payload = bytes(range(20))
    bam = transport_frames(0xFF10, payload, 0x80)
    lines = [
        f" (1.{i:06d})  can0  {fid:08X}   [8]  {data.hex(' ').upper()}"
        for i, (fid, data) in enumerate(bam)
    ]
    lines.append(" (2.000000)  can0  18FEF121   [8]  00 34 12 00 00 00 00 00")
    dm1 = dm1_payload([DtcCode(523, 4, 1)], (1, 0, 0, 0))
    lines.append(f" (3.000000)  can0  18FECA00   [8]  {dm1.hex(' ').upper()}")
    log = tmp_path / "truck.log"
    log.write_text("\n".join(lines) + "\n")
    assert main(["decode", "--json", "--no-choices", str(DBC), str(log)]) == 0
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["message"] for r in records] == ["BatteryCells", "CCVS1", "DM1"]
    assert records[0]["signals"] == {
        **_expect(oracle, "BatteryCells", payload),
        "source_address": 0x80,
    }
    assert records[1]["signals"]["source_address"] == 0x21
    assert records[2]["signals"]["spn_0"] == 523
    assert "3 J1939 transport frames (0 TP timeouts, 0 TP aborts)" in captured.err
