"""The channel factory: URI forms, TLS policy, secrets kept out of text; the status errors."""

from __future__ import annotations

import copy
import pickle
import threading

import grpc
import pytest

from daq_agent.core.errors import ConfigError, DaqError, RpcStatusError, TransportError
from daq_agent.ingestion import RpcError, SiftChannel, use_sift_channel
from daq_agent.ingestion.transport import STATUS_ERRORS

_KEY = "s3cr3t-key-0123456789"


@pytest.mark.parametrize(
    ("uri", "host", "port"),
    [
        ("127.0.0.1:50051", "127.0.0.1", 50051),
        ("grpc://127.0.0.1:50051", "127.0.0.1", 50051),
        ("https://localhost:8443", "localhost", 8443),
        ("https://localhost", "localhost", 443),
        ("localhost", "localhost", 443),
        ("[::1]:7000", "::1", 7000),
        ("grpc://[::1]:7000/", "::1", 7000),
        ("127.9.8.7:1", "127.9.8.7", 1),
    ],
)
def test_uri_forms(uri: str, host: str, port: int) -> None:
    """host:port, grpc:// and https:// URIs give the host and port (443 by default)."""
    with use_sift_channel({"uri": uri, "apikey": _KEY, "use_ssl": False}) as channel:
        assert (channel.host, channel.port) == (host, port)
        assert not channel.use_ssl
    assert channel.closed


@pytest.mark.parametrize("uri", ["", "host:port", "a:b:c", "https://", "h:99999"])
def test_bad_uri_is_a_config_error(uri: str) -> None:
    """A URI that cannot be parsed raises a ConfigError naming the uri key."""
    with pytest.raises(ConfigError) as info:
        use_sift_channel({"uri": uri, "apikey": _KEY})
    assert info.value.key == "uri"


@pytest.mark.parametrize("host", ["example.com", "10.0.0.1", "192.168.1.2", "[2001:db8::1]"])
def test_plain_text_refused_off_loopback(host: str) -> None:
    """use_ssl=False is refused for a host that is not loopback, without naming the key."""
    with pytest.raises(ConfigError, match="loopback") as info:
        use_sift_channel({"uri": f"{host}:50051", "apikey": _KEY, "use_ssl": False})
    assert info.value.key == "use_ssl"
    assert _KEY not in str(info.value)


def test_tls_is_the_default() -> None:
    """Without use_ssl the channel uses TLS, for any host."""
    with use_sift_channel({"uri": "api.example.com:443", "apikey": _KEY}) as channel:
        assert channel.use_ssl
        assert isinstance(channel, grpc.Channel)
        assert channel.target == "api.example.com:443"


def test_key_stays_out_of_repr_and_keeps_config() -> None:
    """The channel keeps its config but its repr never shows the API key."""
    config = {"uri": "127.0.0.1:1", "apikey": _KEY, "use_ssl": False}
    with use_sift_channel(config) as channel:  # type: ignore[arg-type]
        assert channel.config is config
        assert _KEY not in repr(channel)
        assert ("authorization", f"Bearer {_KEY}") in channel.call_metadata()


def test_empty_key_sends_no_authorization() -> None:
    """An empty API key sends no authorization header."""
    with use_sift_channel({"uri": "127.0.0.1:1", "apikey": "", "use_ssl": False}) as channel:
        assert channel.call_metadata() == ()


def test_close_is_idempotent() -> None:
    """Closing a closed channel does nothing."""
    channel = use_sift_channel({"uri": "127.0.0.1:1", "apikey": _KEY, "use_ssl": False})
    assert isinstance(channel, SiftChannel)
    channel.close()
    channel.close()
    assert channel.closed


def test_the_stream_loop_is_shared_and_stopped_with_the_channel() -> None:
    """Data streams share one loop thread per channel; closing the channel joins it, and a
    closed channel opens no new one."""
    channel = use_sift_channel({"uri": "127.0.0.1:1", "apikey": _KEY, "use_ssl": False})
    loop = channel.stream_loop()
    assert channel.stream_loop() is loop
    (thread,) = [t for t in threading.enumerate() if t.name == "daq-ingest-stream"]
    assert loop.call_sync(lambda: threading.current_thread().name, 5) == "daq-ingest-stream"
    channel.close()
    assert not thread.is_alive()
    with pytest.raises(TransportError, match="closed"):
        channel.stream_loop()


def test_every_status_code_is_mapped() -> None:
    """Every gRPC status code maps to a daq-agent transport error that is a grpc.RpcError."""
    assert set(STATUS_ERRORS) == set(grpc.StatusCode)
    for error_type in STATUS_ERRORS.values():
        assert issubclass(error_type, RpcStatusError)
        assert issubclass(error_type, TransportError)
        assert issubclass(error_type, grpc.RpcError)


def test_rpc_error_has_grpc_accessors() -> None:
    """RpcError answers code() and details() as grpc's errors do, is caught by
    ``except grpc.RpcError`` and ``except DaqError``, and survives pickling and copying."""
    error = RpcError(grpc.StatusCode.NOT_FOUND, "no such run", method="/sift.runs.v2/GetRun")
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert error.details() == "no such run"
    assert (error.status_code, error.status_details) == (grpc.StatusCode.NOT_FOUND, "no such run")
    assert error.trailing_metadata() == ()
    assert str(error) == "/sift.runs.v2/GetRun: NOT_FOUND: no such run"
    for catch in (grpc.RpcError, DaqError, RpcStatusError):
        with pytest.raises(catch):
            raise error
    for clone in (pickle.loads(pickle.dumps(error)), copy.copy(error)):
        assert isinstance(clone, RpcError)
        assert (clone.code(), clone.details(), clone.method) == (
            grpc.StatusCode.NOT_FOUND,
            "no such run",
            "/sift.runs.v2/GetRun",
        )
