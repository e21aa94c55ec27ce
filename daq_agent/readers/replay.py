"""ReplayReader: a recorded CAN log played as a bus, at its recorded pace or as fast as possible.

Any format python-can's ``can.LogReader`` reads works: BLF, ASC, candump ``.log``, TRC, CSV, the
SQLite ``.db`` and MF4 (when asammdf is installed), also gzip-compressed (``.asc.gz``). Frames are
counted and decoded exactly like a live bus (see :mod:`daq_agent.readers.can`); when the log is
exhausted the reader becomes ``ended`` so the agent can finish the run once everything is delivered.

A recorded log is not a live bus: it can wait, so it is never dropped (:attr:`ReplayReader.live`
is False). On a full ring the reader waits for room (``put_many(block=True)``), whatever the
ring's overflow policy and whether it plays ``realtime`` or not (a paced replay that had to wait
catches up with its frames that fell due meanwhile).

Timestamps (``time_base``):

* ``"recorded"``: the log's own timestamps, converted to ns;
* ``"now"``: shifted so the first frame is stamped with the host time the replay started;
* ``"auto"`` (default): recorded, unless the log's timestamps are relative (before 2001, e.g. an ASC
  log without a date or a log starting at 0.0), then shifted like ``"now"``.

Pacing: with ``realtime=True`` a frame is emitted when its recorded offset from the first frame
(divided by ``speed``) has elapsed on the monotonic clock; idle gaps longer than ``max_gap``
seconds are skipped. The wait is interruptible by :meth:`stop`. If the file fails mid-way, the
reader reopens it and skips the frames it already emitted, so nothing is emitted twice.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Final, Literal, get_args

import can

from daq_agent.core.backoff import RetryPolicy
from daq_agent.core.clock import HostClock, host_clock, seconds_to_ns
from daq_agent.core.errors import ConfigError, ReaderError
from daq_agent.readers.base import ErrorCallback, ReaderABC, Sink
from daq_agent.readers.can import CanReader, FrameDecoder, MessageProcessor

__all__ = ["ReplayReader", "TimeBase"]

log = logging.getLogger(__name__)

TimeBase = Literal["auto", "recorded", "now"]
_TIME_BASES: Final = get_args(TimeBase)
_RELATIVE_BEFORE_S: Final = 1_000_000_000.0  # 2001-09-09: earlier timestamps are log-relative
_MAX_BURST: Final = 4096


class ReplayReader(ReaderABC):
    """Plays a recorded CAN log through a decoder into a sink.

    Args:
        name: the bus alias; the thread is ``daq-reader[<name>]``.
        path: the log file; its suffix selects the format.
        decoder: decodes a frame into a sample (None for an unknown id).
        sink: receives every sample, on the reader thread; give it the ring itself (a queue with
            ``put_many``), not ``ring.put``, so that the replay waits for room instead of being
            dropped.
        realtime: play at the recorded pace (True) or as fast as possible (False).
        speed: pace multiplier with ``realtime`` (2.0 plays twice as fast).
        time_base: ``"auto"``, ``"recorded"`` or ``"now"`` (see the module docstring).
        channel: only frames recorded on this channel (None: every frame).
        max_gap: with ``realtime``, idle gaps longer than this many seconds are skipped.
        log_kwargs: extra keyword arguments for ``can.LogReader``.
        on_error: called with (reader, error) whenever reading the log fails.
        retry: delays between reopen attempts (default: the readers' ``READER_RETRY``).
        rng: the random source of the back-off's jitter.
        poll_interval: the longest one ``_read`` call lasts, seconds.
        timestamp_resolution_ns: resolution of the recorded timestamps (1000: microseconds).
        clock: host clock for ``time_base="now"`` and frames without a timestamp.
        key_limit: the most distinct ids held in each per-id map.

    Raises:
        ConfigError: an argument is invalid.

    Counters: those of :class:`~daq_agent.readers.can.CanReader`, plus ``other_channel`` (frames
    of other channels, skipped and not counted as received) and ``log_errors`` (failed reads of
    the log: the first is retried from the same frame; a second at the same frame means a corrupt
    log, and the reader fails with everything before it emitted).
    """

    kind: ClassVar[str] = "replay"
    LIVE: ClassVar[bool] = False
    COUNTERS: ClassVar[tuple[str, ...]] = (*CanReader.COUNTERS, "other_channel", "log_errors")
    KEYED_COUNTERS: ClassVar[tuple[str, ...]] = CanReader.KEYED_COUNTERS

    def __init__(
        self,
        name: str,
        path: str | os.PathLike[str],
        decoder: FrameDecoder,
        sink: Sink,
        *,
        realtime: bool = True,
        speed: float = 1.0,
        time_base: TimeBase = "auto",
        channel: str | int | None = None,
        max_gap: float = 60.0,
        log_kwargs: dict[str, Any] | None = None,
        on_error: ErrorCallback | None = None,
        retry: RetryPolicy | None = None,
        rng: random.Random | None = None,
        poll_interval: float = 0.1,
        timestamp_resolution_ns: int = 1000,
        clock: HostClock | None = None,
        key_limit: int = 1024,
    ) -> None:
        super().__init__(
            name,
            sink,
            on_error=on_error,
            retry=retry,
            rng=rng,
            poll_interval=poll_interval,
            key_limit=key_limit,
        )
        if speed <= 0:
            raise ConfigError(f"replay {name!r}: speed must be > 0, got {speed}")
        if time_base not in _TIME_BASES:
            raise ConfigError(
                f"replay {name!r}: time_base must be one of {', '.join(_TIME_BASES)}, "
                f"got {time_base!r}"
            )
        if max_gap <= 0:
            raise ConfigError(f"replay {name!r}: max_gap must be > 0, got {max_gap}")
        self.path = Path(path)
        self.realtime = realtime
        self.speed = speed
        self.time_base: TimeBase = time_base
        self.channel = channel
        self.max_gap = max_gap
        self.log_kwargs = dict(log_kwargs or {})
        self._clock = clock or host_clock()
        self._resolution_ns = timestamp_resolution_ns
        self._processor = MessageProcessor(self, decoder, self._clock, timestamp_resolution_ns)
        self._log: can.io.generic.MessageReader | None = None
        self._messages: Iterator[can.Message] | None = None
        self._pending: can.Message | None = None
        self._pending_due = 0.0
        self._position = 0  # frames taken from the log so far (kept across reopens)
        self._failed_at: int | None = None  # the position where reading last failed
        # timing, fixed by the first frame
        self._offset_ns: int | None = None
        self._first_s = 0.0
        self._start_mono = 0.0
        self._prev_s = 0.0
        self._skipped_s = 0.0
        self._size = 0
        self._fraction: float | None = None

    @property
    def position(self) -> int:
        """How many frames of the log were taken so far."""
        return self._position

    @property
    def last_decode_error(self) -> str:
        """The text of the most recent decode failure ("" if none)."""
        return self._processor.last_decode_error

    def _open(self) -> None:
        if not self.path.is_file():
            raise ConfigError(f"replay {self.name!r}: no such log file: {self.path}")
        kwargs = dict(self.log_kwargs)
        suffixes = [s.lower() for s in self.path.suffixes]
        if ".asc" in suffixes[-2:]:
            kwargs.setdefault("relative_timestamp", False)
        try:
            reader = can.LogReader(self.path, **kwargs)
        except (ValueError, ImportError) as exc:  # unknown suffix, asammdf missing for MF4
            raise ConfigError(f"replay {self.name!r}: cannot read {self.path}: {exc}") from exc
        self._log = reader
        try:
            self._size = self.path.stat().st_size
        except OSError:
            self._size = 0
        messages = iter(reader)
        try:
            for _ in range(self._position):  # after a failure mid-file: skip what was emitted
                if next(messages, None) is None:
                    break
        except Exception as exc:
            reader.stop()
            raise ConfigError(
                f"replay {self.name!r}: {self.path} changed: cannot skip to frame "
                f"{self._position}: {exc}"
            ) from exc
        self._messages = messages
        self._pending = None
        log.info("reader %s: replaying %s from frame %d", self.name, self.path, self._position)

    def _close(self) -> None:
        reader, self._log = self._log, None
        self._messages = None
        self._pending = None
        if reader is not None:
            reader.stop()

    @property
    def fraction_read(self) -> float | None:
        """How much of the file was read, 0 to 1 (updated after each burst; None when the
        format's reader does not tell, e.g. a compressed log)."""
        return self._fraction

    def _note_progress(self) -> None:
        reader = self._log
        file = getattr(reader, "file", None)
        if file is None or self._size <= 0:
            return
        raw = getattr(file, "buffer", file)  # a text log: the bytes under its decoder
        if getattr(raw, "fileobj", None) is not None:  # gzip: the decompressed position
            return
        try:
            self._fraction = min(1.0, raw.tell() / self._size)
        except (OSError, ValueError, AttributeError):
            self._fraction = None

    def _read(self, timeout: float) -> bool:
        try:
            more = self._read_burst(timeout)
        finally:
            self._note_progress()
        if not more:
            self._fraction = 1.0
        return more

    def _read_burst(self, timeout: float) -> bool:
        messages = self._messages
        if messages is None:
            raise ConfigError("replay log is not open")
        deadline = time.monotonic() + timeout
        process = self._processor.process
        for _ in range(_MAX_BURST):
            msg = self._pending
            if msg is None:
                msg = self._next(messages)
                if msg is None:
                    log.info(
                        "reader %s: end of %s (%d frames)", self.name, self.path, self._position
                    )
                    return False
                if self.channel is not None and msg.channel != self.channel:
                    self._position += 1
                    self.counters.add("other_channel")
                    continue
                if self.realtime:
                    self._pending_due = self._due(msg)
            if self.realtime:
                wait = self._pending_due - time.monotonic()
                if wait > 0:
                    self._pending = msg
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return True
                    if self._stop.wait(min(wait, remaining)) or wait > remaining:
                        return True
            self._pending = None
            self._position += 1
            process(msg, self._timestamp_ns(msg))
        return True

    def _next(self, messages: Iterator[can.Message]) -> can.Message | None:
        """The next frame of the log, None at its end.

        Raises:
            ReaderError: the log could not be read here (retried: the file is reopened).
            ConfigError: it failed at the same frame again (a corrupt log; not retried).
        """
        try:
            return next(messages, None)
        except Exception as exc:
            self.counters.add("log_errors")
            where = f"{self.path} after frame {self._position}"
            if self._failed_at == self._position:
                raise ConfigError(f"replay {self.name!r}: corrupt log: {where}: {exc}") from exc
            self._failed_at = self._position
            raise ReaderError(f"cannot read {where}: {exc}") from exc

    def _due(self, msg: can.Message) -> float:
        """The monotonic time at which ``msg`` is due (fixing the pacing origin on first use)."""
        ts = float(msg.timestamp or 0.0)
        if self._offset_ns is None:
            self._fix_origin(ts)
        gap = ts - self._prev_s
        if gap > self.max_gap:
            self._skipped_s += gap
        if ts > self._prev_s:
            self._prev_s = ts
        return self._start_mono + (ts - self._first_s - self._skipped_s) / self.speed

    def _fix_origin(self, first_s: float) -> None:
        self._first_s = first_s
        self._prev_s = first_s
        self._start_mono = time.monotonic()
        now_ns = self._clock.now_ns()
        relative = first_s < _RELATIVE_BEFORE_S
        if self.time_base == "now" or (self.time_base == "auto" and relative):
            self._offset_ns = now_ns - seconds_to_ns(first_s, self._resolution_ns)
        else:
            self._offset_ns = 0

    def _timestamp_ns(self, msg: can.Message) -> int:
        ts = float(msg.timestamp or 0.0)
        if self._offset_ns is None:
            self._fix_origin(ts)
        assert self._offset_ns is not None
        try:
            return seconds_to_ns(ts, self._resolution_ns) + self._offset_ns
        except ValueError:
            return self._clock.now_ns()
