"""``daq-agent plot``: channels over time as PNG or SVG, from the store or straight from a log.

From the local server's store::

    daq-agent plot --db DB [--run NAME] --channel NAME... --output FILE.png|FILE.svg

From a recorded CAN log decoded with the project's decoder (no agent, no store)::

    daq-agent plot --log FILE --dbc FILE [--dbc FILE...] --channel NAME... --output FILE.svg

``--channel`` takes exact channel names or glob patterns (``'Cell*'``), repeatable; a pattern
that matches nothing is an error naming it and the nearest channel names. Without ``--run`` the
newest run with samples is plotted (the title names it). ``--start``/``--end`` limit the time as
for ``export``. A log is read with the project's candump parser for ``.log``/``.txt``/``-``
(both ``candump -L`` and plain ``candump can0`` lines the parser accepts), and with python-can's
``can.LogReader`` for BLF, ASC, TRC, CSV and the other formats it knows.

Each channel gets its own axis (``--group-by-unit``: numeric channels of the same unit share
one), all on one time axis since the first plotted sample (seconds; minutes or hours for long
spans). Enums are drawn as steps with their labels as y tick labels (signed value tables at their
signed keys); bool channels as steps at false/true. String and bytes channels cannot be
plotted and are skipped with a note. Rendering uses matplotlib's Agg (PNG) and SVG backends
without pyplot: no display, no global state. The format follows the output suffix (``.png`` or
``.svg``).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daq_agent.commands._browse import browse
from daq_agent.core.clock import seconds_to_ns
from daq_agent.core.errors import DaqError, DecodeError
from daq_agent.core.model import ChannelDataType
from daq_agent.server.browse import (
    ChannelView,
    RunView,
    StoreBrowser,
    TimeBound,
    iso_timestamp,
    match_names,
    parse_time_bound,
)
from daq_agent.server.store import Value

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "FORMATS",
    "Series",
    "add_subparser",
    "build_figure",
    "log_series",
    "save_figure",
    "store_series",
]

FORMATS = {".png": "png", ".svg": "svg"}
_PLOTTABLE_SKIPPED = {ChannelDataType.STRING, ChannelDataType.BYTES, ChannelDataType.BIT_FIELD}
_MAX_ENUM_TICKS = 24
_CANDUMP_SUFFIXES = {".log", ".txt", ""}


@dataclass(slots=True)
class Series:
    """The points of one channel: times (ns) and numbers (enum keys signed, bools 0/1).

    Attributes:
        label: the legend text (the channel name, with its flow when several flows share it).
        channel: the channel.
        times_ns: sample times.
        values: the plotted numbers.
    """

    label: str
    channel: ChannelView
    times_ns: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    @property
    def stepped(self) -> bool:
        """Enums and bools are drawn as steps."""
        return self.channel.is_enum or self.channel.data_type is ChannelDataType.BOOL

    def add(self, timestamp_ns: int, value: Value) -> None:
        """Append a stored value (None and non-numbers are left out)."""
        number = self.channel.number(value)
        if isinstance(number, bool):
            number = int(number)
        if isinstance(number, int | float):
            self.times_ns.append(timestamp_ns)
            self.values.append(float(number))


def add_subparser(subparsers: Any) -> None:
    """Register ``plot``."""
    parser = subparsers.add_parser(
        "plot",
        help="plot channels over time (PNG or SVG) from the store or a CAN log",
        description="Plot channels over time from the local server's store (--db) or from a "
        "CAN log decoded with databases (--log, --dbc). The output suffix picks PNG or SVG.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--db", type=Path, help="the server's SQLite file")
    source.add_argument("--log", type=Path, metavar="FILE", help="a CAN log (candump, BLF, ASC…)")
    parser.add_argument(
        "--dbc", action="append", type=Path, metavar="FILE", help="CAN database for --log"
    )
    parser.add_argument("--bus", default="can0", help="bus alias for a log's flows (can0)")
    parser.add_argument(
        "--run", default=None, metavar="NAME", help="the run (default: the newest with samples)"
    )
    parser.add_argument(
        "--channel",
        "-c",
        action="append",
        required=True,
        metavar="NAME",
        help="a channel name or glob pattern (repeatable)",
    )
    parser.add_argument("--start", default=None, metavar="TIME", help="as for export")
    parser.add_argument("--end", default=None, metavar="TIME", help="as for export")
    parser.add_argument(
        "--group-by-unit",
        action="store_true",
        help="numeric channels of one unit share an axis",
    )
    parser.add_argument("--title", default=None, help="the figure title (default: the run)")
    parser.add_argument(
        "--output", "-o", type=Path, required=True, metavar="FILE", help="FILE.png or FILE.svg"
    )
    parser.set_defaults(func=_do_plot)


def _do_plot(args: argparse.Namespace) -> int:
    fmt = _format(args.output)
    start = parse_time_bound(args.start, "--start") if args.start is not None else None
    end = parse_time_bound(args.end, "--end") if args.end is not None else None
    if args.db is not None:
        if args.dbc:
            raise DaqError("--dbc goes with --log, not --db")
        with browse(args.db) as browser:
            run = _pick_run(browser, args.run)
            series = store_series(browser, run, args.channel, start=start, end=end)
        title = args.title or _run_title(run, args.db)
    else:
        if not args.dbc:
            raise DaqError("--log needs --dbc FILE (the database to decode it with)")
        if args.run is not None:
            raise DaqError("--run goes with --db, not --log")
        from daq_agent.decode.dbc import load_database

        databases = [load_database(path) for path in args.dbc]
        series = log_series(args.log, databases, args.channel, bus=args.bus, start=start, end=end)
        title = args.title or f"{args.log.name} decoded with {', '.join(p.name for p in args.dbc)}"
    series = _plottable(series)
    figure = build_figure(series, title, group_by_unit=args.group_by_unit)
    save_figure(figure, args.output, fmt)
    points = sum(len(s.values) for s in series)
    print(f"plotted {len(series)} channels ({points} points) to {args.output}", file=sys.stderr)
    return 0


def _format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DaqError(f"{path}: the output must end in .png or .svg")
    return fmt


def _pick_run(browser: StoreBrowser, name: str | None) -> RunView:
    if name is not None:
        runs = browser.runs_named(name)
        with_samples = {run for _, run in browser.stats}
        chosen = [run for run in runs if run.pk in with_samples] or runs
        return chosen[-1]
    run = browser.latest_run()
    if run is None:
        raise DaqError(f"{browser.store.path}: the store holds no samples")
    return run


def _run_title(run: RunView, db: Path) -> str:
    ident = f" ({run.run_id[:8]})" if run.run_id else ""
    return f"run {run.name}{ident} · {db.name}"


def _plottable(series: list[Series]) -> list[Series]:
    kept = []
    for item in series:
        if item.channel.data_type in _PLOTTABLE_SKIPPED:
            print(
                f"daq-agent plot: {item.label}: {item.channel.type_name} values cannot be plotted",
                file=sys.stderr,
            )
            continue
        kept.append(item)
    if not kept:
        raise DaqError("none of the channels can be plotted (string, bytes or bit field)")
    return kept


def _labels(keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """Legend labels: the channel name, with the flow when several flows have that name."""
    pairs = list(keys)
    counts: dict[str, int] = {}
    for _, channel in pairs:
        counts[channel] = counts.get(channel, 0) + 1
    return {(f, c): (f"{c} ({f})" if counts[c] > 1 else c) for f, c in pairs}


def store_series(
    browser: StoreBrowser,
    run: RunView,
    patterns: Sequence[str],
    *,
    start: TimeBound | None = None,
    end: TimeBound | None = None,
) -> list[Series]:
    """The series of the channels ``patterns`` match, in one run of the store, in the order of
    the flows and channels.

    Raises:
        DaqError: a pattern matches no channel (the message lists near names).
    """
    names = set(browser.match_channels(patterns))
    flows = [f for f in browser.flows if any(c.name in names for c in f.channels)]
    wanted = [
        (flow, index, channel)
        for flow in flows
        for index, channel in enumerate(flow.channels)
        if channel.name in names
    ]
    labels = _labels((flow.name, channel.name) for flow, _, channel in wanted)
    # one series per (flow name, channel), whatever the ingestion config the flow belongs to
    series: dict[tuple[str, str], Series] = {}
    by_flow: dict[int, list[tuple[int, Series]]] = {}
    for flow, index, channel in wanted:
        key = (flow.name, channel.name)
        item = series.get(key)
        if item is None:
            item = series[key] = Series(labels[key], channel)
        by_flow.setdefault(flow.pk, []).append((index, item))
    rows = browser.iter_rows(flows, [run], start=start, end=end)
    try:
        for row in rows:
            values = row.values
            for index, item in by_flow[row.flow.pk]:
                if index < len(values):
                    item.add(row.timestamp_ns, values[index])
    finally:
        rows.close()
    return list(series.values())


def _log_frames(path: Path) -> Iterator[tuple[int, bool, bool, bytes, int]]:
    """``(frame id, extended, data frame, payload, timestamp ns)`` of every frame of a log.

    Raises:
        DaqError: the file cannot be read or its format is unknown.
    """
    if str(path) == "-" or path.suffix.lower() in _CANDUMP_SUFFIXES:
        from daq_agent.decode.candump import CandumpParser

        try:
            handle = (
                sys.stdin if str(path) == "-" else path.open(encoding="utf-8", errors="replace")
            )
        except OSError as exc:
            raise DaqError(f"cannot read {path}: {exc.strerror}") from exc
        with handle:
            for _, frame in CandumpParser().parse(handle):
                data_frame = not (frame.is_remote or frame.is_error)
                yield frame.frame_id, frame.is_extended, data_frame, frame.data, frame.timestamp_ns
        return
    import can

    try:
        reader = can.LogReader(str(path))
    except (OSError, ValueError) as exc:
        raise DaqError(f"cannot read {path}: {exc}") from exc
    try:
        for msg in reader:
            data_frame = not (msg.is_remote_frame or msg.is_error_frame)
            yield (
                msg.arbitration_id, msg.is_extended_id, data_frame, bytes(msg.data),
                seconds_to_ns(msg.timestamp, 1000),
            )  # fmt: skip
    except (OSError, ValueError) as exc:
        raise DaqError(f"cannot read {path}: {exc}") from exc
    finally:
        reader.stop()


def log_series(
    path: Path,
    databases: Sequence[Any],
    patterns: Sequence[str],
    *,
    bus: str = "can0",
    start: TimeBound | None = None,
    end: TimeBound | None = None,
) -> list[Series]:
    """The series of the channels ``patterns`` match, decoded from a CAN log with the project's
    decoder; unknown ids and undecodable frames are skipped (counted on stderr). Relative
    ``start``/``end`` count from the log's first frame.

    Raises:
        DaqError: a pattern matches no channel of the databases, or the log cannot be read.
    """
    from daq_agent.decode.can_decoder import CanDecoder, frame_key

    decoder = CanDecoder(bus, databases)
    views = {
        message.flow.name: tuple(ChannelView.from_pb(c.as_pb()) for c in message.flow.channels)
        for message in decoder.messages
    }
    every = [c.name for channels in views.values() for c in channels]
    names = set(match_names(patterns, every, "channel"))
    wanted = [
        (flow, index, channel)
        for flow, channels in views.items()
        for index, channel in enumerate(channels)
        if channel.name in names
    ]
    labels = _labels((flow, channel.name) for flow, _, channel in wanted)
    by_flow: dict[str, list[tuple[int, Series]]] = {}
    ordered: list[Series] = []
    for flow, index, channel in wanted:
        item = Series(labels[flow, channel.name], channel)
        ordered.append(item)
        by_flow.setdefault(flow, []).append((index, item))
    table = {
        key: message
        for key, message in decoder.lookup_table().items()
        if message.flow.name in by_flow
    }
    first: int | None = None
    lo = hi = None
    errors = 0
    for frame_id, extended, data_frame, data, timestamp_ns in _log_frames(path):
        if first is None:
            first = timestamp_ns
            lo = start.resolve(first) if start else None
            hi = end.resolve(first) if end else None
        if not data_frame or (lo is not None and timestamp_ns < lo):
            continue
        if hi is not None and timestamp_ns > hi:
            continue
        message = table.get(frame_key(frame_id, extended))
        if message is None:
            continue
        try:
            sample = message.decode(data, timestamp_ns)
        except DecodeError:
            errors += 1
            continue
        for index, item in by_flow[message.flow.name]:
            item.add(timestamp_ns, sample.values[index])
    if errors:
        print(f"daq-agent plot: {errors} frames could not be decoded", file=sys.stderr)
    return ordered


def _groups(series: Sequence[Series], by_unit: bool) -> list[list[Series]]:
    if not by_unit:
        return [[item] for item in series]
    groups: list[list[Series]] = []
    by_key: dict[str, list[Series]] = {}
    for item in series:
        unit = item.channel.unit
        if item.stepped or not unit:
            groups.append([item])
            continue
        group = by_key.get(unit)
        if group is None:
            group = by_key[unit] = []
            groups.append(group)
        group.append(item)
    return groups


def build_figure(series: Sequence[Series], title: str, *, group_by_unit: bool = False) -> Figure:
    """The figure: one axis per channel (or per unit), a shared time axis since the first point
    (s, min or h by the span), enums as steps with their labels as y tick labels.

    Raises:
        DaqError: no series, or none has a point.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator

    if not series:
        raise DaqError("nothing to plot")
    starts = [item.times_ns[0] for item in series if item.times_ns]
    if not starts:
        names = ", ".join(item.label for item in series)
        raise DaqError(f"no samples of {names} in the selected run and time range")
    origin = min(starts)
    span_s = (max(item.times_ns[-1] for item in series if item.times_ns) - origin) / 1e9
    time_unit, scale = _time_unit(span_s)
    groups = _groups(series, group_by_unit)
    figure = Figure(figsize=(11, 1.2 + 2.0 * len(groups)), layout="constrained")
    axes = figure.subplots(len(groups), 1, sharex=True, squeeze=False)[:, 0]
    for ax, group in zip(axes, groups, strict=True):
        for item in group:
            seconds = [(t - origin) / scale for t in item.times_ns]
            if item.stepped:
                ax.step(seconds, item.values, where="post", label=item.label, linewidth=1.2)
            else:
                ax.plot(seconds, item.values, label=item.label, linewidth=1.0)
        first = group[0]
        _y_axis(ax, group, FixedLocator)
        unit = first.channel.unit
        ylabel = " / ".join(s.label for s in group) if len(group) <= 2 else f"[{unit}]"
        if unit and len(group) <= 2:
            ylabel += f" [{unit}]"
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(True, alpha=0.3)
        if len(group) > 1:
            ax.legend(loc="upper right", fontsize=7)
        else:
            ax.set_title(first.label, loc="left", fontsize=9)
    axes[-1].set_xlabel(f"time [{time_unit}] since {iso_timestamp(origin)}")
    figure.suptitle(title)
    return figure


def _time_unit(span_s: float) -> tuple[str, float]:
    """Seconds for up to 10 minutes, then minutes up to 3 hours, then hours (ns per unit)."""
    if span_s > 3 * 3600:
        return "h", 3600e9
    if span_s > 600:
        return "min", 60e9
    return "s", 1e9


def _y_axis(ax: Any, group: Sequence[Series], locator: Any) -> None:
    """Enum ticks at their keys with their labels; bools at false/true."""
    item = group[0]
    if item.channel.is_enum:
        seen = {int(v) for v in item.values if math.isfinite(v)}
        labels = dict(item.channel.labels)
        keys = sorted(labels) if len(labels) <= _MAX_ENUM_TICKS else sorted(seen)
        keys = sorted(set(keys) | seen)
        if not keys:
            return
        ax.yaxis.set_major_locator(locator(keys))
        ax.set_yticklabels([labels.get(k, str(k)) for k in keys], fontsize=7)
        ax.set_ylim(min(keys) - 0.5, max(keys) + 0.5)
    elif item.channel.data_type is ChannelDataType.BOOL:
        ax.yaxis.set_major_locator(locator([0, 1]))
        ax.set_yticklabels(["false", "true"], fontsize=7)
        ax.set_ylim(-0.2, 1.2)


def save_figure(figure: Figure, path: Path, fmt: str | None = None) -> None:
    """Write the figure as PNG or SVG (by ``fmt``, else by the suffix of ``path``).

    Raises:
        DaqError: an unknown suffix, or the file cannot be written.
    """
    fmt = fmt or _format(path)
    try:
        figure.savefig(path, format=fmt, dpi=110)
    except OSError as exc:
        raise DaqError(f"cannot write {path}: {exc.strerror or exc}") from exc
