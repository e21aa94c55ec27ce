"""The full-jitter back-off and the dead-letter file format (the classification of failures is
the sink's: tests/unit/test_sink_errors.py)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from daq_agent.core.backoff import Backoff, FailureKind, RetryPolicy
from daq_agent.core.errors import ConfigError
from daq_agent.pipeline.deadletter import DeadLetter, read_dead_letters


def test_full_jitter_stays_under_a_growing_capped_bound() -> None:
    """Each delay lies in [0, min(max, initial * 2**(n-1))]; the cap grows, then stays."""
    backoff = Backoff(RetryPolicy(initial_s=0.1, max_s=1.0), random.Random(3))
    caps = []
    for _ in range(8):
        delay = backoff.failure()
        cap = backoff.cap()
        caps.append(cap)
        assert 0.0 <= delay <= cap
    assert caps[:5] == [0.1, 0.2, 0.4, 0.8, 1.0]
    assert caps[-1] == 1.0
    backoff.reset()
    assert backoff.cap() == 0.1


def test_jitter_spreads_delays() -> None:
    """Full jitter: delays at one step are spread over the range, not fixed."""
    delays = []
    for seed in range(50):
        backoff = Backoff(RetryPolicy(initial_s=1.0, max_s=1.0), random.Random(seed))
        delays.append(backoff.failure())
    assert min(delays) < 0.25
    assert max(delays) > 0.75


def test_auth_failures_wait_long() -> None:
    """Authentication failures wait between half and all of auth_max_s, whatever the streak."""
    backoff = Backoff(RetryPolicy(initial_s=0.01, max_s=0.05, auth_max_s=30.0), random.Random(1))
    for _ in range(20):
        assert 15.0 <= backoff.failure(FailureKind.AUTH) <= 30.0


def test_bad_policy_is_a_config_error() -> None:
    """Non-positive delays or a cap under the first delay are refused."""
    with pytest.raises(ConfigError):
        RetryPolicy(initial_s=0)
    with pytest.raises(ConfigError):
        RetryPolicy(initial_s=2.0, max_s=1.0)


def test_dead_letter_round_trip_and_torn_tail(tmp_path: Path) -> None:
    """Entries read back in order with their reason; a torn last entry is not returned."""
    path = tmp_path / "sub" / "dead.dqdl"
    letter = DeadLetter(path)
    letter.append(b"\x01\x02", "INVALID_ARGUMENT: bad")
    letter.append(b"", "too large")
    assert letter.count == 2
    entries = list(read_dead_letters(path))
    assert [(e.payload, e.reason) for e in entries] == [
        (b"\x01\x02", "INVALID_ARGUMENT: bad"),
        (b"", "too large"),
    ]
    with open(path, "ab") as fh:
        fh.write(b"DQDL\x00\x00")
    assert len(list(read_dead_letters(path))) == 2
