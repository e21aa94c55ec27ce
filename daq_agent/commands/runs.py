"""``daq-agent runs``: the runs of a local server's store.

``runs --db DB [--json]`` lists each run with its name, id, client key, asset(s), start and stop
times, its samples and channels, and the time of its first and last sample. A run whose client set
no start time (sift_stream sets none) shows when the server created it, marked ``(created)``.
Samples stored without a run are listed as ``(no run)``. ``--json`` prints one array of objects
(times as ISO 8601 UTC strings and integer ns).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from daq_agent.commands._browse import browse, print_table, time_text
from daq_agent.server.browse import RunSummary, RunView

__all__ = ["add_subparser", "run_record"]


def add_subparser(subparsers: Any) -> None:
    """Register ``runs``."""
    parser = subparsers.add_parser(
        "runs",
        help="list the runs of a local server's store",
        description="List the runs stored by the local ingestion server.",
    )
    parser.add_argument("--db", type=Path, required=True, help="the server's SQLite file")
    parser.add_argument("--json", action="store_true", help="print a JSON array")
    parser.set_defaults(func=_do_runs)


def run_record(summary: RunSummary) -> dict[str, Any]:
    """A run as a JSON object."""
    run = summary.run
    return {
        "name": run.name,
        "run_id": run.run_id,
        "client_key": run.client_key,
        "assets": list(summary.assets),
        "start": time_text(run.start_ns) or None,
        "start_ns": run.start_ns,
        "created": time_text(run.created_ns) or None,
        "created_ns": run.created_ns,
        "stop": time_text(run.stop_ns) or None,
        "stop_ns": run.stop_ns,
        "is_stopped": run.is_stopped,
        "flows": summary.flows,
        "channels": summary.channels,
        "samples": summary.samples,
        "first_sample": time_text(summary.first_ns) or None,
        "first_sample_ns": summary.first_ns,
        "last_sample": time_text(summary.last_ns) or None,
        "last_sample_ns": summary.last_ns,
    }


def _start_text(run: RunView) -> str:
    if run.start_ns is not None or run.created_ns is None:
        return time_text(run.start_ns)
    return f"{time_text(run.created_ns)} (created)"


def _do_runs(args: argparse.Namespace) -> int:
    with browse(args.db) as browser:
        summaries = browser.run_summaries()
    if args.json:
        json.dump([run_record(s) for s in summaries], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    rows = [
        (
            s.run.name,
            s.run.run_id,
            s.run.client_key or "",
            ", ".join(s.assets),
            _start_text(s.run),
            time_text(s.run.stop_ns) if s.run.is_stopped else "(running)",
            str(s.samples),
            str(s.channels),
            time_text(s.first_ns),
            time_text(s.last_ns),
        )
        for s in summaries
    ]
    headers = ("name", "id", "client key", "asset", "start", "stop", "samples", "channels",
               "first sample", "last sample")  # fmt: skip
    print_table(f"{len(rows)} runs in {args.db}", headers, rows, right=("samples", "channels"))
    return 0
