"""``daq-agent serve``: run the embedded local ingestion server until SIGINT or SIGTERM.

The API key comes from ``--api-key`` or the environment variable ``DAQ_AGENT_API_KEY``; it is
never logged. The database defaults to ``local.sqlite`` in ``$DAQ_AGENT_STATE_DIR`` (else
``./daq-agent-state``). ``--tls-cert`` and ``--tls-key`` serve TLS (what Sift's clients use by
default); ``--max-connections``, ``--max-streams`` and ``--idle-timeout`` bound what clients hold.
Started by the agent (``--control-fd``, see :mod:`daq_agent.server.process`), it reports its port
there and stops when the agent is gone.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from pathlib import Path
from typing import Any

from daq_agent.core.errors import DaqError
from daq_agent.core.signals import dump_stacks_on, stop_on_signals
from daq_agent.h2grpc.server import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONCURRENT_STREAMS,
    DEFAULT_MAX_CONNECTIONS,
)
from daq_agent.server.local import make_server
from daq_agent.server.process import ParentLink
from daq_agent.server.store import DEFAULT_MAX_VALIDATION_ERRORS

__all__ = ["API_KEY_ENV", "STATE_DIR_ENV", "add_subparser", "default_db_path"]

log = logging.getLogger("daq_agent.serve")

API_KEY_ENV = "DAQ_AGENT_API_KEY"
STATE_DIR_ENV = "DAQ_AGENT_STATE_DIR"
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def default_db_path() -> Path:
    """``$DAQ_AGENT_STATE_DIR/local.sqlite``, else ``./daq-agent-state/local.sqlite``."""
    return Path(os.environ.get(STATE_DIR_ENV) or "daq-agent-state") / "local.sqlite"


def add_subparser(subparsers: Any) -> None:
    """Register ``serve``."""
    parser = subparsers.add_parser(
        "serve",
        help="run the local ingestion server (Sift-compatible gRPC, stored in SQLite)",
        description="Run the embedded local ingestion server until SIGINT or SIGTERM.",
    )
    parser.add_argument("--db", type=Path, default=None, help=f"SQLite file ({default_db_path()})")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=int, default=50051, help="port, 0 for any free (50051)")
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"require 'authorization: Bearer KEY' on every call (or set {API_KEY_ENV})",
    )
    # Internal: set by LocalServerProcess (the port goes there; end of file there means stop).
    parser.add_argument("--control-fd", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--tls-cert", type=Path, default=None, help="serve TLS with this PEM certificate chain"
    )
    parser.add_argument(
        "--tls-key", type=Path, default=None, help="the unencrypted PEM private key of --tls-cert"
    )
    parser.add_argument(
        "--max-connections",
        type=_positive(int),
        default=DEFAULT_MAX_CONNECTIONS,
        help=f"connections served at once; more are refused ({DEFAULT_MAX_CONNECTIONS})",
    )
    parser.add_argument(
        "--max-streams",
        type=_positive(int),
        default=DEFAULT_MAX_CONCURRENT_STREAMS,
        help=f"calls open at once on one connection ({DEFAULT_MAX_CONCURRENT_STREAMS})",
    )
    parser.add_argument(
        "--idle-timeout",
        type=_positive(float, zero=True),
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="SECONDS",
        help=f"close a connection silent for this long, 0 for never ({DEFAULT_IDLE_TIMEOUT:g})",
    )
    parser.add_argument(
        "--max-validation-errors",
        type=int,
        default=DEFAULT_MAX_VALIDATION_ERRORS,
        metavar="N",
        help="validation errors kept, the newest; older ones are counted"
        f" ({DEFAULT_MAX_VALIDATION_ERRORS})",
    )
    parser.set_defaults(func=_do_serve)


def _positive(kind: type[int] | type[float], *, zero: bool = False) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(
                f"must be {'0 or more' if zero else 'more than 0'}: {text!r}"
            )
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its errors
    return parse


def _do_serve(args: argparse.Namespace) -> int:
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    db_path: Path = args.db or default_db_path()
    if (args.tls_cert is None) != (args.tls_key is None):
        raise DaqError("--tls-cert and --tls-key go together")
    if args.host not in _LOOPBACK and args.tls_cert is None:
        log.warning("serving plain-text gRPC on %s: keep it on a trusted network", args.host)
    stop = threading.Event()
    link = ParentLink(args.control_fd) if args.control_fd is not None else None
    try:
        server = make_server(
            db_path,
            host=args.host,
            port=args.port,
            api_key=api_key,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            max_connections=args.max_connections,
            max_concurrent_streams=args.max_streams,
            idle_timeout=args.idle_timeout or None,
            max_validation_errors=args.max_validation_errors,
        )
    except OSError as exc:
        raise DaqError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from exc
    try:
        with stop_on_signals(stop), dump_stacks_on(), server:
            if link is not None:
                link.report_listening(server.port)
            while not stop.is_set():
                if link is None:
                    stop.wait(0.5)
                elif link.parent_gone(0.5):
                    log.warning("the process that started this server is gone: stopping")
                    break
    finally:
        if link is not None:
            link.close()
    return 0
