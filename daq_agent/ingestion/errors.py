"""Errors of the ingestion API for gRPC statuses: daq-agent errors that are also ``grpc.RpcError``.

:class:`RpcError` is what every call of the library raises for an answer with a status other than
OK, whether the call went through grpcio (unary calls) or through sift_stream (data streams). It
is a :class:`~daq_agent.core.errors.RpcStatusError` (so a :class:`~daq_agent.core.errors.DaqError`)
and a :class:`grpc.RpcError` with grpc's accessors, so both of these work::

    except grpc.RpcError as exc:
        if exc.code() is grpc.StatusCode.UNAUTHENTICATED: ...
    except DaqError: ...

Like grpc's errors, it exposes the status through the *methods* ``code()`` and ``details()``; the
values are also the attributes ``status_code`` and ``status_details``.

:func:`stream_error` is the one place where a failure of sift_stream becomes such an error: the
status is read from the stream's metrics (a stream that failed and was reconnected) or from the
text of its error, which names the status by tonic's description of the code.
"""

from __future__ import annotations

import re
from typing import Any

import grpc
import sift_stream_bindings as ssb

from daq_agent.core.errors import DaqError, RpcStatusError
from daq_agent.ingestion.sift_stream import StreamFailed, StreamTimeout

__all__ = ["RpcError", "stream_error"]

_REDACTED = "<redacted>"

# How tonic (sift_stream's gRPC library) describes each status code in its errors.
_DESCRIPTIONS: dict[str, grpc.StatusCode] = {
    "The operation completed successfully": grpc.StatusCode.OK,
    "The operation was cancelled": grpc.StatusCode.CANCELLED,
    "Unknown error": grpc.StatusCode.UNKNOWN,
    "Client specified an invalid argument": grpc.StatusCode.INVALID_ARGUMENT,
    "Deadline expired before operation could complete": grpc.StatusCode.DEADLINE_EXCEEDED,
    "Some requested entity was not found": grpc.StatusCode.NOT_FOUND,
    "Some entity that we attempted to create already exists": grpc.StatusCode.ALREADY_EXISTS,
    "The caller does not have permission to execute the specified operation": (
        grpc.StatusCode.PERMISSION_DENIED
    ),
    "Some resource has been exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "The system is not in a state required for the operation's execution": (
        grpc.StatusCode.FAILED_PRECONDITION
    ),
    "The operation was aborted": grpc.StatusCode.ABORTED,
    "Operation was attempted past the valid range": grpc.StatusCode.OUT_OF_RANGE,
    "Operation is not implemented or not supported": grpc.StatusCode.UNIMPLEMENTED,
    "Internal error": grpc.StatusCode.INTERNAL,
    "The service is currently unavailable": grpc.StatusCode.UNAVAILABLE,
    "Unrecoverable data loss or corruption": grpc.StatusCode.DATA_LOSS,
    "The request does not have valid authentication credentials": (grpc.StatusCode.UNAUTHENTICATED),
}
_CODE = re.compile(r"code: '([^']*)'")
_MESSAGE = re.compile(r'message: "((?:[^"\\]|\\.)*)"')
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


class RpcError(RpcStatusError, grpc.RpcError):
    """The ingestion API answered a gRPC status other than OK.

    Args:
        code: the status code.
        details: the status message (never holds the API key).
        method: the gRPC method path, if known.

    Attributes:
        status_code: the :class:`grpc.StatusCode`, also returned by :meth:`code`.
        status_details: the status message, also returned by :meth:`details`.
        method: the gRPC method path ("" when unknown).
    """

    def __init__(self, code: grpc.StatusCode, details: str, *, method: str = "") -> None:
        super().__init__(code, details, method=method)
        self._grpc_code = code

    def code(self) -> grpc.StatusCode:
        """The status code (as ``grpc.Call.code()``)."""
        return self._grpc_code

    def details(self) -> str:
        """The status message (as ``grpc.Call.details()``)."""
        return self.status_details

    def trailing_metadata(self) -> tuple[Any, ...]:
        """The trailing metadata (none is kept)."""
        return ()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.status_code, self.status_details, self.method))


def _rebuild(code: grpc.StatusCode, details: str, method: str) -> RpcError:
    return RpcError(code, details, method=method)


def _scrub(text: str, secret: str | None) -> str:
    return text.replace(secret, _REDACTED) if secret else text


def _from_statuses(statuses: dict[int, int]) -> grpc.StatusCode:
    """The status a failed window reports: its most frequent non-OK status, else UNAVAILABLE."""
    failed = {number: n for number, n in statuses.items() if number != 0}
    if not failed:
        return grpc.StatusCode.UNAVAILABLE  # ended early, or reconnected without a status
    number = max(failed, key=lambda k: failed[k])
    return _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def stream_error(exc: BaseException, method: str = "", secret: str | None = None) -> DaqError:
    """The daq-agent error for a failure of a sift_stream data stream.

    * a window whose stream failed and was reconnected: :class:`RpcError` with the status the
      failed stream ended with (``UNAVAILABLE`` when it ended without one);
    * no answer in time: :class:`RpcError` ``DEADLINE_EXCEEDED``;
    * a rate limit: :class:`RpcError` ``RESOURCE_EXHAUSTED``;
    * any other error of the bindings: :class:`RpcError` with the status its text names
      (``UNKNOWN`` when it names none);
    * a daq-agent error (a sample that does not fit its channel…) is returned as it is.

    The message never holds ``secret``.
    """
    if isinstance(exc, RpcError):
        return exc
    if isinstance(exc, StreamFailed):
        details = (
            f"the stream failed and was reconnected before its close (retries {exc.retries}, "
            f"streams ended by status {exc.codes}): what it carried may not be stored"
        )
        return RpcError(_from_statuses(exc.codes), details, method=method)
    if isinstance(exc, StreamTimeout):
        return RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, _scrub(str(exc), secret), method=method)
    if isinstance(exc, DaqError):
        return exc
    text = " ".join(_scrub(str(exc), secret).split())  # the bindings' errors span lines
    if isinstance(exc, ssb.RateLimitedErrorPy):
        return RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, text, method=method)
    found = _CODE.search(text)
    code = _DESCRIPTIONS.get(found.group(1)) if found else None
    if code is None or code is grpc.StatusCode.OK:
        return RpcError(grpc.StatusCode.UNKNOWN, text, method=method)
    message = _MESSAGE.search(text, found.end()) if found else None
    details = message.group(1) if message else text
    return RpcError(code, details, method=method)
