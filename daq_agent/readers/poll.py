"""PollReaderABC: a request/response device polled at a configured rate (Modbus, SCPI).

A polled device answers questions instead of talking on its own. The reader thread asks each
*poll group* (a Modbus register group, a SCPI query) at its rate, and every poll ends in exactly
one outcome, counted::

    received = decoded + timeouts + exceptions + decode_errors      (one per poll)

``decoded`` polls become one sample each (``{device}.{group}``, stamped with the host time the
poll's first request was sent). A *timeout* is a poll with no complete reply in ``timeout_s``; an
*exception* is a reply saying no (a Modbus exception response, by code in the per-key map
``exception_codes``); a *decode error* is a reply that does not decode. ``late_replies`` counts
replies that arrived after their poll timed out (discarded, outside ``received``), ``requests``
the requests sent, ``values_read`` the registers/bits/replies read, and ``overruns`` the poll
cycles skipped because the device could not keep up with the rate (the schedule keeps its phase;
it never bursts to catch up).

A device that vanishes (connection refused, port gone) is a source failure: the base reader
reports it, backs off (:class:`~daq_agent.core.backoff.Backoff`) and reopens it, and the thread
never dies. A subclass implements ``_open``/``_close`` and one poll hook::

    _poll(index) -> Sample | PollFault     ask group ``index`` once; raise ReaderError when
                                           the connection itself failed
"""

from __future__ import annotations

import abc
import enum
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import ClassVar, Final

from daq_agent.core.backoff import RetryPolicy
from daq_agent.core.clock import host_clock
from daq_agent.core.errors import ConfigError
from daq_agent.core.model import FlowConfig
from daq_agent.core.sample import Sample
from daq_agent.readers.base import ErrorCallback, ReaderABC, Sink

__all__ = ["POLL_COUNTERS", "PollFault", "PollReaderABC"]

POLL_COUNTERS: Final = (
    "received",
    "decoded",
    "unknown",
    "timeouts",
    "exceptions",
    "decode_errors",
    "late_replies",
    "requests",
    "values_read",
    "overruns",
)
"""The counters of every polled device (see the module docstring)."""


class PollFault(enum.Enum):
    """Why a poll gave no sample (the name of the counter it is counted under)."""

    TIMEOUT = "timeouts"
    EXCEPTION = "exceptions"
    DECODE = "decode_errors"


class PollReaderABC(ReaderABC):
    """A device polled group by group at a rate, with its faults counted.

    Args:
        name: the device alias (``{device}`` in flow names; thread ``daq-reader[<name>]``).
        sink: receives every sample.
        rate_hz: polls of each group per second (a group may have its own, see ``rates``).
        timeout_s: the longest to wait for one reply.
        clock: host time in ns for the samples (default: the agent's host clock).
        on_error: called on the reader thread when the device fails.
        retry: delays between reconnect attempts (default: the readers' ``READER_RETRY``).
        rng: the random source of the back-off's jitter.
        poll_interval: the longest the thread waits between polls before checking for a stop.

    Raises:
        ConfigError: a rate or the timeout is not positive.
    """

    kind: ClassVar[str] = "poll"
    COUNTERS: ClassVar[tuple[str, ...]] = (*ReaderABC.COUNTERS, *POLL_COUNTERS)
    KEYED_COUNTERS: ClassVar[tuple[str, ...]] = ("exception_codes",)

    def __init__(
        self,
        name: str,
        sink: Sink,
        *,
        rate_hz: float,
        timeout_s: float,
        clock: Callable[[], int] | None = None,
        on_error: ErrorCallback | None = None,
        retry: RetryPolicy | None = None,
        rng: random.Random | None = None,
        poll_interval: float = 0.1,
    ) -> None:
        super().__init__(
            name, sink, on_error=on_error, retry=retry, rng=rng, poll_interval=poll_interval
        )
        if not (rate_hz > 0 and math.isfinite(rate_hz)):
            raise ConfigError(f"must be > 0, got {rate_hz}", key="rate_hz")
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ConfigError(f"must be > 0, got {timeout_s}", key="timeout_s")
        self.rate_hz = rate_hz
        self.timeout_s = timeout_s
        self._clock = clock or host_clock().now_ns
        self._periods: tuple[float, ...] = ()
        self._due: list[float] = []

    # -- for subclasses -------------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def flows(self) -> list[FlowConfig]:
        """One flow per poll group."""

    def _set_rates(self, rates: Sequence[float | None]) -> None:
        """The poll groups' rates (None: the device's); call once from the constructor."""
        self._periods = tuple(1.0 / (r or self.rate_hz) for r in rates)

    @abc.abstractmethod
    def _poll(self, index: int) -> Sample | PollFault:
        """Ask poll group ``index`` once and return its sample, or why there is none.

        Raises:
            ReaderError: the connection failed (the device is reopened after a back-off).
        """

    def _now_ns(self) -> int:
        return self._clock()

    # -- the schedule ---------------------------------------------------------------------------

    def _reset_schedule(self) -> None:
        now = time.monotonic()
        self._due = [now] * len(self._periods)

    def _read(self, timeout: float) -> bool:
        if len(self._due) != len(self._periods):
            self._reset_schedule()
        now = time.monotonic()
        due = min(self._due, default=now + timeout)
        if due > now:
            self._stop.wait(min(timeout, due - now))
            return True
        counters = self.counters.values
        for index, at in enumerate(self._due):
            if at > now or self._stop.is_set():
                continue
            outcome = self._poll(index)
            counters["received"] += 1
            if isinstance(outcome, Sample):
                counters["decoded"] += 1
                self._emit(outcome)
            else:
                counters[outcome.value] += 1
            period = self._periods[index]
            at += period
            late = time.monotonic() - at
            if late >= 0:  # the device cannot keep up: skip the cycles missed, keep the phase
                missed = int(late // period) + 1
                counters["overruns"] += missed
                at += missed * period
            self._due[index] = at
        return True
