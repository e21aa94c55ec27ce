"""The flusher: one thread (``daq-flusher``) from the ring buffer to the ingestion API.

It drains the ring by size and age, encodes each batch into serialized
``IngestWithConfigDataStreamRequest`` messages (off the reader threads), and sends them over a
long-lived client stream. A stream is a *window*: it is closed after ``checkpoint_seconds`` or
``checkpoint_records`` (or when the source goes quiet, or at shutdown) and the server's OK answer
is the checkpoint: every sample of the window is committed, and only then counted as delivered.
Then a new stream is opened.

When a stream fails (the server is away, answers an error, or a send fails) the window is kept,
a capped exponential back-off runs, and the whole window is re-sent on a new stream. The window
lives in a :class:`WindowStore`; this module's :class:`MemoryWindow` keeps it in memory. The
durable spool (issue 5) replaces it with one that appends to disk before sending — that is the
seam: ``append`` before ``send``, ``acknowledge`` after the checkpoint.

With lazy flow creation (a set of flows too large for one CreateIngestionConfig message), each
flow is registered through the IngestionService the first time a sample of it is sent.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from daq_agent.errors import ConfigError, DaqError
from daq_agent.ingestion.config import FlowConfig
from daq_agent.pipeline.ring_buffer import RingBuffer
from daq_agent.pipeline.sample import Sample
from daq_agent.pipeline.status import FlusherStats

__all__ = [
    "DataStream",
    "Flusher",
    "FlusherSettings",
    "MemoryWindow",
    "SampleEncoder",
    "StreamOpener",
    "WindowStore",
]

log = logging.getLogger(__name__)

_LIVE_AGE_NS = 3600 * 1_000_000_000
"""Samples older than this when acknowledged are replayed data, left out of the latency."""


# -- seams --------------------------------------------------------------------------------------


class DataStream(Protocol):
    """One open IngestWithConfigDataStream call carrying serialized requests."""

    def send_serialized(self, payloads: Sequence[bytes]) -> None:
        """Queue serialized requests on the stream.

        Raises:
            TransportError: the stream has failed.
        """

    def close(self, timeout: float | None = None) -> None:
        """End the stream and wait for the server's answer (OK = every request committed).

        Raises:
            TransportError: the server answered an error, or did not answer within ``timeout``.
        """

    def cancel(self) -> None:
        """Abandon the stream without waiting."""


StreamOpener = Callable[[], DataStream]
"""Opens a new stream (``IngestionService.open_stream`` or :class:`GrpcDataStream`)."""


class SampleEncoder(Protocol):
    """Turns samples into serialized ``IngestWithConfigDataStreamRequest`` messages."""

    def encode_many(self, samples: Sequence[Sample]) -> list[bytes]:
        """Encode samples in order.

        Raises:
            Exception: a sample does not fit its flow (the flusher then encodes one at a time).
        """
        ...

    def encode(self, sample: Sample) -> bytes:
        """Encode one sample.

        Raises:
            Exception: the sample does not fit its flow.
        """
        ...


class WindowStore(Protocol):
    """Where the flusher keeps what it sent until the server acknowledges it (the spool seam)."""

    def append(
        self, payloads: Sequence[bytes], count: int, oldest_ns: int, newest_ns: int
    ) -> object:
        """Record one batch before it is sent (a durable store returns once it is written)."""
        ...

    def payloads(self) -> Iterator[Sequence[bytes]]:
        """Every batch of the window, in order (for a re-send)."""
        ...

    def acknowledge(self) -> tuple[int, list[tuple[int, int]]]:
        """The window was committed: forget it (called with the flusher's counter lock held).

        Returns:
            (samples, [(oldest_ns, newest_ns) per batch]).
        """
        ...

    @property
    def count(self) -> int:
        """Samples in the window."""
        ...


class MemoryWindow:
    """A :class:`WindowStore` in memory (no durability: lost if the process dies)."""

    __slots__ = ("_batches", "_count", "_spans")

    def __init__(self) -> None:
        self._batches: list[Sequence[bytes]] = []
        self._spans: list[tuple[int, int]] = []
        self._count = 0

    def append(self, payloads: Sequence[bytes], count: int, oldest_ns: int, newest_ns: int) -> None:
        """Record one batch before it is sent."""
        self._batches.append(payloads)
        self._spans.append((oldest_ns, newest_ns))
        self._count += count

    def payloads(self) -> Iterator[Sequence[bytes]]:
        """Every batch of the window, in order."""
        return iter(list(self._batches))

    def acknowledge(self) -> tuple[int, list[tuple[int, int]]]:
        """Forget the window; returns its sample count and batch time spans."""
        out = (self._count, self._spans)
        self._batches = []
        self._spans = []
        self._count = 0
        return out

    @property
    def count(self) -> int:
        """Samples in the window."""
        return self._count


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
        checkpoint_timeout_s: the longest to wait for the server's answer at a checkpoint.
        retry_initial_s: the first back-off after a failure.
        retry_max_s: the cap of the back-off.
        drain_timeout_s: at shutdown, how long to keep retrying before abandoning what is left.
    """

    max_batch: int = 2000
    max_age_s: float = 0.05
    checkpoint_seconds: float = 1.0
    checkpoint_records: int = 200_000
    idle_checkpoint_s: float = 0.2
    checkpoint_timeout_s: float = 30.0
    retry_initial_s: float = 0.2
    retry_max_s: float = 10.0
    drain_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.checkpoint_records < 1:
            raise ConfigError("max_batch and checkpoint_records must be >= 1")
        if min(self.max_age_s, self.checkpoint_seconds, self.retry_initial_s) <= 0:
            raise ConfigError("max_age_s, checkpoint_seconds and retry_initial_s must be > 0")
        if self.retry_max_s < self.retry_initial_s:
            raise ConfigError("retry_max_s must be >= retry_initial_s")


class _Latency:
    """A bounded reservoir of latencies (ns) for p50/p99."""

    __slots__ = ("_rng", "_seen", "_values", "limit")

    def __init__(self, limit: int = 20_000) -> None:
        self.limit = limit
        self._values: list[int] = []
        self._seen = 0
        self._rng = random.Random(1)

    def add(self, value_ns: int) -> None:
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
        self._values = []
        self._seen = 0


class Flusher:
    """Drains a ring buffer into the ingestion API over checkpointed long-lived streams.

    Args:
        ring: the ring buffer the readers fill.
        open_stream: opens a new stream.
        encoder: encodes samples into serialized requests.
        settings: batching, checkpoints and retries.
        register_flows: with lazy flow creation, registers flows the first time they are seen
            (``IngestionService.register_flows``); None when every flow was registered up front.
        flows_by_name: the flows, to register lazily.
        window: where a window is kept until acknowledged (default: memory). What it holds
            at start (a spool's backlog) is counted as ``recovered`` and sent first.
        clock_ns: the clock latencies are measured against (ns since the epoch).

    Raises:
        ConfigError: ``settings`` are invalid.
    """

    def __init__(
        self,
        ring: RingBuffer[Sample],
        open_stream: StreamOpener,
        encoder: SampleEncoder,
        *,
        settings: FlusherSettings | None = None,
        register_flows: Callable[[Sequence[FlowConfig]], None] | None = None,
        flows_by_name: dict[str, FlowConfig] | None = None,
        window: WindowStore | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.ring = ring
        self.settings = settings or FlusherSettings()
        self._open_stream = open_stream
        self._encoder = encoder
        self._register_flows = register_flows
        self._flows_by_name = flows_by_name or {}
        self._registered: set[str] = set()
        self._window: WindowStore = window or MemoryWindow()
        self.recovered = self._window.count  # a spool's backlog: sent first, counted apart
        self._clock_ns = clock_ns
        self._stream: DataStream | None = None
        self._stream_opened = 0.0
        self._last_data = time.monotonic()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._wake = threading.Event()
        self._checkpoint_requested = threading.Event()
        self._lock = threading.Lock()  # guards the counters' consistency for stats()
        self._latency = _Latency()
        self._rng = random.Random()
        self._failures_in_row = 0
        self._drain_deadline: float | None = None
        self.taken = 0
        self.delivered = 0
        self.rejected = 0
        self.abandoned = 0
        self.batches = 0
        self.checkpoints = 0
        self.failures = 0
        self.retries = 0
        self.lazy_flows = 0
        self.last_error = ""
        self.error: BaseException | None = None

    # -- public ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the ``daq-flusher`` thread (idempotent)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="daq-flusher", daemon=True)
        self._thread.start()

    def stop(self, *, drain: bool = True, timeout: float | None = None) -> bool:
        """Stop the thread; with ``drain``, first deliver everything in the ring and the window.

        The caller closes the ring first (so nothing new arrives); the flusher then empties it,
        checkpoints and ends. Without ``drain`` (or once ``settings.drain_timeout_s`` has passed)
        what is left is counted as abandoned.

        Args:
            drain: deliver what is left before ending.
            timeout: how long to wait for the thread (None: drain_timeout_s plus a margin).

        Returns:
            True if the thread has ended.
        """
        if not drain:
            self._abort.set()
        self._stop.set()
        self.ring.close()
        self._wake.set()
        thread = self._thread
        if thread is None:
            return True
        thread.join(self.settings.drain_timeout_s + 5.0 if timeout is None else timeout)
        if thread.is_alive():
            log.warning("flusher did not stop in time; abandoning what is left")
            self._abort.set()
            self._wake.set()
            thread.join(5.0)
        return not thread.is_alive()

    def abort(self) -> None:
        """Give up draining: what is not yet acknowledged is counted as abandoned.

        Only sets events, so it may be called from a signal handler; :meth:`stop` still joins.
        """
        self._abort.set()
        self._wake.set()

    def request_checkpoint(self) -> None:
        """Ask the thread to close the current stream soon (e.g. before reading the store)."""
        self._checkpoint_requested.set()
        self._wake.set()

    def is_alive(self) -> bool:
        """True while the thread runs."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def pending(self) -> int:
        """Samples sent or being sent, not yet acknowledged (the window)."""
        return self._window.count

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
                lazy_flows=self.lazy_flows,
                last_error=self.last_error,
                latency_p50_ms=p50,
                latency_p99_ms=p99,
            )

    def reset_latency(self) -> None:
        """Forget the latencies measured so far (e.g. after a warm-up)."""
        with self._lock:
            self._latency.reset()

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # never vanish: record, log, count what is left
            self.error = exc
            log.exception("flusher failed: %s", exc)
            self._abandon_all()

    def _loop(self) -> None:
        settings = self.settings
        ring = self.ring
        while True:
            if self._abort.is_set():
                self._abandon_all()
                return
            batch = ring.get_batch(settings.max_batch, timeout=self._poll_timeout())
            if batch:
                batch = self._fill(batch)
                self._send_batch(batch)
            elif ring.closed:
                # everything left was taken: deliver the window and end
                self._checkpoint(final=True)
                return
            if self._checkpoint_due():
                self._checkpoint(final=False)

    def _poll_timeout(self) -> float:
        s = self.settings
        if self._window.count:
            return max(0.001, min(s.idle_checkpoint_s, s.checkpoint_seconds) / 2)
        return 0.1

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

    def _checkpoint_due(self) -> bool:
        window = self._window.count
        if not window:
            self._checkpoint_requested.clear()
            return False
        s = self.settings
        now = time.monotonic()
        return (
            self._checkpoint_requested.is_set()
            or window >= s.checkpoint_records
            or now - self._stream_opened >= s.checkpoint_seconds
            or (self.ring.depth == 0 and now - self._last_data >= s.idle_checkpoint_s)
        )

    def _encode(self, batch: list[Sample]) -> tuple[list[bytes], list[Sample]]:
        """Encode a batch; samples that cannot be encoded are left out (the caller counts them)."""
        try:
            return self._encoder.encode_many(batch), batch
        except Exception:
            payloads: list[bytes] = []
            kept: list[Sample] = []
            for sample in batch:
                try:
                    payloads.append(self._encoder.encode(sample))
                    kept.append(sample)
                except Exception as exc:
                    if self.rejected + len(batch) - len(kept) <= 10:
                        log.warning("sample of flow %r not encodable: %s", sample.flow, exc)
            return payloads, kept

    def _register(self, batch: Sequence[Sample]) -> None:
        register = self._register_flows
        if register is None:
            return
        registered = self._registered
        new: dict[str, FlowConfig] = {}
        for sample in batch:
            name = sample.flow
            if name not in registered and name not in new:
                flow = self._flows_by_name.get(name)
                if flow is not None:
                    new[name] = flow
        if not new:
            return
        register(list(new.values()))  # TransportError: retried by the caller's back-off
        registered.update(new)
        with self._lock:
            self.lazy_flows += len(new)

    def _send_batch(self, batch: list[Sample]) -> None:
        self._last_data = time.monotonic()
        payloads, kept = self._encode(batch)
        with self._lock:  # one step, so a snapshot always balances
            self.taken += len(batch)
            self.rejected += len(batch) - len(kept)
            if not payloads:
                return
            oldest = min(kept[0].timestamp_ns, kept[-1].timestamp_ns)
            newest = max(kept[0].timestamp_ns, kept[-1].timestamp_ns)
            self._window.append(payloads, len(payloads), oldest, newest)
            self.batches += 1
        while True:
            try:
                self._register(kept)
                if self._stream is None:
                    # a new stream carries the whole window (after a failure: the re-send)
                    self._reopen()
                else:
                    self._stream.send_serialized(payloads)
                return
            except DaqError as exc:
                if not self._recover(exc):
                    return

    def _reopen(self) -> DataStream:
        """Open a stream and send it the whole window."""
        stream = self._open_stream()
        self._stream = stream
        self._stream_opened = time.monotonic()
        for chunk in self._window.payloads():
            stream.send_serialized(chunk)
        return stream

    def _checkpoint(self, *, final: bool) -> None:
        self._checkpoint_requested.clear()
        while self._window.count:
            try:
                stream = self._stream if self._stream is not None else self._reopen()
                self._stream = None
                stream.close(timeout=self.settings.checkpoint_timeout_s)
            except DaqError as exc:
                if not self._recover(exc):
                    return
                continue
            now = self._clock_ns()
            self._failures_in_row = 0
            with self._lock:
                count, spans = self._window.acknowledge()
                self.delivered += count
                self.checkpoints += 1
                for oldest, newest in spans:
                    # recorded logs carry old timestamps: only live data has a latency
                    if 0 <= now - oldest <= _LIVE_AGE_NS:
                        self._latency.add(now - oldest)
                    if 0 <= now - newest <= _LIVE_AGE_NS:
                        self._latency.add(now - newest)
            return
        if final and self._stream is not None:
            stream, self._stream = self._stream, None
            try:
                stream.close(timeout=self.settings.checkpoint_timeout_s)
            except DaqError as exc:
                log.debug("closing an empty stream failed: %s", exc)

    def _recover(self, exc: DaqError) -> bool:
        """After a stream failure: cancel it, back off; False once the window was abandoned."""
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.cancel()
            except Exception as cancel_exc:
                log.debug("cancelling a failed stream: %s", cancel_exc)
        self._failures_in_row += 1
        with self._lock:
            self.failures += 1
            self.retries += 1
            self.last_error = str(exc)
        delay = min(
            self.settings.retry_max_s,
            self.settings.retry_initial_s * 2 ** min(self._failures_in_row - 1, 30),
        ) * self._rng.uniform(0.8, 1.2)
        log.warning(
            "ingestion stream failed (%d in a row): %s; re-sending %d samples in %.1f s",
            self._failures_in_row,
            exc,
            self._window.count,
            delay,
        )
        if self._stop.is_set():
            # draining: give up once the drain time is spent
            if self._drain_deadline is None:
                self._drain_deadline = time.monotonic() + self.settings.drain_timeout_s
            delay = min(delay, max(0.0, self._drain_deadline - time.monotonic()))
        self._abort.wait(delay)
        if self._abort.is_set() or (
            self._drain_deadline is not None and time.monotonic() >= self._drain_deadline
        ):
            self._abandon_all()
            return False
        return True

    def _abandon_all(self) -> None:
        """Count the window and whatever is left in the ring as abandoned."""
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.cancel()
            except Exception as exc:
                log.debug("cancelling the stream: %s", exc)
        self.ring.close()
        left = self.ring.get_batch(max(1, self.ring.capacity), timeout=0)
        with self._lock:
            count, _ = self._window.acknowledge()
            self.taken += len(left)
            self.abandoned += count + len(left)
        if count or left:
            log.error(
                "abandoned %d samples the ingestion API never acknowledged", count + len(left)
            )
        self._abort.set()
