"""The latest value of every channel: a cheap tap on the samples, and its readings for people.

:class:`LatestValues` remembers the last :class:`~daq_agent.core.sample.Sample` of each flow and
counts samples per flow. It is fed whole batches (the flusher's writer thread after each batch it
takes from the ring, never the reader threads per frame). Keeping the last samples costs about
0.1 µs a sample, counting them (for the rates) about 0.2 µs more (``benchmarks/stages.py``, of
some 22 µs a frame costs under the GIL), so samples are counted only while someone reads the tap
(for ``watch_s`` after each read): an agent nobody monitors pays only the first. It is also a
sample queue (``put_many``), so a reader can feed it directly (``daq-agent monitor --bus``).

:meth:`LatestValues.document` names the values with the flows' channel definitions: one
:class:`ChannelReading` per channel that has a value, with its unit, its enum label and its flow's
rate. An enum key of a signed value table is shown as its signed number (``-1``, not
``4294967295``), whichever of the two the sample carries.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from daq_agent.core.model import ChannelConfig, ChannelDataType, FlowConfig
from daq_agent.core.sample import Sample, Value

__all__ = [
    "ChannelReading",
    "EnumLabels",
    "LatestValues",
    "RateMeter",
    "json_value",
]

_U32 = 1 << 32
_SIGN32 = 1 << 31
_flow_of = attrgetter("flow")


class EnumLabels:
    """The labels of one enum channel, and the signed reading of its keys.

    A negative key of a DBC value table travels as its 32-bit two's complement with
    ``is_signed`` set; a value of such a channel at or above 2**31 is shown as negative.
    """

    __slots__ = ("_labels", "signed")

    def __init__(self, channel: ChannelConfig) -> None:
        self.signed = any(e.is_signed for e in channel.enum_types)
        labels: dict[int, str] = {}
        for e in channel.enum_types:
            key = e.key
            if e.is_signed and _SIGN32 <= key < _U32:
                key -= _U32
            labels[key] = e.name
        self._labels = labels

    def number(self, value: int) -> int:
        """The key as a person reads it (signed when the table is)."""
        if self.signed and _SIGN32 <= value < _U32:
            return value - _U32
        return value

    def label(self, value: int) -> str:
        """The label of a key ("" when the table has none for it)."""
        return self._labels.get(self.number(value), "")


@dataclass(frozen=True, slots=True)
class ChannelReading:
    """The latest value of one channel.

    Attributes:
        flow: the flow name.
        name: the channel name.
        value: the value as a person reads it (a signed enum key as its signed number).
        unit: the unit ("" when none).
        label: the enum label of the value ("" when not an enum or no label for the key).
        timestamp_ns: the sample's timestamp, ns since the epoch.
        rate: samples per second of the flow (None until known).
        count: samples of the flow counted (while the tap is read, see :class:`LatestValues`).
    """

    flow: str
    name: str
    value: Value
    unit: str
    label: str
    timestamp_ns: int
    rate: float | None
    count: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable (see :func:`json_value`)."""
        return {
            "flow": self.flow,
            "name": self.name,
            "value": json_value(self.value),
            "unit": self.unit,
            "label": self.label,
            "timestamp_ns": self.timestamp_ns,
            "rate": None if self.rate is None else round(self.rate, 3),
            "count": self.count,
        }


def json_value(value: Value) -> Any:
    """A value JSON can carry: non-finite floats as ``"nan"``/``"inf"``, bytes as hex."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    return value


class RateMeter:
    """Rates per key from cumulative counts, over a sliding window of wall time.

    Each :meth:`update` records the counts; a rate compares them with the oldest record not
    younger than ``window_s`` (the start, before that: a rate since the start).

    Args:
        window_s: the window, seconds.
        start: the time of the ``initial`` counts (``time.monotonic()`` by default).
        initial: the counts at ``start`` (default: none).
    """

    __slots__ = ("_history", "window_s")

    def __init__(
        self,
        window_s: float = 5.0,
        start: float | None = None,
        initial: Mapping[str, int] | None = None,
    ) -> None:
        self.window_s = window_s
        begin = time.monotonic() if start is None else start
        self._history: deque[tuple[float, dict[str, int]]] = deque([(begin, dict(initial or {}))])

    def update(self, now: float, counts: Mapping[str, int]) -> dict[str, float]:
        """Record ``counts`` at ``now``; the rate of every key (per second)."""
        history = self._history
        while len(history) > 1 and history[1][0] <= now - self.window_s:
            history.popleft()
        base_time, base = history[0]
        if now - history[-1][0] >= 0.2:  # a record per 0.2 s at most: the deque stays small
            history.append((now, dict(counts)))
        span = now - base_time
        if span <= 0:
            return {}
        return {key: max(0, n - base.get(key, 0)) / span for key, n in counts.items()}


class LatestValues:
    """The last sample of every flow, and a count per flow; thread-safe.

    Args:
        flows: the flows whose channels name the values (samples of other flows are counted
            and shown without channel names: ``value[0]``, ``value[1]``…).
        rate_window_s: the window of the rates.
        watch_s: samples are counted until this long after the last read (None: always).
    """

    __slots__ = (
        "_channels",
        "_count_until",
        "_counts",
        "_last",
        "_lock",
        "_merged",
        "_rate_window_s",
        "_rates",
        "_watch_s",
    )

    def __init__(
        self,
        flows: Iterable[FlowConfig] = (),
        rate_window_s: float = 5.0,
        watch_s: float | None = 60.0,
    ) -> None:
        self._channels: dict[str, list[tuple[ChannelConfig, EnumLabels | None]]] = {}
        self.add_flows(flows)
        self._last: dict[str, Sample] = {}
        # flows with absent values (multiplexed messages): each channel's last value and time
        self._merged: dict[str, tuple[list[Value], list[int]]] = {}
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._rate_window_s = rate_window_s
        self._rates = RateMeter(rate_window_s)
        self._watch_s = watch_s
        self._count_until = math.inf if watch_s is None else -math.inf

    def observe(self, batch: Sequence[Sample]) -> None:
        """Remember the batch's last sample of each flow; count the batch's samples while the
        tap is read."""
        if not batch:
            return
        last = {s.flow: s for s in batch}
        counting = time.monotonic() < self._count_until
        with self._lock:
            self._last.update(last)
            merged = self._merged
            for flow, sample in last.items():  # once per flow and batch, not per sample
                if flow in merged or None in sample.values:
                    self._merge(flow, sample)
            if counting:
                self._counts.update(map(_flow_of, batch))

    def _merge(self, flow: str, sample: Sample) -> None:
        """Keep each channel's last value of a flow whose samples leave some out (a multiplexed
        message shows every group it sent, each value with its own time)."""
        entry = self._merged.get(flow)
        values = sample.values
        if entry is None or len(entry[0]) != len(values):
            entry = self._merged[flow] = ([None] * len(values), [0] * len(values))
        kept, times = entry
        stamp = sample.timestamp_ns
        for i, value in enumerate(values):
            if value is not None:
                kept[i] = value
                times[i] = stamp

    # -- a sample queue, for a reader feeding the tap directly --------------------------------

    def put_many(
        self, items: Iterable[Sample], *, block: bool = False, timeout: float | None = None
    ) -> int:
        """Observe ``items`` (never full, never blocks); returns how many."""
        batch = items if isinstance(items, list) else list(items)
        self.observe(batch)
        return len(batch)

    @property
    def closed(self) -> bool:
        """Never closed: the tap takes samples until dropped."""
        return False

    def add_flows(self, flows: Iterable[FlowConfig]) -> None:
        """Name the values of more flows (added while running); known ones stay as they are."""
        channels = dict(self._channels)
        for flow in flows:
            channels.setdefault(
                flow.name,
                [
                    (c, EnumLabels(c) if c.data_type is ChannelDataType.ENUM else None)
                    for c in flow.channels
                ],
            )
        self._channels = channels  # one assignment: readers see the old map or the new one

    # -- readings ---------------------------------------------------------------------------

    @property
    def flow_names(self) -> list[str]:
        """The flows whose channels name the values, sorted."""
        return sorted(self._channels)

    def counts(self) -> dict[str, int]:
        """Samples seen per flow."""
        with self._lock:
            return dict(self._counts)

    def readings(self, now: float | None = None) -> list[ChannelReading]:
        """One reading per channel with a value, by flow and channel: the flow's last sample,
        or for a flow whose samples leave values out (multiplexed), each channel's last value.

        Args:
            now: ``time.monotonic()`` for the rates (default: now).
        """
        at = time.monotonic() if now is None else now
        with self._lock:
            last: dict[str, tuple[Sequence[Value], Sequence[int]]] = {
                flow: (sample.values, [sample.timestamp_ns] * len(sample.values))
                for flow, sample in self._last.items()
            }
            for flow, (kept, stamps) in self._merged.items():
                last[flow] = (list(kept), list(stamps))
            counts = dict(self._counts)
            if self._watch_s is not None:
                clock = time.monotonic()
                if clock >= self._count_until:  # counting starts now: the rates from here
                    self._rates = RateMeter(self._rate_window_s, start=at, initial=counts)
                self._count_until = clock + self._watch_s
        rates = self._rates.update(at, counts)
        out: list[ChannelReading] = []
        for flow in sorted(last):
            values, times = last[flow]
            channels = self._channels.get(flow)
            rate = rates.get(flow)
            count = counts.get(flow, 0)
            for i, value in enumerate(values):
                if value is None:
                    continue
                if channels is not None and i < len(channels):
                    channel, labels = channels[i]
                    name, unit = channel.name, channel.unit or ""
                else:
                    name, unit, labels = f"value[{i}]", "", None
                label = ""
                if labels is not None and isinstance(value, int) and not isinstance(value, bool):
                    label = labels.label(value)
                    value = labels.number(value)
                out.append(ChannelReading(flow, name, value, unit, label, times[i], rate, count))
        return out

    def document(self, now: float | None = None) -> list[dict[str, Any]]:
        """:meth:`readings` as JSON-serialisable dicts."""
        return [reading.as_dict() for reading in self.readings(now)]
