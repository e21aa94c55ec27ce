"""Data streams of the ingestion API, on Sift's own streaming client (sift_stream).

:meth:`IngestionService.open_stream` returns an :class:`IngestStream`: one
``IngestWithConfigDataStream`` call, built, sent on, then closed once. :meth:`IngestStream.close`
returns only when the API answered the whole stream with OK, which acknowledges everything the
stream carried (the local server answers after committing it to its SQLite file)::

    with service.open_stream() as stream:          # closed (committed) on leaving the block,
        stream.send(*requests)                      # cancelled if the block raises
        stream.send_samples([Sample("readings", time.time_ns(), (3.3, 7))])

Requests are the protobuf ``IngestWithConfigDataStreamRequest`` messages of
:meth:`IngestionService.create_ingestion_request`; samples are plain Python values in the flow's
channel order (``None`` for empty), the faster path: no protobuf is built. With lazy flow creation,
flows not yet registered are registered before they are sent.

A stream is a :class:`~daq_agent.ingestion.sift_stream.Window`: sift_stream reconnects a failed
stream by itself, and what the failed stream carried may be lost, so a stream that failed and
was reconnected before :meth:`~IngestStream.close` fails the close with an
:class:`~daq_agent.ingestion.errors.RpcError` (with the status the failed stream ended with): the
caller sends it again (the local server stores a re-sent sample once). Building a stream costs a
few unary calls (about 10 ms on loopback): send many requests per stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any

import sift_stream_bindings as ssb

from daq_agent import methods
from daq_agent._proto.sift.ingest.v1.ingest_pb2 import (
    IngestWithConfigDataChannelValue,
    IngestWithConfigDataStreamRequest,
)
from daq_agent.core.errors import DaqError, TransportError
from daq_agent.core.sample import Sample
from daq_agent.ingestion.errors import stream_error
from daq_agent.ingestion.sift_stream import RequestBuilder, StreamSettings, Window

if TYPE_CHECKING:
    from daq_agent.ingestion.service import IngestionService
    from daq_agent.ingestion.transport import SiftChannel

__all__ = ["DEFAULT_STREAM_TIMEOUT_SEC", "IngestStream", "to_stream_request"]

DEFAULT_STREAM_TIMEOUT_SEC = 60.0
"""The longest building a stream, one send or the close may take, when not given."""

_METHOD = methods.INGEST_WITH_CONFIG_DATA_STREAM
_CAPACITY = 16_384  # sift_stream's queue, in requests (allocated per stream)
_CHUNK = 4_096  # requests per call into the bindings, so each one returns well within a timeout

_V = ssb.IngestWithConfigDataChannelValuePy
_EMPTY = _V.empty()
_REQUEST = ssb.IngestWithConfigDataStreamRequestPy
_FROM_TIMESTAMP = ssb.TimeValuePy.from_timestamp
_WHICH = IngestWithConfigDataChannelValue.WhichOneof
# One converter per oneof field of a channel value (None: no field set, sent as empty). Looked up
# by the unbound WhichOneof, this is about 1 µs per value, half the cost of a generic getattr.
_CONVERT: dict[str | None, Callable[[IngestWithConfigDataChannelValue], Any]] = {
    None: lambda _v: _EMPTY,
    "empty": lambda _v: _EMPTY,
    "double": lambda v: _V.double(v.double),
    "float": lambda v: _V.float(v.float),
    "string": lambda v: _V.string(v.string),
    "bool": lambda v: _V.bool(v.bool),
    "int32": lambda v: _V.int32(v.int32),
    "uint32": lambda v: _V.uint32(v.uint32),
    "int64": lambda v: _V.int64(v.int64),
    "uint64": lambda v: _V.uint64(v.uint64),
    "enum": lambda v: _V.enum_value(v.enum),
    "bit_field": lambda v: _V.bitfield(v.bit_field),
    "bytes": lambda v: _V.bytes(v.bytes),
}


def to_stream_request(request: IngestWithConfigDataStreamRequest) -> Any:
    """The sift_stream ``IngestWithConfigDataStreamRequestPy`` carrying the same fields.

    A channel value with no type set is sent as empty.
    """
    timestamp = None
    if request.HasField("timestamp"):
        stamp = request.timestamp
        timestamp = _FROM_TIMESTAMP(stamp.seconds, stamp.nanos)
    convert = _CONVERT
    which = _WHICH
    return _REQUEST(
        request.ingestion_config_id,
        request.flow,
        timestamp,
        [convert[which(value, "type")](value) for value in request.channel_values],
        request.run_id,
        request.end_stream_on_validation_error,
        request.organization_id,
    )


class IngestStream:
    """One data stream of an :class:`IngestionService`; see the module's documentation.

    Use a stream from one thread at a time (streams of one service may run in parallel).

    Args:
        service: the service whose ingestion config, run and flows the data belongs to.
        channel: the channel the service was built on (its address, TLS setting and key).
        timeout: the longest building the stream, one send or the close may take, in seconds.

    Raises:
        RpcError: the API refused the stream (``UNAUTHENTICATED`` for a wrong key) or could not
            be reached (``UNAVAILABLE``), or did not answer in time (``DEADLINE_EXCEEDED``).
    """

    def __init__(self, service: IngestionService, channel: SiftChannel, *, timeout: float) -> None:
        self._service = service
        self._secret = channel.api_key or None
        self._builder: RequestBuilder | None = None
        self._done = False
        self.sent = 0
        """How many requests were sent on the stream."""
        settings = StreamSettings(
            uri=channel.target,
            use_tls=channel.use_ssl,
            asset=service.asset_name,
            client_key=service.ingestion_config.client_key,
            capacity=_CAPACITY,
            timeout_s=timeout,
        )
        loop = channel.stream_loop()
        with self._errors():
            self._window = Window(loop, settings, channel.api_key)

    def send(self, *requests: IngestWithConfigDataStreamRequest) -> None:
        """Send requests, in order.

        Raises:
            RpcError: the stream failed (it must then be cancelled and sent again).
            TransportError: the stream is closed.
        """
        self._check_open()
        if self._service.lazy_flow_creation:
            self._service._register_lazily(request.flow for request in requests)
        converted = [to_stream_request(request) for request in requests]
        self._send(converted)

    def send_samples(self, samples: Iterable[Sample]) -> None:
        """Send samples of the service's flows (values in channel order), in order.

        They carry the service's run, organization and ``end_stream_on_error`` setting.

        Raises:
            IngestionValidationError: a sample's flow is unknown or a value does not fit its
                channel (wrong count, type or range); nothing of this call is sent then.
            RpcError: the stream failed (it must then be cancelled and sent again).
            TransportError: the stream is closed.
        """
        self._check_open()
        service = self._service
        rows = [(s.flow, s.timestamp_ns, s.values) for s in samples]
        if self._builder is None or any(row[0] not in self._builder.flows for row in rows):
            self._builder = RequestBuilder(list(service.flow_configs_by_name.values()))
        requests = self._builder.build(
            rows,
            service.ingestion_config.ingestion_config_id,
            service.run_id or "",
            end_stream_on_validation_error=service.end_stream_on_error,
            organization_id=service.organization_id or "",
        )
        if service.lazy_flow_creation:
            service._register_lazily(row[0] for row in rows)
        self._send(requests)

    def close(self) -> None:
        """End the stream and wait for the API's answer; returns when it answered OK.

        Raises:
            RpcError: the API ended the stream with an error (``INVALID_ARGUMENT`` for a request
                that does not match its flow, with ``end_stream_on_validation_error``), the
                stream failed and was reconnected (what it carried may be lost: send it again),
                or no answer came in time (``DEADLINE_EXCEEDED``).
            TransportError: the stream is already closed.
        """
        self._check_open()
        self._done = True
        with self._errors():
            self._window.finish()

    def cancel(self) -> None:
        """Abandon the stream without waiting (what it carried may or may not be stored)."""
        self._done = True
        self._window.cancel()

    @property
    def closed(self) -> bool:
        """Whether the stream was closed or cancelled."""
        return self._done

    def __enter__(self) -> IngestStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        if exc_val is not None:
            self.cancel()
        elif not self._done:
            self.close()

    # -- internals -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._done:
            raise TransportError("the stream is closed: open another one")

    def _send(self, requests: Sequence[Any]) -> None:
        window = self._window
        with self._errors():
            for start in range(0, len(requests), _CHUNK):
                window.send(list(requests[start : start + _CHUNK]))
        self.sent += len(requests)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (DaqError, RuntimeError) as exc:
            error = stream_error(exc, _METHOD, self._secret)
            if error is exc:
                raise
            raise error from exc
