"""``daq-agent errors --db PATH [--limit N]``: the validation errors the local server recorded."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from daq_agent.commands.export import iso_timestamp
from daq_agent.server.store import Store

__all__ = ["add_subparser"]


def add_subparser(subparsers: Any) -> None:
    """Register ``errors``."""
    parser = subparsers.add_parser(
        "errors",
        help="list validation errors recorded by the local server",
        description="List the requests the local ingestion server refused, oldest first.",
    )
    parser.add_argument("--db", type=Path, required=True, help="the server's SQLite file")
    parser.add_argument(
        "--limit", type=int, default=None, metavar="N", help="only the last N errors"
    )
    parser.set_defaults(func=_do_errors)


def _do_errors(args: argparse.Namespace) -> int:
    with Store.open(args.db, readonly=True) as store:
        total = store.count_validation_errors()
        records = store.validation_errors(limit=args.limit)
        overflow = store.validation_errors_overflow()
    out = sys.stdout
    for record in records:
        out.write(
            f"{iso_timestamp(record.time_ns)}  request #{record.request_index}"
            f"  config={record.ingestion_config_id or '-'}  flow={record.flow or '-'}"
            f"  run={record.run_id or '-'}  peer={record.peer or '-'}\n    {record.reason}\n"
        )
    shown = f"{len(records)} of {total}" if len(records) != total else str(total)
    out.write(f"{shown} validation error{'s' if total != 1 else ''}\n")
    if overflow:
        out.write(
            f"{overflow} older validation error{'s' if overflow != 1 else ''} not kept"
            " (the server keeps the newest: serve --max-validation-errors)\n"
        )
    return 0
