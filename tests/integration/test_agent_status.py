"""The status line, the summary and the run loop of ``daq-agent run`` (in-process)."""

from __future__ import annotations

import io
from pathlib import Path

import can
import pytest

from daq_agent.agent import Agent
from daq_agent.commands.run import drive_agent
from daq_agent.config import load_config
from daq_agent.decode.dbc import load_database
from daq_agent.pipeline.status import (
    AgentStatus,
    FlusherStats,
    RingStats,
    SourceStats,
    format_count,
)
from daq_agent.sim.can import CanSimulator

REPO = Path(__file__).resolve().parents[2]
BENCH_DBC = REPO / "dbc" / "bench.dbc"


def status(received: int, *, time_s: float = 10.0, dropped: int = 0) -> AgentStatus:
    """A status whose every bucket is consistent for ``received`` decoded frames."""
    return AgentStatus(
        time_s=time_s,
        uptime_s=time_s,
        sources=(SourceStats("can0", "can", "running", received, received, 0, 0),),
        ring=RingStats(
            capacity=100,
            depth=0,
            high_water=5,
            put_count=received,
            got=received - dropped,
            dropped=dropped,
        ),
        flusher=FlusherStats(taken=received - dropped, delivered=received - dropped),
        run_name="r",
        target="local:x",
    )


def test_format_count_is_short() -> None:
    """Counts and rates render in at most a handful of characters."""
    assert [format_count(v) for v in (7, 999, 12_345, 4_560_000)] == ["7", "999", "12.3k", "4.56M"]


def test_line_rates_against_previous_snapshot() -> None:
    """The live line shows the rate since the previous snapshot and every bucket."""
    line = status(30_000, time_s=12.0).line(status(10_000, time_s=10.0))
    assert "in 10.0k/s" in line
    assert "rx 30.0k" in line
    assert "delivered 30.0k" in line
    assert "dropped" not in line


def test_balanced_detects_a_missing_sample() -> None:
    """A sample in no bucket makes the snapshot unbalanced; drops counted keep it balanced."""
    assert status(100, dropped=7).balanced
    broken = status(100)
    broken = AgentStatus(
        time_s=broken.time_s,
        uptime_s=broken.uptime_s,
        sources=broken.sources,
        ring=broken.ring,
        flusher=FlusherStats(taken=100, delivered=99),
    )
    assert not broken.balanced
    assert "NOT BALANCED" in broken.summary()[-1]


@pytest.mark.integration
def test_live_status_and_summary_of_a_replay_run(tmp_path: Path) -> None:
    """drive_agent refreshes one line with \\r on a terminal and returns once the replay ended."""
    log_path = tmp_path / "drive.asc"
    simulator = CanSimulator([load_database(BENCH_DBC)])
    with can.Logger(str(log_path)) as writer:
        for i, (_plan, msg) in enumerate(simulator.frames(count=600)):
            msg.timestamp = 1_750_000_000.0 + i * 0.002
            writer.on_message_received(msg)
    config_path = tmp_path / "agent.yaml"
    config_path.write_text(
        f"asset: live\nstate_dir: {tmp_path / 'state'}\n"
        f"replay:\n  - {{path: {log_path}, bus: can0, realtime: true, dbc: {BENCH_DBC}}}\n"
    )
    agent = Agent(load_config(config_path, env={}))
    agent.start()
    out = io.StringIO()
    final = drive_agent(agent, duration=60, out=out, live=True, refresh=0.1)
    text = out.getvalue()
    assert text.count("\r") >= 3  # refreshed in place while the 1.2 s log played
    assert "delivered" in text
    assert final.flusher.delivered == final.decoded == 600
    summary = "\n".join(final.summary())
    assert "replay replay-drive [ended]: received 600, decoded 600" in summary
    assert "accounting: balanced" in summary
