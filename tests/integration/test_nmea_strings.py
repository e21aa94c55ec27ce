"""NMEA letter fields (RMC status A/V, mode letters) keep their letter all the way: pty →
SerialReader → sift_stream → the local server's SQLite store → ``daq-agent export``."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import threading
import time
import tty
from pathlib import Path

import pytest

from daq_agent.core.model import ChannelDataType
from daq_agent.core.sample import Sample
from daq_agent.ingestion import IngestionService, TelemetryConfig, use_sift_channel
from daq_agent.readers.base import ReaderState
from daq_agent.readers.serial import SerialReader
from daq_agent.serialdefs import SerialCodec, load_definitions, loads_definitions
from daq_agent.server.local import LocalIngestServer
from daq_agent.server.store import Store

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
GPS = ROOT / "configs" / "serial" / "gps_nmea.yaml"
DAQ_AGENT = Path(sys.executable).with_name("daq-agent")
LETTERS = [("A", "A"), ("V", "N"), ("A", "F"), ("V", "R")]  # (status, mode), NMEA 4.1 F/R too


def test_status_and_mode_letters_reach_the_store_and_export(
    local_server: LocalIngestServer,
) -> None:
    defs = load_definitions(GPS)
    codec = SerialCodec(defs, device="gps")
    rmc = codec.frame("rmc")
    types = {c.name: c.config.data_type for c in rmc.channels}
    assert types["status"] is ChannelDataType.STRING
    assert types["mode"] is ChannelDataType.STRING
    wire = b"".join(
        codec.encode(
            "rmc",
            {
                "utc_time": 3600.0 + i,
                "status": status,
                "latitude": 48.1,
                "longitude": -11.5,
                "speed": 1.5,
                "date": "2026-12-01",
                "mode": mode,
            },
        )
        for i, (status, mode) in enumerate(LETTERS)
    )
    assert b",A,4806.0000000,N," in wire
    assert wire.count(b"$GPRMC") == len(LETTERS)
    samples: list[Sample] = []
    cond = threading.Condition()

    def sink(sample: Sample) -> None:
        with cond:
            samples.append(sample)
            cond.notify_all()

    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        reader = SerialReader("gps", os.ttyname(slave), {"baudrate": 9600}, defs, sink)
        with reader:
            assert reader.wait_state(ReaderState.RUNNING, timeout=5)
            os.write(master, wire)
            with cond:
                assert cond.wait_for(lambda: len(samples) >= len(LETTERS), timeout=10)
    finally:
        os.close(master)
        os.close(slave)
    uri = f"127.0.0.1:{local_server.port}"
    with use_sift_channel({"uri": uri, "apikey": "any-key", "use_ssl": False}) as channel:
        service = IngestionService(
            channel,
            TelemetryConfig(
                asset_name="bench", ingestion_client_key="gps-letters", flows=reader.flows
            ),
            end_stream_on_error=True,
        )
        with service.open_stream() as stream:
            stream.send_samples(samples)
    with Store.open(local_server.db_path, readonly=True) as store:
        stored = sorted(store.iter_samples(), key=lambda s: s.timestamp_ns)
        assert store.count_validation_errors() == 0
    assert [(s.values["status"], s.values["mode"]) for s in stored] == LETTERS
    result = subprocess.run(
        [
            str(DAQ_AGENT),
            "export",
            "--db",
            str(local_server.db_path),
            "--wide",
            "--flow",
            "gps.rmc",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    status_column = next(k for k in rows[0] if k.endswith("status"))
    mode_column = next(k for k in rows[0] if k.endswith("mode"))
    assert [(r[status_column], r[mode_column]) for r in rows] == LETTERS


def test_text_outside_a_value_table_is_counted_by_the_reader() -> None:
    """With an enum table instead, a letter the table lacks leaves the channel empty and is
    counted in the reader's (the status') unmatched_values; the sample is kept."""
    defs = loads_definitions(
        "format: nmea\nframes:\n  - name: rmc\n    id: RMC\n    fields:\n"
        "      - {name: utc_time, type: time}\n"
        "      - {name: status, type: string, values: {A: valid, V: void}}\n"
    )
    codec = SerialCodec(defs, device="gps")
    good = codec.encode("rmc", {"utc_time": 1.0, "status": 0})
    body = "GPRMC,000002.000,X"
    checksum = 0
    for char in body.encode():
        checksum ^= char
    odd = f"${body}*{checksum:02X}\r\n".encode()
    samples: list[Sample] = []
    cond = threading.Condition()

    def sink(sample: Sample) -> None:
        with cond:
            samples.append(sample)
            cond.notify_all()

    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        reader = SerialReader("gps", os.ttyname(slave), {"baudrate": 9600}, defs, sink)
        with reader:
            assert reader.wait_state(ReaderState.RUNNING, timeout=5)
            os.write(master, good + odd)
            with cond:
                assert cond.wait_for(lambda: len(samples) >= 2, timeout=10)
            deadline = time.monotonic() + 10  # the counters are synced right after the read
            while reader.counters.get("decoded") < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            counters = reader.counters.snapshot()
    finally:
        os.close(master)
        os.close(slave)
    assert [s.values for s in samples] == [(1.0, 0), (2.0, None)]
    assert counters["unmatched_values"] == 1
    assert counters["decoded"] == 2
