"""A gRPC server core on asyncio and ``h2``: unary and client-streaming calls, plain or over TLS.

The server runs its event loop on one named thread. Handlers (see :mod:`daq_agent.server.rpc`)
run on that thread and see serialized messages in batches: every message completed by one HTTP/2
DATA frame is handed over in one ``on_messages`` call, which is what makes a coalescing client fast.
It is a standard gRPC server: grpcio, grpclib, Sift's own clients or ``grpcurl`` can call it.

Bounds, each configurable on :class:`GrpcH2Server`: the size of one message (after
decompression), the number of connections, the number of concurrent streams per connection
(``SETTINGS_MAX_CONCURRENT_STREAMS``), the time a connection may stay silent, one request message
per unary call, and the deadline a client sends in ``grpc-timeout``.

A malformed request (bad header names or values, missing pseudo-headers) is refused on its own
stream (``RST_STREAM`` with ``PROTOCOL_ERROR``); the connection and its other calls go on. Header
values are trimmed of surrounding blanks first, as HTTP does, so ``authorization: Bearer `` (an
empty key) reaches the authorization check and gets ``UNAUTHENTICATED``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h2.utilities

from daq_agent.core.errors import ConfigError
from daq_agent.h2grpc.wire import (
    DEFAULT_MAX_MESSAGE_BYTES,
    FramingError,
    MessageReader,
    encode_grpc_message,
    frame,
    silence_header_logging,
)
from daq_agent.server.rpc import (
    CallContext,
    RpcError,
    StreamHandler,
    StreamHandlerFactory,
    UnaryHandler,
)

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_CONCURRENT_STREAMS",
    "DEFAULT_MAX_CONNECTIONS",
    "GrpcH2Server",
    "ServerStats",
    "parse_grpc_timeout",
    "server_ssl_context",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_CONNECTIONS = 100
"""Connections served at once; more are closed as soon as they are accepted."""
DEFAULT_MAX_CONCURRENT_STREAMS = 100
"""Calls open at once on one connection (advertised as SETTINGS_MAX_CONCURRENT_STREAMS)."""
DEFAULT_IDLE_TIMEOUT = 300.0
"""Seconds a connection may stay silent (not even a PING) before it is closed."""

_WINDOW = 16 * 1024 * 1024
_MAX_FRAME = 1024 * 1024
_MAX_HEADER_LIST = 65536
_TLS_HANDSHAKE_TIMEOUT = 10.0
_REFUSAL_LOG_INTERVAL = 10.0  # seconds between two warnings about refused connections
_ACCEPTED_ENCODINGS = ("identity", "gzip", "deflate")
# Sending on a stream h2 has closed (the client reset it) or forgotten (closed streams are dropped
# once a newer one opens: h2 then takes the id for a new stream of ours and refuses it as too low
# or, against a client that allows no pushes, as one stream too many).
_GONE = (
    h2.exceptions.StreamClosedError,
    h2.exceptions.StreamIDTooLowError,
    h2.exceptions.TooManyStreamsError,
)
_REQUEST = h2.utilities.HeaderValidationFlags(
    is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False
)
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def parse_grpc_timeout(value: str) -> float:
    """Seconds in a ``grpc-timeout`` value: up to 8 digits and a unit (``H M S m u n``).

    Raises:
        ValueError: the value is not of that form.
    """
    digits, unit = value[:-1], _TIMEOUT_UNITS.get(value[-1:])
    if unit is None or not digits.isascii() or not digits.isdigit() or len(digits) > 8:
        raise ValueError(f"malformed grpc-timeout {value!r}")
    return int(digits) * unit


def server_ssl_context(cert_file: str | Path, key_file: str | Path) -> ssl.SSLContext:
    """A TLS server context for gRPC: the certificate chain and key, TLS 1.2 or later, ALPN h2.

    Raises:
        ConfigError: a file is missing or unreadable, the key does not match the certificate, or
            the key is encrypted (naming the files).
    """

    cert, key = str(cert_file), str(key_file)
    for path, what in ((cert, "TLS certificate"), (key, "TLS private key")):
        if not Path(path).is_file():
            raise ConfigError(f"no such {what} file", source=path)

    def refuse_encrypted_key() -> str:
        raise ConfigError("the TLS private key is encrypted (give an unencrypted one)", source=key)

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    try:
        context.load_cert_chain(cert, key, password=refuse_encrypted_key)
    except OSError as exc:  # ssl.SSLError is an OSError
        reason = exc.strerror if exc.strerror and not isinstance(exc, ssl.SSLError) else exc
        raise ConfigError(
            f"cannot load the TLS certificate with the private key {key}: {reason}", source=cert
        ) from exc
    return context


@dataclass(slots=True)
class ServerStats:
    """What the server refused or cut short, counted since it was built (read from any thread)."""

    connections_refused: int = 0
    """Connections beyond ``max_connections``, closed as soon as accepted."""
    connections_idle: int = 0
    """Connections closed after ``idle_timeout`` seconds of silence."""
    protocol_errors: int = 0
    """Connections closed on an HTTP/2 protocol error."""
    malformed_requests: int = 0
    """Streams reset because their request headers were malformed."""
    deadlines_exceeded: int = 0
    """Calls ended with DEADLINE_EXCEEDED (their ``grpc-timeout`` ran out)."""
    calls_abandoned: int = 0
    """Calls the client reset, or whose connection was lost or closed, before their answer."""


@dataclass(slots=True)
class _Call:
    stream_id: int
    context: CallContext
    reader: MessageReader
    handler: StreamHandler | None = None
    unary: UnaryHandler | None = None
    unary_messages: list[bytes] = field(default_factory=list)
    finished: bool = False  # our side has ended; ignore further data
    pending: bytes = b""  # response bytes waiting for flow-control window
    trailers: list[tuple[str, str]] | None = None
    deadline: float | None = None  # loop time, from grpc-timeout
    timer: asyncio.TimerHandle | None = None


def _trimmed(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Header values without surrounding blanks (a recipient may trim them, RFC 9110 5.5)."""
    return [(name, value.strip(b" \t")) for name, value in headers]


def _well_formed(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether request headers pass h2's checks (RFC 9113 8.2 and 8.3)."""
    try:
        for _ in h2.utilities.validate_headers(headers, _REQUEST):
            pass
    except h2.exceptions.ProtocolError:  # its message quotes header values: never log it
        return False
    return True


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection: decodes frames, routes calls, writes responses."""

    def __init__(self, server: GrpcH2Server) -> None:
        self._server = server
        # Header validation is ours (per stream, see _on_request): h2's own treats a bad header
        # as a connection error, which would take every other call on the connection down.
        self._h2 = h2.connection.H2Connection(
            config=h2.config.H2Configuration(
                client_side=False, header_encoding=None, validate_inbound_headers=False
            )
        )
        self._transport: asyncio.Transport | None = None
        self._calls: dict[int, _Call] = {}
        self._peer = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._refused = False
        self.last_received = 0.0  # loop time of the last bytes from the peer

    # asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self.last_received = self._loop.time()
        peer = transport.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        server = self._server
        if len(server._connections) >= server.max_connections:
            self._refuse()
            return
        self._h2.initiate_connection()
        server._connections.add(self)
        # Applied when the client acknowledges them (h2 tracks the ACK).
        self._h2.update_settings(
            {
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: _MAX_FRAME,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: server.max_concurrent_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: _MAX_HEADER_LIST,
            }
        )
        # Accept large frames now, not only once the client's ACK is processed: h2 checks frame
        # sizes against the limit in force when a read began, so an ACK and a large DATA frame
        # arriving in one read would otherwise fail as "overlong frame".
        self._h2.max_inbound_frame_size = _MAX_FRAME
        self._h2.increment_flow_control_window(_WINDOW)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self)
        for call in list(self._calls.values()):
            if not call.finished or call.pending or call.trailers:
                self._server.stats.calls_abandoned += 1
            self._abort(call)
            self._forget(call)
        self._transport = None

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        assert self._loop is not None
        self.last_received = self._loop.time()
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._server.stats.protocol_errors += 1
            log.warning("closing connection from %s: HTTP/2 protocol error: %s", self._peer, exc)
            self._flush()
            self.close()
            return
        # A stream that ended and was then reset in this same read (a client that gave up
        # waiting while we were not reading) is abandoned: it is aborted, never answered.
        reset = [e.stream_id for e in events if isinstance(e, h2.events.StreamReset)]
        for event in events:
            try:
                if reset and isinstance(event, h2.events.StreamEnded) and event.stream_id in reset:
                    continue
                self._dispatch(event)
            except Exception:  # a handler bug must not take the connection down
                log.exception("error handling %s from %s", type(event).__name__, self._peer)
        self._flush()

    # events ----------------------------------------------------------------------------------

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            self._on_data(event)
        elif isinstance(event, h2.events.RequestReceived):
            self._on_request(event)
        elif isinstance(event, h2.events.StreamEnded):
            self._on_end(event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            call = self._calls.get(event.stream_id)
            if call is not None:
                self._server.stats.calls_abandoned += 1
                log.debug("%s from %s reset by the client", call.context.method, self._peer)
                self._abort(call)
                self._forget(call)
        elif isinstance(event, h2.events.WindowUpdated):
            self._resume_sending()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.close()

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        assert stream_id is not None
        # header_encoding=None: h2 hands over (bytes, bytes) pairs
        raw = _trimmed(event.headers or ())
        if not _well_formed(raw):
            self._server.stats.malformed_requests += 1
            log.info("refused a malformed request from %s (stream %d)", self._peer, stream_id)
            self._reset(stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return
        # names are visible ASCII once validated; values may be anything but NUL, CR and LF
        headers = {name.decode("ascii"): value.decode("utf-8", "replace") for name, value in raw}
        method = headers.get(":path", "")
        metadata = {k: v for k, v in headers.items() if not k.startswith(":")}
        context = CallContext(method=method, metadata=metadata, peer=self._peer)
        encoding = metadata.get("grpc-encoding", "identity")
        call = _Call(
            stream_id=stream_id,
            context=context,
            reader=MessageReader(
                encoding=encoding, max_message_bytes=self._server.max_message_bytes
            ),
        )
        self._calls[stream_id] = call
        if headers.get(":method") != "POST":
            self._finish(call, grpc.StatusCode.UNIMPLEMENTED, "gRPC requires POST")
            return
        if not metadata.get("content-type", "").startswith("application/grpc"):
            self._finish(call, grpc.StatusCode.UNKNOWN, "content-type must be application/grpc")
            return
        if encoding not in _ACCEPTED_ENCODINGS:
            self._finish(
                call, grpc.StatusCode.UNIMPLEMENTED, f"unsupported grpc-encoding {encoding}"
            )
            return
        timeout = metadata.get("grpc-timeout")
        if timeout is not None:
            try:
                seconds = parse_grpc_timeout(timeout)
            except ValueError as exc:
                self._finish(call, grpc.StatusCode.INTERNAL, str(exc))
                return
            assert self._loop is not None
            call.deadline = self._loop.time() + seconds
            call.timer = self._loop.call_at(call.deadline, self._on_deadline, call)
        unary = self._server.unary.get(method)
        factory = self._server.streams.get(method)
        if unary is None and factory is None:
            self._finish(call, grpc.StatusCode.UNIMPLEMENTED, f"unknown method {method}")
            return
        try:
            if self._server.authorize is not None:
                self._server.authorize(context)
            if factory is not None:
                call.handler = factory(context)
            else:
                call.unary = unary
        except RpcError as exc:
            self._finish(call, exc.code, exc.message)
        except Exception as exc:
            log.exception("error starting %s", method)
            self._finish(call, grpc.StatusCode.INTERNAL, f"internal error: {exc}")

    def _acknowledge(self, event: h2.events.DataReceived) -> None:
        if event.flow_controlled_length:
            assert event.stream_id is not None
            try:
                self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            except _GONE:
                pass

    def _on_data(self, event: h2.events.DataReceived) -> None:
        self._acknowledge(event)
        call = self._calls.get(event.stream_id)
        if call is None or call.finished or not event.data:
            return
        try:
            messages = call.reader.feed(event.data)
        except FramingError as exc:
            self._finish(call, exc.code, str(exc))
            return
        if not messages:
            return
        if call.handler is not None:
            try:
                call.handler.on_messages(messages)
            except RpcError as exc:
                self._finish(call, exc.code, exc.message)
            except Exception as exc:
                log.exception("error in %s", call.context.method)
                self._finish(call, grpc.StatusCode.INTERNAL, f"internal error: {exc}")
        elif call.unary_messages or len(messages) > 1:  # buffer one request, never more
            self._finish(call, grpc.StatusCode.INTERNAL, "a unary call takes one request message")
        else:
            call.unary_messages = messages

    def _on_end(self, stream_id: int) -> None:
        call = self._calls.get(stream_id)
        if call is None or call.finished:
            return
        if call.reader.pending:
            self._finish(call, grpc.StatusCode.INTERNAL, "stream ended inside a message")
            return
        try:
            if call.handler is not None:
                response = call.handler.on_end()
            else:
                assert call.unary is not None
                if not call.unary_messages:
                    raise RpcError(
                        grpc.StatusCode.INTERNAL, "a unary call ended without a request message"
                    )
                response = call.unary(call.unary_messages[0], call.context)
        except RpcError as exc:
            self._finish(call, exc.code, exc.message)
            return
        except Exception as exc:
            log.exception("error in %s", call.context.method)
            self._finish(call, grpc.StatusCode.INTERNAL, f"internal error: {exc}")
            return
        assert self._loop is not None
        if call.deadline is not None and self._loop.time() >= call.deadline:
            self._deadline_exceeded(call)  # the handler ran past it (and hears on_abort)
            return
        self._respond(call, response)

    def _on_deadline(self, call: _Call) -> None:
        call.timer = None
        if self._calls.get(call.stream_id) is call:
            self._deadline_exceeded(call)
            self._flush()

    # responses -------------------------------------------------------------------------------

    def _deadline_exceeded(self, call: _Call) -> None:
        self._server.stats.deadlines_exceeded += 1
        log.debug("%s from %s ran past its deadline", call.context.method, self._peer)
        if call.finished:  # answered, but the answer is still waiting for flow control
            self._reset(call.stream_id, h2.errors.ErrorCodes.CANCEL)
            self._forget(call)
        else:
            self._finish(call, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")

    def _respond(self, call: _Call, response: bytes) -> None:
        call.finished = True
        if not self._is_open(call.stream_id):  # the client gave up on the call
            self._abandon(call)
            return
        try:
            self._h2.send_headers(
                call.stream_id,
                [
                    (":status", "200"),
                    ("content-type", "application/grpc"),
                    ("grpc-accept-encoding", ",".join(_ACCEPTED_ENCODINGS)),
                ],
            )
        except _GONE:
            self._abandon(call)
            return
        call.pending = frame([response])
        call.trailers = [("grpc-status", "0")]
        self._send_pending(call)

    def _finish(self, call: _Call, code: grpc.StatusCode, message: str) -> None:
        """End a call with a non-OK status (a trailers-only response)."""
        if call.finished:
            return
        self._abort(call)  # a streaming handler hears that no OK will be sent
        headers = [
            (":status", "200"),
            ("content-type", "application/grpc"),
            ("grpc-status", str(code.value[0])),
            ("grpc-message", encode_grpc_message(message)),
        ]
        if self._is_open(call.stream_id):
            try:
                self._h2.send_headers(call.stream_id, headers, end_stream=True)
                # The request may still be arriving: ask the client to stop sending it.
                self._h2.reset_stream(call.stream_id, error_code=0)
            except _GONE:
                pass
        self._forget(call)

    def _reset(self, stream_id: int, code: h2.errors.ErrorCodes) -> None:
        if self._is_open(stream_id):
            try:
                self._h2.reset_stream(stream_id, error_code=code)
            except _GONE:
                pass

    def _is_open(self, stream_id: int) -> bool:
        """Whether h2 still has the stream open (sending on any other raises)."""
        stream = self._h2.streams.get(stream_id)
        return stream is not None and not stream.closed

    def _send_pending(self, call: _Call) -> None:
        stream_id = call.stream_id
        if not self._is_open(stream_id):  # reset while the answer waited for window
            self._abandon(call)
            return
        try:
            while call.pending:
                window = min(
                    self._h2.local_flow_control_window(stream_id), self._h2.max_outbound_frame_size
                )
                if window <= 0:
                    return  # resumed on WindowUpdated
                chunk, call.pending = call.pending[:window], call.pending[window:]
                self._h2.send_data(stream_id, chunk)
            if call.trailers is not None:
                self._h2.send_headers(stream_id, call.trailers, end_stream=True)
                call.trailers = None
        except _GONE:
            call.pending = b""
            call.trailers = None
        self._forget(call)

    def _resume_sending(self) -> None:
        for call in list(self._calls.values()):
            if call.finished and (call.pending or call.trailers):
                self._send_pending(call)

    def _abort(self, call: _Call) -> None:
        if call.handler is not None and not call.finished:
            try:
                call.handler.on_abort()
            except Exception:
                log.exception("error aborting %s", call.context.method)
        call.finished = True
        call.handler = None

    def _abandon(self, call: _Call) -> None:
        """Drop a call whose stream the client reset or h2 forgot: it cannot be answered."""
        self._server.stats.calls_abandoned += 1
        log.debug("%s from %s abandoned by the client", call.context.method, self._peer)
        self._forget(call)

    def _forget(self, call: _Call) -> None:
        if self._calls.get(call.stream_id) is call:
            del self._calls[call.stream_id]
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None

    def _refuse(self) -> None:
        """Close a connection beyond the limit before the HTTP/2 handshake.

        A gRPC client sees a failed connection attempt (UNAVAILABLE) and backs off before it
        tries again; a GOAWAY would count as a connection made and be retried at once.
        """
        self._refused = True
        self._server._note_refused(self._peer)
        self.close()

    # plumbing --------------------------------------------------------------------------------

    def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data and self._transport is not None:
            self._transport.write(data)

    @property
    def busy(self) -> bool:
        return any(not call.finished or call.pending for call in self._calls.values())

    def go_away(self) -> None:
        try:
            self._h2.close_connection()
        except h2.exceptions.ProtocolError:
            pass
        self._flush()

    def close_idle(self, idle: float) -> None:
        """Close a connection that sent nothing for ``idle`` seconds (its calls are aborted)."""
        self._server.stats.connections_idle += 1
        log.info("closing connection from %s: silent for %.1f s", self._peer, idle)
        self.go_away()
        self.close()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class GrpcH2Server:
    """A gRPC server for unary and client-streaming methods, on one event-loop thread.

    The listening socket is bound on construction, so :attr:`port` is known before :meth:`start`
    (bind to port 0 to get a free one).

    Args:
        host: the address to listen on.
        port: the port, or 0 for any free port.
        unary: handlers of unary methods by full path.
        streams: factories of client-streaming handlers by full path.
        authorize: called with every call's context before its handler; raises
            :class:`~daq_agent.server.rpc.RpcError` to refuse the call.
        max_message_bytes: the largest request message accepted, once decompressed (gRPC's
            default 4 MiB); a larger one ends its call with RESOURCE_EXHAUSTED.
        max_connections: connections served at once; one more is closed as soon as it is
            accepted (its calls fail with UNAVAILABLE and the client backs off).
        max_concurrent_streams: calls open at once on one connection
            (``SETTINGS_MAX_CONCURRENT_STREAMS``; gRPC clients queue the calls beyond it).
        idle_timeout: seconds a connection may send nothing (not even a PING) before it is
            closed, aborting its calls; None never closes one.
        ssl_context: serve TLS with this server context (see :func:`server_ssl_context`);
            None serves plain text.
        tick: called on the server thread every ``tick_interval`` seconds (housekeeping such as
            committing what a quiet stream delivered); its errors are logged.
        tick_interval: seconds between ticks.

    Attributes:
        stats: what was refused or cut short (:class:`ServerStats`).

    Raises:
        OSError: the address cannot be bound.
        ValueError: a limit is not positive.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        unary: Mapping[str, UnaryHandler],
        streams: Mapping[str, StreamHandlerFactory],
        authorize: Callable[[CallContext], None] | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
        tick: Callable[[], None] | None = None,
        tick_interval: float = 1.0,
    ) -> None:
        for name, value in (
            ("max_message_bytes", max_message_bytes),
            ("max_connections", max_connections),
            ("max_concurrent_streams", max_concurrent_streams),
            ("idle_timeout", 1 if idle_timeout is None else idle_timeout),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be positive, not {value}")
        silence_header_logging()
        self._tick = tick
        self._tick_interval = tick_interval
        self._thread: threading.Thread | None = None
        self._closed = False
        self.unary = dict(unary)
        self.streams = dict(streams)
        self.authorize = authorize
        self.max_message_bytes = max_message_bytes
        self.max_connections = max_connections
        self.max_concurrent_streams = max_concurrent_streams
        self.idle_timeout = idle_timeout
        self.ssl_context = ssl_context
        self.stats = ServerStats()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
            self._socket.listen(128)
        except OSError:
            self._socket.close()
            raise
        self.host = host
        self.port: int = self._socket.getsockname()[1]
        self._connections: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._grace = 5.0
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._next_refusal_log = 0.0

    @property
    def address(self) -> str:
        """``host:port`` to give a client."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def connections(self) -> int:
        """Connections being served now."""
        return len(self._connections)

    def start(self) -> None:
        """Start serving on a thread named ``daq-server``; returns once it accepts connections.

        Raises:
            RuntimeError: the server was already started or stopped.
        """
        with self._lock:
            if self._thread is not None or self._closed:
                raise RuntimeError("server already started or stopped")
            self._thread = threading.Thread(target=self._run, name="daq-server", daemon=True)
            self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise RuntimeError(f"server failed to start: {self._error}") from self._error

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting calls, let running calls finish for up to ``grace`` seconds, then close.

        Idempotent; joins the server thread.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread, loop, stopping = self._thread, self._loop, self._stopping
        self._grace = grace
        if thread is None:
            self._socket.close()
            return
        if loop is not None and stopping is not None:
            loop.call_soon_threadsafe(stopping.set)
        thread.join()

    def __enter__(self) -> GrpcH2Server:
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __del__(self) -> None:
        if self._thread is not None and not self._closed:
            log.warning("%s was not properly stopped", self)

    def __repr__(self) -> str:
        return f"GrpcH2Server({self.address}{', TLS' if self.ssl_context else ''})"

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start() or logged
            self._error = exc
            log.exception("server on %s failed", self.address)
        finally:
            self._started.set()
            loop.close()

    def _on_tick(self) -> None:
        assert self._tick is not None
        assert self._loop is not None
        try:
            self._tick()
        except Exception:
            log.exception("server tick failed")
        if not self._closed:
            self._loop.call_later(self._tick_interval, self._on_tick)

    def _sweep_idle(self) -> None:
        assert self._loop is not None
        assert self.idle_timeout is not None
        now = self._loop.time()
        for connection in list(self._connections):
            silent = now - connection.last_received
            if silent >= self.idle_timeout:
                connection.close_idle(silent)
        if not self._closed:
            self._loop.call_later(self._sweep_interval(), self._sweep_idle)

    def _sweep_interval(self) -> float:
        assert self.idle_timeout is not None
        return min(1.0, max(0.01, self.idle_timeout / 4))

    def _note_refused(self, peer: str) -> None:
        assert self._loop is not None
        self.stats.connections_refused += 1
        now = self._loop.time()
        if now >= self._next_refusal_log:
            self._next_refusal_log = now + _REFUSAL_LOG_INTERVAL
            log.warning(
                "refused the connection from %s: %d connections open (max_connections); "
                "%d refused so far",
                peer,
                len(self._connections),
                self.stats.connections_refused,
            )

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = await loop.create_server(
            lambda: _Connection(self),
            sock=self._socket,
            ssl=self.ssl_context,
            ssl_handshake_timeout=_TLS_HANDSHAKE_TIMEOUT if self.ssl_context else None,
        )
        self._started.set()
        timers = []
        if self._tick is not None:
            timers.append(loop.call_later(self._tick_interval, self._on_tick))
        if self.idle_timeout is not None:
            timers.append(loop.call_later(self._sweep_interval(), self._sweep_idle))
        await self._stopping.wait()
        for timer in timers:
            timer.cancel()
        server.close()
        for connection in list(self._connections):
            connection.go_away()
        deadline = loop.time() + self._grace
        while any(c.busy for c in self._connections) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for connection in list(self._connections):
            connection.close()
        await server.wait_closed()
