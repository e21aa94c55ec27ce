"""The seam between the HTTP/2 gRPC server core (:mod:`daq_agent.h2grpc.server`) and the services.

Handlers run on the server's event-loop thread, one call at a time, and take and return serialized
protobuf bytes. A handler ends a call with a non-OK status by raising :class:`RpcError`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import grpc

__all__ = [
    "CallContext",
    "RpcError",
    "StreamHandler",
    "StreamHandlerFactory",
    "UnaryHandler",
]


class RpcError(Exception):
    """Raised by a handler to end its call with ``code`` and ``message``."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass(slots=True)
class CallContext:
    """What a handler knows about its call."""

    method: str
    """The full method path, ``/sift.ingest.v1.IngestService/IngestWithConfigDataStream``."""
    metadata: Mapping[str, str] = field(default_factory=dict)
    """Request headers other than pseudo-headers, names in lower case."""
    peer: str = ""
    """The client's address, ``127.0.0.1:54321``."""

    def __repr__(self) -> str:  # the authorization header carries the API key: never show it
        shown = {k: "<redacted>" if k in _SECRET_HEADERS else v for k, v in self.metadata.items()}
        return f"CallContext(method={self.method!r}, metadata={shown!r}, peer={self.peer!r})"


_SECRET_HEADERS = frozenset({"authorization", "x-api-key"})


UnaryHandler = Callable[[bytes, CallContext], bytes]
"""Handles one unary call: serialized request in, serialized response out."""


class StreamHandler(Protocol):
    """Handles one client-streaming call."""

    def on_messages(self, messages: list[bytes]) -> None:
        """Take the next serialized requests of the stream (a batch, in order).

        Raises:
            RpcError: to end the call with that status; no more messages are delivered.
        """

    def on_end(self) -> bytes:
        """The client closed its side: finish (commit) and return the serialized response.

        Raises:
            RpcError: to end the call with that status instead of OK.
        """

    def on_abort(self) -> None:
        """The call was cancelled, reset or its connection lost; no response will be sent."""


StreamHandlerFactory = Callable[[CallContext], StreamHandler]
"""Creates the handler of one client-streaming call."""
