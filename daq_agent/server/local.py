"""The embedded local ingestion server: the gRPC server core, the services and the SQLite store.

Build it with :func:`make_server` (unstarted, port already bound), then ``start()``/``stop()`` or
use it as a context manager::

    with make_server("local.sqlite") as server:
        print(server.port)
"""

from __future__ import annotations

import hmac
import logging
import threading
from pathlib import Path

import grpc

from daq_agent.h2grpc.server import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONCURRENT_STREAMS,
    DEFAULT_MAX_CONNECTIONS,
    GrpcH2Server,
    ServerStats,
    server_ssl_context,
)
from daq_agent.server.lifecycle import StartStop
from daq_agent.server.rpc import CallContext, RpcError
from daq_agent.server.services import LocalServices
from daq_agent.server.store import DEFAULT_MAX_VALIDATION_ERRORS, Store

__all__ = ["LocalIngestServer", "make_server"]

log = logging.getLogger(__name__)


class LocalIngestServer(StartStop):
    """A started-on-demand local ingestion server over one SQLite file.

    Attributes:
        db_path: the SQLite file.
        store: the server's own (writable) store; from other threads prefer :meth:`open_store`.
        services: the RPC handlers.
    """

    def __init__(
        self,
        db_path: str | Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        durable: bool = True,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        max_validation_errors: int = DEFAULT_MAX_VALIDATION_ERRORS,
    ) -> None:
        """Open the store and bind the port; see :func:`make_server`.

        Raises:
            DaqError: the database cannot be opened, or the TLS files cannot be loaded.
            OSError: the address cannot be bound.
            ValueError: a limit is not positive, or only one of the TLS files is given.
        """
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        ssl_context = (
            server_ssl_context(tls_cert, tls_key)
            if tls_cert is not None and tls_key is not None
            else None
        )
        self.db_path = Path(db_path)
        self.store = Store.open(self.db_path, durable=durable)
        self.services = LocalServices(self.store, max_validation_errors=max_validation_errors)
        self._api_key = api_key.encode() if api_key else None
        try:
            self._server = GrpcH2Server(
                host=host,
                port=port,
                unary=self.services.unary_handlers(),
                streams=self.services.stream_handlers(),
                authorize=self._authorize if self._api_key is not None else None,
                tick=self.services.commit_if_due,
                max_connections=max_connections,
                max_concurrent_streams=max_concurrent_streams,
                idle_timeout=idle_timeout,
                ssl_context=ssl_context,
            )
        except (OSError, ValueError):
            self.store.close()
            raise
        self._lock = threading.Lock()
        self._started = False
        self._stopped = False

    @property
    def host(self) -> str:
        """The address listened on."""
        return self._server.host

    @property
    def port(self) -> int:
        """The bound port (known before :meth:`start`)."""
        return self._server.port

    @property
    def address(self) -> str:
        """``host:port`` to give a client."""
        return self._server.address

    @property
    def stats(self) -> ServerStats:
        """What the server refused or cut short (connections, malformed requests, deadlines)."""
        return self._server.stats

    @property
    def connections(self) -> int:
        """Connections being served now."""
        return self._server.connections

    def start(self) -> None:
        """Serve on the thread ``daq-server``; returns once connections are accepted.

        Raises:
            RuntimeError: already started or stopped.
        """
        with self._lock:
            if self._started or self._stopped:
                raise RuntimeError("local ingestion server already started or stopped")
            self._started = True
        self._server.start()
        log.info(
            "listening on %s (db %s%s%s)",
            self.address,
            self.db_path,
            ", TLS" if self._server.ssl_context is not None else "",
            ", API key required" if self._api_key is not None else "",
        )

    def stop(self, grace: float = 5.0) -> None:
        """Stop serving (running calls get ``grace`` seconds), commit and close the store.

        Idempotent; joins the server thread.
        """
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._server.stop(grace)
        self.services.commit()  # what open (never ended) streams delivered
        self.store.close()
        log.info("stopped %s (db %s)", self.address, self.db_path)

    def open_store(self) -> Store:
        """A new read-only store on the same file: sees committed data only; close it after use.

        Raises:
            DaqError: the file cannot be opened.
        """
        return Store.open(self.db_path, readonly=True)

    def __repr__(self) -> str:
        return f"LocalIngestServer({self.address}, db={str(self.db_path)!r})"

    def _authorize(self, ctx: CallContext) -> None:
        """Refuse a call without ``authorization: Bearer <key>`` (the key is never logged).

        Raises:
            RpcError: UNAUTHENTICATED.
        """
        assert self._api_key is not None
        header = ctx.metadata.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self._api_key
        ):
            log.debug("refused %s from %s: missing or wrong API key", ctx.method, ctx.peer)
            raise RpcError(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key")


def make_server(
    db_path: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    api_key: str | None = None,
    durable: bool = True,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS,
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    max_validation_errors: int = DEFAULT_MAX_VALIDATION_ERRORS,
) -> LocalIngestServer:
    """Build the local ingestion server, unstarted, with its port bound (``port=0``: any free one).

    Args:
        db_path: the SQLite file (created if missing).
        host: the address to listen on; without TLS, keep it on loopback.
        port: the port, 0 for a free one (read it from ``.port``).
        api_key: when set, every call must carry ``authorization: Bearer <api_key>``.
        durable: fsync at every commit (a stream's OK then survives a power loss).
        tls_cert: serve TLS (ALPN h2) with this PEM certificate chain; needs ``tls_key``.
        tls_key: the PEM private key of ``tls_cert`` (unencrypted).
        max_connections: connections served at once; more are closed at once.
        max_concurrent_streams: calls open at once per connection.
        idle_timeout: seconds a silent connection is kept; None keeps it forever.
        max_validation_errors: validation errors kept (the newest); older ones are deleted and
            counted, and ``daq-agent errors`` reports how many.

    Raises:
        DaqError: the database cannot be opened, or the TLS files cannot be loaded
            (:class:`~daq_agent.core.errors.ConfigError` naming the file).
        OSError: the address cannot be bound.
        ValueError: a limit is not positive, or only one of the TLS files is given.
    """
    return LocalIngestServer(
        db_path,
        host=host,
        port=port,
        api_key=api_key,
        durable=durable,
        tls_cert=tls_cert,
        tls_key=tls_key,
        max_connections=max_connections,
        max_concurrent_streams=max_concurrent_streams,
        idle_timeout=idle_timeout,
        max_validation_errors=max_validation_errors,
    )
