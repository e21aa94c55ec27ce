"""The monitor's view model: status documents in, the rows of the screen out (no terminal).

A document has the shape of the agent's ``/status.json`` (:mod:`daq_agent.status_json`): the
status snapshot (``AgentStatus.as_dict()``; read directly from a bus or a log, only its
``sources``) and the latest reading of every channel. :class:`MonitorModel` keeps the last one,
filters the channels by name, sorts them, and formats values, rates and ages; it also turns the
status into one health row per source and for the ring, the spool and the stream.
"""

from __future__ import annotations

import enum
import fnmatch
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from daq_agent.pipeline.latest import RateMeter
from daq_agent.pipeline.status import format_count

__all__ = [
    "HealthRow",
    "MonitorModel",
    "SignalRow",
    "SortKey",
    "format_age",
    "format_rate",
    "format_value",
]

_NS = 1_000_000_000


class SortKey(enum.Enum):
    """How the signal rows are ordered."""

    NAME = "name"
    """By flow, then channel name."""
    RATE = "rate"
    """Busiest flows first."""
    AGE = "age"
    """Freshest values first."""

    def next(self) -> SortKey:
        """The next order (the ``s`` key cycles through them)."""
        members = list(SortKey)
        return members[(members.index(self) + 1) % len(members)]


@dataclass(frozen=True, slots=True)
class SignalRow:
    """One channel on the screen, every cell formatted.

    Attributes:
        key: ``flow/name``, unique per row.
        flow: the flow.
        name: the channel.
        value: the value.
        unit: the unit.
        label: the enum label.
        rate: the flow's samples per second.
        age: how old the value is.
    """

    key: str
    flow: str
    name: str
    value: str
    unit: str
    label: str
    rate: str
    age: str

    @property
    def cells(self) -> tuple[str, ...]:
        """The cells in column order (flow, signal, value, unit, label, rate, age)."""
        return (self.flow, self.name, self.value, self.unit, self.label, self.rate, self.age)


@dataclass(frozen=True, slots=True)
class HealthRow:
    """One part of the pipeline: a source, the ring, the spool, the stream.

    Attributes:
        part: what it is (``can0 (can)``, ``ring``).
        state: its state (``running``, ``ok``, ``dropping``, ``FAILED``…).
        detail: its numbers.
    """

    part: str
    state: str
    detail: str

    @property
    def cells(self) -> tuple[str, str, str]:
        """The cells in column order."""
        return (self.part, self.state, self.detail)


def format_value(value: Any) -> str:
    """A value for a cell: floats to 7 significant digits, bools ``true``/``false``."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.7g}" if math.isfinite(value) else str(value)
    return str(value)


def format_rate(rate: float | None) -> str:
    """Samples per second: ``-`` when unknown, ``9.87``, ``123.4``, ``12.3k``."""
    if rate is None:
        return "-"
    if rate < 100:
        return f"{rate:.2f}"
    if rate < 1000:
        return f"{rate:.1f}"
    return format_count(rate)


def format_age(seconds: float) -> str:
    """An age: ``0.12 s``, ``42 s``, ``3m05s``, ``2h03m``, ``3d04h`` (from the future: 0)."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 48 * 3600:
        return f"{whole // 3600}h{whole // 60 % 60:02d}m"
    return f"{whole // 86400}d{whole // 3600 % 24:02d}h"


class MonitorModel:
    """What the screen shows: the last document, the filter, the order and the pause.

    Args:
        rate_window_s: the window of the sources' frame rates.
    """

    def __init__(self, rate_window_s: float = 5.0) -> None:
        self.document: Mapping[str, Any] | None = None
        self.filter = ""
        self.sort = SortKey.NAME
        self.paused = False
        self._paused_at_ns = 0
        self.error = ""
        self.updates = 0
        self._rate_window_s = rate_window_s
        self._source_rates: RateMeter | None = None  # from the first document on
        self._source_rate: dict[str, float] = {}

    def update(
        self, document: Mapping[str, Any] | None, error: str = "", now: float | None = None
    ) -> bool:
        """Take a new document (ignored while paused); returns True when it was taken.

        Args:
            document: the new document (None: none yet).
            error: why there is no fresh document ("" when there is).
            now: ``time.monotonic()`` for the sources' rates.
        """
        self.error = error
        if self.paused or document is None:
            return False
        self.document = document
        self.updates += 1
        received = {
            str(s.get("name")): int(s.get("received") or 0) for s in self._sources(document)
        }
        at = time.monotonic() if now is None else now
        if self._source_rates is None:
            # an agent's counts are since its start: a rate only from the second document on
            self._source_rates = RateMeter(self._rate_window_s, start=at, initial=received)
        self._source_rate = self._source_rates.update(at, received)
        return True

    def toggle_pause(self) -> bool:
        """Pause or resume; returns True when now paused (the ages stop growing too)."""
        self.paused = not self.paused
        self._paused_at_ns = time.time_ns()
        return self.paused

    def cycle_sort(self) -> SortKey:
        """The next order."""
        self.sort = self.sort.next()
        return self.sort

    def matches(self, flow: str, name: str) -> bool:
        """True when the channel passes the filter: a case-insensitive part of ``flow.name``,
        or a glob pattern (``*Volt*``, ``can0.BMS_*``) when it holds ``*``, ``?`` or ``[``."""
        text = self.filter.strip().lower()
        if not text:
            return True
        full = f"{flow}.{name}".lower()
        if any(ch in text for ch in "*?["):
            return fnmatch.fnmatchcase(full, text) or fnmatch.fnmatchcase(name.lower(), text)
        return text in full

    def channels(self) -> list[Mapping[str, Any]]:
        """The readings of the document that pass the filter, in the chosen order."""
        document = self.document
        if document is None:
            return []
        raw = document.get("channels") or []
        chosen = [c for c in raw if self.matches(str(c.get("flow", "")), str(c.get("name", "")))]
        chosen.sort(key=lambda c: (str(c.get("flow", "")), str(c.get("name", ""))))
        if self.sort is SortKey.RATE:
            chosen.sort(key=lambda c: -(c.get("rate") or 0.0))
        elif self.sort is SortKey.AGE:
            chosen.sort(key=lambda c: -int(c.get("timestamp_ns") or 0))
        return chosen

    def signal_rows(self, now_ns: int | None = None) -> list[SignalRow]:
        """The rows of the signal table.

        Args:
            now_ns: the wall clock the ages are measured against (default: now, or the moment
                of the pause while paused).
        """
        if now_ns is not None:
            now = now_ns
        else:
            now = self._paused_at_ns if self.paused else time.time_ns()
        rows = []
        for c in self.channels():
            flow, name = str(c.get("flow", "")), str(c.get("name", ""))
            timestamp = int(c.get("timestamp_ns") or 0)
            rate = c.get("rate")
            rows.append(
                SignalRow(
                    key=f"{flow}/{name}",
                    flow=flow,
                    name=name,
                    value=format_value(c.get("value")),
                    unit=str(c.get("unit") or ""),
                    label=str(c.get("label") or ""),
                    rate=format_rate(None if rate is None else float(rate)),
                    age=format_age((now - timestamp) / _NS) if timestamp else "-",
                )
            )
        return rows

    @property
    def run_line(self) -> str:
        """``run NAME  up 0:01:23`` of an agent's document ("" read directly or before any)."""
        document = self.document
        status = document.get("status") if document is not None else None
        if not isinstance(status, Mapping) or "uptime_s" not in status:
            return ""
        whole = int(float(status.get("uptime_s") or 0))
        up = f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"
        return f"run {status.get('run') or '(none)'}  up {up}"

    @property
    def total_channels(self) -> int:
        """Channels in the document, filtered or not."""
        document = self.document
        return len(document.get("channels") or []) if document is not None else 0

    @staticmethod
    def _sources(document: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
        status = document.get("status") or {}
        sources = status.get("sources") or []
        return [s for s in sources if isinstance(s, Mapping)]

    def health_rows(self) -> list[HealthRow]:
        """One row per source, then the ring, the spool and the stream (when there are)."""
        document = self.document
        if document is None:
            return []
        rows = []
        for s in self._sources(document):
            name = str(s.get("name", ""))
            rate = self._source_rate.get(name)
            errors = int(s.get("errors") or 0)
            detail = (
                f"{format_rate(rate)} frames/s  received {s.get('received', 0)}  "
                f"decoded {s.get('decoded', 0)}  unknown {s.get('unknown', 0)}  errors {errors}"
            )
            by_kind = s.get("errors_by_kind") or {}
            if by_kind:
                detail += " (" + ", ".join(f"{k} {n}" for k, n in sorted(by_kind.items())) + ")"
            if s.get("reopens"):
                detail += f"  reopens {s['reopens']}"
            if s.get("last_error"):
                detail += f"  last error: {s['last_error']}"
            rows.append(HealthRow(f"{name} ({s.get('kind', '?')})", str(s.get("state")), detail))
        status = document.get("status") or {}
        ring = status.get("ring")
        if isinstance(ring, Mapping):
            dropped = int(ring.get("dropped") or 0)
            rows.append(
                HealthRow(
                    "ring",
                    "dropping" if dropped else "ok",
                    f"depth {ring.get('depth', 0)}/{ring.get('capacity', 0)}  "
                    f"high-water {ring.get('high_water', 0)}  dropped {dropped}",
                )
            )
        spool = status.get("spool")
        if isinstance(spool, Mapping):
            failed = spool.get("failed")
            rows.append(
                HealthRow(
                    "spool",
                    "FAILED" if failed else "ok",
                    f"{format_count(float(spool.get('bytes') or 0))} B in "
                    f"{spool.get('segments', 0)} segments  pending "
                    f"{spool.get('pending_samples', 0)} samples  dropped "
                    f"{spool.get('dropped_samples', 0)}" + (f"  {failed}" if failed else ""),
                )
            )
        flusher = status.get("flusher")
        if isinstance(flusher, Mapping):
            rows.append(self._stream_row(flusher, status.get("stream") or {}))
        if not isinstance(ring, Mapping) and document.get("mode") == "direct":
            rows.append(HealthRow("pipeline", "direct", "read directly: no ring, spool or stream"))
        return rows

    @staticmethod
    def _stream_row(flusher: Mapping[str, Any], stream: Mapping[str, Any]) -> HealthRow:
        failures = int(flusher.get("failures") or 0)
        pending = int(flusher.get("pending") or 0)
        state = "ok"
        if failures and pending:
            state = "retrying"
        detail = f"delivered {flusher.get('delivered', 0)}  pending {pending}  failures {failures}"
        p50, p99 = flusher.get("latency_p50_ms"), flusher.get("latency_p99_ms")
        if p50 is not None and p99 is not None:
            detail += f"  latency p50 {float(p50):.0f} ms p99 {float(p99):.0f} ms"
        if stream:
            detail += (
                f"  windows {float(stream.get('windows', 0)):.0f} committed "
                f"{float(stream.get('windows_failed', 0)):.0f} failed"
            )
        lost = sum(
            int(flusher.get(k) or 0) for k in ("dropped", "corrupt", "dead_lettered", "abandoned")
        )
        if lost:
            state = "LOSING"
            detail += f"  lost {lost}"
        return HealthRow("stream", state, detail)
