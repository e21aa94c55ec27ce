"""The HTTP/2 gRPC core: our server with grpcio clients, our client with grpcio servers."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest

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


def test_server_keeps_serving_while_one_stream_stalls(
    server: tuple[GrpcH2Server, list[Counting]],
) -> None:
    """A stream left open without data never blocks another client's calls."""
    srv, _ = server
    gate = threading.Event()

    def stalling() -> Iterator[bytes]:
        yield b"partial"
        gate.wait(15)  # the client sends nothing more until the other call is done

    with grpc.insecure_channel(srv.address) as stalled, grpc.insecure_channel(srv.address) as other:
        idle = stalled.stream_unary(COUNT).future(stalling(), timeout=30)
        try:
            assert other.stream_unary(COUNT)(iter([b"1", b"2"]), timeout=10) == b"2/2"
            assert not idle.done()
        finally:
            gate.set()
        assert idle.result(timeout=10) == b"1/7"


def test_a_port_in_use_is_an_os_error_and_nothing_leaks(
    server: tuple[GrpcH2Server, list[Counting]],
) -> None:
    """Binding a taken port raises OSError at construction, leaving no half-built server."""
    srv, _ = server
    with pytest.raises(OSError, match="in use"):
        GrpcH2Server(port=srv.port, unary={}, streams={})


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
