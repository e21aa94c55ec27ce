"""Serial frames end to end: simulator bytes on a pty → SerialReader → samples → a data stream of
IngestionService (sift_stream) → the local ingestion server, where every frame is stored with its
values."""

from __future__ import annotations

import os
import threading
import tty
from pathlib import Path

import pytest

from daq_agent.core.sample import Sample
from daq_agent.ingestion import IngestionService, TelemetryConfig, use_sift_channel
from daq_agent.readers.base import ReaderState
from daq_agent.readers.serial import SerialReader
from daq_agent.serialdefs import load_definitions
from daq_agent.server.local import LocalIngestServer
from daq_agent.server.store import Store
from daq_agent.sim.serial import SerialSimulator

pytestmark = pytest.mark.integration

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "serial"


@pytest.mark.parametrize("defs_name", ["imu_cobs.yaml", "gps_nmea.yaml"])
def test_pty_to_local_server(defs_name: str, local_server: LocalIngestServer) -> None:
    """Every simulated frame read from a pty is accepted by the server and stored with the
    values the reader decoded (enum keys, bools, strings, bytes, scaled doubles)."""
    defs = load_definitions(CONFIGS / defs_name)
    simulator = SerialSimulator(defs, rate=1000, seed=7)
    frames = list(simulator.generate(120))
    samples: list[Sample] = []
    lock = threading.Condition()

    def sink(sample: Sample) -> None:
        with lock:
            samples.append(sample)
            lock.notify_all()

    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        reader = SerialReader("dev1", os.ttyname(slave), {"baudrate": 115200}, defs, sink)
        with reader:
            assert reader.wait_state(ReaderState.RUNNING, timeout=5)
            os.write(master, b"".join(f.data for f in frames))
            with lock:
                assert lock.wait_for(lambda: len(samples) >= len(frames), timeout=10)
    finally:
        os.close(master)
        os.close(slave)
    flows = reader.flows
    # A keyless server takes any key; sift_stream needs a non-empty one.
    uri = f"127.0.0.1:{local_server.port}"
    with use_sift_channel({"uri": uri, "apikey": "any-key", "use_ssl": False}) as channel:
        service = IngestionService(
            channel,
            TelemetryConfig(
                asset_name="bench", ingestion_client_key=f"serial-{defs.name}", flows=flows
            ),
            end_stream_on_error=True,
        )
        with service.open_stream() as stream:
            stream.send_samples(samples)
    with Store.open(local_server.db_path, readonly=True) as store:
        stored = list(store.iter_samples())
        errors = store.count_validation_errors()
    assert errors == 0
    assert len(stored) == len(frames)
    names = {f.name: [c.name for c in f.channels] for f in flows}
    by_time = sorted(samples, key=lambda s: (s.timestamp_ns, s.flow))
    for want, got in zip(
        by_time, sorted(stored, key=lambda s: (s.timestamp_ns, s.flow)), strict=True
    ):
        assert got.flow == want.flow
        assert got.timestamp_ns == want.timestamp_ns
        expected = dict(zip(names[want.flow], want.values, strict=True))
        for name, value in expected.items():
            if isinstance(value, float):
                assert got.values[name] == pytest.approx(value, rel=1e-6), name
            else:
                assert got.values[name] == value, (name, got.values[name], value)
