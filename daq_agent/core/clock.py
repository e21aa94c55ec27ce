"""Timestamps in integer nanoseconds since the Unix epoch.

Two sources of time reach the pipeline:

* **Driver timestamps**: python-can gives ``Message.timestamp`` as float seconds. A float near
  1.7e9 s resolves about 240 ns, so the exact nanosecond is already gone; :func:`seconds_to_ns`
  converts without adding more error (integer and fractional parts split exactly) and rounds to the
  resolution the source really has (microseconds for most interfaces and log formats), so
  ``1700000000.123456`` becomes exactly ``1700000000123456000``.
* **Host time**, when an interface gives none: :class:`HostClock` reads the wall clock once, then
  advances with ``time.monotonic_ns()``, so an NTP step or a manual clock change never makes
  timestamps jump backwards mid-run. It re-anchors to the wall clock rarely (default hourly) and
  never goes backwards when it does.
"""

from __future__ import annotations

import threading
import time
from typing import Final

from daq_agent.core.errors import ConfigError

__all__ = ["NS_PER_S", "HostClock", "host_clock", "seconds_to_ns"]

NS_PER_S: Final = 1_000_000_000


def seconds_to_ns(seconds: float, resolution_ns: int = 1) -> int:
    """Convert float seconds (a python-can timestamp) to integer nanoseconds.

    The integer part is converted exactly; only the fraction goes through a multiplication, then
    the result is rounded to the nearest multiple of ``resolution_ns``.

    Args:
        seconds: seconds since the epoch (or since the start of a log).
        resolution_ns: the resolution the source has, in ns (1000 for microsecond timestamps).

    Returns:
        Nanoseconds, rounded to ``resolution_ns``.

    Raises:
        ValueError: ``seconds`` is not finite.
    """
    try:
        whole = int(seconds)  # exact; seconds - whole is then exact too
    except (OverflowError, ValueError) as exc:
        raise ValueError(f"timestamp is not finite: {seconds!r}") from exc
    if resolution_ns <= 1:
        return whole * NS_PER_S + round((seconds - whole) * NS_PER_S)
    return whole * NS_PER_S + round((seconds - whole) * (NS_PER_S / resolution_ns)) * resolution_ns


class HostClock:
    """A wall clock anchored once, advanced by the monotonic clock.

    Args:
        reanchor_interval_s: how often to re-read the wall clock (0 never).

    Raises:
        ConfigError: ``reanchor_interval_s`` is negative.
    """

    __slots__ = ("_anchor", "_last", "_lock", "_reanchor_ns")

    def __init__(self, reanchor_interval_s: float = 3600.0) -> None:
        if reanchor_interval_s < 0:
            raise ConfigError(f"reanchor_interval_s must be >= 0, got {reanchor_interval_s}")
        self._reanchor_ns = int(reanchor_interval_s * NS_PER_S)
        self._lock = threading.Lock()
        # (wall_ns, monotonic_ns) read together; replaced as one tuple so threads see a pair.
        self._anchor = (time.time_ns(), time.monotonic_ns())
        self._last = 0

    def now_ns(self) -> int:
        """Nanoseconds since the epoch; never less than a value this clock returned before."""
        wall, mono = self._anchor
        now_mono = time.monotonic_ns()
        if self._reanchor_ns and now_mono - mono >= self._reanchor_ns:
            self.reanchor()
            wall, mono = self._anchor
        value = wall + (now_mono - mono)
        if value <= self._last:  # after a re-anchor onto a wall clock that was behind
            value = self._last + 1
        self._last = value
        return value

    def reanchor(self) -> None:
        """Re-read the wall clock now."""
        with self._lock:
            self._anchor = (time.time_ns(), time.monotonic_ns())


_default_clock: HostClock | None = None
_default_lock = threading.Lock()


def host_clock() -> HostClock:
    """The process-wide host clock (created on first use)."""
    global _default_clock
    if _default_clock is None:
        with _default_lock:
            if _default_clock is None:
                _default_clock = HostClock()
    return _default_clock
