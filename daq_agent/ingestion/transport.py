"""The gRPC channel to the ingestion API; the one place where gRPC errors become daq-agent errors.

:func:`use_sift_channel` builds a :class:`SiftChannel` from a :class:`SiftChannelConfig` dict, the
shape Sift's Python client uses::

    with use_sift_channel({"uri": "api.siftstack.com:443", "apikey": key}) as channel:
        service = IngestionService(channel, telemetry_config)

Every call on the channel carries ``authorization: Bearer <apikey>``. TLS is on by default; plain
text is refused unless the host is a loopback address (development against the local server).
The gRPC default message limit (4 MiB) is kept, as on the real API: the service guards sizes itself.

Unary calls go through grpcio. Data streams go through Sift's own streaming client (sift_stream),
to the same address with the same TLS setting and key: the channel owns the asyncio loop thread
the bindings run on (:meth:`SiftChannel.stream_loop`, started on first use, stopped by
:meth:`SiftChannel.close`).

:func:`map_rpc_errors` is the only place that turns a :class:`grpc.RpcError` from grpcio into a
daq-agent error: an :class:`~daq_agent.ingestion.errors.RpcError` (itself a ``grpc.RpcError``)
for every status code (:data:`STATUS_ERRORS`).
"""

from __future__ import annotations

import ipaddress
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from types import TracebackType
from typing import Any, NamedTuple, NotRequired, TypedDict

import grpc

from daq_agent.core.errors import ConfigError, TransportError
from daq_agent.ingestion.errors import RpcError
from daq_agent.ingestion.sift_stream import StreamLoop

__all__ = [
    "STATUS_ERRORS",
    "SiftChannel",
    "SiftChannelConfig",
    "map_rpc_errors",
    "use_sift_channel",
]

_DEFAULT_TLS_PORT = 443
_SCHEMES = ("grpc://", "grpcs://", "https://", "http://")
_REDACTED = "<redacted>"


class SiftChannelConfig(TypedDict):
    """How to reach the ingestion API.

    Attributes:
        uri: ``host:port``, ``grpc://host:port`` or ``https://host:port`` (port 443 when omitted).
        apikey: the API key, sent as ``authorization: Bearer <apikey>`` on every call; an empty key
            sends no authorization header (the local server started without ``--api-key``).
        use_ssl: TLS (the default). ``False`` is accepted only for a loopback host.
    """

    uri: str
    apikey: str
    use_ssl: NotRequired[bool]


STATUS_ERRORS: Mapping[grpc.StatusCode, type[RpcError]] = dict.fromkeys(grpc.StatusCode, RpcError)
"""The daq-agent error raised for each gRPC status code (every code has an entry)."""


@contextmanager
def map_rpc_errors(method: str = "", *, secret: str | None = None) -> Iterator[None]:
    """Turn a :class:`grpc.RpcError` raised inside the block into a daq-agent error.

    Args:
        method: the gRPC method path, named in the error.
        secret: a value (the API key) scrubbed from the server's details before they are kept.

    Raises:
        RpcError: (a :class:`~daq_agent.core.errors.RpcStatusError` and a ``grpc.RpcError``) for
            an RPC that ended with a non-OK status: ``code()`` returns its status code.
        TransportError: for a gRPC failure that carries no status.
    """
    try:
        yield
    except grpc.RpcError as exc:
        code_fn = getattr(exc, "code", None)
        details_fn = getattr(exc, "details", None)
        code = code_fn() if callable(code_fn) else None
        details = details_fn() if callable(details_fn) else None
        text = _scrub(str(details) if details is not None else "", secret)
        if not isinstance(code, grpc.StatusCode):
            where = f"{method}: " if method else ""
            raise TransportError(f"{where}gRPC call failed: {_scrub(repr(exc), secret)}") from None
        raise STATUS_ERRORS[code](code, text, method=method) from exc
    except grpc.FutureTimeoutError as exc:
        where = f"{method}: " if method else ""
        raise TransportError(f"{where}gRPC call timed out") from exc


def _scrub(text: str, secret: str | None) -> str:
    if secret:
        text = text.replace(secret, _REDACTED)
    return text


class _Endpoint(NamedTuple):
    host: str
    port: int

    @property
    def target(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:/\[\]]+))(?::(?P<port>\d+))?$")


def _parse_uri(uri: str) -> _Endpoint:
    rest = uri.strip()
    lowered = rest.lower()
    for scheme in _SCHEMES:
        if lowered.startswith(scheme):
            rest = rest[len(scheme) :]
            break
    rest = rest.rstrip("/")
    match = _HOST_PORT.match(rest)
    if match is None:
        raise ConfigError(
            f"cannot parse {uri!r} (expected host:port, grpc://host:port or https://host:port)",
            key="uri",
        )
    host = match.group("v6") or match.group("host")
    port_text = match.group("port")
    port = int(port_text) if port_text else _DEFAULT_TLS_PORT
    if not 0 < port < 65536:
        raise ConfigError(f"port {port} out of range in {uri!r}", key="uri")
    return _Endpoint(host, port)


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _CallDetailsImpl(_CallDetails, grpc.ClientCallDetails):  # type: ignore[misc]
    """grpc needs ``ClientCallDetails`` instances; a named tuple gives them value semantics."""


class _AuthInterceptor(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Adds the channel's headers (``authorization`` among them) to every call."""

    __slots__ = ("_headers",)

    def __init__(self, headers: Sequence[tuple[str, str]]) -> None:
        self._headers = tuple(headers)

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), *self._headers]
        return _CallDetailsImpl(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return continuation(self._details(client_call_details), request_iterator)


class SiftChannel(grpc.Channel):
    """A gRPC channel to the ingestion API that authenticates every call.

    It implements :class:`grpc.Channel` by delegating to a grpcio channel, and is a context manager
    that closes it. Build it with :func:`use_sift_channel`.

    Attributes:
        config: the :class:`SiftChannelConfig` it was built from.
        host: the server's host name or address.
        port: the server's port.
        use_ssl: whether the channel uses TLS.
    """

    def __init__(
        self,
        config: SiftChannelConfig,
        inner: grpc.Channel,
        endpoint: tuple[str, int],
        use_ssl: bool,
        metadata: Sequence[tuple[str, str]],
    ) -> None:
        self.config = config
        self.host, self.port = endpoint
        self.use_ssl = use_ssl
        self._metadata = tuple(metadata)
        self._inner = inner
        self._closed = False
        self._loop: StreamLoop | None = None
        self._lock = threading.Lock()

    @property
    def target(self) -> str:
        """``host:port`` (``[v6]:port`` for an IPv6 address)."""
        return _Endpoint(self.host, self.port).target

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata sent on every call (authorization included; never log it)."""
        return self._metadata

    def map_errors(self, method: str = "") -> AbstractContextManager[None]:
        """:func:`map_rpc_errors` for a call on this channel, with the API key scrubbed."""
        return map_rpc_errors(method, secret=self.config.get("apikey") or None)

    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.UnaryUnaryMultiCallable[Any, Any]:
        """See :meth:`grpc.Channel.unary_unary`."""
        return self._inner.unary_unary(  # type: ignore[call-arg]
            method, request_serializer, response_deserializer, _registered_method
        )

    def unary_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.UnaryStreamMultiCallable[Any, Any]:
        """See :meth:`grpc.Channel.unary_stream`."""
        return self._inner.unary_stream(  # type: ignore[call-arg]
            method, request_serializer, response_deserializer, _registered_method
        )

    def stream_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.StreamUnaryMultiCallable[Any, Any]:
        """See :meth:`grpc.Channel.stream_unary`."""
        return self._inner.stream_unary(  # type: ignore[call-arg]
            method, request_serializer, response_deserializer, _registered_method
        )

    def stream_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.StreamStreamMultiCallable[Any, Any]:
        """See :meth:`grpc.Channel.stream_stream`."""
        return self._inner.stream_stream(  # type: ignore[call-arg]
            method, request_serializer, response_deserializer, _registered_method
        )

    def subscribe(
        self,
        callback: Callable[[grpc.ChannelConnectivity], None],
        try_to_connect: bool = False,
    ) -> None:
        """See :meth:`grpc.Channel.subscribe`."""
        self._inner.subscribe(callback, try_to_connect)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        """See :meth:`grpc.Channel.unsubscribe`."""
        self._inner.unsubscribe(callback)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def api_key(self) -> str:
        """The API key data streams authenticate with (never log it)."""
        return self.config.get("apikey") or ""

    def stream_loop(self) -> StreamLoop:
        """The asyncio loop (thread ``daq-ingest-stream``) sift_stream's calls run on.

        Started on first use and shared by every data stream on this channel; stopped and joined
        by :meth:`close`.

        Raises:
            TransportError: the channel is closed.
        """
        with self._lock:
            if self._closed:
                raise TransportError("channel closed")
            if self._loop is None:
                self._loop = StreamLoop("daq-ingest-stream")
            return self._loop

    def close(self) -> None:
        """Close the channel, cancelling its active calls; calling it again does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop, self._loop = self._loop, None
        if loop is not None:
            loop.close()
        self._inner.close()

    def __enter__(self) -> SiftChannel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool | None:
        self.close()
        return None

    def __repr__(self) -> str:
        return f"SiftChannel(target={self.target!r}, use_ssl={self.use_ssl})"


def use_sift_channel(
    config: SiftChannelConfig, metadata: Mapping[str, str] | None = None
) -> SiftChannel:
    """Open a channel to the ingestion API described by ``config``.

    Args:
        config: ``uri``, ``apikey`` and optionally ``use_ssl`` (default ``True``).
        metadata: extra metadata sent on every call.

    Returns:
        The channel; use it as a context manager or call :meth:`SiftChannel.close`.

    Raises:
        ConfigError: when ``uri`` cannot be parsed, ``apikey`` is missing, or ``use_ssl`` is false
            for a host that is not loopback (the API key would travel in clear text).
    """
    if "uri" not in config or not isinstance(config["uri"], str):
        raise ConfigError("is required", key="uri")
    apikey = config.get("apikey")
    if not isinstance(apikey, str):
        raise ConfigError("is required (a string)", key="apikey")
    use_ssl = config.get("use_ssl", True)
    if not isinstance(use_ssl, bool):
        raise ConfigError("must be true or false", key="use_ssl")
    endpoint = _parse_uri(config["uri"])
    if not use_ssl and not _is_loopback(endpoint.host):
        raise ConfigError(
            f"plain text is allowed only to a loopback host, not {endpoint.host!r}: "
            "the API key would cross the network unencrypted (use TLS)",
            key="use_ssl",
        )
    if use_ssl:
        inner = grpc.secure_channel(endpoint.target, grpc.ssl_channel_credentials())
    else:
        inner = grpc.insecure_channel(endpoint.target)
    headers = [(key.lower(), value) for key, value in (metadata or {}).items()]
    if apikey:
        headers.append(("authorization", f"Bearer {apikey}"))
    channel = grpc.intercept_channel(inner, _AuthInterceptor(headers)) if headers else inner
    return SiftChannel(config, channel, endpoint, use_ssl, headers)
