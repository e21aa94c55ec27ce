"""``daq-agent export``: write what the local server stored as CSV or Parquet.

Long shape (default, CSV only): one row per sample and channel with a value::

    timestamp,timestamp_ns,run,asset,flow,channel,value,unit,label

Wide shape (``--wide``, and always for ``--format parquet``): one table per flow, one row per
sample, a column per channel (empty cells, or Parquet nulls, for channels without a value)::

    timestamp,timestamp_ns,run,asset,<channel>,<enum channel>,<enum channel>.label,...

Parquet columns are typed as the channels are (double, float, int32, uint32, int64, uint64, bool,
string, binary; an enum as int32 when its value table is signed, else uint32) and carry the unit,
description and data type in their field metadata; ``timestamp`` is ``timestamp[ns, UTC]``. In
wide tables the unit is a property of the column (Parquet field metadata; ``daq-agent channels``
lists it), not a cell repeated on every row.

Output: one flow's table goes to ``--output FILE`` (CSV also to stdout); several flows need
``--output DIR``, which gets one file per flow, ``DIR/<flow>.csv`` or ``DIR/<flow>.parquet``. The
long shape is one CSV for every flow.

Enum labels (``--labels``, the default; ``--no-labels`` to leave them out): a ``label`` column
(long) or a ``<channel>.label`` column after each enum channel (wide). The default is on because
a person reading an export wants ``Reverse``, not ``-1``, and the numeric column stays beside it,
so nothing a tool needs is lost. Enum keys of signed value tables are written as signed numbers
(``-1``, not the ``4294967295`` the wire carries).

Selection: ``--run NAME``, ``--flow NAME`` and ``--channel NAME`` (repeatable; exact names or glob
patterns), ``--start``/``--end`` (ISO 8601, integer ns, or ``+SECONDS`` after the first sample
of each run; both inclusive). Rows come run by run, in time order within a run.

Large stores are streamed: each flow is read from the store's primary key in small batches, CSV
rows are written as they come, and Parquet is written one row group at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from daq_agent.commands._browse import browse
from daq_agent.core.errors import DaqError
from daq_agent.core.model import ChannelDataType
from daq_agent.server.browse import (
    ChannelView,
    FlowView,
    RunView,
    StoreBrowser,
    TimeBound,
    iso_timestamp,
    parse_time_bound,
)
from daq_agent.server.store import Value

__all__ = [
    "LONG_HEADER",
    "ExportSelection",
    "add_subparser",
    "export_long_csv",
    "export_tables",
    "format_value",
    "iso_timestamp",
]

LONG_HEADER = ("timestamp", "timestamp_ns", "run", "asset", "flow", "channel", "value", "unit")
ROW_GROUP_SIZE = 65_536
"""Rows per Parquet row group (and per batch held in memory while writing)."""
LABEL_SUFFIX = ".label"


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


@dataclass(frozen=True, slots=True)
class ExportSelection:
    """What to export: runs, flows, channels (None: all of the flows'), and a time window."""

    runs: Sequence[RunView]
    flows: Sequence[FlowView]
    channels: frozenset[str] | None = None
    start: TimeBound | None = None
    end: TimeBound | None = None
    labels: bool = True

    def wants(self, channel: ChannelView) -> bool:
        """True when the channel is exported."""
        return self.channels is None or channel.name in self.channels


def add_subparser(subparsers: Any) -> None:
    """Register ``export``."""
    parser = subparsers.add_parser(
        "export",
        help="export stored samples as CSV or Parquet",
        description="Export samples stored by the local ingestion server: long CSV (a row per "
        "value), or wide tables (a row per sample, one table per flow) as CSV or Parquet.",
    )
    parser.add_argument("--db", type=Path, required=True, help="the server's SQLite file")
    parser.add_argument("--run", default=None, metavar="NAME", help="only runs with this name")
    parser.add_argument(
        "--flow",
        action="append",
        default=None,
        metavar="NAME",
        help="only this flow (repeatable; glob patterns allowed)",
    )
    parser.add_argument(
        "--channel",
        action="append",
        default=None,
        metavar="NAME",
        help="only this channel (repeatable; glob patterns allowed)",
    )
    parser.add_argument(
        "--start",
        default=None,
        metavar="TIME",
        help="from this time: ISO 8601, integer ns, or +SECONDS after each run's first sample",
    )
    parser.add_argument("--end", default=None, metavar="TIME", help="up to this time (as --start)")
    parser.add_argument(
        "--format",
        choices=("csv", "parquet"),
        default="csv",
        help="csv (default) or parquet (always wide, needs --output)",
    )
    parser.add_argument(
        "--wide", action="store_true", help="one table per flow: a row per sample, a column per "
        "channel"
    )  # fmt: skip
    parser.add_argument(
        "--labels",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add enum label columns (default: on)",
    )
    parser.add_argument(
        "--row-group-size",
        type=int,
        default=ROW_GROUP_SIZE,
        metavar="N",
        help="rows per Parquet row group, the most held in memory (default: %(default)s)",
    )
    parser.add_argument(
        "--output",
        "-o",
        type=Path,
        default=None,
        metavar="PATH",
        help="a file, or a directory for one file per flow (default: stdout, CSV only)",
    )
    parser.set_defaults(func=_do_export)


def _do_export(args: argparse.Namespace) -> int:
    start = parse_time_bound(args.start, "--start") if args.start is not None else None
    end = parse_time_bound(args.end, "--end") if args.end is not None else None
    with browse(args.db) as browser:
        runs = browser.runs_named(args.run)
        flows = browser.select_flows(args.flow, args.channel)
        channels = frozenset(browser.match_channels(args.channel, flows)) if args.channel else None
        selection = ExportSelection(runs, flows, channels, start, end, args.labels)
        if args.format == "csv" and not args.wide:
            with _open_text(args.output) as out:
                rows = export_long_csv(browser, out, selection)
            if args.output is not None:
                print(f"wrote {rows} rows to {args.output}", file=sys.stderr)
            return 0
        if args.row_group_size < 1:
            raise DaqError("--row-group-size must be at least 1")
        written = export_tables(
            browser, args.output, selection, fmt=args.format, row_group_size=args.row_group_size
        )
    for flow, (path, rows) in written.items():
        if path is not None:
            print(f"wrote {rows} rows of {flow} to {path}", file=sys.stderr)
    return 0


@contextlib.contextmanager
def _open_text(path: Path | None) -> Iterator[IO[str]]:
    if path is None:
        yield sys.stdout
        return
    try:
        with path.open("w", encoding="utf-8", newline="") as out:
            yield out
    except OSError as exc:
        raise DaqError(f"cannot write {path}: {exc.strerror}") from exc


# -- long CSV -----------------------------------------------------------------------------------


def export_long_csv(browser: StoreBrowser, out: IO[str], selection: ExportSelection) -> int:
    """Write the selection as long CSV to ``out``; returns the number of data rows.

    Raises:
        DaqError: a stored sample cannot be decoded.
    """
    writer = csv.writer(out, lineterminator="\n")
    labels = selection.labels
    writer.writerow((*LONG_HEADER, "label") if labels else LONG_HEADER)
    wanted = {
        flow.pk: [(i, c) for i, c in enumerate(flow.channels) if selection.wants(c)]
        for flow in selection.flows
    }
    count = 0
    rows = browser.iter_rows(
        selection.flows, selection.runs, start=selection.start, end=selection.end
    )
    with contextlib.closing(rows):
        for row in rows:
            stamp = iso_timestamp(row.timestamp_ns)
            values = row.values
            head = (stamp, row.timestamp_ns, row.run.name, row.flow.asset, row.flow.name)
            for index, channel in wanted[row.flow.pk]:
                value = values[index] if index < len(values) else None
                if value is None:
                    continue
                cells = [*head, channel.name, format_value(channel.number(value)), channel.unit]
                if labels:
                    cells.append(channel.label(value) or "")
                writer.writerow(cells)
                count += 1
    return count


# -- wide tables --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Column:
    """A channel column of a wide table: its channel (first definition) and, per flow pk, the
    value index in that flow's samples."""

    channel: ChannelView
    index: dict[int, int]


@dataclass(frozen=True, slots=True)
class _Table:
    """One wide table: a flow name (its flows of every ingestion config) and its columns."""

    name: str
    flows: tuple[FlowView, ...]
    columns: tuple[_Column, ...]

    def cells(self, flow_pk: int, values: Sequence[Value]) -> list[Value]:
        """The values of a sample in column order (None where the flow has no such channel)."""
        out: list[Value] = []
        for column in self.columns:
            index = column.index.get(flow_pk)
            out.append(values[index] if index is not None and index < len(values) else None)
        return out


def _tables(selection: ExportSelection) -> list[_Table]:
    groups: dict[str, list[FlowView]] = {}
    for flow in selection.flows:
        groups.setdefault(flow.name, []).append(flow)
    tables = []
    for name, flows in groups.items():
        columns: dict[str, _Column] = {}
        for flow in flows:
            for index, channel in enumerate(flow.channels):
                if not selection.wants(channel):
                    continue
                column = columns.setdefault(channel.name, _Column(channel, {}))
                column.index[flow.pk] = index
        tables.append(_Table(name, tuple(flows), tuple(columns.values())))
    return tables


def export_tables(
    browser: StoreBrowser,
    output: Path | None,
    selection: ExportSelection,
    *,
    fmt: str = "csv",
    row_group_size: int = ROW_GROUP_SIZE,
) -> dict[str, tuple[Path | None, int]]:
    """Write one wide table per flow name; returns ``{flow: (path or None for stdout, rows)}``.

    One table goes to ``output`` (a file; an existing directory gets ``<flow>.<fmt>``; None:
    stdout, CSV only); several tables need ``output`` to be a directory (created if missing).

    Raises:
        DaqError: no output for Parquet, several flows but no directory, a file that cannot be
            written, or a stored sample that cannot be decoded.
    """
    tables = _tables(selection)
    paths = _table_paths(tables, output, fmt)
    written: dict[str, tuple[Path | None, int]] = {}
    for table, path in zip(tables, paths, strict=True):
        if fmt == "parquet":
            assert path is not None
            rows = _write_parquet(browser, table, selection, path, row_group_size)
        else:
            with _open_text(path) as out:
                rows = _write_wide_csv(browser, table, selection, out)
        written[table.name] = (path, rows)
    return written


def _table_paths(tables: Sequence[_Table], output: Path | None, fmt: str) -> list[Path | None]:
    names = ", ".join(t.name for t in tables[:5]) + (", …" if len(tables) > 5 else "")
    if output is None:
        if fmt == "parquet":
            raise DaqError("--format parquet needs --output FILE (or a directory)")
        if len(tables) > 1:
            raise DaqError(
                f"{len(tables)} flows selected ({names}): give --flow NAME, or --output DIR for "
                "one file per flow"
            )
        return [None]
    if len(tables) == 1 and not output.is_dir():
        return [output]
    if output.exists() and not output.is_dir():
        raise DaqError(
            f"{output} is a file, but {len(tables)} flows are selected ({names}): give "
            "--flow NAME, or a directory for one file per flow"
        )
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DaqError(f"cannot create directory {output}: {exc.strerror}") from exc
    return [output / f"{_file_name(t.name)}.{fmt}" for t in tables]


def _file_name(flow: str) -> str:
    return re.sub(r"[^\w.+-]", "_", flow) or "_"


def _wide_header(table: _Table, labels: bool) -> list[str]:
    header = ["timestamp", "timestamp_ns", "run", "asset"]
    for column in table.columns:
        header.append(column.channel.name)
        if labels and column.channel.is_enum:
            header.append(column.channel.name + LABEL_SUFFIX)
    return header


def _rows(
    browser: StoreBrowser, table: _Table, selection: ExportSelection
) -> Iterator[tuple[int, str, str, list[Value]]]:
    """``(timestamp ns, run name, asset, cells)`` of every sample of the table."""
    rows = browser.iter_rows(table.flows, selection.runs, start=selection.start, end=selection.end)
    with contextlib.closing(rows):
        for row in rows:
            yield (
                row.timestamp_ns,
                row.run.name,
                row.flow.asset,
                table.cells(row.flow.pk, row.values),
            )


def _write_wide_csv(
    browser: StoreBrowser, table: _Table, selection: ExportSelection, out: IO[str]
) -> int:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(_wide_header(table, selection.labels))
    channels = [column.channel for column in table.columns]
    labels = selection.labels
    count = 0
    for timestamp_ns, run, asset, cells in _rows(browser, table, selection):
        line: list[object] = [iso_timestamp(timestamp_ns), timestamp_ns, run, asset]
        for channel, value in zip(channels, cells, strict=True):
            line.append(format_value(channel.number(value)))
            if labels and channel.is_enum:
                line.append(channel.label(value) or "")
        writer.writerow(line)
        count += 1
    return count


def _arrow_type(channel: ChannelView) -> Any:
    import pyarrow as pa

    data_type = channel.data_type
    if data_type is ChannelDataType.ENUM:
        return pa.int32() if channel.signed else pa.uint32()
    return {
        ChannelDataType.DOUBLE: pa.float64(),
        ChannelDataType.FLOAT: pa.float32(),
        ChannelDataType.INT_32: pa.int32(),
        ChannelDataType.UINT_32: pa.uint32(),
        ChannelDataType.INT_64: pa.int64(),
        ChannelDataType.UINT_64: pa.uint64(),
        ChannelDataType.BOOL: pa.bool_(),
        ChannelDataType.STRING: pa.string(),
        ChannelDataType.BYTES: pa.binary(),
        ChannelDataType.BIT_FIELD: pa.binary(),
    }[data_type]


def _write_parquet(
    browser: StoreBrowser,
    table: _Table,
    selection: ExportSelection,
    path: Path,
    row_group_size: int = ROW_GROUP_SIZE,
) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    labels = selection.labels
    fields = [
        pa.field("timestamp", pa.timestamp("ns", tz="UTC"), nullable=False),
        pa.field("run", pa.string(), nullable=False),
        pa.field("asset", pa.string(), nullable=False),
    ]
    channels = [column.channel for column in table.columns]
    for channel in channels:
        metadata = {
            "unit": channel.unit,
            "description": channel.description,
            "data_type": channel.type_name,
        }
        if channel.is_enum:
            metadata["enum"] = json.dumps({str(k): n for k, n in sorted(channel.labels.items())})
        fields.append(pa.field(channel.name, _arrow_type(channel), metadata=metadata))
        if labels and channel.is_enum:
            fields.append(pa.field(channel.name + LABEL_SUFFIX, pa.string()))
    schema = pa.schema(fields, metadata={"flow": table.name})
    width = len(fields)
    count = 0
    try:
        with pq.ParquetWriter(path, schema) as writer:
            batch: list[list[Any]] = [[] for _ in range(width)]

            def flush() -> None:
                arrays = [
                    pa.array(data, type=field.type)
                    for data, field in zip(batch, fields, strict=True)
                ]
                writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
                for data in batch:
                    data.clear()

            for timestamp_ns, run, asset, cells in _rows(browser, table, selection):
                batch[0].append(timestamp_ns)
                batch[1].append(run)
                batch[2].append(asset)
                position = 3
                for channel, value in zip(channels, cells, strict=True):
                    batch[position].append(channel.number(value))
                    position += 1
                    if labels and channel.is_enum:
                        batch[position].append(channel.label(value))
                        position += 1
                count += 1
                if len(batch[0]) >= row_group_size:
                    flush()
            if batch[0] or count == 0:
                flush()
    except OSError as exc:
        raise DaqError(f"cannot write {path}: {exc}") from exc
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
        raise DaqError(f"flow {table.name}: cannot write {path}: {exc}") from exc
    return count
