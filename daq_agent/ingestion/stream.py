"""Client streams of ``IngestWithConfigDataStream`` carrying serialized requests.

Two ways to carry one:

- :class:`H2IngestStream`, the fast path: an HTTP/2 connection of our own
  (:mod:`daq_agent.h2grpc.client`) that packs many requests into each DATA frame. Used whenever the
  channel is a :class:`~daq_agent.ingestion.transport.SiftChannel` (it knows the address, TLS
  setting and API key).
- :class:`GrpcioIngestStream`, for any other ``grpc.Channel`` a user hands in: grpcio's
  ``stream_unary`` fed from a queue.

Both answer :meth:`close` only once the server has answered the whole stream with OK, which for the
local server means every request of the stream is committed to its SQLite file.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Protocol

import grpc

from daq_agent import methods
from daq_agent.core.errors import RpcStatusError, TransportError
from daq_agent.h2grpc.client import ClientStream, H2Channel
from daq_agent.ingestion.transport import map_rpc_errors

__all__ = ["GrpcioIngestStream", "H2IngestStream", "IngestStream"]

_END = object()


class IngestStream(Protocol):
    """One open ``IngestWithConfigDataStream`` call."""

    def send_serialized(self, payloads: Sequence[bytes]) -> None:
        """Send serialized ``IngestWithConfigDataStreamRequest`` messages, in order.

        Raises:
            TransportError: the stream has failed (RpcStatusError when the server ended it).
        """

    def close(self, timeout: float | None = None) -> None:
        """End the stream and wait for the answer; returns when the server answered OK.

        Raises:
            TransportError: the server answered an error (RpcStatusError), the connection failed,
                or no answer came within ``timeout``.
        """

    def cancel(self) -> None:
        """Abandon the stream without waiting (idempotent)."""


class H2IngestStream:
    """An ingest stream on a coalescing HTTP/2 connection.

    Args:
        channel: the connection.
        timeout: a deadline for the whole call, sent to the server (None: none).
        send_timeout: the longest one send may wait for the server's flow-control window (a
            server that stopped reading); then it fails with a TransportError (None: no limit).
    """

    def __init__(
        self,
        channel: H2Channel,
        *,
        timeout: float | None = None,
        send_timeout: float | None = None,
    ) -> None:
        self._stream: ClientStream = channel.stream(
            methods.INGEST_WITH_CONFIG_DATA_STREAM, timeout=timeout
        )
        self._send_timeout = send_timeout

    def send_serialized(self, payloads: Sequence[bytes]) -> None:
        """See :meth:`IngestStream.send_serialized`."""
        self._stream.send(payloads, timeout=self._send_timeout)

    def close(self, timeout: float | None = None) -> None:
        """See :meth:`IngestStream.close`."""
        self._stream.close(timeout)

    def cancel(self) -> None:
        """See :meth:`IngestStream.cancel`."""
        self._stream.cancel()


class GrpcioIngestStream:
    """An ingest stream on any grpcio channel (slower: grpcio handles one message at a time)."""

    def __init__(self, channel: grpc.Channel, *, timeout: float | None = None) -> None:
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        call = channel.stream_unary(
            methods.INGEST_WITH_CONFIG_DATA_STREAM,
            request_serializer=None,
            response_deserializer=None,
        )
        self._future = call.future(self._requests(), timeout=timeout)
        self._done = threading.Event()
        self._future.add_done_callback(lambda _f: self._done.set())
        self._ended = False

    def _requests(self) -> Iterator[bytes]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            yield from item  # type: ignore[misc]

    def send_serialized(self, payloads: Sequence[bytes]) -> None:
        """See :meth:`IngestStream.send_serialized`."""
        if self._done.is_set():
            self._raise()
            raise TransportError("stream already finished")
        if self._ended:
            raise TransportError("stream already closed")
        self._queue.put(list(payloads))

    def close(self, timeout: float | None = None) -> None:
        """See :meth:`IngestStream.close`."""
        if not self._ended:
            self._ended = True
            self._queue.put(_END)
        if not self._done.wait(timeout):
            self._future.cancel()  # type: ignore[no-untyped-call]
            raise RpcStatusError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no answer within {timeout} s",
                method=methods.INGEST_WITH_CONFIG_DATA_STREAM,
            )
        self._raise()

    def cancel(self) -> None:
        """See :meth:`IngestStream.cancel`."""
        if not self._ended:
            self._ended = True
            self._queue.put(_END)
        self._future.cancel()  # type: ignore[no-untyped-call]

    def _raise(self) -> None:
        if self._future.cancelled():
            raise RpcStatusError(
                grpc.StatusCode.CANCELLED,
                "stream cancelled",
                method=methods.INGEST_WITH_CONFIG_DATA_STREAM,
            )
        error = self._future.exception()
        if error is not None:
            with map_rpc_errors(methods.INGEST_WITH_CONFIG_DATA_STREAM):
                raise error
