"""The flusher: from the ring buffer, through the backlog (the durable spool), to a sink.

Two threads, so that a slow or absent server never stalls the ring::

    ring ──► daq-flusher ──pack──► backlog.append (the spool: samples on disk, group-commit fsync)
                                        │
             daq-sender ◄──read back in bounded chunks──┘ ──► sink window ──► commit ──► ack

``daq-flusher`` drains the ring by size and age, packs each batch of samples into one payload
(:mod:`daq_agent.pipeline.batch`: samples, not wire requests, so nothing about the API needs to be
known to spool) and appends it to the backlog *before* anything is sent. ``daq-sender`` reads what
is not yet acknowledged back from the backlog in chunks of at most ``read_chunk_bytes`` (never a
whole window in memory) and sends it on a window of the :class:`~daq_agent.pipeline.sink.Sink`.
A window is bounded by ``checkpoint_seconds`` and ``checkpoint_records`` (and closed early when
traffic pauses or at shutdown); its commit returns once the server has committed every sample of
it: only then is the backlog acknowledged up to the window's last sequence number, and the samples
counted delivered.

Failures are sorted by the sink (``SinkError.kind``): a transient one cancels the window, waits a
capped exponential back-off with full jitter, and re-sends from the acknowledged sequence on a new
window, never giving up. An authentication failure is retried slowly (the sink re-reads the key).
Each streak of failures is logged once when it starts (and again if its reason changes) and once
when delivery resumes, with the count of attempts; never once per attempt. A commit with no answer
within ``checkpoint_timeout_s`` abandons the window (a hung server or a dead path) and re-sends. A
sample the server can never accept is isolated by bisecting the window and moved to the
dead-letter file.

The backlog is a :class:`WindowStore`: :class:`~daq_agent.pipeline.spool.Spool` (durable: its
content at start, an earlier run's unacknowledged batches, is replayed first and counted as
``recovered``) or :class:`MemoryWindow` (no durability; while the server fails, the writer waits,
so the ring's overflow policy applies as without a backlog). A :class:`SpoolError` (a write or
fsync failed) is fatal: the flusher records it in :attr:`Flusher.error`, closes the ring and ends.

Every sample taken is in exactly one bucket (:attr:`FlusherStats.balanced`)::

    taken + recovered = delivered + pending + rejected + abandoned + dropped + corrupt
                        + dead_lettered
"""

from __future__ import annotations

import bisect
import logging
import operator
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from daq_agent.core.backoff import Backoff, FailureKind, RetryPolicy
from daq_agent.core.errors import ConfigError, DaqError, SinkError, SpoolError
from daq_agent.core.sample import Sample
from daq_agent.pipeline.batch import (
    LegacyDecoder,
    Row,
    RunRef,
    pack_batch,
    pack_rows,
    unpack_payloads,
)
from daq_agent.pipeline.deadletter import DeadLetter
from daq_agent.pipeline.latest import LatestValues
from daq_agent.pipeline.ring_buffer import RingBuffer
from daq_agent.pipeline.sink import Sink, SinkStream
from daq_agent.pipeline.spool import SpoolRecord
from daq_agent.pipeline.status import LATENCY_BUCKETS_S, FlusherStats

__all__ = [
    "Flusher",
    "FlusherSettings",
    "MemoryWindow",
    "WindowStore",
]

log = logging.getLogger(__name__)

_LIVE_AGE_NS = 3600 * 1_000_000_000
"""Samples older than this when acknowledged are replayed data, left out of the latency."""
_MAX_SPANS = 4096
"""The most batch time spans remembered per window (for the latency reservoir)."""


# -- the backlog -------------------------------------------------------------------------------


class WindowStore(Protocol):
    """The backlog between the flusher and the stream (the spool's interface).

    Records carry consecutive sequence numbers from 1; the sender reads what follows the last
    sequence it sent and acknowledges up to the last one of a committed window.
    """

    def append(self, payloads: Sequence[bytes], count: int, oldest_ns: int, newest_ns: int) -> int:
        """Record one batch before it is sent; returns its sequence number.

        Raises:
            SpoolError: a durable store could not write it.
        """
        ...

    def read(
        self, after_seq: int, *, max_records: int = 1000, max_bytes: int = 8 * 2**20
    ) -> list[SpoolRecord]:
        """The next records after ``after_seq``, in order, bounded by count and bytes.

        Raises:
            SpoolError: a durable store could not read.
        """
        ...

    def acknowledge(self, seq: int) -> None:
        """Everything up to ``seq`` was committed by the server: forget it.

        Raises:
            SpoolError: a durable store could not persist the cursor.
        """
        ...

    @property
    def acked_seq(self) -> int:
        """The acknowledged sequence number (0: none)."""
        ...

    @property
    def last_seq(self) -> int:
        """The last sequence number appended (0: none)."""
        ...

    @property
    def pending_samples(self) -> int:
        """Samples appended (or recovered) and neither acknowledged nor dropped."""
        ...


class MemoryWindow:
    """A :class:`WindowStore` in memory (no durability: lost if the process dies).

    Args:
        limit_bytes: the most payload bytes held; beyond it the oldest batches are dropped and
            counted (``dropped_samples``). The flusher keeps far below it: while the server
            fails, its writer waits instead of appending.
    """

    __slots__ = (
        "_acked",
        "_bytes",
        "_last",
        "_limit",
        "_lock",
        "_pending",
        "_records",
        "dropped_records",
        "dropped_samples",
    )

    def __init__(self, limit_bytes: int = 256 * 2**20) -> None:
        self._records: deque[tuple[SpoolRecord, int]] = deque()
        self._lock = threading.Lock()
        self._limit = limit_bytes
        self._bytes = 0
        self._acked = 0
        self._last = 0
        self._pending = 0
        self.dropped_records = 0
        self.dropped_samples = 0

    def append(self, payloads: Sequence[bytes], count: int, oldest_ns: int, newest_ns: int) -> int:
        """Record one batch; returns its sequence number."""
        size = sum(len(p) for p in payloads)
        with self._lock:
            self._last += 1
            self._records.append(
                (SpoolRecord(self._last, count, oldest_ns, newest_ns, tuple(payloads)), size)
            )
            self._bytes += size
            self._pending += count
            while self._bytes > self._limit and len(self._records) > 1:
                record, dropped = self._records.popleft()
                self._bytes -= dropped
                self._pending -= record.count
                self.dropped_records += 1
                self.dropped_samples += record.count
            return self._last

    def read(
        self, after_seq: int, *, max_records: int = 1000, max_bytes: int = 8 * 2**20
    ) -> list[SpoolRecord]:
        """The records after ``after_seq``, in order (at least one if there is one)."""
        with self._lock:
            if not self._records:
                return []
            start = max(0, after_seq + 1 - self._records[0][0].seq)
            out: list[SpoolRecord] = []
            budget = max_bytes
            for i in range(start, len(self._records)):
                record, size = self._records[i]
                if len(out) >= max_records or (out and size > budget):
                    break
                budget -= size
                out.append(record)
            return out

    def acknowledge(self, seq: int) -> None:
        """Forget every record up to ``seq``."""
        with self._lock:
            while self._records and self._records[0][0].seq <= seq:
                record, size = self._records.popleft()
                self._bytes -= size
                self._pending -= record.count
            self._acked = max(self._acked, min(seq, self._last))

    @property
    def acked_seq(self) -> int:
        """The acknowledged sequence number."""
        return self._acked

    @property
    def last_seq(self) -> int:
        """The last sequence number appended."""
        return self._last

    @property
    def pending_samples(self) -> int:
        """Samples held."""
        return self._pending

    @property
    def count(self) -> int:
        """Samples held (the window)."""
        return self._pending


# -- the flusher ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FlusherSettings:
    """How the flusher batches, checkpoints and retries.

    Attributes:
        max_batch: the most samples per batch.
        max_age_s: the longest the first sample of a batch waits for the batch to fill.
        checkpoint_seconds: the longest a stream stays open.
        checkpoint_records: the most samples per stream.
        idle_checkpoint_s: close the stream when nothing arrived for this long (delivers promptly
            when traffic pauses).
        checkpoint_timeout_s: the longest to wait for the server's answer at a checkpoint; then
            the stream is abandoned and the window re-sent.
        retry_initial_s: the cap of the first back-off after a failure.
        retry_max_s: the cap of the back-off for transient failures.
        auth_retry_s: the back-off after an authentication failure (slow: a person must act).
        drain_timeout_s: at shutdown, how long to keep delivering before giving up (what is left
            stays in a durable spool for the next start; from memory it is abandoned).
        read_chunk_bytes: the most bytes read back from the backlog at a time.
    """

    max_batch: int = 2000
    max_age_s: float = 0.05
    checkpoint_seconds: float = 1.0
    checkpoint_records: int = 50_000
    idle_checkpoint_s: float = 0.2
    checkpoint_timeout_s: float = 30.0
    retry_initial_s: float = 0.2
    retry_max_s: float = 10.0
    auth_retry_s: float = 30.0
    drain_timeout_s: float = 30.0
    read_chunk_bytes: int = 4 * 2**20

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.checkpoint_records < 1 or self.read_chunk_bytes < 1:
            raise ConfigError("max_batch, checkpoint_records and read_chunk_bytes must be >= 1")
        if min(self.max_age_s, self.checkpoint_seconds, self.retry_initial_s) <= 0:
            raise ConfigError("max_age_s, checkpoint_seconds and retry_initial_s must be > 0")
        if self.auth_retry_s <= 0 or self.checkpoint_timeout_s <= 0:
            raise ConfigError("auth_retry_s and checkpoint_timeout_s must be > 0")
        if self.retry_max_s < self.retry_initial_s:
            raise ConfigError("retry_max_s must be >= retry_initial_s")

    @property
    def retry_policy(self) -> RetryPolicy:
        """The back-off delays."""
        return RetryPolicy(self.retry_initial_s, self.retry_max_s, self.auth_retry_s)


_flow_of = operator.attrgetter("flow")


class _Latency:
    """Latencies (ns): a bounded reservoir for p50/p99, and a histogram that is never reset."""

    __slots__ = ("_bounds_ns", "_rng", "_seen", "_values", "buckets", "limit", "sum_ns")

    def __init__(self, limit: int = 20_000) -> None:
        self.limit = limit
        self._values: list[int] = []
        self._seen = 0
        self._rng = random.Random(1)
        self._bounds_ns = [round(b * 1e9) for b in LATENCY_BUCKETS_S]
        self.buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.sum_ns = 0

    def add(self, value_ns: int) -> None:
        self.buckets[bisect.bisect_left(self._bounds_ns, value_ns)] += 1
        self.sum_ns += value_ns
        self._seen += 1
        if len(self._values) < self.limit:
            self._values.append(value_ns)
        else:
            slot = self._rng.randrange(self._seen)
            if slot < self.limit:
                self._values[slot] = value_ns

    def percentiles(self) -> tuple[float | None, float | None]:
        values = sorted(self._values)
        if not values:
            return None, None
        p50 = values[len(values) // 2]
        p99 = values[min(len(values) - 1, (len(values) * 99) // 100)]
        return p50 / 1e6, p99 / 1e6

    def reset(self) -> None:
        """Forget the reservoir (the histogram counts on: it is a monotonic metric)."""
        self._values = []
        self._seen = 0


class _Window:
    """What the current stream carries: a range of backlog sequence numbers and its tallies."""

    __slots__ = ("opened", "samples", "sent_seq", "spans")

    def __init__(self, acked: int) -> None:
        self.opened = time.monotonic()
        self.sent_seq = acked
        self.samples = 0
        self.spans: list[tuple[int, int]] = []

    def add(self, records: Sequence[SpoolRecord], samples: int) -> None:
        self.samples += samples
        self.sent_seq = records[-1].seq
        if len(self.spans) < _MAX_SPANS:
            self.spans.extend((r.oldest_ns, r.newest_ns) for r in records)


class Flusher:
    """Drains a ring buffer into a sink through a backlog and committed windows.

    Args:
        ring: the ring buffer the readers fill.
        sink: where samples are delivered.
        settings: batching, checkpoints and retries.
        run: the run the samples taken from the ring belong to (kept with them in the backlog).
        window: the backlog (default: :class:`MemoryWindow`; the agent passes its
            :class:`~daq_agent.pipeline.spool.Spool`). What it holds at start is counted as
            ``recovered`` and sent first.
        legacy: decodes payloads spooled by an earlier version (wire requests) into samples.
        clock_ns: the clock latencies are measured against (ns since the epoch).
        dead_letter: where samples the server can never accept go (None: counted and logged
            only).
        rng: the random source of the back-off jitter.
        latest: remembers the last sample of each flow taken (one update per batch, on the
            writer thread), for the monitor.

    Raises:
        ConfigError: ``settings`` are invalid.
    """

    def __init__(
        self,
        ring: RingBuffer[Sample],
        sink: Sink,
        *,
        settings: FlusherSettings | None = None,
        run: RunRef | None = None,
        window: WindowStore | None = None,
        legacy: LegacyDecoder | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
        dead_letter: DeadLetter | None = None,
        rng: random.Random | None = None,
        latest: LatestValues | None = None,
    ) -> None:
        self.ring = ring
        self._latest = latest
        self.settings = settings or FlusherSettings()
        self.sink = sink
        self._run = run
        self._legacy = legacy
        self._backlog: WindowStore = window if window is not None else MemoryWindow()
        self._memory = isinstance(self._backlog, MemoryWindow)
        self._dead_letter = dead_letter
        self._clock_ns = clock_ns
        self._backoff = Backoff(self.settings.retry_policy, rng)
        self._acked = self._backlog.acked_seq
        self.recovered = self._backlog.pending_samples  # sent first, counted apart
        self._stream: SinkStream | None = None
        self._window: _Window | None = None
        self._writer: threading.Thread | None = None
        self._sender: threading.Thread | None = None
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._writer_done = threading.Event()
        self._wake = threading.Event()  # wakes the writer (stop, abort)
        self._send_wake = threading.Event()  # wakes the sender (data, stop, checkpoint request)
        self._checkpoint_requested = threading.Event()
        self._healthy = threading.Event()  # the sender is not backing off (memory backpressure)
        self._healthy.set()
        self._lock = threading.Lock()  # guards the counters' consistency for stats()
        self._latency = _Latency()
        self._per_flow: Counter[str] = Counter()  # samples taken from the ring, per flow
        self._stop_at: float | None = None
        self._retry_at = 0.0
        self._streak = ""  # the reason of the current streak of failures ("" while delivering)
        self._streak_since = 0.0
        self._last_append = time.monotonic()
        self.taken = 0
        self.spooled = 0
        self.delivered = 0
        self.rejected = 0
        self.abandoned = 0
        self.dropped = 0
        self.corrupt = 0
        self.dead_lettered = 0
        self.batches = 0
        self.checkpoints = 0
        self.failures = 0
        self.retries = 0
        self.auth_failures = 0
        self.checkpoint_timeouts = 0
        self.last_error = ""
        self.error: BaseException | None = None

    # -- public ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the ``daq-flusher`` and ``daq-sender`` threads (idempotent)."""
        if self._writer is not None:
            return
        self._writer = threading.Thread(target=self._run_writer, name="daq-flusher", daemon=True)
        self._sender = threading.Thread(target=self._run_sender, name="daq-sender", daemon=True)
        self._writer.start()
        self._sender.start()

    def stop(self, *, drain: bool = True, timeout: float | None = None) -> bool:
        """Stop the threads; with ``drain``, first deliver everything in the ring and backlog.

        The caller closes the ring first (so nothing new arrives); the writer then moves what is
        left into the backlog and the sender delivers it, until ``settings.drain_timeout_s``.
        Without ``drain`` the sender ends at once. What is not delivered stays in a durable spool
        (``pending``: replayed at the next start) or, in memory, is counted as abandoned.

        Args:
            drain: deliver what is left before ending (with a durable spool, only while the
                server answers: at the first failure the rest stays spooled).
            timeout: how long to wait for the threads (None: drain_timeout_s plus a margin).

        Returns:
            True if the threads have ended.
        """
        if not drain:
            self._abort.set()
        if self._stop_at is None:
            self._stop_at = time.monotonic()
        self._stop.set()
        self.ring.close()
        self._wake.set()
        self._send_wake.set()
        self._healthy.set()
        if self._writer is None or self._sender is None:
            self._abandon_memory()
            return True
        wait = self.settings.drain_timeout_s + 5.0 if timeout is None else timeout
        deadline = time.monotonic() + wait
        self._writer.join(max(0.0, deadline - time.monotonic()))
        self._sender.join(max(0.0, deadline - time.monotonic()))
        if self._sender.is_alive() or self._writer.is_alive():
            log.warning("flusher did not stop in time; abandoning the drain")
            self.abort()
            stream = self._stream
            if stream is not None:
                try:
                    stream.cancel()  # unblocks a send waiting for the server
                except Exception as exc:
                    log.debug("cancelling the stream: %s", exc)
            self._writer.join(5.0)
            self._sender.join(5.0)
        alive = self._writer.is_alive() or self._sender.is_alive()
        if not alive:
            self._abandon_memory()
        return not alive

    def abort(self) -> None:
        """Give up delivering: the sender ends (what is left stays spooled, or is abandoned).

        Only sets events: safe from any thread (never from inside a signal handler, see
        :mod:`daq_agent.core.signals`); :meth:`stop` still joins.
        """
        self._abort.set()
        self._wake.set()
        self._send_wake.set()
        self._healthy.set()

    def request_checkpoint(self) -> None:
        """Ask the sender to close the current stream soon (e.g. before reading the store)."""
        self._checkpoint_requested.set()
        self._send_wake.set()

    def is_alive(self) -> bool:
        """True while a thread runs."""
        return any(t is not None and t.is_alive() for t in (self._writer, self._sender))

    @property
    def pending(self) -> int:
        """Samples in the backlog, not yet acknowledged."""
        return self._backlog.pending_samples

    @property
    def backlog(self) -> WindowStore:
        """The backlog (the spool, or memory)."""
        return self._backlog

    def stats(self) -> FlusherStats:
        """A snapshot of the counters."""
        with self._lock:
            p50, p99 = self._latency.percentiles()
            return FlusherStats(
                taken=self.taken,
                recovered=self.recovered,
                delivered=self.delivered,
                pending=self.pending,
                rejected=self.rejected,
                abandoned=self.abandoned,
                batches=self.batches,
                checkpoints=self.checkpoints,
                failures=self.failures,
                retries=self.retries,
                last_error=self.last_error,
                latency_p50_ms=p50,
                latency_p99_ms=p99,
                latency_buckets=tuple(self._latency.buckets),
                latency_sum_s=self._latency.sum_ns / 1e9,
                per_flow=dict(self._per_flow),
                spooled=self.spooled,
                dropped=self.dropped,
                corrupt=self.corrupt,
                dead_lettered=self.dead_lettered,
                auth_failures=self.auth_failures,
                checkpoint_timeouts=self.checkpoint_timeouts,
                durable=not self._memory,
            )

    def reset_latency(self) -> None:
        """Forget the latencies measured so far (e.g. after a warm-up)."""
        with self._lock:
            self._latency.reset()

    # -- the writer thread -------------------------------------------------------------------

    def _run_writer(self) -> None:
        try:
            self._write_loop()
        except BaseException as exc:  # never vanish: record, log, stop everything
            self._fatal(exc)
        finally:
            self._writer_done.set()
            self._send_wake.set()

    def _write_loop(self) -> None:
        settings = self.settings
        ring = self.ring
        while True:
            if self.error is not None:
                return
            if self._memory and not self._stop.is_set():
                # without a durable backlog, a failing server holds the writer (and so the ring
                # applies its overflow policy), as if there were no backlog at all
                self._healthy.wait(0.1)
                if not self._healthy.is_set():
                    continue
            batch = ring.get_batch(settings.max_batch, timeout=0.1)
            if batch:
                batch = self._fill(batch)
                self._append(batch)
            elif ring.closed:
                return

    def _fill(self, batch: list[Sample]) -> list[Sample]:
        """Top a small batch up until it is full or its first sample is max_age old."""
        settings = self.settings
        if len(batch) >= settings.max_batch or self.ring.closed:
            return batch
        deadline = time.monotonic() + settings.max_age_s
        while len(batch) < settings.max_batch and not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wake.wait(min(remaining, 0.005))
            more = self.ring.get_batch(settings.max_batch - len(batch), timeout=0)
            batch.extend(more)
        return batch

    def _append(self, batch: list[Sample]) -> None:
        self._last_append = time.monotonic()
        if self._latest is not None:
            self._latest.observe(batch)
        payload = pack_batch(batch, self._run)
        backlog = self._backlog
        count = len(batch)
        with self._lock:  # one step, so a snapshot always balances
            self.taken += count
            self._per_flow.update(map(_flow_of, batch))
            oldest = min(batch[0].timestamp_ns, batch[-1].timestamp_ns)
            newest = max(batch[0].timestamp_ns, batch[-1].timestamp_ns)
            before = backlog.pending_samples
            last = backlog.last_seq
            error: BaseException | None = None
            try:
                backlog.append((payload,), count, oldest, newest)
            except BaseException as exc:
                error = exc
            # written (even if its fsync failed: the spool then holds it, unsynced) or not
            written = count if backlog.last_seq > last else 0
            self.abandoned += count - written
            # a quota makes room by dropping the oldest batches (counted by the spool)
            self.dropped += before + written - backlog.pending_samples
            self.spooled += written
            self.batches += 1 if written else 0
        self._send_wake.set()
        if error is not None:
            raise error

    # -- the sender thread -------------------------------------------------------------------

    def _run_sender(self) -> None:
        try:
            self._send_loop()
        except BaseException as exc:  # never vanish: record, log, stop everything
            self._fatal(exc)
        finally:
            self._drop_stream()
            left = self._backlog.pending_samples
            if left and not self._memory:
                log.warning("%d samples left in the spool: they are sent at the next start", left)

    def _finished(self) -> bool:
        """True when the sender must end now (abort, fatal error, drain time spent, or a failure
        while stopping with a durable backlog: what is left is safe for the next start)."""
        if self._abort.is_set() or self.error is not None:
            return True
        if self._stop.is_set() and not self._memory and self._backoff.attempts:
            return True
        stop_at = self._stop_at
        return stop_at is not None and time.monotonic() >= stop_at + self.settings.drain_timeout_s

    def _send_loop(self) -> None:
        s = self.settings
        backlog = self._backlog
        wake = self._send_wake
        while True:
            wake.clear()
            if self._finished():
                return
            window = self._window
            now = time.monotonic()
            if window is None:
                if backlog.pending_samples == 0:
                    self._checkpoint_requested.clear()
                    if self._writer_done.is_set():
                        return  # everything taken was delivered (or dropped/rejected)
                    wake.wait(0.1)
                    continue
                if now < self._retry_at:
                    wake.wait(min(self._retry_at - now, 0.1))
                    continue
                try:
                    self._open()
                except DaqError as exc:
                    self._failed(exc)
                continue
            full = (
                window.samples >= s.checkpoint_records
                or now - window.opened >= s.checkpoint_seconds
            )
            requested = self._checkpoint_requested.is_set() and window.sent_seq > self._acked
            if not full and not requested:
                last = backlog.last_seq
                with self._lock:
                    before = backlog.pending_samples
                    records = backlog.read(
                        window.sent_seq, max_records=4096, max_bytes=s.read_chunk_bytes
                    )
                    # a record found corrupt on disk leaves the spool's pending counters
                    found_corrupt = before - backlog.pending_samples
                    self.corrupt += found_corrupt
                if not records and found_corrupt:
                    continue  # a chunk of corrupt records only: read on from the same place
                if records:
                    room = s.checkpoint_records - window.samples
                    cut = 0
                    while cut < len(records) and room > 0:
                        room -= records[cut].count
                        cut += 1
                    try:
                        self._send(records[:cut])
                    except DaqError as exc:
                        self._failed(exc, through=records[cut - 1].seq)
                    continue
                # nothing valid after sent_seq up to `last`: skipped records join the window
                window.sent_seq = max(window.sent_seq, last)
            if window.sent_seq <= self._acked:
                self._checkpoint_requested.clear()
                if self._writer_done.is_set() and backlog.pending_samples == 0:
                    return
                wake.wait(0.05)
                continue
            idle = now - self._last_append >= s.idle_checkpoint_s
            if full or idle or self._checkpoint_requested.is_set() or self._writer_done.is_set():
                self._checkpoint()
                continue
            until = min(
                window.opened + s.checkpoint_seconds - now,
                self._last_append + s.idle_checkpoint_s - now,
                0.1,
            )
            wake.wait(max(0.001, until))

    def _open(self) -> None:
        self._stream = self.sink.open()
        self._window = _Window(self._acked)

    def _groups(self, records: Sequence[SpoolRecord]) -> list[tuple[RunRef | None, list[Row]]]:
        """The samples of records, grouped by run, in order.

        A record whose payload cannot be unpacked (checksummed, so not disk rot: a foreign or
        future file) is left out and logged; the window still covers its sequence number, so its
        samples are acknowledged with the window and counted corrupt, never retried forever.
        """
        groups: list[tuple[RunRef | None, list[Row]]] = []
        for record in records:
            try:
                unpacked_record = unpack_payloads(record.payloads, self._legacy)
            except SpoolError as exc:
                log.error(
                    "spool record %d (%d samples) left out: %s", record.seq, record.count, exc
                )
                continue
            for unpacked in unpacked_record:
                if groups and groups[-1][0] == unpacked.run:
                    groups[-1][1].extend(unpacked.rows)
                else:
                    groups.append((unpacked.run, unpacked.rows))
        return groups

    def _send(self, records: Sequence[SpoolRecord]) -> None:
        stream, window = self._stream, self._window
        assert stream is not None
        assert window is not None
        groups = self._groups(records)
        for run, rows in groups:
            stream.send(rows, run)
        window.add(records, sum(len(rows) for _, rows in groups))

    def _checkpoint(self) -> None:
        stream, window = self._stream, self._window
        assert stream is not None
        assert window is not None
        self._checkpoint_requested.clear()
        try:
            stream.commit(self.settings.checkpoint_timeout_s)
        except DaqError as exc:
            self._failed(exc)
            return
        self._stream = None
        self._window = None
        self._ack(window.sent_seq, window.samples, 0, window.spans)
        self._succeeded()

    def _succeeded(self) -> None:
        if self._streak:
            log.warning(
                "delivering again after %d failed attempts over %.0f s",
                self._backoff.attempts,
                time.monotonic() - self._streak_since,
            )
            self._streak = ""
        self._backoff.reset()
        self._healthy.set()

    def _ack(self, seq: int, sent: int, dead: int, spans: Sequence[tuple[int, int]]) -> None:
        """The server committed everything up to ``seq``: acknowledge the backlog, count."""
        backlog = self._backlog
        now = self._clock_ns()
        with self._lock:
            before = backlog.pending_samples
            backlog.acknowledge(seq)  # SpoolError: fatal (the caller's thread ends)
            tally = before - backlog.pending_samples
            dead_n = min(dead, tally)
            delivered = min(tally - dead_n, sent)
            self.delivered += delivered
            self.dead_lettered += dead_n
            # records the window covered but did not send (unreadable or unpackable when read
            # back): the spool's tally tells
            self.corrupt += tally - dead_n - delivered
            self.checkpoints += 1
            self._acked = seq
            for oldest, newest in spans:
                # recorded logs carry old timestamps: only live data has a latency
                if 0 <= now - oldest <= _LIVE_AGE_NS:
                    self._latency.add(now - oldest)
                if 0 <= now - newest <= _LIVE_AGE_NS:
                    self._latency.add(now - newest)

    def _failed(self, exc: DaqError, through: int = 0) -> None:
        """After a window failed: cancel it; isolate a refused sample, or back off.

        ``through``: the last sequence number the failed call carried (a send that failed
        carried records beyond the window's).
        """
        window = self._window
        end_seq = max(window.sent_seq if window is not None else self._acked, through)
        self._drop_stream()
        kind = exc.kind if isinstance(exc, SinkError) else FailureKind.TRANSIENT
        # no answer in time: a hung server or a dead path, whether the window was being built
        # (a new stream per window: a hang between windows is met there), sent or committed
        timed_out = isinstance(exc, SinkError) and exc.timed_out
        with self._lock:
            self.failures += 1
            self.retries += 1
            self.last_error = str(exc)
            if kind is FailureKind.AUTH:
                self.auth_failures += 1
            if timed_out:
                self.checkpoint_timeouts += 1
        if kind is FailureKind.REJECTED and end_seq > self._acked:
            log.warning("the ingestion API refused a request (%s): isolating it", exc)
            self._isolate(end_seq)
            return
        delay = self._backoff.failure(kind)
        if self._memory:
            self._healthy.clear()
        self._retry_at = time.monotonic() + delay
        reason = kind.value  # the state: transient, auth (a refusal starts its own streak)
        if reason != self._streak:  # once per change of state, never once per attempt
            if not self._streak:
                self._streak_since = time.monotonic()
            self._streak = reason
            pending = self._backlog.pending_samples
            if kind is FailureKind.AUTH:
                log.error(
                    "the ingestion API refused the API key (%s); retrying about every %.3g s, "
                    "%d samples kept until it is accepted: fix the key",
                    exc,
                    self.settings.auth_retry_s,
                    pending,
                )
            else:
                log.warning(
                    "cannot deliver (attempt %d): %s; %d samples kept, retrying with back-off "
                    "(up to %.0f s)",
                    self._backoff.attempts,
                    exc,
                    pending,
                    self.settings.retry_max_s,
                )
        else:
            log.debug(
                "attempt %d failed again: %s; next in %.2f s", self._backoff.attempts, exc, delay
            )

    def _isolate(self, end_seq: int) -> None:
        """Deliver the batches up to ``end_seq`` one at a time, bisecting refused samples."""
        backlog = self._backlog
        after = self._acked
        try:
            while after < end_seq and not self._finished():
                with self._lock:
                    before = backlog.pending_samples
                    records = backlog.read(after, max_records=1)
                    self.corrupt += before - backlog.pending_samples
                if not records or records[0].seq > end_seq:
                    break
                record = records[0]
                good = dead = 0
                for run, rows in self._groups(records):
                    ok, bad = self._bisect(rows, run)
                    good += ok
                    dead += bad
                self._ack(record.seq, good, dead, ())
                after = record.seq
        except DaqError as exc:
            if isinstance(exc, SpoolError):
                raise
            self._failed(exc)  # transient or auth: never REJECTED (handled in _bisect)
            return
        self._succeeded()

    def _bisect(self, rows: list[Row], run: RunRef | None) -> tuple[int, int]:
        """Send ``rows`` on their own window; split refused ones until each is isolated.

        Returns:
            (samples committed, samples dead-lettered).

        Raises:
            DaqError: a failure other than a refusal (the caller backs off).
        """
        if self._abort.is_set():
            raise DaqError("aborted")
        try:
            self._stream = stream = self.sink.open()
        except SinkError as exc:
            if exc.kind is not FailureKind.REJECTED:
                raise
            # the API refused the set-up (the config), not these samples: back off and retry
            raise SinkError(str(exc), FailureKind.TRANSIENT, timed_out=exc.timed_out) from exc
        try:
            stream.send(rows, run)
            stream.commit(self.settings.checkpoint_timeout_s)
        except DaqError as exc:
            self._drop_stream()
            if not (isinstance(exc, SinkError) and exc.kind is FailureKind.REJECTED):
                raise
            if len(rows) == 1:
                self._bury(rows, run, exc)
                return 0, 1
            mid = len(rows) // 2
            left = self._bisect(rows[:mid], run)
            right = self._bisect(rows[mid:], run)
            return left[0] + right[0], left[1] + right[1]
        self._stream = None
        return len(rows), 0

    def _bury(self, rows: list[Row], run: RunRef | None, exc: DaqError) -> None:
        reason = str(exc)
        if self._dead_letter is not None:
            # SpoolError: fatal, never dropped
            self._dead_letter.append(pack_rows(rows, run), reason)
        else:
            log.error(
                "dropped a sample of flow %r the ingestion API refused: %s", rows[0][0], reason
            )

    def _drop_stream(self) -> None:
        stream, self._stream = self._stream, None
        self._window = None
        if stream is not None:
            try:
                stream.cancel()
            except Exception as exc:
                log.debug("cancelling the stream: %s", exc)

    def _fatal(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
            if isinstance(exc, SpoolError):
                log.error("the spool failed, stopping: %s", exc)
            else:
                log.error("flusher failed: %s", exc, exc_info=exc)
        self._abort.set()
        self.ring.close()
        self._wake.set()
        self._send_wake.set()
        self._healthy.set()

    def _abandon_memory(self) -> None:
        """Without a durable backlog, what is left when the threads end is abandoned."""
        if not self._memory:
            return
        backlog = self._backlog
        with self._lock:
            left = backlog.pending_samples
            backlog.acknowledge(backlog.last_seq)
            self.abandoned += left
        if left:
            log.error("abandoned %d samples the ingestion API never acknowledged", left)
