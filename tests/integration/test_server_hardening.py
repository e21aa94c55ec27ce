"""The gRPC server core under bad or hostile input: keys, TLS, sizes, limits, deadlines, logs.

Well-behaved clients are grpcio; a raw ``h2`` client on a socket sends what grpcio never would
(malformed headers, a gzip bomb, frames batched the way a resumed process reads them).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
import trustme
from server_calls import call

from daq_agent import methods
from daq_agent._proto.sift.ping.v1 import ping_pb2
from daq_agent.cli import main
from daq_agent.core.errors import ConfigError
from daq_agent.h2grpc.server import GrpcH2Server, server_ssl_context
from daq_agent.server.local import make_server
from daq_agent.server.rpc import CallContext

pytestmark = pytest.mark.integration

ECHO = "/test.Service/Echo"
SLOW = "/test.Service/Slow"
COUNT = "/test.Service/Count"
KEY = "k3y-Zq8vX2-distinctive"
MIB = 1024 * 1024


class Counting:
    """A stream handler that keeps what it got and how it ended."""

    def __init__(self, ctx: CallContext) -> None:
        self.ctx = ctx
        self.messages: list[bytes] = []
        self.ended = threading.Event()
        self.aborted = threading.Event()

    def on_messages(self, messages: list[bytes]) -> None:
        self.messages.extend(messages)

    def on_end(self) -> bytes:
        self.ended.set()
        return str(len(self.messages)).encode()

    def on_abort(self) -> None:
        self.aborted.set()


def _slow(request: bytes, _ctx: CallContext) -> bytes:
    time.sleep(float(request.decode()))  # blocks the server thread: a handler running long
    return b"done"


ServerFactory = Callable[..., tuple[GrpcH2Server, list[Counting]]]


@pytest.fixture
def serve() -> Iterator[ServerFactory]:
    """Start our server with echo, slow and counting methods and the given limits."""
    started: list[GrpcH2Server] = []

    def start(**kwargs: Any) -> tuple[GrpcH2Server, list[Counting]]:
        handlers: list[Counting] = []

        def factory(ctx: CallContext) -> Counting:
            handlers.append(Counting(ctx))
            return handlers[-1]

        server = GrpcH2Server(
            unary={ECHO: lambda request, _ctx: request[::-1], SLOW: _slow},
            streams={COUNT: factory},
            **kwargs,
        )
        server.start()
        started.append(server)
        return server, handlers

    yield start
    for server in started:
        server.stop(grace=0.5)


def _channel(address: str, **kwargs: Any) -> grpc.Channel:
    """A grpcio channel with a connection of its own (grpcio shares them between channels)."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    if "credentials" in kwargs:
        return grpc.secure_channel(address, kwargs.pop("credentials"), options=options, **kwargs)
    return grpc.insecure_channel(address, options=options, **kwargs)


def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def _message(payload: bytes, *, compressed: bool = False) -> bytes:
    return struct.pack(">BI", int(compressed), len(payload)) + payload


class RawClient:
    """A bare HTTP/2 client: sends whatever a test asks (however malformed) and reads events."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
                validate_inbound_headers=False,
            )
        )
        self.closed = False
        self.ended: dict[int, list[tuple[bytes, bytes]]] = {}  # stream: its last headers
        self.resets: dict[int, int] = {}  # stream: error code
        self._headers: dict[int, list[tuple[bytes, bytes]]] = {}
        self._window_opened = False
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(2**30)
        self.flush()
        # The server's settings and its connection window come in one write, the window last.
        self.wait(lambda: self._window_opened)

    def flush(self) -> None:
        """Send everything queued, in one write."""
        self.sock.sendall(self.h2.data_to_send())

    def request(self, path: str, *extra: tuple[bytes, bytes], end: bool = False) -> int:
        """Open a call; returns its stream id (not flushed)."""
        stream_id: int = self.h2.get_next_available_stream_id()
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.encode()),
            (b":authority", b"localhost"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            *extra,
        ]
        self.h2.send_headers(stream_id, headers, end_stream=end)
        return stream_id

    def send(self, stream_id: int, data: bytes, *, end: bool = False, frame: int = 16384) -> None:
        """Queue ``data`` in DATA frames of ``frame`` bytes (not flushed)."""
        for start in range(0, len(data), frame):
            last = start + frame >= len(data)
            self.h2.send_data(stream_id, data[start : start + frame], end_stream=end and last)
        if not data and end:
            self.h2.end_stream(stream_id)

    def status(self, stream_id: int, timeout: float = 10.0) -> tuple[int, str]:
        """The call's grpc-status and grpc-message, once it ended."""
        self.wait(lambda: stream_id in self.ended or stream_id in self.resets, timeout)
        assert stream_id in self.ended, f"stream {stream_id} was reset: {self.resets}"
        headers = dict(self.ended[stream_id])
        return int(headers[b"grpc-status"]), headers.get(b"grpc-message", b"").decode()

    def wait(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        """Read and handle frames until ``condition()`` or the connection closes."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert not self.closed, "the server closed the connection"
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise AssertionError("nothing came in time") from None
            except ConnectionResetError:
                data = b""
            if not data:
                self.closed = True
                continue
            for event in self.h2.receive_data(data):
                self._on(event)
            self.flush()

    def _on(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.WindowUpdated) and event.stream_id == 0:
            self._window_opened = True
        elif isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
            self._headers[event.stream_id] = list(event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            self.ended[event.stream_id] = self._headers.get(event.stream_id, [])
        elif isinstance(event, h2.events.StreamReset):
            self.resets[event.stream_id] = int(event.error_code)
        elif isinstance(event, h2.events.DataReceived):
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.closed = True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw() -> Iterator[Callable[[int], RawClient]]:
    """Open raw HTTP/2 connections, closed after the test."""
    clients: list[RawClient] = []

    def connect(port: int) -> RawClient:
        clients.append(RawClient(port))
        return clients[-1]

    yield connect
    for client in clients:
        client.close()


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# -- authentication ----------------------------------------------------------------------------


def test_an_empty_or_malformed_bearer_is_unauthenticated_never_a_protocol_error(
    tmp_path: Path,
) -> None:
    """``Bearer `` (sift_py's empty key), no scheme or garbage: UNAUTHENTICATED, no GOAWAY."""
    server = make_server(tmp_path / "auth.sqlite", api_key=KEY)
    with server, _channel(server.address) as channel:
        for value in ("Bearer ", "Bearer", "", "   ", KEY, "Basic " + KEY, "Bearer x", "%%~!:;{}"):
            with pytest.raises(grpc.RpcError) as caught:
                call(
                    channel,
                    methods.PING,
                    ping_pb2.PingRequest(),
                    ping_pb2.PingResponse,
                    [("authorization", value)],
                )
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED, value
        for value in (f"Bearer {KEY}", f"bearer  {KEY} "):
            md = [("authorization", value)]
            assert call(channel, methods.PING, ping_pb2.PingRequest(), ping_pb2.PingResponse, md)
        assert server.stats.protocol_errors == 0
        assert server.connections == 1  # every call above on one connection


def test_an_empty_bearer_is_accepted_by_a_server_without_a_key(tmp_path: Path) -> None:
    """With no key configured, ``authorization: Bearer `` is just another header."""
    server = make_server(tmp_path / "open.sqlite")
    with server, _channel(server.address) as channel:
        md = [("authorization", "Bearer ")]
        answer = call(channel, methods.PING, ping_pb2.PingRequest(), ping_pb2.PingResponse, md)
        assert answer.response


def test_raw_garbage_headers_fail_their_own_stream_only(
    tmp_path: Path, raw: Callable[[int], RawClient], caplog: pytest.LogCaptureFixture
) -> None:
    """Non-UTF-8 bytes in a key are UNAUTHENTICATED; CR/LF or a bad name resets one stream."""
    server = make_server(tmp_path / "raw.sqlite", api_key=KEY)
    ping = _message(ping_pb2.PingRequest().SerializeToString())
    with server:
        client = raw(server.port)
        garbage = client.request(methods.PING, (b"authorization", b"Bearer \xff\xfe\x80 "))
        client.send(garbage, ping, end=True)
        newline = client.request(
            methods.PING, (b"authorization", b"Bearer " + KEY.encode() + b"\n")
        )
        client.send(newline, ping, end=True)
        upper = client.request(methods.PING, (b"Authorization", b"Bearer " + KEY.encode()))
        client.send(upper, ping, end=True)
        good = client.request(methods.PING, (b"authorization", b"\tBearer " + KEY.encode() + b" "))
        client.send(good, ping, end=True)
        client.flush()
        assert client.status(garbage)[0] == grpc.StatusCode.UNAUTHENTICATED.value[0]
        assert client.status(good) == (0, "")
        client.wait(lambda: newline in client.resets and upper in client.resets)
        assert client.resets[newline] == client.resets[upper] == 1  # PROTOCOL_ERROR
        assert not client.closed
        assert server.stats.malformed_requests == 2
        assert server.stats.protocol_errors == 0
    assert not _errors(caplog)


# -- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    """A throwaway certificate authority."""
    return trustme.CA()


@pytest.fixture
def tls_files(authority: trustme.CA, tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1 signed by ``authority``, and its key."""
    cert = authority.issue_cert("localhost", "127.0.0.1")
    cert_file, key_file = tmp_path / "server.pem", tmp_path / "server.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return cert_file, key_file


def _credentials(authority: trustme.CA) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=authority.cert_pem.bytes())


def test_tls_with_alpn_h2_and_a_verifying_grpcio_client(
    tmp_path: Path, authority: trustme.CA, tls_files: tuple[Path, Path]
) -> None:
    """make_server(tls_cert, tls_key) serves TLS, negotiates h2 and is verified by grpcio."""
    cert_file, key_file = tls_files
    server = make_server(tmp_path / "tls.sqlite", tls_cert=cert_file, tls_key=key_file)
    with server:
        with _channel(server.address, credentials=_credentials(authority)) as channel:
            assert call(channel, methods.PING, ping_pb2.PingRequest(), ping_pb2.PingResponse)
        # An untrusted authority is refused by the client; plain text is refused by the server.
        stranger = grpc.ssl_channel_credentials(root_certificates=trustme.CA().cert_pem.bytes())
        for channel in (_channel(server.address, credentials=stranger), _channel(server.address)):
            with channel, pytest.raises(grpc.RpcError) as caught:
                call(channel, methods.PING, ping_pb2.PingRequest(), ping_pb2.PingResponse)
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        context = ssl.create_default_context(cadata=authority.cert_pem.bytes().decode())
        context.set_alpn_protocols(["http/1.1", "h2"])
        with (
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock,
            context.wrap_socket(sock, server_hostname="localhost") as tls,
        ):
            assert tls.selected_alpn_protocol() == "h2"
            assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_tls_files_that_cannot_be_loaded_are_config_errors(
    tmp_path: Path, authority: trustme.CA, tls_files: tuple[Path, Path]
) -> None:
    """A missing file, a key of another certificate, or an encrypted key names the file."""
    cert_file, key_file = tls_files
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "nope.pem"))):
        server_ssl_context(tmp_path / "nope.pem", key_file)
    other_key = tmp_path / "other.key"
    authority.issue_cert("other").private_key_pem.write_to_path(str(other_key))
    with pytest.raises(ConfigError, match=re.escape(str(other_key))):
        server_ssl_context(cert_file, other_key)
    with pytest.raises(ValueError, match="go together"):
        make_server(tmp_path / "x.sqlite", tls_cert=cert_file)


def test_serve_with_tls_flags(
    tmp_path: Path, authority: trustme.CA, tls_files: tuple[Path, Path]
) -> None:
    """``daq-agent serve --tls-cert --tls-key`` answers a verifying grpcio client over TLS."""
    cert_file, key_file = tls_files
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daq_agent.cli",
            "serve",
            "--db",
            str(tmp_path / "served.sqlite"),
            "--port",
            "0",
            "--tls-cert",
            str(cert_file),
            "--tls-key",
            str(key_file),
            "--max-connections",
            "4",
            "--max-streams",
            "8",
            "--idle-timeout",
            "30",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = _listening_port(process)
        with _channel(f"127.0.0.1:{port}", credentials=_credentials(authority)) as channel:
            assert call(channel, methods.PING, ping_pb2.PingRequest(), ping_pb2.PingResponse)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        _end(process)


def test_serve_refuses_half_a_tls_configuration(
    tmp_path: Path, tls_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """``--tls-cert`` without ``--tls-key`` (or a missing file) is a clear error, exit code 2."""
    cert_file = tls_files[0]
    db = str(tmp_path / "half.sqlite")
    assert main(["serve", "--db", db, "--port", "0", "--tls-cert", str(cert_file)]) == 2
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err
    missing = str(tmp_path / "missing.key")
    args = ["serve", "--db", db, "--port", "0", "--tls-cert", str(cert_file), "--tls-key", missing]
    assert main(args) == 2
    assert f"{missing}: no such TLS private key file" in capsys.readouterr().err


def _state(pid: int) -> str:
    """The process state letter from /proc (``T``: stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _listening_port(process: subprocess.Popen[str]) -> int:
    assert process.stderr is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        assert line, "serve exited before listening"
        match = re.search(r"listening on 127\.0\.0\.1:(\d+) \(db [^,)]+, TLS", line)
        if match:
            return int(match.group(1))
    raise AssertionError("serve did not log its TLS address")


def _end(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(timeout=10)
    if process.stderr is not None:
        process.stderr.close()


# -- sizes -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gzip_bomb() -> bytes:
    """67 MB of zeros, gzip-compressed into about 65 KB."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(MIB)
    bomb = b"".join(compressor.compress(zeros) for _ in range(64)) + compressor.flush()
    assert len(bomb) < 100_000
    return bomb


def test_a_gzip_bomb_is_refused_without_being_inflated(
    serve: ServerFactory, raw: Callable[[int], RawClient], gzip_bomb: bytes
) -> None:
    """The 4 MiB limit holds for the decompressed message; the bomb never grows in memory."""
    server, handlers = serve()
    client = raw(server.port)
    tracemalloc.start()
    try:
        stream_id = client.request(COUNT, (b"grpc-encoding", b"gzip"))
        client.send(stream_id, _message(gzip_bomb, compressed=True), end=True)
        client.flush()
        code, message = client.status(stream_id)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "larger than max once decompressed" in message
    assert peak < 24 * MIB  # the bomb inflated would be 64 MiB
    assert handlers[0].messages == []
    assert handlers[0].aborted.is_set()
    # A compressed message within the limit still goes through, on the same connection.
    small = zlib.compressobj(6, zlib.DEFLATED, 31)
    payload = small.compress(bytes(4 * MIB)) + small.flush()  # exactly the limit
    stream_id = client.request(COUNT, (b"grpc-encoding", b"gzip"))
    client.send(stream_id, _message(payload, compressed=True), end=True)
    client.flush()
    assert client.status(stream_id) == (0, "")
    assert [len(m) for m in handlers[1].messages] == [4 * MIB]


def test_a_message_in_1_kib_frames_is_reassembled_whole(
    serve: ServerFactory, raw: Callable[[int], RawClient]
) -> None:
    """4 MiB sent in 4096 DATA frames of 1 KiB arrives as one intact message."""
    server, handlers = serve()
    client = raw(server.port)
    payload = os.urandom(4 * MIB - 5)
    stream_id = client.request(COUNT)
    client.send(stream_id, _message(payload), end=True, frame=1024)
    client.flush()
    assert client.status(stream_id, timeout=30) == (0, "")
    assert handlers[0].messages == [payload]


# -- limits ------------------------------------------------------------------------------------


def test_connections_beyond_the_limit_are_refused(serve: ServerFactory) -> None:
    """With max_connections=2 a third client gets UNAVAILABLE; once one leaves, it gets in."""
    server, _ = serve(max_connections=2)
    first, second = _channel(server.address), _channel(server.address)
    try:
        for channel in (first, second):
            assert channel.unary_unary(ECHO)(b"ab", timeout=10) == b"ba"
        _until(lambda: server.connections == 2)
        with _channel(server.address) as third, pytest.raises(grpc.RpcError) as caught:
            third.unary_unary(ECHO)(b"ab", timeout=10)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert server.stats.connections_refused >= 1
        first.close()
        _until(lambda: server.connections == 1)
        with _channel(server.address) as fourth:
            assert fourth.unary_unary(ECHO)(b"cd", timeout=10) == b"dc"
    finally:
        first.close()
        second.close()


def test_concurrent_streams_are_limited_per_connection(
    serve: ServerFactory, raw: Callable[[int], RawClient]
) -> None:
    """max_concurrent_streams is advertised, and grpcio holds a third call until one ends."""
    server, handlers = serve(max_concurrent_streams=2)
    settings = raw(server.port).h2.remote_settings
    assert settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] == 2
    release = [threading.Event() for _ in range(3)]

    def requests(index: int) -> Iterator[bytes]:
        yield str(index).encode()
        release[index].wait(timeout=30)

    with _channel(server.address) as channel:
        count = channel.stream_unary(COUNT)
        calls = [count.future(requests(i), timeout=30) for i in range(3)]
        _until(lambda: len(handlers) == 2 and all(h.messages for h in handlers))
        time.sleep(0.3)  # a bounded look for the call that must not start
        assert len(handlers) == 2
        release[int(handlers[0].messages[0])].set()  # one call ends: the third may start
        _until(lambda: len(handlers) == 3)
        for event in release:
            event.set()
        assert [c.result(timeout=30) for c in calls] == [b"1", b"1", b"1"]


def test_an_idle_connection_is_closed_and_its_stream_cleaned_up(
    serve: ServerFactory, raw: Callable[[int], RawClient], caplog: pytest.LogCaptureFixture
) -> None:
    """A client that stops sending mid-stream (a SIGSTOP) is closed after idle_timeout."""
    server, handlers = serve(idle_timeout=0.3)
    client = raw(server.port)
    stream_id = client.request(COUNT)
    client.send(stream_id, _message(b"one") + _message(b"partial")[:6])
    client.flush()
    _until(lambda: bool(handlers) and handlers[0].messages == [b"one"])
    started = time.monotonic()
    client.wait(lambda: client.closed, timeout=10)
    assert 0.2 < time.monotonic() - started < 5
    assert handlers[0].aborted.wait(timeout=5)
    assert not handlers[0].ended.is_set()
    assert server.stats.connections_idle == 1
    assert server.stats.calls_abandoned == 1
    _until(lambda: server.connections == 0)
    with _channel(server.address) as channel:  # a new client is served as before
        assert channel.unary_unary(ECHO)(b"ab", timeout=10) == b"ba"
    assert not _errors(caplog)


def test_a_unary_call_buffers_one_message_only(
    serve: ServerFactory, raw: Callable[[int], RawClient]
) -> None:
    """A second request message on a unary call ends it at once, before the client ends."""
    server, _ = serve()
    client = raw(server.port)
    stream_id = client.request(ECHO)
    client.send(stream_id, _message(b"a") + _message(b"b"))  # never ended
    client.flush()
    code, message = client.status(stream_id)
    assert code == grpc.StatusCode.INTERNAL.value[0]
    assert "one request message" in message
    empty = client.request(ECHO, end=True)
    client.flush()
    assert client.status(empty)[0] == grpc.StatusCode.INTERNAL.value[0]


# -- deadlines and abandoned calls -------------------------------------------------------------


def test_grpc_timeout_ends_a_stalled_stream_and_a_slow_handler(
    serve: ServerFactory, raw: Callable[[int], RawClient]
) -> None:
    """grpc-timeout is honoured: a stream left open or a handler running long: DEADLINE_EXCEEDED."""
    server, handlers = serve()
    client = raw(server.port)
    started = time.monotonic()
    stalled = client.request(COUNT, (b"grpc-timeout", b"200m"))
    client.send(stalled, _message(b"one"))  # then nothing: the client forgot it
    slow = client.request(SLOW, (b"grpc-timeout", b"100000u"))
    client.send(slow, _message(b"0.3"), end=True)
    quick = client.request(ECHO, (b"grpc-timeout", b"5S"))
    client.send(quick, _message(b"ab"), end=True)
    bad = client.request(ECHO, (b"grpc-timeout", b"12x"))
    client.send(bad, _message(b"ab"), end=True)
    client.flush()
    deadline_exceeded = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert client.status(stalled) == (deadline_exceeded, "deadline exceeded")
    assert 0.15 < time.monotonic() - started < 5
    assert handlers[0].aborted.is_set()
    assert client.status(slow)[0] == deadline_exceeded
    assert client.status(quick) == (0, "")
    code, message = client.status(bad)
    assert code == grpc.StatusCode.INTERNAL.value[0]
    assert "grpc-timeout" in message
    assert server.stats.deadlines_exceeded == 2


def test_a_stream_given_up_while_the_server_was_not_reading(
    serve: ServerFactory, raw: Callable[[int], RawClient], caplog: pytest.LogCaptureFixture
) -> None:
    """END_STREAM, RST_STREAM and a newer stream read at once: aborted quietly, no traceback.

    The bytes a client sends while the server is stopped (SIGSTOP) arrive in one read: its
    stream's end, its reset once the client timed out, and its next call. Answering the reset
    stream raised h2's StreamIDTooLowError ("1 is lower than 3").
    """
    server, handlers = serve()
    client = raw(server.port)
    first = client.request(COUNT)
    client.send(first, _message(b"x"))
    client.flush()
    _until(lambda: bool(handlers) and handlers[0].messages == [b"x"])
    client.send(first, b"", end=True)
    client.h2.reset_stream(first, error_code=8)  # CANCEL
    second = client.request(COUNT)
    client.send(second, _message(b"y"), end=True)
    client.flush()  # one write: one read on the server
    assert client.status(second) == (0, "")
    assert handlers[0].aborted.is_set()
    assert not handlers[0].ended.is_set()
    assert first not in client.ended
    assert server.stats.calls_abandoned == 1
    assert not _errors(caplog)


def test_sigstop_longer_than_the_client_timeout_leaves_no_traceback(
    tmp_path: Path, raw: Callable[[int], RawClient]
) -> None:
    """``daq-agent serve`` stopped past a client's deadline resumes without an error logged."""
    db = tmp_path / "stopped.sqlite"
    command = [sys.executable, "-m", "daq_agent.cli", "serve", "--port", "0", "--db", str(db)]
    process = subprocess.Popen(
        [*command, "--max-streams", "7"],
        stderr=subprocess.PIPE,
        text=True,
    )
    log_lines: list[str] = []
    try:
        assert process.stderr is not None
        port = None
        while port is None:
            line = process.stderr.readline()
            assert line, "serve exited before listening"
            found = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            port = int(found.group(1)) if found else None
        reader = threading.Thread(
            target=lambda: log_lines.extend(process.stderr),  # type: ignore[arg-type]
            name="serve-log",
        )
        reader.start()
        settings = raw(port).h2.remote_settings  # the flag reached the server
        assert settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] == 7
        with _channel(f"127.0.0.1:{port}") as channel:
            ping = channel.unary_unary(methods.PING)
            assert ping(b"", timeout=10)
            process.send_signal(signal.SIGSTOP)
            _until(lambda: _state(process.pid) == "T")
            try:
                for _ in range(3):  # each gives up while the server is stopped
                    with pytest.raises(grpc.RpcError) as caught:
                        ping(b"", timeout=0.3)
                    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            finally:
                process.send_signal(signal.SIGCONT)
            assert ping(b"", timeout=10)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        reader.join(timeout=10)
    finally:
        _end(process)
    assert not [line for line in log_lines if "Traceback" in line or "ERROR" in line]


# -- logs --------------------------------------------------------------------------------------


class _Everything(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []
        self.names: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        self.names.add(record.name)
        self.lines.append(f"{record.name} {record.getMessage()} {record.exc_text or ''}")
        if record.exc_info:
            self.lines.append(logging.Formatter().formatException(record.exc_info))


@pytest.fixture
def every_logger_at_debug() -> Iterator[_Everything]:
    """Every logger (hpack's and h2's included) set to DEBUG and captured; restored after."""
    handler = _Everything()
    root = logging.getLogger()
    names = ["hpack", "hpack.hpack", "hpack.table", "h2", "asyncio", "grpc", "daq_agent"]
    loggers = [logging.getLogger(n) for n in names] + [
        logger
        for logger in logging.root.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    ]
    saved = [(logger, logger.level, logger.disabled) for logger in loggers]
    saved_root = root.level
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
        logger.disabled = False
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_root)
        for logger, level, disabled in saved:
            logger.setLevel(level)
            logger.disabled = disabled


def test_no_logger_prints_the_key_even_at_debug(
    tmp_path: Path, every_logger_at_debug: _Everything, raw: Callable[[int], RawClient]
) -> None:
    """Wrong, empty, malformed and right keys leave no trace of the key in any log record."""
    server = make_server(tmp_path / "logs.sqlite", api_key=KEY)
    codes: list[grpc.StatusCode] = []
    with server:
        with _channel(server.address) as channel:
            for value in (f"Bearer {KEY}x", f"{KEY} ", "Bearer ", f"Bearer {KEY}"):
                ping = channel.unary_unary(methods.PING).with_call
                try:
                    ping(b"", metadata=[("authorization", value)], timeout=10)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
        client = raw(server.port)
        for value in (b"Bearer " + KEY.encode() + b"\r\n", b"Bearer " + KEY.encode() + b"\xff"):
            stream_id = client.request(methods.PING, (b"authorization", value))
            client.send(stream_id, _message(b""), end=True)
        client.flush()
        client.wait(lambda: len(client.ended) + len(client.resets) == 2)
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 3 + [grpc.StatusCode.OK]
    captured = "\n".join(every_logger_at_debug.lines)
    assert "refused /sift.ping.v1.PingService/Ping" in captured  # DEBUG records were captured
    assert {"asyncio", "daq_agent.server.local"} <= every_logger_at_debug.names
    assert KEY not in captured
    assert KEY not in repr(CallContext("/m", {"authorization": f"Bearer {KEY}"}))
