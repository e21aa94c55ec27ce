"""Retry classification, the full-jitter back-off, and the dead-letter file format."""

from __future__ import annotations

import random
from pathlib import Path

import grpc
import pytest

from daq_agent.core.backoff import Backoff, FailureKind, RetryPolicy
from daq_agent.core.errors import ConfigError, RpcStatusError, TransportError
from daq_agent.pipeline.deadletter import DeadLetter, read_dead_letters
from daq_agent.pipeline.retry import classify

TRANSIENT = [
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
]


@pytest.mark.parametrize("code", TRANSIENT)
def test_transient_codes_are_retried(code: grpc.StatusCode) -> None:
    """Server away, overloaded, reset or slow: transient (retried forever)."""
    assert classify(RpcStatusError(code, "x")) is FailureKind.TRANSIENT


def test_connection_errors_are_transient() -> None:
    """A TransportError without a status (a lost connection) is transient."""
    assert classify(TransportError("connection lost")) is FailureKind.TRANSIENT


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED]
)
def test_auth_codes(code: grpc.StatusCode) -> None:
    """A refused key is its own kind (slow retries)."""
    assert classify(RpcStatusError(code, "bad key")) is FailureKind.AUTH


def test_refused_requests() -> None:
    """INVALID_ARGUMENT and a message too large are requests the server can never accept."""
    assert classify(RpcStatusError(grpc.StatusCode.INVALID_ARGUMENT, "bad")) is (
        FailureKind.REJECTED
    )
    too_large = RpcStatusError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (5 vs. 4)"
    )
    assert classify(too_large) is FailureKind.REJECTED


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
