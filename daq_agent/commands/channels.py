"""``daq-agent channels``: the channels of a local server's store.

``channels --db DB [--run NAME] [--json]`` lists each channel of each flow: its name, flow, asset,
data type, unit, enum labels (signed keys shown signed), and the samples of its flow with the
times of the first and last (in the runs named ``NAME`` only, and only flows with samples there,
when ``--run`` is given). The sample count is its flow's: a multiplexed signal can be empty in
some of those samples.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from daq_agent.commands._browse import browse, print_table, time_text
from daq_agent.server.browse import ChannelSummary

__all__ = ["add_subparser", "channel_record", "labels_text"]

_LABELS_SHOWN = 6


def add_subparser(subparsers: Any) -> None:
    """Register ``channels``."""
    parser = subparsers.add_parser(
        "channels",
        help="list the channels of a local server's store",
        description="List the channels stored by the local ingestion server, with their flow, "
        "type, unit, enum labels and sample counts.",
    )
    parser.add_argument("--db", type=Path, required=True, help="the server's SQLite file")
    parser.add_argument("--run", default=None, metavar="NAME", help="only runs with this name")
    parser.add_argument("--json", action="store_true", help="print a JSON array")
    parser.set_defaults(func=_do_channels)


def labels_text(summary: ChannelSummary, limit: int = _LABELS_SHOWN) -> str:
    """``-1=Reverse 0=Neutral 1=Forward`` (the first ``limit``, then ``…(+N)``)."""
    items = sorted(summary.channel.labels.items())
    text = " ".join(f"{key}={name}" for key, name in items[:limit])
    if len(items) > limit:
        text += f" …(+{len(items) - limit})"
    return text


def channel_record(summary: ChannelSummary) -> dict[str, Any]:
    """A channel as a JSON object."""
    channel = summary.channel
    return {
        "name": channel.name,
        "flow": summary.flow.name,
        "asset": summary.flow.asset,
        "data_type": channel.type_name,
        "unit": channel.unit,
        "description": channel.description,
        "enum": [{"key": k, "name": n} for k, n in sorted(channel.labels.items())],
        "samples": summary.samples,
        "first_sample": time_text(summary.first_ns) or None,
        "first_sample_ns": summary.first_ns,
        "last_sample": time_text(summary.last_ns) or None,
        "last_sample_ns": summary.last_ns,
    }


def _do_channels(args: argparse.Namespace) -> int:
    with browse(args.db) as browser:
        runs = browser.runs_named(args.run) if args.run is not None else None
        summaries = browser.channel_summaries(runs)
    if args.json:
        json.dump([channel_record(s) for s in summaries], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    rows = [
        (
            s.channel.name,
            s.flow.name,
            s.channel.type_name,
            s.channel.unit,
            labels_text(s),
            str(s.samples),
            time_text(s.first_ns),
            time_text(s.last_ns),
        )
        for s in summaries
    ]
    headers = ("channel", "flow", "type", "unit", "enum labels", "samples", "first", "last")
    where = f" of run {args.run!r}" if args.run is not None else ""
    print_table(f"{len(rows)} channels{where} in {args.db}", headers, rows, right=("samples",))
    return 0
