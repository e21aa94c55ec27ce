"""A CAN traffic generator driven by DBC (or any cantools) databases.

Every message of the databases is sent periodically on a python-can bus:

* each numeric signal follows a waveform (sine, ramp or random walk) inside its ``[min, max]``
  (its raw range when the database gives none), generated as raw integers so the values a decoder
  sees are exactly representable; float signals get float waveforms; 1-bit signals toggle;
* signals with a value table (choices) cycle through their choices;
* multiplexers (also nested ones) cycle through the multiplexer ids their signals use;
* periods come from ``GenMsgCycleTime`` (``cycle_times=True``; :data:`DEFAULT_CYCLE_S` where a
  message has none), or a total ``rate`` in frames/s is spread evenly over the messages;
* CAN FD messages are sent with ``is_fd`` (and bit-rate switch), extended ids flagged;
* J1939 messages (a DBC marked J1939, or ``j1939=True``) longer than 8 bytes are broadcast with
  the transport protocol (a TP.CM BAM and its TP.DT packets, back to back: J1939-21 asks a sender
  for 50-200 ms between packets, a receiver does not need it); ``dm1`` adds a DM1 (active DTCs)
  message every second, multi-packet when it carries more than one DTC.

The schedule and the values depend only on the seed and the simulated time, so two simulators with
the same seed produce the same frames (:meth:`CanSimulator.frames`); :meth:`CanSimulator.run`
sends them at their due times on the monotonic clock.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import can

from daq_agent.core.errors import ConfigError
from daq_agent.decode import j1939 as j1939_codec

__all__ = [
    "DEFAULT_CYCLE_S",
    "CanSimulator",
    "MessagePlan",
    "SignalGenerator",
    "SimulationSummary",
]

log = logging.getLogger(__name__)

DEFAULT_CYCLE_S: Final = 0.1
"""Period of a message without a cycle time in its database, seconds."""
_ENUM_HOLD_FRAMES: Final = 10
"""An enum signal keeps each choice for this many frames of its message."""
_MAX_LAG_S: Final = 1.0
"""When the sender falls further behind than this, the schedule restarts from now."""


@dataclass(slots=True)
class SignalGenerator:
    """The waveform of one signal, as raw values (or floats for float signals).

    Attributes:
        name: the signal name.
        kind: ``"sine"``, ``"ramp"``, ``"walk"``, ``"toggle"``, ``"enum"`` or ``"constant"``.
        lo: the lowest raw value.
        hi: the highest raw value.
        period_s: the waveform period (sine, ramp, toggle), seconds.
        phase: a phase offset in [0, 1).
        choices: the raw values an enum signal cycles through.
        is_float: the signal is an IEEE float (values are not rounded).
    """

    name: str
    kind: str
    lo: float
    hi: float
    period_s: float = 10.0
    phase: float = 0.0
    choices: tuple[int, ...] = ()
    is_float: bool = False
    _rng: random.Random = field(default_factory=random.Random, repr=False)
    _walk: float = 0.0

    def value(self, t: float, frame_index: int) -> int | float:
        """The raw value at simulated time ``t`` for the ``frame_index``-th frame."""
        lo, hi = self.lo, self.hi
        kind = self.kind
        if kind == "enum":
            return self.choices[(frame_index // _ENUM_HOLD_FRAMES) % len(self.choices)]
        if kind == "constant" or hi <= lo:
            x = lo
        elif kind == "toggle":
            x = lo if ((t / self.period_s + self.phase) % 1.0) < 0.5 else hi
        elif kind == "sine":
            s = math.sin(2 * math.pi * (t / self.period_s + self.phase))
            x = lo + (hi - lo) * (0.5 + 0.5 * s)
        elif kind == "ramp":
            x = lo + (hi - lo) * ((t / self.period_s + self.phase) % 1.0)
        else:  # walk
            span = hi - lo
            self._walk = min(hi, max(lo, self._walk + self._rng.uniform(-0.02, 0.02) * span))
            x = self._walk
        if self.is_float:
            return x
        return int(min(hi, max(lo, round(x))))


@dataclass(slots=True)
class MessagePlan:
    """How one message is generated and how often.

    Attributes:
        message: the cantools message.
        period_s: its period, seconds.
        offset_s: when it is first sent, relative to the start, seconds.
        generators: one per signal, by signal name.
        muxes: for each multiplexer signal, the ids it cycles through.
        sent: frames sent so far.
        generated: frames generated so far.
    """

    message: Any
    period_s: float
    offset_s: float
    generators: dict[str, SignalGenerator]
    muxes: dict[str, tuple[int, ...]]
    sent: int = 0
    generated: int = 0
    j1939: bool = False
    payload: Any = None  # a callable (t) -> bytes replacing the database's encoding (DM1)

    @property
    def name(self) -> str:
        """The message name."""
        return str(self.message.name)

    def values(self, t: float) -> dict[str, int | float]:
        """The raw values of the signals present in the next frame (the muxes decide which)."""
        index = self.generated
        out: dict[str, int | float] = {}
        signals = self.message.signals
        selected: dict[str, int] = {}
        for name, ids in self.muxes.items():
            selected[name] = ids[index % len(ids)]
        for signal in signals:
            if not _present(signal, selected, signals):
                continue
            if signal.name in selected:
                out[signal.name] = selected[signal.name]
            else:
                out[signal.name] = self.generators[signal.name].value(t, index)
        return out


@dataclass(frozen=True, slots=True)
class _Dm1Message:
    """Stands in for a database message in the DM1 plan (its payload is built, not encoded)."""

    frame_id: int
    name: str = "DM1"
    length: int = 8
    is_extended_frame: bool = True
    is_fd: bool = False
    cycle_time: int = 1000
    signals: tuple[Any, ...] = ()


def _present(signal: Any, selected: dict[str, int], signals: Sequence[Any]) -> bool:
    """True if ``signal`` is in the frame given the selected multiplexer values (also nested)."""
    seen = 0
    while signal.multiplexer_signal is not None:
        mux = signal.multiplexer_signal
        if selected.get(mux) not in (signal.multiplexer_ids or ()):
            return False
        parent = next((s for s in signals if s.name == mux), None)
        if parent is None:
            return False
        signal = parent
        seen += 1
        if seen > len(signals):  # a cycle in a broken database
            return False
    return True


@dataclass(frozen=True, slots=True)
class SimulationSummary:
    """What a simulator sent.

    Attributes:
        frames: frames sent in total.
        errors: sends that failed (counted, not raised).
        elapsed_s: wall time of the run, seconds.
        per_message: frames sent per message name.
    """

    frames: int
    errors: int
    elapsed_s: float
    per_message: dict[str, int]

    def render(self) -> str:
        """A human-readable summary, one message per line."""
        rate = self.frames / self.elapsed_s if self.elapsed_s > 0 else 0.0
        head = f"sent {self.frames} frames in {self.elapsed_s:.2f} s ({rate:.0f} frames/s)"
        lines = [f"{head}, {self.errors} send errors"]
        width = max((len(n) for n in self.per_message), default=0)
        lines.extend(f"  {n:<{width}}  {c}" for n, c in sorted(self.per_message.items()))
        return "\n".join(lines)


def _raw_range(signal: Any) -> tuple[float, float]:
    """The raw values of ``signal`` that respect both its bit length and its [min, max]."""
    length = int(signal.length)
    if signal.is_float:
        lo_phys = signal.minimum if signal.minimum is not None else -1000.0
        hi_phys = signal.maximum if signal.maximum is not None else 1000.0
        if hi_phys < lo_phys:
            lo_phys, hi_phys = hi_phys, lo_phys
        return float(lo_phys), float(hi_phys)  # float signals: scaling applied to floats
    if signal.is_signed:
        lo, hi = -(1 << (length - 1)), (1 << (length - 1)) - 1
    else:
        lo, hi = 0, (1 << length) - 1
    scale = float(signal.scale or 1)
    offset = float(signal.offset or 0)
    if (
        signal.minimum is not None
        and signal.maximum is not None
        and signal.minimum < signal.maximum
    ):
        a = (float(signal.minimum) - offset) / scale
        b = (float(signal.maximum) - offset) / scale
        a, b = min(a, b), max(a, b)
        lo_r, hi_r = max(lo, math.ceil(a - 1e-9)), min(hi, math.floor(b + 1e-9))
        if lo_r <= hi_r:
            return float(lo_r), float(hi_r)
    return float(lo), float(hi)


class CanSimulator:
    """Generates and sends realistic periodic traffic from cantools databases.

    Args:
        databases: the cantools databases whose messages are sent.
        bus: the python-can bus to send on (None: only :meth:`frames` can be used).
        rate: total frames/s spread evenly over the messages (None: use cycle times).
        default_cycle_s: the period of messages without a cycle time, seconds.
        seed: makes the waveforms and their phases reproducible.
        messages: only these message names (None: every message).
        j1939: every 29-bit message is J1939 (None: those of a DBC marked J1939).
        dm1: send a DM1 with these trouble codes every second (None: no DM1; an empty list: a
            DM1 saying no DTC is active).
        dm1_source: the source address of the DM1.
        dm1_lamps: the DM1's lamp states ``(mil, rsl, awl, pl)``.

    Raises:
        ConfigError: there is nothing to send, or an argument is invalid.
    """

    def __init__(
        self,
        databases: Sequence[Any],
        bus: can.BusABC | None = None,
        *,
        rate: float | None = None,
        default_cycle_s: float = DEFAULT_CYCLE_S,
        seed: int = 0,
        messages: Sequence[str] | None = None,
        j1939: bool | None = None,
        dm1: Sequence[j1939_codec.DtcCode] | None = None,
        dm1_source: int = 0x00,
        dm1_lamps: tuple[int, int, int, int] = (0, 0, 1, 0),
    ) -> None:
        if rate is not None and rate <= 0:
            raise ConfigError(f"rate must be > 0 frames/s, got {rate}")
        if default_cycle_s <= 0:
            raise ConfigError(f"default cycle time must be > 0, got {default_cycle_s}")
        self.bus = bus
        self.seed = seed
        wanted = set(messages) if messages is not None else None
        if not 0 <= dm1_source <= 0xFF:
            raise ConfigError(f"DM1 source address must be 0..255, got {dm1_source}")
        chosen = []
        j1939_messages: set[int] = set()
        for db in databases:
            database_j1939 = bool(j1939) or (j1939 is None and j1939_codec.database_is_j1939(db))
            for message in db.messages:
                if wanted is not None and message.name not in wanted:
                    continue
                if getattr(message, "is_container", False):
                    log.warning("simulator: container message %s is not simulated", message.name)
                    continue
                if j1939 is not False and j1939_codec.message_is_j1939(message, database_j1939):
                    j1939_messages.add(id(message))
                chosen.append(message)
        if dm1 is not None:
            chosen.append(_Dm1Message(0x18FECA00 | dm1_source))
        if not chosen:
            raise ConfigError("the databases have no message to simulate")
        dm1_data = j1939_codec.dm1_payload(tuple(dm1 or ()), dm1_lamps)
        self.plans: list[MessagePlan] = []
        n = len(chosen)
        for i, message in enumerate(chosen):
            if rate is not None:
                period = n / rate
                offset = i / rate
            else:
                cycle_ms = message.cycle_time
                period = cycle_ms / 1000.0 if cycle_ms else default_cycle_s
                offset = (i / n) * period
            plan = self._plan(message, period, offset)
            if isinstance(message, _Dm1Message):
                plan.j1939 = True
                plan.payload = lambda t, data=dm1_data: data
            else:
                plan.j1939 = id(message) in j1939_messages
            self.plans.append(plan)
        self.errors = 0

    @property
    def frames_per_second(self) -> float:
        """The nominal total frame rate of the schedule."""
        return sum(1.0 / p.period_s for p in self.plans)

    def _plan(self, message: Any, period: float, offset: float) -> MessagePlan:
        rng = random.Random(f"{self.seed}:{message.frame_id}:{message.name}")
        generators: dict[str, SignalGenerator] = {}
        children: dict[str, set[int]] = {}
        for signal in message.signals:
            if signal.multiplexer_signal is not None:
                children.setdefault(signal.multiplexer_signal, set()).update(
                    signal.multiplexer_ids or ()
                )
        for signal in message.signals:
            lo, hi = _raw_range(signal)
            sig_rng = random.Random(f"{self.seed}:{message.frame_id}:{signal.name}")
            if signal.choices:
                keys = tuple(sorted(int(k) for k in signal.choices))
                kind, choices = "enum", keys
            elif signal.length == 1 and not signal.is_float:
                kind, choices = "toggle", ()
            else:
                kind, choices = rng.choice(("sine", "ramp", "walk")), ()
            gen = SignalGenerator(
                name=signal.name,
                kind=kind,
                lo=lo,
                hi=hi,
                period_s=rng.uniform(2.0, 20.0),
                phase=rng.random(),
                choices=choices,
                is_float=bool(signal.is_float),
                _rng=sig_rng,
            )
            gen._walk = lo + (hi - lo) * sig_rng.random()
            generators[signal.name] = gen
        muxes = {name: tuple(sorted(ids)) for name, ids in children.items() if ids}
        return MessagePlan(message, period, offset, generators, muxes)

    def make_frame(self, plan: MessagePlan, t: float) -> can.Message:
        """Generate the next frame of ``plan`` at simulated time ``t`` (seconds from start)."""
        message = plan.message
        values = plan.values(t)
        plan.generated += 1
        data = message.encode(values, scaling=False, padding=True, strict=False)
        is_fd = bool(message.is_fd) or len(data) > 8
        return can.Message(
            timestamp=t,
            arbitration_id=message.frame_id,
            is_extended_id=bool(message.is_extended_frame),
            is_fd=is_fd,
            bitrate_switch=is_fd,
            data=data,
        )

    def make_frames(self, plan: MessagePlan, t: float) -> list[can.Message]:
        """The frames of the next message of ``plan``: one, or a J1939 BAM's TP.CM + TP.DT."""
        if plan.payload is None and not (plan.j1939 and plan.message.length > 8):
            return [self.make_frame(plan, t)]
        message = plan.message
        if plan.payload is not None:
            plan.generated += 1
            data = bytes(plan.payload(t))
        else:
            values = plan.values(t)
            plan.generated += 1
            data = message.encode(values, scaling=False, padding=True, strict=False)
        frame_id = int(message.frame_id)
        if len(data) <= 8:
            return [can.Message(timestamp=t, arbitration_id=frame_id, data=data)]
        pgn = j1939_codec.pgn_of(frame_id)
        return [
            can.Message(timestamp=t, arbitration_id=ident, is_extended_id=True, data=chunk)
            for ident, chunk in j1939_codec.transport_frames(pgn, data, frame_id & 0xFF)
        ]

    def frames(
        self, duration: float | None = None, count: int | None = None
    ) -> Iterator[tuple[MessagePlan, can.Message]]:
        """The schedule in simulated time: (plan, frame) in due order; ``frame.timestamp`` is
        its due time in seconds from the start.

        Args:
            duration: stop after this many simulated seconds (None: no limit).
            count: stop after this many frames (None: no limit).
        """
        heap = [(plan.offset_s, i) for i, plan in enumerate(self.plans)]
        heapq.heapify(heap)
        produced = 0
        while heap:
            if count is not None and produced >= count:
                return
            due, i = heapq.heappop(heap)
            if duration is not None and due >= duration:
                return
            plan = self.plans[i]
            for frame in self.make_frames(plan, due):
                if count is not None and produced >= count:
                    return
                yield plan, frame
                produced += 1
            heapq.heappush(heap, (due + plan.period_s, i))

    def run(
        self,
        duration: float | None = None,
        count: int | None = None,
        stop: threading.Event | None = None,
    ) -> SimulationSummary:
        """Send frames at their due times until ``duration``, ``count`` or ``stop``.

        Send failures (a full queue, a dropped link) are counted, logged once, never raised.

        Raises:
            ConfigError: the simulator has no bus.
        """
        bus = self.bus
        if bus is None:
            raise ConfigError("this simulator has no bus to send on")
        stop = stop or threading.Event()
        start = time.monotonic()
        shift = 0.0  # simulated-time delay accumulated when the sender fell behind
        sent = 0
        for plan, frame in self.frames(duration=duration, count=count):
            if stop.is_set():
                break
            due = start + shift + frame.timestamp
            now = time.monotonic()
            if due > now:
                if stop.wait(due - now):
                    break
            elif now - due > _MAX_LAG_S:
                shift += now - due
            frame.timestamp = 0.0  # the bus stamps it
            try:
                bus.send(frame)
            except (can.CanError, OSError) as exc:
                self.errors += 1
                if self.errors == 1:
                    log.warning("simulator: send failed (counted from now on): %s", exc)
                continue
            plan.sent += 1
            sent += 1
        return self.summary(time.monotonic() - start)

    def summary(self, elapsed_s: float) -> SimulationSummary:
        """What was sent so far."""
        per_message = {p.name: p.sent for p in self.plans}
        return SimulationSummary(
            frames=sum(per_message.values()),
            errors=self.errors,
            elapsed_s=elapsed_s,
            per_message=per_message,
        )
