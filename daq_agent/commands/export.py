"""``daq-agent export``: write what the local server stored as CSV.

Long format (default): one row per timestamp and channel with a value::

    timestamp,timestamp_ns,flow,channel,value

Wide format (``--wide``): one row per timestamp and flow, a column per channel (empty cells for
channels without a value). Timestamps are ISO 8601 UTC with nanoseconds and integer ns.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from daq_agent.core.errors import DaqError
from daq_agent.server.store import Store, Value

__all__ = ["add_subparser", "export_csv", "format_value", "iso_timestamp"]

LONG_HEADER = ("timestamp", "timestamp_ns", "flow", "channel", "value")


def iso_timestamp(timestamp_ns: int) -> str:
    """``2026-11-27T19:00:00.123456789Z`` for integer ns since the epoch (UTC)."""
    seconds, nanos = divmod(timestamp_ns, 1_000_000_000)
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{nanos:09d}Z"


def format_value(value: Value) -> str:
    """A CSV cell: floats round-trip (``nan``, ``inf``), bools ``true``/``false``, bytes hex."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, float):
        return repr(value)
    return str(value)


def add_subparser(subparsers: Any) -> None:
    """Register ``export``."""
    parser = subparsers.add_parser(
        "export",
        help="export stored samples as CSV",
        description="Export samples stored by the local ingestion server.",
    )
    parser.add_argument("--db", type=Path, required=True, help="the server's SQLite file")
    parser.add_argument("--run", default=None, metavar="NAME", help="only runs with this name")
    parser.add_argument(
        "--channel",
        action="append",
        default=None,
        metavar="NAME",
        help="only this channel (repeatable)",
    )
    parser.add_argument("--format", choices=("csv",), default="csv", help="output format (csv)")
    parser.add_argument(
        "--wide", action="store_true", help="one row per timestamp and flow, a column per channel"
    )
    parser.add_argument(
        "--output", "-o", type=Path, default=None, metavar="FILE", help="write here (stdout)"
    )
    parser.set_defaults(func=_do_export)


def _do_export(args: argparse.Namespace) -> int:
    with Store.open(args.db, readonly=True) as store, _open_output(args.output) as out:
        rows = export_csv(store, out, run=args.run, channels=args.channel, wide=args.wide)
    if args.output is not None:
        print(f"wrote {rows} rows to {args.output}", file=sys.stderr)
    return 0


@contextlib.contextmanager
def _open_output(path: Path | None) -> Iterator[IO[str]]:
    if path is None:
        yield sys.stdout
        return
    try:
        with path.open("w", encoding="utf-8", newline="") as out:
            yield out
    except OSError as exc:
        raise DaqError(f"cannot write {path}: {exc.strerror}") from exc


def export_csv(
    store: Store,
    out: IO[str],
    *,
    run: str | None = None,
    channels: list[str] | None = None,
    wide: bool = False,
) -> int:
    """Write the selected samples as CSV to ``out``; returns the number of data rows.

    Raises:
        DaqError: no run has the name ``run``, or a channel in ``channels`` does not exist.
    """
    if run is not None and not store.list_runs({"name": run}, limit=1):
        raise DaqError(f"no run named {run!r}")
    flows = store.list_flows()
    known = {c.name for flow in flows for c in flow.channels()}
    if channels:
        missing = [name for name in channels if name not in known]
        if missing:
            raise DaqError(f"no channel named {', '.join(repr(m) for m in missing)}")
    wanted = set(channels) if channels else None
    flow_names = sorted(
        {
            flow.name
            for flow in flows
            if wanted is None or any(c.name in wanted for c in flow.channels())
        }
    )
    writer = csv.writer(out, lineterminator="\n")
    samples = store.iter_samples(run_name=run, flows=flow_names)
    count = 0
    if wide:
        columns: list[str] = []
        for flow in flows:
            if flow.name in flow_names:
                for channel in flow.channels():
                    if (wanted is None or channel.name in wanted) and channel.name not in columns:
                        columns.append(channel.name)
        writer.writerow(("timestamp", "timestamp_ns", "flow", *columns))
        for sample in samples:
            values = sample.values
            writer.writerow(
                (
                    iso_timestamp(sample.timestamp_ns),
                    sample.timestamp_ns,
                    sample.flow,
                    *(format_value(values.get(name)) for name in columns),
                )
            )
            count += 1
        return count
    writer.writerow(LONG_HEADER)
    for sample in samples:
        stamp = iso_timestamp(sample.timestamp_ns)
        for name, value in sample.values.items():
            if value is None or (wanted is not None and name not in wanted):
                continue
            writer.writerow((stamp, sample.timestamp_ns, sample.flow, name, format_value(value)))
            count += 1
    return count
