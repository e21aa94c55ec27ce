"""A client-streaming gRPC client on ``h2`` that coalesces messages into large DATA frames.

grpcio hands every message of a client stream through its core one at a time, which caps a Python
producer at a few thousand messages per second. Here a batch of serialized messages is framed in
one pass and written in as few HTTP/2 DATA frames as the peer's frame size and flow-control windows
allow.
It is still a standard gRPC client (TLS with ALPN ``h2``, ``te: trailers``, status in trailers) that
any gRPC server, Sift included, accepts.

Threads: a connection owns one reader thread (``daq-h2-reader``) that processes the peer's frames
(settings, window updates, pings, responses); callers write from their own threads.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from daq_agent import __version__
from daq_agent.core.errors import RpcStatusError, TransportError
from daq_agent.h2grpc.wire import MessageReader, frame, status_from_headers
from daq_agent.h2grpc.wire_io import PlainWire, TlsWire, Wire

__all__ = ["ClientStream", "H2Channel"]

log = logging.getLogger(__name__)

_RECV_WINDOW = 16 * 1024 * 1024
_USER_AGENT = f"daq-agent/{__version__} h2"


@dataclass(slots=True)
class _StreamState:
    headers: list[tuple[str, str]] = field(default_factory=list)
    trailers: list[tuple[str, str]] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    ended: bool = False
    reset: int | None = None


class H2Channel:
    """One HTTP/2 connection to a gRPC server, opened on first use and reopened after a failure.

    Args:
        host: the server's host name or address.
        port: the server's port.
        use_ssl: TLS (with ALPN ``h2``); required by real Sift.
        metadata: headers sent with every call, e.g. ``[("authorization", "Bearer …")]``.
        ssl_context: a custom TLS context (default: system trust store, hostname checked).
        connect_timeout: seconds to wait for the TCP/TLS connection.
        write_timeout: seconds one socket write may block (a peer that stopped reading); then
            the connection is dropped and its calls fail with UNAVAILABLE.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        use_ssl: bool = True,
        metadata: Sequence[tuple[str, str]] = (),
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout: float = 10.0,
        write_timeout: float = 30.0,
    ) -> None:
        self.host = host
        self.port = port
        self.use_ssl = use_ssl
        self._metadata = [(k.lower(), v) for k, v in metadata]
        self._ssl_context = ssl_context
        self._connect_timeout = connect_timeout
        self._write_timeout = write_timeout
        self._lock = threading.Lock()  # guards the h2 state machine
        self._send_lock = threading.Lock()  # keeps socket writes in h2's order
        self._changed = threading.Condition(self._lock)
        self._sock: Wire | None = None
        self._h2: h2.connection.H2Connection | None = None
        self._reader: threading.Thread | None = None
        self._streams: dict[int, _StreamState] = {}
        self._failure: str | None = None
        self._closed = False

    @property
    def authority(self) -> str:
        """``host:port`` as sent in ``:authority``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def stream(self, method: str, *, timeout: float | None = None) -> ClientStream:
        """Open a client-streaming call to ``method`` (a full path).

        Raises:
            TransportError: the server cannot be reached.
        """
        with self._lock:
            h2conn = self._connected()
            stream_id = h2conn.get_next_available_stream_id()
            headers = [
                (":method", "POST"),
                (":scheme", "https" if self.use_ssl else "http"),
                (":path", method),
                (":authority", self.authority),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                ("user-agent", _USER_AGENT),
                ("grpc-accept-encoding", "identity"),
                *self._metadata,
            ]
            if timeout is not None:
                headers.append(("grpc-timeout", f"{max(1, int(timeout * 1000))}m"))
            self._streams[stream_id] = _StreamState()
            h2conn.send_headers(stream_id, headers)
            self._write_locked()
        return ClientStream(self, stream_id, method)

    def close(self) -> None:
        """Close the connection (idempotent); open streams fail with UNAVAILABLE."""
        with self._lock:
            self._closed = True
            sock = self._sock
            if self._h2 is not None and sock is not None:
                try:
                    self._h2.close_connection()
                    self._write_locked()
                except (h2.exceptions.ProtocolError, OSError, TransportError):
                    pass
            self._fail_locked("channel closed")
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(timeout=5)

    def __enter__(self) -> H2Channel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # connection ------------------------------------------------------------------------------

    def _connected(self) -> h2.connection.H2Connection:
        """The live connection, connecting first when needed (lock held)."""
        if self._closed:
            raise TransportError("channel closed")
        if self._h2 is not None and self._failure is None:
            return self._h2
        if self._h2 is not None:  # the server sent GOAWAY: retire that connection
            self._fail_locked(self._failure or "reconnecting")
        if self._reader is not None:
            reader, self._reader = self._reader, None
            self._lock.release()
            try:
                reader.join(timeout=5)
            finally:
                self._lock.acquire()
        try:
            raw = socket.create_connection((self.host, self.port), timeout=self._connect_timeout)
        except OSError as exc:
            raise self._unavailable(f"cannot connect to {self.authority}: {exc}") from exc
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Bounds blocking writes only (reads stay blocking: the reader thread waits on them).
            seconds = int(self._write_timeout)
            micros = int((self._write_timeout - seconds) * 1_000_000)
            raw.setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", seconds, micros)
            )
            sock: Wire = PlainWire(raw)
            if self.use_ssl:
                context = self._ssl_context or ssl.create_default_context()
                context.set_alpn_protocols(["h2"])
                tls = TlsWire(raw, context, server_hostname=self.host)
                if tls.selected_alpn_protocol() != "h2":
                    raise self._unavailable(f"{self.authority} does not speak HTTP/2 (ALPN)")
                sock = tls
            raw.settimeout(None)
        except (OSError, ssl.SSLError) as exc:
            raw.close()
            raise self._unavailable(f"TLS handshake with {self.authority} failed: {exc}") from exc
        except TransportError:
            raw.close()
            raise
        conn = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        conn.initiate_connection()
        conn.update_settings(
            {
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _RECV_WINDOW,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            }
        )
        conn.increment_flow_control_window(_RECV_WINDOW)
        self._sock, self._h2, self._failure = sock, conn, None
        self._streams.clear()
        self._write_locked()
        self._reader = threading.Thread(
            target=self._read_loop, args=(sock, conn), name="daq-h2-reader", daemon=True
        )
        self._reader.start()
        return conn

    @staticmethod
    def _unavailable(reason: str) -> RpcStatusError:
        """A connection failure, reported like grpcio does (UNAVAILABLE: worth retrying)."""
        return RpcStatusError(grpc.StatusCode.UNAVAILABLE, reason)

    def _write_locked(self) -> None:
        """Send what h2 has queued (lock held); the socket write happens in h2's order."""
        assert self._h2 is not None
        data = self._h2.data_to_send()
        if not data:
            return
        sock = self._sock
        # Lock order: _lock, then _send_lock. Taking _send_lock before letting go of _lock keeps
        # the bytes in h2's order; never take _lock again while holding _send_lock.
        self._send_lock.acquire()
        self._lock.release()
        error: OSError | None = None
        try:
            if sock is None:
                error = OSError("not connected")
            else:
                sock.sendall(data)
        except OSError as exc:
            error = exc
        finally:
            self._send_lock.release()
            self._lock.acquire()
        if error is not None:
            reason = f"connection to {self.authority} lost: {error}"
            self._fail_locked(reason)
            raise TransportError(reason) from error

    def _fail_locked(self, reason: str) -> None:
        if self._failure is None:
            self._failure = reason
        sock, self._sock = self._sock, None
        self._h2 = None
        if sock is not None:
            sock.close()
        self._changed.notify_all()

    def _read_loop(self, sock: Wire, conn: h2.connection.H2Connection) -> None:
        while True:
            try:
                data = sock.recv()
            except OSError as exc:
                data = b""
                reason = f"connection to {self.authority} lost: {exc}"
            else:
                reason = f"connection to {self.authority} closed by the server"
            with self._lock:
                if self._h2 is not conn:
                    return
                if not data:
                    self._fail_locked(reason)
                    return
                try:
                    events = conn.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    self._fail_locked(f"HTTP/2 protocol error from {self.authority}: {exc}")
                    return
                for event in events:
                    self._on_event(conn, event)
                try:
                    self._write_locked()
                except TransportError:
                    return
                self._changed.notify_all()

    def _on_event(self, conn: h2.connection.H2Connection, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            state = self._streams.get(event.stream_id)
            if state is not None:
                state.headers = [(str(k), str(v)) for k, v in event.headers or ()]
        elif isinstance(event, h2.events.DataReceived):
            if event.flow_controlled_length:
                try:
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                except h2.exceptions.StreamClosedError:
                    pass
            state = self._streams.get(event.stream_id)
            if state is not None and event.data:
                state.data += event.data
        elif isinstance(event, h2.events.TrailersReceived):
            state = self._streams.get(event.stream_id)
            if state is not None:
                state.trailers = [(str(k), str(v)) for k, v in event.headers or ()]
        elif isinstance(event, h2.events.StreamEnded):
            state = self._streams.get(event.stream_id)
            if state is not None:
                state.ended = True
        elif isinstance(event, h2.events.StreamReset):
            state = self._streams.get(event.stream_id)
            if state is not None:
                state.reset = int(event.error_code or 0)
        elif isinstance(event, h2.events.ConnectionTerminated):
            last = event.last_stream_id or 0
            for stream_id, state in self._streams.items():
                if stream_id > last and not state.ended:
                    state.reset = int(h2.errors.ErrorCodes.REFUSED_STREAM)
            # No new streams on this connection; the next call reconnects.
            self._failure = self._failure or "server sent GOAWAY"


class ClientStream:
    """The sending side of one client-streaming call. Not thread-safe: one producer per stream."""

    def __init__(self, channel: H2Channel, stream_id: int, method: str) -> None:
        self._channel = channel
        self._stream_id = stream_id
        self.method = method
        self._closed = False
        self.sent_messages = 0

    def send(self, payloads: Sequence[bytes], *, timeout: float | None = None) -> None:
        """Send serialized messages, coalesced into as few DATA frames as the peer allows.

        Blocks while the peer's flow-control window is exhausted.

        Raises:
            RpcStatusError: the server already ended the call (with its status).
            TransportError: the connection failed, or no window opened within ``timeout``.
        """
        if not payloads:
            return
        data = frame(payloads)
        channel = self._channel
        deadline = None if timeout is None else time.monotonic() + timeout
        view = memoryview(data)
        offset, size = 0, len(data)
        with channel._lock:
            while offset < size:
                conn = self._live()
                window = min(conn.local_flow_control_window(self._stream_id), size - offset)
                if window <= 0:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise TransportError(f"{self.method}: send timed out (flow control)")
                    channel._changed.wait(remaining if remaining is not None else 1.0)
                    continue
                frame_size = conn.max_outbound_frame_size
                end = offset + window
                while offset < end:
                    chunk = min(frame_size, end - offset)
                    conn.send_data(self._stream_id, view[offset : offset + chunk].tobytes())
                    offset += chunk
                channel._write_locked()
        self.sent_messages += len(payloads)

    def close(self, timeout: float | None = None) -> bytes:
        """End the request stream and wait for the server's answer.

        Returns:
            The serialized response message.

        Raises:
            RpcStatusError: the server answered a status other than OK.
            TransportError: the connection failed or no answer came within ``timeout``.
        """
        channel = self._channel
        deadline = None if timeout is None else time.monotonic() + timeout
        with channel._lock:
            if not self._closed:
                self._closed = True
                state = channel._streams.get(self._stream_id)
                if state is not None and not state.ended and state.reset is None:
                    conn = self._live()
                    try:
                        conn.end_stream(self._stream_id)
                    except h2.exceptions.StreamClosedError:
                        pass
                    channel._write_locked()
            while True:
                state = channel._streams.get(self._stream_id)
                if state is None:
                    raise TransportError(f"{self.method}: stream lost")
                if state.ended or state.reset is not None:
                    break
                if channel._failure is not None and channel._h2 is None:
                    raise self._unavailable(channel._failure)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    self._cancel_locked()
                    raise RpcStatusError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"no answer within {timeout} s",
                        method=self.method,
                    )
                channel._changed.wait(remaining if remaining is not None else 1.0)
            channel._streams.pop(self._stream_id, None)
        return self._result(state)

    def cancel(self) -> None:
        """Abandon the call (RST_STREAM CANCEL); the server discards it. Idempotent."""
        with self._channel._lock:
            self._cancel_locked()
            self._channel._streams.pop(self._stream_id, None)

    def _cancel_locked(self) -> None:
        self._closed = True
        conn = self._channel._h2
        if conn is None:
            return
        try:
            conn.reset_stream(self._stream_id, error_code=h2.errors.ErrorCodes.CANCEL)
            self._channel._write_locked()
        except (h2.exceptions.ProtocolError, TransportError):
            pass

    def _live(self) -> h2.connection.H2Connection:
        """The connection, or the reason this stream can no longer send (lock held)."""
        channel = self._channel
        state = channel._streams.get(self._stream_id)
        if state is not None and (state.ended or state.reset is not None):
            raise self._early_result(state)
        conn = channel._h2
        if conn is None or state is None:
            raise self._unavailable(channel._failure or "connection lost")
        return conn

    def _unavailable(self, reason: str) -> RpcStatusError:
        return RpcStatusError(grpc.StatusCode.UNAVAILABLE, reason, method=self.method)

    def _early_result(self, state: _StreamState) -> Exception:
        try:
            self._result(state)
        except (RpcStatusError, TransportError) as exc:
            return exc
        return RpcStatusError(
            grpc.StatusCode.INTERNAL, "server answered before the stream ended", method=self.method
        )

    def _result(self, state: _StreamState) -> bytes:
        status = status_from_headers(state.trailers) or status_from_headers(state.headers)
        if status is None:
            if state.reset is not None:
                raise RpcStatusError(
                    grpc.StatusCode.UNAVAILABLE
                    if state.reset == h2.errors.ErrorCodes.REFUSED_STREAM
                    else grpc.StatusCode.CANCELLED,
                    f"stream reset by the server (HTTP/2 error {state.reset})",
                    method=self.method,
                )
            raise RpcStatusError(
                grpc.StatusCode.INTERNAL, "response without grpc-status", method=self.method
            )
        code, message = status
        if code is not grpc.StatusCode.OK:
            raise RpcStatusError(code, message, method=self.method)
        messages = MessageReader().feed(bytes(state.data))
        return messages[0] if messages else b""
