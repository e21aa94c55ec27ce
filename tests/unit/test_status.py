"""The status snapshot's wording: errors split by kind, what was lost."""

from __future__ import annotations

from daq_agent.pipeline.status import AgentStatus, FlusherStats, RingStats, SourceStats


def test_errors_are_split_by_kind_in_the_summary_and_the_snapshot() -> None:
    imu = SourceStats(
        "imu",
        "serial",
        "running",
        received=10,
        decoded=5,
        unknown=0,
        errors=5,
        reopens=0,
        counters={"checksum_errors": 3, "framing_errors": 2, "unknown_frames": 0},
    )
    status = AgentStatus(
        time_s=1.0,
        uptime_s=1.0,
        sources=(imu,),
        ring=RingStats(8, 0, 5, 5, 5, 0),
        flusher=FlusherStats(taken=5, delivered=5),
    )
    line = next(line for line in status.summary() if "imu" in line)
    assert "errors 5 (checksum_errors 3, framing_errors 2)" in line
    assert status.as_dict()["sources"][0]["errors_by_kind"] == {
        "checksum_errors": 3,
        "framing_errors": 2,
    }
    assert "lost: nothing" in status.summary()
