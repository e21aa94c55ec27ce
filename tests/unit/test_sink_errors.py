"""The one mapping of transport failures to what they mean for the data (sinks.sift.sink_error)."""

from __future__ import annotations

import grpc
import pytest

from daq_agent.core.errors import (
    FailureKind,
    IngestionValidationError,
    RpcStatusError,
    SinkError,
    TransportError,
)
from daq_agent.ingestion.sift_stream import StreamFailed, StreamTimeout
from daq_agent.sinks.sift import sink_error

TRANSIENT = [
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.NOT_FOUND,
]
# sift_stream's own wording (tonic's status descriptions), as it raised them against a server
# that answered these statuses
STREAM_INVALID = (
    "[StreamError]: final stream flush to Sift failed during shutdown\n\n[cause]:\n - code: "
    "'Client specified an invalid argument', message: \"unknown run 'x'\""
)
STREAM_UNAUTHENTICATED = (
    "[GrpcConnectError]: failed to connect to Sift\n\n[cause]:\n - code: 'The request does not "
    'have valid authentication credentials\', message: "missing or invalid API key"'
)
STREAM_REFUSED = (
    "[GrpcConnectError]: failed to connect to Sift\n\n[cause]:\n - code: 'The service is "
    'currently unavailable\', message: "tcp connect error", ConnectionRefused'
)


@pytest.mark.parametrize("code", TRANSIENT)
def test_transient_statuses_are_retried(code: grpc.StatusCode) -> None:
    """Server away, overloaded, reset or slow (or anything unknown): retried forever."""
    assert sink_error(RpcStatusError(code, "x")).kind is FailureKind.TRANSIENT


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED]
)
def test_a_refused_key_is_auth(code: grpc.StatusCode) -> None:
    assert sink_error(RpcStatusError(code, "bad key")).kind is FailureKind.AUTH


def test_requests_that_can_never_be_accepted_are_rejected() -> None:
    """INVALID_ARGUMENT, a message too large and a sample that does not fit its flow."""
    assert sink_error(RpcStatusError(grpc.StatusCode.INVALID_ARGUMENT, "bad")).kind is (
        FailureKind.REJECTED
    )
    too_large = RpcStatusError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (5 vs. 4)"
    )
    assert sink_error(too_large).kind is FailureKind.REJECTED
    assert sink_error(IngestionValidationError("2 values for 3 channels")).kind is (
        FailureKind.REJECTED
    )


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        (STREAM_INVALID, FailureKind.REJECTED),
        (STREAM_UNAUTHENTICATED, FailureKind.AUTH),
        (STREAM_REFUSED, FailureKind.TRANSIENT),
    ],
)
def test_sift_stream_errors_by_their_wording(text: str, kind: FailureKind) -> None:
    """sift_stream raises RuntimeError; its message says the status. One line in the result."""
    error = sink_error(RuntimeError(text))
    assert error.kind is kind
    assert "\n" not in str(error)


@pytest.mark.parametrize(
    ("codes", "kind"),
    [
        ({3: 1}, FailureKind.REJECTED),
        ({16: 2}, FailureKind.AUTH),
        ({7: 1}, FailureKind.AUTH),
        ({14: 1}, FailureKind.TRANSIENT),
        ({}, FailureKind.TRANSIENT),  # reconnected (a retry) without a status: a broken path
    ],
)
def test_a_stream_that_failed_inside_a_window(codes: dict[int, int], kind: FailureKind) -> None:
    """The statuses the failed stream ended with decide: refused, auth, or re-send."""
    assert sink_error(StreamFailed("failed", codes)).kind is kind


def test_a_refusal_seen_only_in_the_stream_statuses_names_the_status() -> None:
    """sift_stream keeps only the status of a stream the server ended early: the dead-letter
    reason names it (OK, the count of streams that ended cleanly, is left out)."""
    error = sink_error(StreamFailed("failed", {0: 1, 3: 1}))
    assert str(error).startswith("the server ended the stream with INVALID_ARGUMENT (")


def test_a_timeout_is_transient_and_says_so() -> None:
    error = sink_error(StreamTimeout("no answer within 3.0 s"))
    assert error.kind is FailureKind.TRANSIENT
    assert error.timed_out


def test_plain_transport_errors_are_transient_and_sink_errors_pass_through() -> None:
    assert sink_error(TransportError("connection lost")).kind is FailureKind.TRANSIENT
    original = SinkError("x", FailureKind.AUTH)
    assert sink_error(original) is original


def test_the_key_never_shows() -> None:
    """A library that quotes the key in its error: the message has it replaced."""
    key = "sk-live-0123456789abcdef"
    error = sink_error(RuntimeError(f"bad header 'authorization: Bearer {key}'"), key)
    assert key not in str(error)
    assert "<redacted>" in str(error)
