"""Read-only views of a store for people and tools: runs, channels, and samples in time order.

:class:`StoreBrowser` wraps a store opened read-only and answers what ``daq-agent runs``,
``channels``, ``export`` and ``plot`` ask: which runs there are (with their assets, sample and
channel counts and time span), which channels (with flow, type, unit, enum labels, and per run
their flow's sample count and first/last time), and the samples of chosen flows and runs, streamed
from the primary key in bounded memory (one cursor per flow, merged by time).

Enum keys travel as ``uint32`` on the wire; a channel whose enum table has a signed key
(``ChannelEnumType.is_signed``) is a signed value table, and :meth:`ChannelView.number` turns the
stored key back into the signed number (``4294967295`` → ``-1``) for anything a person reads.

Samples stored without a run (run pk 0) appear as a run named ``(no run)`` with an empty id.
"""

from __future__ import annotations

import datetime
import difflib
import fnmatch
import heapq
import re
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from daq_agent._proto.sift.ingestion_configs.v2 import ingestion_configs_pb2
from daq_agent.core.errors import DaqError
from daq_agent.core.model import ChannelDataType
from daq_agent.server.store import (
    IngestionConfigRecord,
    RunRecord,
    Store,
    Value,
    decode_values,
)

__all__ = [
    "NO_RUN_NAME",
    "ChannelSummary",
    "ChannelView",
    "FlowView",
    "RunSummary",
    "RunView",
    "SampleRow",
    "StoreBrowser",
    "TimeBound",
    "iso_timestamp",
    "match_names",
    "parse_time_bound",
]

NO_RUN_NAME = "(no run)"
"""The name shown for samples stored without a run."""

_U32 = 1 << 32
_I32_MAX = (1 << 31) - 1


def iso_timestamp(timestamp_ns: int) -> str:
    """``2026-11-27T19:00:00.123456789Z`` for integer ns since the epoch (UTC)."""
    seconds, nanos = divmod(timestamp_ns, 1_000_000_000)
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{nanos:09d}Z"


@dataclass(frozen=True, slots=True)
class ChannelView:
    """A channel of a stored flow, as a person reads it.

    Attributes:
        name: the channel name.
        data_type: its type.
        unit: its unit ("" when none).
        description: its description ("" when none).
        labels: enum labels by signed key (empty for other types).
        signed: the enum table has a signed key: stored keys are 32-bit two's complement.
    """

    name: str
    data_type: ChannelDataType
    unit: str
    description: str
    labels: Mapping[int, str]
    signed: bool

    @classmethod
    def from_pb(cls, message: ingestion_configs_pb2.ChannelConfig) -> ChannelView:
        """The view of a wire channel config."""
        signed = any(e.is_signed for e in message.enum_types)
        labels = {_signed(e.key) if signed else e.key: e.name for e in message.enum_types}
        try:
            data_type = ChannelDataType.from_pb(message.data_type)
        except ValueError as exc:
            raise DaqError(
                f"channel {message.name!r} has an unknown data type {message.data_type}"
            ) from exc
        return cls(message.name, data_type, message.unit, message.description, labels, signed)

    @property
    def is_enum(self) -> bool:
        """True for an enum channel."""
        return self.data_type is ChannelDataType.ENUM

    @property
    def type_name(self) -> str:
        """``double``, ``enum``, ``uint32``…"""
        return self.data_type.as_human_str()

    def number(self, value: Value) -> Value:
        """The value as a person reads it: a signed enum key as its signed number."""
        if self.signed and isinstance(value, int) and not isinstance(value, bool):
            return _signed(value)
        return value

    def label(self, value: Value) -> str | None:
        """The enum label of a stored value, or None (not an enum, no label for the key)."""
        if not self.labels or value is None or isinstance(value, bool):
            return None
        number = self.number(value)
        return self.labels.get(number) if isinstance(number, int) else None


def _signed(key: int) -> int:
    """A 32-bit key as its two's-complement number (already negative keys pass through)."""
    key %= _U32
    return key - _U32 if key > _I32_MAX else key


@dataclass(frozen=True, slots=True)
class FlowView:
    """A stored flow with its asset and channels."""

    pk: int
    name: str
    asset: str
    ingestion_config_id: str
    channels: tuple[ChannelView, ...]


@dataclass(frozen=True, slots=True)
class RunView:
    """A run (pk 0: the samples stored without a run)."""

    pk: int
    run_id: str
    name: str
    client_key: str | None
    start_ns: int | None
    stop_ns: int | None
    is_stopped: bool
    created_ns: int | None = None
    """When the server created it (a client may set no start time: sift_stream sets none)."""

    @classmethod
    def from_record(cls, record: RunRecord) -> RunView:
        """The view of a stored run."""
        return cls(
            record.pk, record.run_id, record.name, record.client_key, record.start_ns,
            record.stop_ns, record.is_stopped, record.created_ns,
        )  # fmt: skip


_NO_RUN = RunView(0, "", NO_RUN_NAME, None, None, None, True)


@dataclass(frozen=True, slots=True)
class RunSummary:
    """A run with what it holds."""

    run: RunView
    assets: tuple[str, ...]
    flows: int
    channels: int
    samples: int
    first_ns: int | None
    last_ns: int | None


@dataclass(frozen=True, slots=True)
class ChannelSummary:
    """A channel of a flow with its flow's samples (in the selected runs)."""

    flow: FlowView
    channel: ChannelView
    samples: int
    """Samples of the channel's flow (a multiplexed signal may be empty in some of them)."""
    first_ns: int | None
    last_ns: int | None


class SampleRow(NamedTuple):
    """One stored sample with its run and flow; values raw, in the flow's channel order."""

    run: RunView
    flow: FlowView
    timestamp_ns: int
    values: list[Value]


@dataclass(frozen=True, slots=True)
class TimeBound:
    """A time limit: absolute ns since the epoch, or ns after the first sample of each run."""

    ns: int
    relative: bool = False

    def resolve(self, run_first_ns: int | None) -> int | None:
        """The absolute ns of this bound for a run whose first sample is at ``run_first_ns``."""
        if not self.relative:
            return self.ns
        return None if run_first_ns is None else run_first_ns + self.ns


_UNITS_NS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000, "m": 60_000_000_000,
             "h": 3_600_000_000_000}  # fmt: skip
_RELATIVE = re.compile(r"^\+(\d+(?:\.\d*)?|\.\d+)(ns|us|ms|s|m|h)?$")
_FRACTION = re.compile(r"^(.*T\d{2}:\d{2}:\d{2})\.(\d{1,9})(.*)$")


def parse_time_bound(text: str, option: str = "time") -> TimeBound:
    """Parse a time limit: integer ns since the epoch, ISO 8601 (UTC when no offset is given,
    up to nanoseconds), or ``+N[ns|us|ms|s|m|h]`` after the first sample of the run (seconds
    when no unit is given).

    Raises:
        DaqError: the text is none of these, naming ``option``.
    """
    value = text.strip()
    relative = _RELATIVE.match(value)
    if relative:
        number, unit = relative.groups()
        scale = _UNITS_NS[unit or "s"]
        whole, _, fraction = number.partition(".")
        digits = fraction[:18]
        ns = int(whole or 0) * scale + (int(digits) * scale // 10 ** len(digits) if digits else 0)
        return TimeBound(ns, relative=True)
    if re.fullmatch(r"-?\d+", value):
        return TimeBound(int(value))
    nanos = 0
    fraction_match = _FRACTION.match(value)
    if fraction_match:
        head, fraction, tail = fraction_match.groups()
        nanos = int(fraction.ljust(9, "0"))
        value = head + tail
    try:
        moment = datetime.datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError as exc:
        raise DaqError(
            f"{option}: {text!r} is not ISO 8601, integer ns or +SECONDS after the run start"
        ) from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    delta = moment - epoch
    seconds = delta.days * 86_400 + delta.seconds
    return TimeBound(seconds * 1_000_000_000 + delta.microseconds * 1_000 + nanos)


def match_names(patterns: Iterable[str], names: Sequence[str], what: str) -> list[str]:
    """The names matched by each pattern (an exact name or a glob: ``*``, ``?``, ``[…]``), in
    the order of ``names``, each once.

    Raises:
        DaqError: a pattern matches nothing; the message names it and lists near names.
    """
    chosen: set[str] = set()
    for pattern in patterns:
        if pattern in names:
            chosen.add(pattern)
            continue
        hits = fnmatch.filter(names, pattern)
        if not hits:
            raise DaqError(_no_match(pattern, names, what))
        chosen.update(hits)
    return [name for name in dict.fromkeys(names) if name in chosen]


def _no_match(pattern: str, names: Sequence[str], what: str) -> str:
    plain = re.sub(r"[*?\[\]]", "", pattern)
    unique = list(dict.fromkeys(names))
    near = difflib.get_close_matches(plain, unique, n=5, cutoff=0.5)
    if not near and plain:
        near = [n for n in unique if plain.lower() in n.lower()][:5]
    text = f"no {what} matches {pattern!r}"
    if near:
        text += f" (near: {', '.join(near)})"
    elif not unique:
        text += f" (the store has no {what}s)"
    return text


class StoreBrowser:
    """Read-only queries over a store (open it with ``Store.open(path, readonly=True)``).

    Args:
        store: the store; the browser does not close it.

    Attributes:
        flows: every flow, by pk.
        runs: every run by pk, with the pseudo-run ``(no run)`` (pk 0) first when samples
            without a run exist.
    """

    __slots__ = ("_stats", "flows", "runs", "store")

    def __init__(self, store: Store) -> None:
        self.store = store
        assets = {c.pk: c.asset_name for c in _all_configs(store)}
        self.flows: list[FlowView] = []
        for record in store.list_flows():
            definition = record.flow_config()
            self.flows.append(
                FlowView(
                    record.pk,
                    record.name,
                    assets.get(record.config_pk, ""),
                    record.ingestion_config_id,
                    tuple(ChannelView.from_pb(c) for c in definition.channels),
                )
            )
        self._stats: dict[tuple[int, int], tuple[int, int, int]] | None = None
        runs = [RunView.from_record(r) for r in _all_runs(store)]
        if any(run_pk == 0 for _, run_pk in self.stats):
            runs.insert(0, _NO_RUN)
        self.runs: list[RunView] = runs

    @property
    def stats(self) -> Mapping[tuple[int, int], tuple[int, int, int]]:
        """``(flow pk, run pk) → (samples, first ns, last ns)`` (one scan of the samples)."""
        if self._stats is None:
            self._stats = {
                (flow, run): (count, first, last)
                for flow, run, count, first, last in self.store.sample_stats()
            }
        return self._stats

    # -- runs --------------------------------------------------------------------------------

    def runs_named(self, name: str | None) -> list[RunView]:
        """The runs with this name (every run for None).

        Raises:
            DaqError: no run has the name; the message lists near names.
        """
        if name is None:
            return list(self.runs)
        found = [run for run in self.runs if run.name == name]
        if not found:
            raise DaqError(_no_match(name, [r.name for r in self.runs], "run").replace(
                "no run matches", "no run named"))  # fmt: skip
        return found

    def latest_run(self) -> RunView | None:
        """The newest run that has samples (None when the store has none)."""
        with_samples = {run for _, run in self.stats}
        for run in reversed(self.runs):
            if run.pk in with_samples:
                return run
        return None

    def run_first_ns(self, run: RunView) -> int | None:
        """The time of the run's first sample, in any flow."""
        firsts = [first for (_, r), (_, first, _) in self.stats.items() if r == run.pk]
        return min(firsts) if firsts else None

    def run_summaries(self) -> list[RunSummary]:
        """Every run with its assets, flows, channels, samples and sample time span."""
        flows = {flow.pk: flow for flow in self.flows}
        summaries = []
        for run in self.runs:
            held = [
                (flows[f], numbers)
                for (f, r), numbers in self.stats.items()
                if r == run.pk and f in flows
            ]
            summaries.append(
                RunSummary(
                    run,
                    tuple(sorted({flow.asset for flow, _ in held})),
                    len(held),
                    sum(len(flow.channels) for flow, _ in held),
                    sum(n for _, (n, _, _) in held),
                    min((lo for _, (_, lo, _) in held), default=None),
                    max((hi for _, (_, _, hi) in held), default=None),
                )
            )
        return summaries

    # -- channels ----------------------------------------------------------------------------

    def channel_summaries(self, runs: Sequence[RunView] | None = None) -> list[ChannelSummary]:
        """Every channel of every flow with its flow's samples, first and last time; with
        ``runs``, only flows that have samples in them, counted in them only."""
        pks = None if runs is None else {run.pk for run in runs}
        summaries: list[ChannelSummary] = []
        for flow in self.flows:
            numbers = [
                value
                for (f, r), value in self.stats.items()
                if f == flow.pk and (pks is None or r in pks)
            ]
            if pks is not None and not numbers:
                continue
            samples = sum(n for n, _, _ in numbers)
            first = min((lo for _, lo, _ in numbers), default=None)
            last = max((hi for _, _, hi in numbers), default=None)
            summaries.extend(
                ChannelSummary(flow, channel, samples, first, last) for channel in flow.channels
            )
        return summaries

    def select_flows(
        self, flow_patterns: Sequence[str] | None, channel_patterns: Sequence[str] | None
    ) -> list[FlowView]:
        """The flows named by ``flow_patterns`` (all for None) that have a channel matched by
        ``channel_patterns`` (any for None), by pk.

        Raises:
            DaqError: a pattern matches no flow or no channel (listing near names).
        """
        flows = self.flows
        if flow_patterns:
            names = set(match_names(flow_patterns, [f.name for f in flows], "flow"))
            flows = [f for f in flows if f.name in names]
        if channel_patterns:
            wanted = set(self.match_channels(channel_patterns, flows))
            flows = [f for f in flows if any(c.name in wanted for c in f.channels)]
        return flows

    def match_channels(
        self, patterns: Sequence[str], flows: Sequence[FlowView] | None = None
    ) -> list[str]:
        """The channel names of ``flows`` (default all) that the patterns match.

        Raises:
            DaqError: a pattern matches no channel (listing near names).
        """
        names = [c.name for f in (self.flows if flows is None else flows) for c in f.channels]
        return match_names(patterns, names, "channel")

    # -- samples -----------------------------------------------------------------------------

    def iter_rows(
        self,
        flows: Sequence[FlowView],
        runs: Sequence[RunView],
        *,
        start: TimeBound | None = None,
        end: TimeBound | None = None,
    ) -> Generator[SampleRow, None, None]:
        """The samples of these flows in these runs: run by run (in pk order), in time order
        within a run (ties by flow pk), each ``start <= t <= end``.

        Memory stays bounded: each flow of a run is read from the primary key by its own cursor
        in small batches and the cursors are merged by time; nothing is sorted or held whole.

        Raises:
            DaqError: a stored sample cannot be decoded.
        """
        by_pk = {flow.pk: flow for flow in flows}
        for run in sorted(runs, key=lambda r: r.pk):
            first = self.run_first_ns(run) if _relative(start, end) else None
            lo = start.resolve(first) if start else None
            hi = end.resolve(first) if end else None
            if _empty_window(start, lo, hi):
                continue
            streams = [
                _tagged(
                    flow.pk,
                    self.store.iter_flow_samples(
                        flow.pk, run.pk, start_ns=lo, end_ns=hi, batch=128
                    ),
                )
                for flow in flows
                if (flow.pk, run.pk) in self.stats
            ]
            try:
                for timestamp_ns, flow_pk, data in heapq.merge(*streams):
                    yield SampleRow(run, by_pk[flow_pk], timestamp_ns, decode_values(data))
            finally:  # a consumer that stops early closes every cursor now, not at GC
                for stream in streams:
                    stream.close()


def _empty_window(start: TimeBound | None, lo: int | None, hi: int | None) -> bool:
    """True when no sample can fall in the window (a relative start in a run without samples,
    or a start after the end)."""
    if start is not None and lo is None:
        return True
    return lo is not None and hi is not None and lo > hi


def _relative(*bounds: TimeBound | None) -> bool:
    return any(b is not None and b.relative for b in bounds)


def _tagged(
    flow_pk: int, rows: Generator[tuple[int, bytes], None, None]
) -> Generator[tuple[int, int, bytes], None, None]:
    try:
        for timestamp_ns, data in rows:
            yield timestamp_ns, flow_pk, data
    finally:
        rows.close()


def _all_runs(store: Store) -> list[RunRecord]:
    runs: list[RunRecord] = []
    while True:
        page = store.list_runs(after=runs[-1].pk if runs else 0, limit=1000)
        runs.extend(page)
        if len(page) < 1000:
            return runs


def _all_configs(store: Store) -> list[IngestionConfigRecord]:
    configs: list[IngestionConfigRecord] = []
    after = 0
    while True:
        page = store.list_ingestion_configs(after=after, limit=1000)
        configs.extend(page)
        if len(page) < 1000:
            return configs
        after = page[-1].pk
