"""The HTTP/2 gRPC core: our server with grpcio clients, our client with grpcio servers."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.settings
import pytest
import trustme

from daq_agent.core.errors import RpcStatusError, TransportError
from daq_agent.h2grpc.client import H2Channel
from daq_agent.h2grpc.server import GrpcH2Server
from daq_agent.server.rpc import CallContext, RpcError

pytestmark = pytest.mark.integration

ECHO = "/test.Service/Echo"
COUNT = "/test.Service/Count"


class Counting:
    """A stream handler that counts messages and bytes; ``b"fail"`` ends the call."""

    calls: list[Counting]

    def __init__(self, ctx: CallContext) -> None:
        self.ctx = ctx
        self.messages = 0
        self.size = 0
        self.batches = 0
        self.aborted = False
        self.aborts = 0

    def on_messages(self, messages: list[bytes]) -> None:
        self.batches += 1
        for message in messages:
            if message == b"fail":
                raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "failing as asked: 100% ünïcode")
            if message == b"bug":
                raise ZeroDivisionError("a handler bug")
            self.messages += 1
            self.size += len(message)

    def on_end(self) -> bytes:
        return f"{self.messages}/{self.size}".encode()

    def on_abort(self) -> None:
        self.aborted = True
        self.aborts += 1


def _echo(request: bytes, ctx: CallContext) -> bytes:
    if request == b"who":
        return ctx.metadata.get("authorization", "").encode()
    if request == b"missing":
        raise RpcError(grpc.StatusCode.NOT_FOUND, "no such thing")
    return request[::-1]


@pytest.fixture
def server() -> Iterator[tuple[GrpcH2Server, list[Counting]]]:
    """Our server with an echo and a counting method."""
    handlers: list[Counting] = []

    def factory(ctx: CallContext) -> Counting:
        handler = Counting(ctx)
        handlers.append(handler)
        return handler

    srv = GrpcH2Server(unary={ECHO: _echo}, streams={COUNT: factory})
    srv.start()
    try:
        yield srv, handlers
    finally:
        srv.stop(grace=1)


def test_grpcio_unary_calls(server: tuple[GrpcH2Server, list[Counting]]) -> None:
    """grpcio calls a unary method and sees its status codes and metadata."""
    srv, _ = server
    with grpc.insecure_channel(srv.address) as channel:
        echo = channel.unary_unary(ECHO)
        assert echo(b"hello", timeout=5) == b"olleh"
        big = bytes(range(256)) * 4000  # > 64 KiB windows both ways
        assert echo(big, timeout=5) == big[::-1]
        assert echo(b"who", metadata=[("authorization", "Bearer k")], timeout=5) == b"Bearer k"
        with pytest.raises(grpc.RpcError) as caught:
            echo(b"missing", timeout=5)
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
        assert caught.value.details() == "no such thing"
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/test.Service/Nope")(b"", timeout=5)
        assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED


def test_grpcio_client_stream_with_error_and_compression(
    server: tuple[GrpcH2Server, list[Counting]],
) -> None:
    """grpcio streams to the server, gzip-compressed or not, and gets early errors with details."""
    srv, handlers = server
    with grpc.insecure_channel(srv.address, compression=grpc.Compression.Gzip) as channel:
        count = channel.stream_unary(COUNT)
        assert count(iter([b"x" * 100] * 500), timeout=10) == b"500/50000"
        with pytest.raises(grpc.RpcError) as caught:
            count(iter([b"a", b"fail", b"b"]), timeout=10)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details() == "failing as asked: 100% ünïcode"
    assert handlers[1].messages == 1


def test_h2_client_coalesces_and_reports_status(
    server: tuple[GrpcH2Server, list[Counting]],
) -> None:
    """Our client carries many messages per DATA frame, larger than every window, and statuses."""
    srv, handlers = server
    with H2Channel("127.0.0.1", srv.port, use_ssl=False) as channel:
        stream = channel.stream(COUNT)
        for _ in range(40):
            stream.send([b"y" * 150] * 5000)  # 3.9 MB each: beyond the 16 MiB window over time
        assert stream.close(timeout=30) == f"{200_000}/{200_000 * 150}".encode()
        assert handlers[0].batches < 200_000 / 10  # many messages arrived per batch

        failing = channel.stream(COUNT)
        failing.send([b"ok", b"fail"])
        with pytest.raises(RpcStatusError) as caught:
            failing.close(timeout=10)
        assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert "failing as asked" in caught.value.details

        unknown = channel.stream("/test.Service/Nope")
        with pytest.raises(RpcStatusError) as caught:
            unknown.close(timeout=10)
        assert caught.value.code is grpc.StatusCode.UNIMPLEMENTED

        after = channel.stream(COUNT)  # the connection survives failed calls
        after.send([b"z"])
        assert after.close(timeout=10) == b"1/1"


def test_h2_client_cancel_aborts_the_call(server: tuple[GrpcH2Server, list[Counting]]) -> None:
    """A cancelled stream is aborted on the server and never answered as committed."""
    srv, handlers = server
    with H2Channel("127.0.0.1", srv.port, use_ssl=False) as channel:
        stream = channel.stream(COUNT)
        stream.send([b"a"] * 10)
        stream.cancel()
        check = channel.stream(COUNT)
        check.send([b"b"])
        assert check.close(timeout=10) == b"1/1"
    assert handlers[0].aborted


def test_h2_client_reconnects_after_server_restart() -> None:
    """A server that went away fails the open stream with UNAVAILABLE; the next call reconnects."""
    srv = GrpcH2Server(unary={}, streams={COUNT: Counting})
    srv.start()
    port = srv.port
    channel = H2Channel("127.0.0.1", port, use_ssl=False)
    try:
        stream = channel.stream(COUNT)
        stream.send([b"a"])
        srv.stop(grace=0)
        with pytest.raises(RpcStatusError) as caught:
            stream.close(timeout=10)
        assert caught.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        with pytest.raises(TransportError):
            channel.stream(COUNT).close(timeout=5)
        again = GrpcH2Server(port=port, unary={}, streams={COUNT: Counting})
        again.start()
        try:
            stream = channel.stream(COUNT)
            stream.send([b"a", b"b"])
            assert stream.close(timeout=10) == b"2/2"
        finally:
            again.stop(grace=0)
    finally:
        channel.close()


def _grpcio_counting_server(
    credentials: grpc.ServerCredentials | None,
) -> tuple[grpc.Server, int, list[str]]:
    seen: list[str] = []

    def count(request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        seen.append(dict(context.invocation_metadata()).get("authorization", ""))
        total = sum(1 for _ in request_iterator)
        return str(total).encode()

    handler = grpc.method_handlers_generic_handler(
        "test.Service", {"Count": grpc.stream_unary_rpc_method_handler(count)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="grpcio"))
    server.add_generic_rpc_handlers((handler,))
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port, seen


def test_h2_client_against_a_grpcio_server_over_tls() -> None:
    """Our client is a standard gRPC client: a grpcio server over TLS accepts its stream."""
    authority = trustme.CA()
    cert = authority.issue_cert("localhost", "127.0.0.1")
    credentials = grpc.ssl_server_credentials(
        [(cert.private_key_pem.bytes(), cert.cert_chain_pems[0].bytes())]
    )
    server, port, seen = _grpcio_counting_server(credentials)
    context = ssl.create_default_context()
    authority.configure_trust(context)
    try:
        with H2Channel(
            "localhost",
            port,
            use_ssl=True,
            ssl_context=context,
            metadata=[("authorization", "Bearer secret")],
        ) as channel:
            stream = channel.stream(COUNT)
            for _ in range(5):
                stream.send([b"m" * 64] * 2000)
            assert stream.close(timeout=30) == b"10000"
    finally:
        server.stop(grace=None).wait()
    assert seen == ["Bearer secret"]


def test_h2_client_refuses_an_untrusted_certificate() -> None:
    """TLS verification is on: a server with an unknown CA is refused with a clear error."""
    cert = trustme.CA().issue_cert("localhost")
    credentials = grpc.ssl_server_credentials(
        [(cert.private_key_pem.bytes(), cert.cert_chain_pems[0].bytes())]
    )
    server, port, _ = _grpcio_counting_server(credentials)
    try:
        with (
            H2Channel("localhost", port, use_ssl=True) as channel,
            pytest.raises(TransportError, match="TLS handshake"),
        ):
            channel.stream(COUNT)
    finally:
        server.stop(grace=None).wait()


def test_server_keeps_serving_while_one_stream_stalls(
    server: tuple[GrpcH2Server, list[Counting]],
) -> None:
    """A stream left open without data never blocks another client's calls."""
    srv, _ = server
    stalled = H2Channel("127.0.0.1", srv.port, use_ssl=False)
    try:
        idle = stalled.stream(COUNT)
        idle.send([b"partial"])
        results: list[Any] = []

        def other() -> None:
            with grpc.insecure_channel(srv.address) as channel:
                results.append(channel.stream_unary(COUNT)(iter([b"1", b"2"]), timeout=10))

        thread = threading.Thread(target=other, name="other-client")
        thread.start()
        thread.join(timeout=15)
        assert results == [b"2/2"]
        idle.cancel()
    finally:
        stalled.close()


def test_a_port_in_use_is_an_os_error_and_nothing_leaks(
    server: tuple[GrpcH2Server, list[Counting]],
) -> None:
    """Binding a taken port raises OSError at construction, leaving no half-built server."""
    srv, _ = server
    with pytest.raises(OSError, match="in use"):
        GrpcH2Server(port=srv.port, unary={}, streams={})


def _silent_peer(
    *, open_windows: bool
) -> tuple[socket.socket, threading.Thread, list[socket.socket]]:
    """A TCP peer that (optionally) opens HTTP/2 flow-control windows wide, then never reads."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def serve() -> None:
        conn, _ = listener.accept()
        accepted.append(conn)
        if open_windows:
            peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
            peer.initiate_connection()
            peer.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
            peer.increment_flow_control_window(2**31 - 1 - 65535)
            conn.sendall(peer.data_to_send())

    thread = threading.Thread(target=serve, name="silent-peer")
    thread.start()
    return listener, thread, accepted


@pytest.mark.parametrize("open_windows", [False, True], ids=["flow-control", "socket"])
def test_a_peer_that_stops_reading_fails_the_send_in_bounded_time(open_windows: bool) -> None:
    """A hung peer fails a send after the timeout, whether its windows or the socket fill up."""
    listener, thread, accepted = _silent_peer(open_windows=open_windows)
    port = listener.getsockname()[1]
    channel = H2Channel("127.0.0.1", port, use_ssl=False, write_timeout=0.5)
    try:
        stream = channel.stream(COUNT)
        thread.join(timeout=5)

        def flood() -> None:
            for _ in range(2000):  # up to 2 GB: far beyond any socket buffer
                stream.send([b"p" * 1_000_000], timeout=0.5)

        started = time.monotonic()
        with pytest.raises(TransportError):
            flood()
        assert time.monotonic() - started < 10
    finally:
        channel.close()
        for conn in accepted:
            conn.close()
        listener.close()


def test_a_handler_error_ends_the_call_and_aborts_the_handler_once(
    server: tuple[GrpcH2Server, list[Counting]],
) -> None:
    """An RpcError or a bug in a handler ends its call with a status and one on_abort."""
    srv, handlers = server
    with grpc.insecure_channel(srv.address) as channel:
        count = channel.stream_unary(COUNT)
        for payload, code in (
            (b"fail", grpc.StatusCode.INVALID_ARGUMENT),
            (b"bug", grpc.StatusCode.INTERNAL),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                count(iter([b"a", payload]), timeout=10)
            assert caught.value.code() is code
        assert count(iter([b"ok"]), timeout=10) == b"1/2"
    assert [h.aborts for h in handlers] == [1, 1, 0]
