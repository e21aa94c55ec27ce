"""SiftChannel against a real grpcio server: headers on the wire and every status code mapped."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from daq_agent.core.errors import RpcStatusError, TransportError
from daq_agent.ingestion import RpcError, SiftChannel, map_rpc_errors, use_sift_channel

pytestmark = pytest.mark.integration

_KEY = "k3y-that-must-never-leak"
_ECHO = "/test.Echo/Headers"
_STREAM = "/test.Echo/Count"
_FAIL = "/test.Echo/Fail"
_SPLIT = "/test.Echo/Split"
_ECHO_ALL = "/test.Echo/EchoAll"


def _identity(data: bytes) -> bytes:
    return data


class _Handler(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Echoes the call's metadata; fails with the status named in the request."""

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        if method == _ECHO:
            return grpc.unary_unary_rpc_method_handler(self._echo)
        if method == _STREAM:
            return grpc.stream_unary_rpc_method_handler(self._count)
        if method == _FAIL:
            return grpc.unary_unary_rpc_method_handler(self._fail)
        if method == _SPLIT:
            return grpc.unary_stream_rpc_method_handler(self._split)
        if method == _ECHO_ALL:
            return grpc.stream_stream_rpc_method_handler(self._echo_all)
        return None

    @staticmethod
    def _split(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from (bytes([b]) for b in request)

    @staticmethod
    def _echo_all(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        auth = next((v for k, v in context.invocation_metadata() if k == "authorization"), "")
        assert auth == f"Bearer {_KEY}"
        yield from requests

    @staticmethod
    def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        pairs = [f"{k}={v}" for k, v in context.invocation_metadata() if isinstance(v, str)]
        return "\n".join(pairs).encode()

    @staticmethod
    def _count(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        auth = next((v for k, v in context.invocation_metadata() if k == "authorization"), "")
        assert isinstance(auth, str)
        return f"{sum(1 for _ in requests)} {auth}".encode()

    @staticmethod
    def _fail(request: bytes, context: grpc.ServicerContext) -> bytes:
        code = grpc.StatusCode[request.decode()]
        context.abort(code, f"failed with {code.name} for Bearer {_KEY}")
        raise AssertionError("abort returns only by raising")


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A grpcio server on 127.0.0.1, port 0, serving the test handler."""
    executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="test-echo-server")
    server = grpc.server(executor, handlers=[_Handler()])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None).wait(10)
        executor.shutdown(wait=True)


@pytest.fixture
def channel(echo_port: int) -> Iterator[SiftChannel]:
    """A plain-text SiftChannel to the echo server, with an API key and extra metadata."""
    config = {"uri": f"grpc://127.0.0.1:{echo_port}", "apikey": _KEY, "use_ssl": False}
    with use_sift_channel(config, metadata={"X-Extra": "yes"}) as ch:  # type: ignore[arg-type]
        yield ch


def test_unary_call_carries_bearer_key(channel: SiftChannel) -> None:
    """A unary call carries authorization: Bearer <key> and the extra metadata."""
    call = channel.unary_unary(_ECHO, _identity, _identity)
    lines = call(b"", timeout=10).decode().splitlines()
    assert f"authorization=Bearer {_KEY}" in lines
    assert "x-extra=yes" in lines


def test_stream_call_carries_bearer_key(channel: SiftChannel) -> None:
    """A client-streaming call carries the key and delivers every message."""
    call = channel.stream_unary(_STREAM, _identity, _identity)
    assert call(iter([b"a"] * 5), timeout=10) == f"5 Bearer {_KEY}".encode()


def test_streaming_calls_are_delegated(channel: SiftChannel) -> None:
    """unary_stream and stream_stream calls reach the server with the key and stream back."""
    split = channel.unary_stream(_SPLIT, _identity, _identity)
    assert list(split(b"abc", timeout=10)) == [b"a", b"b", b"c"]
    echo_all = channel.stream_stream(_ECHO_ALL, _identity, _identity)
    assert list(echo_all(iter([b"x", b"y"]), timeout=10)) == [b"x", b"y"]


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK])
def test_every_status_maps_to_rpc_error(channel: SiftChannel, code: grpc.StatusCode) -> None:
    """Each non-OK status becomes an RpcError (a grpc.RpcError and an RpcStatusError) with its
    code and details, the key scrubbed."""
    call = channel.unary_unary(_FAIL, _identity, _identity)
    with pytest.raises(grpc.RpcError) as info, channel.map_errors(_FAIL):
        call(code.name.encode(), timeout=10)
    error = info.value
    assert isinstance(error, RpcError)
    assert error.code() is code
    assert error.method == _FAIL
    details = error.details()
    assert details is not None
    assert f"failed with {code.name}" in details
    assert _KEY not in details
    assert _KEY not in str(error)
    assert isinstance(error, RpcStatusError)
    assert isinstance(error, TransportError)


def test_unreachable_server_is_unavailable() -> None:
    """A call to a closed port fails with an UNAVAILABLE RpcError."""
    with use_sift_channel({"uri": "127.0.0.1:1", "apikey": _KEY, "use_ssl": False}) as ch:
        call = ch.unary_unary(_ECHO, _identity, _identity)
        with pytest.raises(RpcError) as info, map_rpc_errors(_ECHO, secret=_KEY):
            call(b"", timeout=10)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE


def test_connectivity_subscription(channel: SiftChannel) -> None:
    """subscribe/unsubscribe reach the inner channel and report READY after a call."""
    import threading

    ready = threading.Event()

    def on_state(state: grpc.ChannelConnectivity) -> None:
        if state is grpc.ChannelConnectivity.READY:
            ready.set()

    channel.subscribe(on_state, try_to_connect=True)
    try:
        assert ready.wait(10)
    finally:
        channel.unsubscribe(on_state)
