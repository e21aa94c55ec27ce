"""Retries: which failures are worth retrying, and how long to wait before the next attempt.

Every failure of the ingestion stream is sorted into one :class:`FailureKind` by :func:`classify`:

``TRANSIENT``
    The server is away, overloaded, reset the connection, or did not answer in time
    (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL, ABORTED, UNKNOWN, CANCELLED,
    a lost connection). Retried forever with a capped exponential back-off and full jitter.
``AUTH``
    UNAUTHENTICATED or PERMISSION_DENIED: retried forever too, but slowly (``auth_max_s``), since
    only a person can fix the key; the caller logs it loudly once per streak.
``REJECTED``
    The server can never accept one of the requests (INVALID_ARGUMENT: a malformed or invalid
    request; a request larger than the server takes). Retrying the same bytes cannot help: the
    caller isolates the request and moves it to the dead-letter file.

Anything else (an unknown status, NOT_FOUND, FAILED_PRECONDITION…) is treated as transient: the
promise is to never give up on data while the failure might go away.
"""

from __future__ import annotations

import grpc

from daq_agent.core.backoff import FailureKind
from daq_agent.core.errors import RpcStatusError

__all__ = ["FailureKind", "classify"]

_AUTH_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
_TOO_LARGE_HINTS = ("larger than", "too large", "exceeds maximum", "message length")


def classify(exc: BaseException) -> FailureKind:
    """Sort a failure of the ingestion stream into a :class:`FailureKind`.

    Args:
        exc: the error (an :class:`RpcStatusError` carries the gRPC status code; any other
            error, e.g. a lost connection, is transient).

    Returns:
        The kind of failure.
    """
    if not isinstance(exc, RpcStatusError):
        return FailureKind.TRANSIENT
    code = exc.code
    if code in _AUTH_CODES:
        return FailureKind.AUTH
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return FailureKind.REJECTED
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        details = str(exc.details).lower()
        if any(hint in details for hint in _TOO_LARGE_HINTS):
            return FailureKind.REJECTED
    return FailureKind.TRANSIENT
