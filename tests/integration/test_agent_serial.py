"""A serial device in the agent: a pty carrying NMEA sentences → SerialReader → local server."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from daq_agent.agent import Agent
from daq_agent.config import LocalTarget, load_config
from daq_agent.readers.base import ReaderState
from daq_agent.server.store import Store

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
GPS_DEFS = REPO / "configs" / "serial" / "gps_nmea.yaml"
GGA = b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n"
RMC = b"$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A\r\n"


def test_serial_device_frames_are_stored(tmp_path: Path) -> None:
    """Sentences written to a pty are decoded by the agent's serial reader and stored per flow."""
    master, slave = os.openpty()
    try:
        config_path = tmp_path / "agent.yaml"
        config_path.write_text(
            f"asset: serial-bench\nstate_dir: {tmp_path / 'state'}\n"
            f"serial:\n  - {{name: gps, port: '{os.ttyname(slave)}', baudrate: 115200,"
            f" defs: {GPS_DEFS}}}\n"
        )
        config = load_config(config_path, env={})
        agent = Agent(config)
        assert {f.name for f in agent.plan.flows} == {"gps.gga", "gps.rmc", "gps.vtg"}
        agent.start()
        try:
            assert agent.readers[0].wait_state(ReaderState.RUNNING, timeout=10)
            for i in range(50):
                os.write(master, GGA + RMC + b"garbage-between-frames\r\n")
                deadline = time.monotonic() + 10
                while agent.status().received < 3 * (i + 1):
                    assert time.monotonic() < deadline, "the reader never got the sentences"
                    time.sleep(0.002)
        finally:
            final = agent.stop()
    finally:
        os.close(master)
        os.close(slave)
    source = final.sources[0]
    assert (source.kind, source.decoded) == ("serial", 100)
    assert source.received == source.decoded + source.unknown + source.errors
    assert final.flusher.delivered == 100
    assert final.balanced
    assert isinstance(config.target, LocalTarget)
    with Store.open(config.target.db_path, readonly=True) as store:
        assert store.flow_counts(run_id=agent.run_id) == {"gps.gga": 50, "gps.rmc": 50}
