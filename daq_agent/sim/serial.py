"""A serial device simulator driven by frame definitions: ``daq-agent simulate serial``.

It opens a pseudo-terminal, prints the path of its device side (``/dev/pts/N``; ``--link`` also
makes a stable symlink to it), and writes frames encoded by the same codec the agent decodes with:

* every numeric channel follows a waveform (sine, ramp or random walk) inside its declared
  ``[min, max]`` (a window of its type's range when none is declared); counters (``seq``,
  ``counter``…) count; integer time fields (unit s/ms/us/ns, or the definitions' device timestamp
  field) carry the elapsed or absolute time; 1-bit channels toggle; enum channels cycle through
  their value table; NMEA ``time``/``date`` fields carry the current UTC time and date;
* each frame type is sent at its declared ``rate`` (frames/s; frame types without one get the
  mean of the declared rates); ``--rate`` scales the schedule to that many frames per second in
  total (default: the declared rates, or 50 frames/s when none is declared);
* ``--corrupt RATE`` damages that fraction of the frames: a flipped bit, a truncation, or a burst
  of garbage before the frame.

Without ``--duration``/``--count`` it runs until SIGINT or SIGTERM, then prints a summary. The pty
behaves like a UART: when nobody reads and its buffer is full, frames are dropped (and counted).
"""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import heapq
import math
import os
import random
import select
import sys
import threading
import time
import tty
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from daq_agent.core.errors import ConfigError, ReaderError
from daq_agent.core.model import ChannelDataType
from daq_agent.core.sample import Value
from daq_agent.core.signals import stop_on_signals
from daq_agent.serialdefs.codec import ChannelSpec, CompiledFrame, SerialCodec
from daq_agent.serialdefs.loader import load_definitions
from daq_agent.serialdefs.model import SerialDefinitions

__all__ = [
    "CORRUPTIONS",
    "ChannelWave",
    "SerialSimulator",
    "SimulatedFrame",
    "add_arguments",
    "pty_link",
    "run",
]

CORRUPTIONS: Final = ("bit_flip", "truncation", "garbage")
"""The kinds of damage ``--corrupt`` applies."""

_COUNTER_NAMES: Final = ("seq", "sequence", "counter", "count", "packet_counter")
_TIME_UNITS_S: Final = {"s": 1.0, "ms": 1e3, "us": 1e6, "µs": 1e6, "ns": 1e9}
_WINDOW: Final = 1000.0
_DEFAULT_RATE: Final = 50.0
_WRITE_STALL_S: Final = 0.2


class ChannelWave:
    """The value of one channel over time.

    Args:
        channel: the channel (its field, bit group, type and range).
        rng: the random source (seeded by the simulator).
        device_time: the channel is the definitions' device timestamp field.
        utc_part: the channel's role in a timestamp built from date/time fields (``year``…):
            it carries the current UTC time.
        epoch_ns: that timestamp's epoch, ns since the Unix epoch.
        unit_ns: that timestamp's unit in ns.
        text: the device speaks a text format: floats get a realistic number of decimals.
    """

    __slots__ = (
        "_digits",
        "_grid",
        "_hi",
        "_kind",
        "_lo",
        "_period",
        "_phase",
        "_scale_units",
        "_step",
        "_walk",
        "channel",
        "epoch_ns",
        "unit_ns",
    )

    def __init__(
        self,
        channel: ChannelSpec,
        rng: random.Random,
        *,
        device_time: bool = False,
        utc_part: str = "",
        epoch_ns: int = 0,
        unit_ns: int = 1,
        text: bool = False,
    ) -> None:
        self.channel = channel
        self.epoch_ns = epoch_ns
        self.unit_ns = unit_ns
        item = channel.field
        data_type = channel.config.data_type
        lo, hi = float(channel.minimum), float(channel.maximum)
        source = channel.bit or item
        declared = source.minimum is not None or source.maximum is not None
        self._lo, self._hi = lo, hi
        self._period = rng.uniform(4.0, 30.0)
        self._phase = rng.uniform(0.0, 2 * math.pi)
        self._walk = rng.uniform(lo, hi) if hi > lo else lo
        self._step = (hi - lo) / 200.0 if hi > lo else 0.0
        self._scale_units = 0.0
        name = channel.name.lower()
        unit = (channel.config.unit or "").strip()
        if device_time:
            self._kind = "device_time"
        elif utc_part in ("year", "month", "day", "hour", "minute", "second", "nanosecond"):
            self._kind = utc_part  # a part of the definitions' UTC timestamp: the current time
        elif item.type in ("time", "date", "talker"):
            self._kind = item.type
        elif data_type is ChannelDataType.ENUM:
            self._kind = "enum"
        elif data_type is ChannelDataType.BOOL:
            self._kind = "bool"
        elif data_type is ChannelDataType.STRING:
            self._kind = "string"
        elif data_type is ChannelDataType.BYTES:
            self._kind = "bytes"
        elif name in _COUNTER_NAMES or name.endswith("_counter"):
            self._kind = "counter"
        elif "time" in name and unit in _TIME_UNITS_S and data_type is not ChannelDataType.DOUBLE:
            self._kind = "elapsed"
            self._scale_units = _TIME_UNITS_S[unit]
        else:
            self._kind = rng.choice(("sine", "sine", "ramp", "walk"))
            if not declared and hi - lo > _WINDOW:
                # an undeclared full type range: a plausible window near zero (or the minimum)
                lo = max(lo, 0.0) if lo < 0 <= hi else lo
                hi = min(hi, lo + _WINDOW)
                self._lo, self._hi = lo, hi
                self._walk = rng.uniform(lo, hi)
                self._step = (hi - lo) / 200.0
        self._digits = (7 if item.type in ("lat", "lon") else 4) if text else None
        self._grid: tuple[float, float, int, int] | None = None
        integer = channel.bit is not None or "int" in item.type
        if integer and (source.scale != 1.0 or source.offset != 0.0):
            # a scaled integer: keep to raw values whose physical value lies inside the range
            scale, offset = source.scale, source.offset
            ends = sorted(((lo - offset) / scale, (hi - offset) / scale))
            self._grid = (scale, offset, math.ceil(ends[0] - 1e-9), math.floor(ends[1] + 1e-9))

    def value(self, t: float, index: int, rng: random.Random) -> Value:
        """The value at simulated time ``t`` (seconds since start) for the ``index``-th frame."""
        kind = self._kind
        lo, hi = self._lo, self._hi
        channel = self.channel
        if kind == "sine":
            x = lo + (hi - lo) * (
                0.5 + 0.5 * math.sin(2 * math.pi * t / self._period + self._phase)
            )
            x += rng.gauss(0.0, (hi - lo) * 0.003)
            return self._fit(x)
        if kind == "ramp":
            span = hi - lo
            return self._fit(lo + (span * ((t / self._period) % 1.0) if span else 0.0))
        if kind == "walk":
            self._walk = min(hi, max(lo, self._walk + rng.uniform(-self._step, self._step)))
            return self._fit(self._walk)
        if kind == "counter":
            span = int(hi - lo) + 1 if hi > lo else 1
            return int(lo) + index % span
        if kind == "elapsed":
            return self._fit(lo + t * self._scale_units)
        if kind == "device_time":
            now_ns = time.time_ns() - self.epoch_ns
            return self._fit(now_ns / self.unit_ns)
        if kind == "bool":
            return (index // 10) % 2 == 1
        if kind == "enum":
            keys = channel.keys
            return keys[(index // 25) % len(keys)] if keys else 0
        if kind == "talker":
            return "GN" if index % 4 == 3 else "GP"  # a multi-GNSS receiver mixes talkers
        if kind == "string":
            # text devices: a one-letter status (NMEA status/mode: "A", valid / autonomous)
            return "A" if self._digits is not None and channel.field.type == "string" else "sim"
        if kind == "bytes":
            return bytes((index + i) & 0xFF for i in range(channel.field.size))
        now = dt.datetime.now(dt.UTC)
        if kind in ("year", "month", "day", "hour", "minute", "second"):
            return int(getattr(now, kind))
        if kind == "nanosecond":
            return now.microsecond * 1000
        if kind == "time":
            return now.hour * 3600 + now.minute * 60 + now.second + now.microsecond // 1000 / 1000
        return now.date().isoformat()

    def _fit(self, x: float) -> Value:
        x = min(self._hi, max(self._lo, x))
        grid = self._grid
        if grid is not None:
            scale, offset, raw_lo, raw_hi = grid
            raw = min(raw_hi, max(raw_lo, round((x - offset) / scale)))
            x = raw * scale + offset
        data_type = self.channel.config.data_type
        if data_type in (ChannelDataType.DOUBLE, ChannelDataType.FLOAT):
            return x if self._digits is None else round(x, self._digits)
        return round(x)


@dataclass(frozen=True, slots=True)
class SimulatedFrame:
    """One frame the simulator produced.

    Attributes:
        t: simulated time, seconds since the start.
        frame: the frame type name.
        data: the bytes to write (after any corruption).
        corruption: the damage applied (one of :data:`CORRUPTIONS`), or None.
        values: the values encoded (before corruption).
    """

    t: float
    frame: str
    data: bytes
    corruption: str | None = None
    values: dict[str, Value] = field(default_factory=dict)


class SerialSimulator:
    """Generates the frames of a device from its definitions.

    Args:
        defs: the frame definitions.
        rate: frames per second, all frame types together (> 0); None: the frames' declared
            rates (50 frames/s in total when none is declared).
        corrupt: the fraction of frames damaged, 0 to 1.
        seed: the random seed (None: random).
        frames: the frame types to send (default: all; regex frames without ``render`` are
            skipped).

    Raises:
        ConfigError: invalid rate, corruption rate or frame names, or nothing to send.
    """

    def __init__(
        self,
        defs: SerialDefinitions,
        *,
        rate: float | None = None,
        corrupt: float = 0.0,
        seed: int | None = None,
        frames: Sequence[str] | None = None,
    ) -> None:
        if rate is not None and not rate > 0:
            raise ConfigError(f"--rate must be > 0, got {rate}")
        if not 0.0 <= corrupt <= 1.0:
            raise ConfigError(f"--corrupt must be between 0 and 1, got {corrupt}")
        self.defs = defs
        self.corrupt = corrupt
        self.rng = random.Random(seed)
        self.codec = SerialCodec(defs, device=defs.name)
        chosen: list[CompiledFrame] = []
        for compiled in self.codec.frames:
            if frames is not None and compiled.name not in frames:
                continue
            if defs.format.value == "regex" and not compiled.definition.render:
                continue
            chosen.append(compiled)
        if frames is not None:
            unknown = sorted(set(frames) - {c.name for c in self.codec.frames})
            if unknown:
                raise ConfigError(f"unknown frame types: {', '.join(unknown)}")
        if not chosen:
            raise ConfigError("no frame type can be simulated (regex frames need 'render')")
        self.frames = tuple(chosen)
        declared = [c.definition.rate for c in chosen]
        given = [r for r in declared if r is not None]
        default = sum(given) / len(given) if given else _DEFAULT_RATE / len(chosen)
        rates = [r if r is not None else default for r in declared]
        if rate is not None:
            factor = rate / sum(rates)
            rates = [r * factor for r in rates]
        self.rates: tuple[float, ...] = tuple(rates)
        """Frames per second of each frame type, in :attr:`frames` order."""
        self.rate = sum(rates)
        """Frames per second in total."""
        stamp = defs.timestamp
        parts = {name: role for role, name in stamp.parts} if stamp else {}
        shared: dict[tuple[str, ChannelDataType, str], ChannelWave] = {}
        self._waves: dict[str, list[ChannelWave]] = {}
        for compiled in chosen:
            waves = []
            for ch in compiled.channels:
                # a channel of the same name, type and unit in several frame types (latitude in
                # GGA and RMC) follows one waveform, like a real device
                key = (ch.name, ch.config.data_type, ch.config.unit or "")
                wave = shared.get(key)
                if wave is None:
                    wave = shared[key] = ChannelWave(
                        ch,
                        self.rng,
                        device_time=stamp is not None and ch.bit is None and ch.name == stamp.field,
                        utc_part=parts.get(ch.name, "") if ch.bit is None else "",
                        epoch_ns=stamp.epoch_ns if stamp else 0,
                        unit_ns=stamp.unit_ns if stamp else 1,
                        text=defs.format.is_text,
                    )
                waves.append(wave)
            self._waves[compiled.name] = waves
        self.sent: Counter[str] = Counter()
        self.corrupted: Counter[str] = Counter()
        self.dropped_bytes = 0
        self.written_bytes = 0

    def values(self, compiled: CompiledFrame, t: float, index: int) -> dict[str, Value]:
        """The channel values of one frame at simulated time ``t``."""
        waves = self._waves[compiled.name]
        return {
            c.name: w.value(t, index, self.rng)
            for c, w in zip(compiled.channels, waves, strict=True)
        }

    def generate(self, count: int | None = None) -> Iterator[SimulatedFrame]:
        """The frames in the order of their simulated times (each type at its own rate)."""
        due = [(0.0, i) for i in range(len(self.frames))]
        heapq.heapify(due)
        per_type: Counter[str] = Counter()
        index = 0
        while count is None or index < count:
            t, i = heapq.heappop(due)
            compiled = self.frames[i]
            n = per_type[compiled.name]
            per_type[compiled.name] = n + 1
            heapq.heappush(due, ((n + 1) / self.rates[i], i))  # no accumulated rounding
            values = self.values(compiled, t, n)
            data = self.codec.encode(compiled.name, values)
            corruption = None
            if self.corrupt and self.rng.random() < self.corrupt:
                corruption = self.rng.choice(CORRUPTIONS)
                data = self._damage(data, corruption)
            yield SimulatedFrame(t, compiled.name, data, corruption, values)
            index += 1

    def _damage(self, data: bytes, kind: str) -> bytes:
        rng = self.rng
        if kind == "bit_flip":
            damaged = bytearray(data)
            bit = rng.randrange(len(damaged) * 8)
            damaged[bit // 8] ^= 1 << (bit % 8)
            return bytes(damaged)
        if kind == "truncation":
            return data[: rng.randrange(1, len(data))] if len(data) > 1 else b""
        burst = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
        return burst + data

    def run(
        self,
        write: Callable[[bytes], int],
        stop: threading.Event,
        *,
        duration: float | None = None,
        count: int | None = None,
        paced: bool = True,
    ) -> float:
        """Write frames at their due times until stopped, ``duration`` or ``count``.

        Args:
            write: writes bytes and returns how many were accepted (fewer: the rest is dropped).
            stop: set to end the run.
            duration: seconds to run (None: no limit).
            count: frames to send (None: no limit).
            paced: wait for each frame's due time (False: as fast as possible).

        Returns:
            The elapsed wall time, seconds.
        """
        start = time.monotonic()
        for frame in self.generate(count):
            if stop.is_set() or (duration is not None and frame.t >= duration):
                break
            if paced:
                delay = start + frame.t - time.monotonic()
                if delay > 0 and stop.wait(delay):
                    break
            accepted = write(frame.data)
            self.written_bytes += accepted
            self.dropped_bytes += len(frame.data) - accepted
            self.sent[frame.frame] += 1
            if frame.corruption:
                self.corrupted[frame.corruption] += 1
        return time.monotonic() - start

    def summary(self, elapsed: float) -> str:
        """A human summary of what was sent."""
        total = sum(self.sent.values())
        per_type = ", ".join(f"{name} {n}" for name, n in sorted(self.sent.items()))
        damaged = ", ".join(f"{kind} {n}" for kind, n in sorted(self.corrupted.items())) or "none"
        return (
            f"sent {total} frames in {elapsed:.1f} s ({per_type}); corrupted: {damaged}; "
            f"{self.written_bytes} bytes written, {self.dropped_bytes} dropped (buffer full)"
        )


class _PtyWriter:
    """The master side of a pty, written like a UART: what does not fit is dropped."""

    __slots__ = ("master", "path", "slave")

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)  # no echo, no line discipline: bytes pass unchanged
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        done = 0
        deadline = time.monotonic() + _WRITE_STALL_S
        while done < len(view):
            try:
                done += os.write(self.master, view[done:])
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                select.select([], [self.master], [], left)
            except OSError as exc:
                if exc.errno == errno.EIO:
                    break  # no reader attached right now
                raise
        return done

    def close(self) -> None:
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``simulate serial`` options to ``parser``."""
    parser.add_argument(
        "--defs", required=True, type=Path, metavar="FILE", help="frame-definition YAML file"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        metavar="N",
        help="frames per second, all types together (default: the frames' declared rates, else 50)",
    )
    parser.add_argument(
        "--corrupt",
        type=float,
        default=0.0,
        metavar="RATE",
        help="fraction of frames damaged by a bit flip, truncation or garbage burst (0)",
    )
    parser.add_argument("--seed", type=int, default=None, metavar="N", help="random seed")
    parser.add_argument(
        "--duration", type=float, default=None, metavar="S", help="stop after S seconds"
    )
    parser.add_argument("--count", type=int, default=None, metavar="N", help="stop after N frames")
    parser.add_argument(
        "--frame", action="append", default=None, metavar="NAME", help="only this frame type"
    )
    parser.add_argument(
        "--link",
        type=Path,
        default=None,
        metavar="PATH",
        help="also make PATH a symlink to the pty",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        metavar="FILE",
        help="write the byte stream to FILE (a capture for 'decode --defs') instead of a pty",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``simulate serial``; returns the exit code.

    Raises:
        ConfigError: invalid definitions or options.
        ReaderError: the output cannot be created.
    """
    defs = load_definitions(args.defs)
    simulator = SerialSimulator(
        defs, rate=args.rate, corrupt=args.corrupt, seed=args.seed, frames=args.frame
    )
    if args.duration is None and args.count is None and args.output is not None:
        raise ConfigError("--output needs --count or --duration")
    stop = threading.Event()
    with stop_on_signals(stop):
        if args.output is not None:
            try:
                with open(args.output, "wb") as out:
                    elapsed = simulator.run(
                        out.write, stop, duration=args.duration, count=args.count, paced=False
                    )
            except OSError as exc:
                raise ReaderError(f"cannot write {args.output}: {exc.strerror or exc}") from exc
            print(simulator.summary(elapsed), file=sys.stderr)
            return 0
        writer = _PtyWriter()
        try:
            with pty_link(args.link, writer.path):
                print(writer.path, flush=True)
                elapsed = simulator.run(
                    writer.write, stop, duration=args.duration, count=args.count
                )
        finally:
            writer.close()
    print(simulator.summary(elapsed), file=sys.stderr)
    return 0


@contextmanager
def pty_link(link: Path | None, target: str) -> Iterator[None]:
    """While inside, ``link`` (if given) is a symlink to the pty ``target``: a stable path for
    a config. Replaced atomically; removed on leaving if it still points there.

    Raises:
        ReaderError: the link cannot be made.
    """
    if link is None:
        yield
        return
    tmp = link.with_name(link.name + ".tmp")
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(target)
        tmp.replace(link)
    except OSError as exc:
        raise ReaderError(f"cannot link {link} to {target}: {exc.strerror or exc}") from exc
    try:
        yield
    finally:
        try:
            if os.readlink(link) == target:
                os.unlink(link)
        except OSError:
            pass
