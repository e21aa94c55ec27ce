"""Errors raised by daq-agent.

Every error has one root, :class:`DaqError`, so a caller can catch everything the agent raises::

    DaqError
    ├── ConfigError                 a config, DBC or frame-definition file is wrong (names file/key)
    │   └── TelemetryConfigError    a telemetry config (flows/channels) is wrong
    ├── IngestionValidationError    a request does not match its flow (also a ValueError)
    ├── DecodeError                 a frame cannot be decoded (counted per frame, raised by tools)
    ├── ReaderError                 a bus, port or log cannot be opened or read
    ├── TransportError              the ingestion API could not be reached or answered an error
    │   ├── RpcStatusError          the API answered a gRPC status other than OK (a grpc.RpcError)
    │   └── SinkError               a sink's window failed; ``kind`` says retry, refused or auth
    └── SpoolError                  the on-disk spool cannot be written
"""

from __future__ import annotations

import enum


class FailureKind(enum.Enum):
    """What a failure means for the data that was being sent."""

    TRANSIENT = "transient"
    AUTH = "auth"
    REJECTED = "rejected"


class DaqError(Exception):
    """Root of every error daq-agent raises."""


class ConfigError(DaqError):
    """A configuration file is invalid.

    Attributes:
        source: the file (or other source) the error was found in, if known.
        key: the key path inside that file (``buses[0].dbc``), if known.
        line: the 1-based line, if known.
    """

    def __init__(
        self,
        reason: str,
        *,
        source: str | None = None,
        key: str | None = None,
        line: int | None = None,
    ) -> None:
        self.reason = reason
        self.source = source
        self.key = key
        self.line = line
        super().__init__(self._render())

    def _render(self) -> str:
        where = self.source or ""
        if self.line is not None:
            where = f"{where}:{self.line}" if where else f"line {self.line}"
        if self.key:
            where = f"{where}: {self.key}" if where else self.key
        return f"{where}: {self.reason}" if where else self.reason


class TelemetryConfigError(ConfigError):
    """A telemetry config (asset, flows, channels) is invalid."""


class IngestionValidationError(DaqError, ValueError):
    """A request or flow does not match the telemetry config it is ingested against."""


class DecodeError(DaqError):
    """A frame could not be decoded."""


class ReaderError(DaqError):
    """A bus, serial port or recorded log could not be opened or read."""


class TransportError(DaqError):
    """The ingestion API could not be reached, or failed."""


class RpcStatusError(TransportError):
    """The ingestion API answered with a gRPC status other than OK.

    Attributes:
        status_code: the ``grpc.StatusCode`` of the answer.
        status_details: the status message sent by the server.

    (The ingestion API raises :class:`daq_agent.ingestion.errors.RpcError`, which is also a
    ``grpc.RpcError`` with grpc's ``code()`` and ``details()`` methods.)
    """

    def __init__(self, code: object, details: str, *, method: str = "") -> None:
        self.status_code = code
        self.status_details = details
        self.method = method
        name = getattr(code, "name", str(code))
        where = f"{method}: " if method else ""
        super().__init__(f"{where}{name}: {details}")


class SpoolError(DaqError):
    """The on-disk spool cannot be written or trusted."""


class SinkError(TransportError):
    """A sink could not deliver a window; what that means for the data is in ``kind``.

    Attributes:
        kind: a :class:`FailureKind` (transient, auth or rejected).
        timed_out: the server did not answer a commit in time (a hung server or a dead path).
    """

    def __init__(self, message: str, kind: FailureKind, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.timed_out = timed_out
