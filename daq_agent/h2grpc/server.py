"""A gRPC server core on asyncio and ``h2``: unary and client-streaming calls.

The server runs its event loop on one named thread. Handlers (see :mod:`daq_agent.server.rpc`)
run on that thread and see serialized messages in batches: every message completed by one HTTP/2
DATA frame is handed over in one ``on_messages`` call, which is what makes a coalescing client fast.
It is a standard gRPC server: grpcio, grpclib, Sift's own client or ``grpcurl`` can call it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from daq_agent.h2grpc.wire import (
    DEFAULT_MAX_MESSAGE_BYTES,
    FramingError,
    MessageReader,
    encode_grpc_message,
    frame,
)
from daq_agent.server.rpc import (
    CallContext,
    RpcError,
    StreamHandler,
    StreamHandlerFactory,
    UnaryHandler,
)

__all__ = ["GrpcH2Server"]

log = logging.getLogger(__name__)

_WINDOW = 16 * 1024 * 1024
_MAX_FRAME = 1024 * 1024
_ACCEPTED_ENCODINGS = ("identity", "gzip", "deflate")


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


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection: decodes frames, routes calls, writes responses."""

    def __init__(self, server: GrpcH2Server) -> None:
        self._server = server
        self._h2 = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        self._transport: asyncio.Transport | None = None
        self._calls: dict[int, _Call] = {}
        self._peer = ""

    # asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._server._connections.add(self)
        self._h2.initiate_connection()
        # Applied when the client acknowledges them (h2 tracks the ACK).
        self._h2.update_settings(
            {
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: _MAX_FRAME,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 65536,
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
            self._abort(call)
        self._calls.clear()
        self._transport = None

    def data_received(self, data: bytes) -> None:
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.warning("closing connection from %s: HTTP/2 protocol error: %s", self._peer, exc)
            self._flush()
            self.close()
            return
        for event in events:
            try:
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
            call = self._calls.pop(event.stream_id, None)
            if call is not None:
                self._abort(call)
        elif isinstance(event, h2.events.WindowUpdated):
            self._resume_sending()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.close()

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        # header_encoding="utf-8": h2 hands over str pairs (its annotations say bytes)
        headers = {str(k): str(v) for k, v in event.headers or ()}
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

    def _on_data(self, event: h2.events.DataReceived) -> None:
        stream_id = event.stream_id
        if event.flow_controlled_length:
            try:
                self._h2.acknowledge_received_data(event.flow_controlled_length, stream_id)
            except h2.exceptions.StreamClosedError:
                pass
        call = self._calls.get(stream_id)
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
        else:
            call.unary_messages.extend(messages)

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
                if len(call.unary_messages) != 1:
                    raise RpcError(
                        grpc.StatusCode.UNIMPLEMENTED,
                        f"unary call with {len(call.unary_messages)} request messages",
                    )
                response = call.unary(call.unary_messages[0], call.context)
        except RpcError as exc:
            self._finish(call, exc.code, exc.message)
            return
        except Exception as exc:
            log.exception("error in %s", call.context.method)
            self._finish(call, grpc.StatusCode.INTERNAL, f"internal error: {exc}")
            return
        self._respond(call, response)

    # responses -------------------------------------------------------------------------------

    def _respond(self, call: _Call, response: bytes) -> None:
        call.finished = True
        self._h2.send_headers(
            call.stream_id,
            [
                (":status", "200"),
                ("content-type", "application/grpc"),
                ("grpc-accept-encoding", ",".join(_ACCEPTED_ENCODINGS)),
            ],
        )
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
        try:
            self._h2.send_headers(call.stream_id, headers, end_stream=True)
            # The request may still be arriving: ask the client to stop sending it.
            self._h2.reset_stream(call.stream_id, error_code=0)
        except h2.exceptions.StreamClosedError:
            pass
        self._calls.pop(call.stream_id, None)

    def _send_pending(self, call: _Call) -> None:
        stream_id = call.stream_id
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
        except h2.exceptions.StreamClosedError:
            call.pending = b""
        self._calls.pop(stream_id, None)

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
        max_message_bytes: the largest request message accepted (gRPC's default 4 MiB).
        tick: called on the server thread every ``tick_interval`` seconds (housekeeping such as
            committing what a quiet stream delivered); its errors are logged.
        tick_interval: seconds between ticks.

    Raises:
        OSError: the address cannot be bound.
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
        tick: Callable[[], None] | None = None,
        tick_interval: float = 1.0,
    ) -> None:
        self._tick = tick
        self._tick_interval = tick_interval
        self._thread: threading.Thread | None = None
        self._closed = False
        self.unary = dict(unary)
        self.streams = dict(streams)
        self.authorize = authorize
        self.max_message_bytes = max_message_bytes
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

    @property
    def address(self) -> str:
        """``host:port`` to give a client."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

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
        return f"GrpcH2Server({self.address})"

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

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = await loop.create_server(lambda: _Connection(self), sock=self._socket)
        self._started.set()
        timer = loop.call_later(self._tick_interval, self._on_tick) if self._tick else None
        await self._stopping.wait()
        if timer is not None:
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
