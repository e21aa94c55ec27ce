"""``daq-agent serve``: run the embedded local ingestion server until SIGINT or SIGTERM.

The API key comes from ``--api-key`` or the environment variable ``DAQ_AGENT_API_KEY``; it is
never logged. The database defaults to ``local.sqlite`` in ``$DAQ_AGENT_STATE_DIR`` (else
``./daq-agent-state``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from daq_agent.core.errors import DaqError
from daq_agent.server.local import make_server
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
    parser.add_argument(
        "--max-validation-errors",
        type=int,
        default=DEFAULT_MAX_VALIDATION_ERRORS,
        metavar="N",
        help="validation errors kept, the newest; older ones are counted"
        f" ({DEFAULT_MAX_VALIDATION_ERRORS})",
    )
    parser.set_defaults(func=_do_serve)


def _do_serve(args: argparse.Namespace) -> int:
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    db_path: Path = args.db or default_db_path()
    if args.host not in _LOOPBACK:
        log.warning("serving plain-text gRPC on %s: keep it on a trusted network", args.host)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    try:
        server = make_server(
            db_path,
            host=args.host,
            port=args.port,
            api_key=api_key,
            max_validation_errors=args.max_validation_errors,
        )
    except OSError as exc:
        raise DaqError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from exc
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with server:
            while not stop.wait(0.5):
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
