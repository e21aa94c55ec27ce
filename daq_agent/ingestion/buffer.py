"""Buffered ingestion: requests are collected and sent in batches, one stream per flush.

:class:`BufferedIngestionService` is what :meth:`IngestionService.buffered_ingestion` returns; use
it in a ``with`` block::

    with service.buffered_ingestion(buffer_size=2_000, flush_interval_sec=1.0) as buffered:
        for sample in samples:
            buffered.ingest_flows(sample)

A flush happens when the buffer is full (on the caller's thread), every ``flush_interval_sec``
seconds (on one long-lived thread, ``daq-buffer-flush``, whose timer restarts after any flush), and
when the block is left. Each flush is one data stream (sift_stream, see
:meth:`IngestionService.ingest`). The buffer lock is never held across a network call: a flush
copies the buffer under the lock, sends outside it, and removes what it delivered; flushes are
serialized so requests keep their order.

The buffer is one list for the life of the service: requests stay in it until a flush has
delivered them. When a flush fails they stay where they are, and the calls that follow keep
adding theirs behind them; the next flush sends them all. A failed flush raises its error to the
call that flushed (a full buffer's ``ingest``, :meth:`~BufferedIngestionService.flush`, leaving
the block), once. A failed *periodic* flush has no caller: its error is raised by the next
``ingest`` (or ``ingest_flows``/``try_ingest_flows``) after that call's requests were buffered,
unless that call's own flush delivers everything. :attr:`~BufferedIngestionService.last_error`
holds the error of the last failed flush until a flush succeeds.

When the ``with`` block raises, ``on_error(error, buffer, flush)`` gets the error, the live
buffer (the same list: what it holds when ``flush()`` is called is what is sent, as in sift_py)
and the flush; without ``on_error`` one last flush is tried. The block's error is then re-raised.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

from daq_agent._proto.sift.ingest.v1.ingest_pb2 import IngestWithConfigDataStreamRequest
from daq_agent.ingestion.channel import Flow, FlowOrderedChannelValues

if TYPE_CHECKING:
    from daq_agent.ingestion.service import IngestionService

__all__ = ["DEFAULT_BUFFER_SIZE", "BufferedIngestionService", "OnErrorCallback"]

DEFAULT_BUFFER_SIZE = 1_000
"""Requests buffered before a flush, when ``buffer_size`` is not given."""

OnErrorCallback = Callable[
    [BaseException, list[IngestWithConfigDataStreamRequest], Callable[[], None]], None
]
"""``on_error(error, buffer, flush)``, called when the ``with`` block raises; ``buffer`` is the
live list of requests not yet delivered (changing it changes what ``flush()`` sends)."""

_THREAD_NAME = "daq-buffer-flush"
_JOIN_TIMEOUT_SEC = 30.0

_log = logging.getLogger(__name__)


class _Timer:
    """The periodic flush's schedule, shared by the service and its thread."""

    __slots__ = ("closing", "cond", "last_flush", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.last_flush = time.monotonic()
        self.closing = False

    def restart(self) -> None:
        """A flush happened: the next periodic one is an interval from now (lock held)."""
        self.last_flush = time.monotonic()
        self.cond.notify_all()

    def stop(self) -> None:
        """Tell the thread to end."""
        with self.lock:
            self.closing = True
            self.cond.notify_all()

    def wait_due(self, interval: float) -> bool:
        """Block until a periodic flush is due (True) or the timer is stopped (False)."""
        with self.lock:
            while not self.closing:
                remaining = self.last_flush + interval - time.monotonic()
                if remaining <= 0:
                    return True
                self.cond.wait(remaining)
            return False


def _run_periodic(
    ref: weakref.ref[BufferedIngestionService], timer: _Timer, interval: float
) -> None:
    failures = 0  # in a row: the first is logged as a warning, the recovery says how many
    while timer.wait_due(interval):
        service = ref()
        if service is None:
            return
        try:
            service._flush(periodic=True)
        except Exception as exc:
            # Kept by _flush for the producer; the requests wait for the next interval.
            failures += 1
            level = logging.WARNING if failures == 1 else logging.DEBUG
            _log.log(level, "periodic flush failed, retrying every %.3g s: %s", interval, exc)
        else:
            if failures:
                _log.info("periodic flush delivered again after %d failed tries", failures)
            failures = 0
        # Dropped outside any lock: the last reference may go here and run __del__.
        del service


class BufferedIngestionService:
    """Buffers requests for an :class:`IngestionService` and ingests them in batches.

    Attributes:
        buffer_size: requests buffered before a flush.
        flush_interval_sec: seconds between periodic flushes, or None for none.
    """

    def __init__(
        self,
        service: IngestionService,
        buffer_size: int | None = None,
        flush_interval_sec: float | None = None,
        on_error: OnErrorCallback | None = None,
    ) -> None:
        """Start buffering for ``service`` (and the periodic flush thread, if an interval is set).

        Raises:
            ValueError: when ``buffer_size`` or ``flush_interval_sec`` is not positive.
        """
        size = DEFAULT_BUFFER_SIZE if buffer_size is None else buffer_size
        if size <= 0:
            raise ValueError(f"buffer_size must be positive, not {buffer_size}")
        if flush_interval_sec is not None and not flush_interval_sec > 0:
            raise ValueError(f"flush_interval_sec must be positive, not {flush_interval_sec}")
        self.buffer_size = size
        self.flush_interval_sec = flush_interval_sec
        self._service = service
        self._on_error = on_error
        # The live buffer: requests stay in it, in order, until a flush delivered them.
        self._buffer: list[IngestWithConfigDataStreamRequest] = []
        # _lock guards _buffer, _error, _unraised and the timer's fields; the timer's condition
        # (on _lock) wakes the flush thread.
        self._timer = _Timer()
        self._lock = self._timer.lock
        # Serializes sends (held across the network call, never by a producer appending).
        self._send_lock = threading.Lock()
        self._error: BaseException | None = None
        # The error of a failed periodic flush, not raised to any caller yet.
        self._unraised: BaseException | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        if flush_interval_sec is not None:
            # The thread holds only a weak reference, so an instance never closed can still be
            # collected (its __del__ then stops the thread).
            self._thread = threading.Thread(
                target=_run_periodic,
                args=(weakref.ref(self), self._timer, flush_interval_sec),
                name=_THREAD_NAME,
                daemon=True,
            )
            self._thread.start()

    # -- producer side --------------------------------------------------------------------------

    def ingest(self, *requests: IngestWithConfigDataStreamRequest) -> None:
        """Buffer ``requests``; flush when the buffer is full.

        The requests are buffered even when the call raises a flush's error: they are sent by a
        later flush, behind those still waiting.

        Raises:
            RpcError: this call's flush failed, or (once, when this call does not flush) the
                last periodic flush did; the requests stay buffered and are retried.
            TransportError: likewise, for a failure that carries no gRPC status.
            RuntimeError: when the service is closed (nothing is buffered then).
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("buffered ingestion is closed")
            self._buffer.extend(requests)
            full = len(self._buffer) >= self.buffer_size
            unraised = None
            if not full:
                unraised, self._unraised = self._unraised, None
        if full:
            self._flush()
        elif unraised is not None:
            raise unraised

    def ingest_flows(self, *flows: FlowOrderedChannelValues) -> None:
        """Build requests unvalidated (as :meth:`IngestionService.ingest_flows`) and buffer them.

        Raises:
            IngestionValidationError: when a timestamp is out of range.
            RpcError: see :meth:`ingest`.
            TransportError: see :meth:`ingest`.
        """
        self.ingest(*self._service._requests_from_ordered(flows))

    def try_ingest_flows(self, *flows: Flow) -> None:
        """Validate and build requests (as :meth:`IngestionService.try_ingest_flows`), buffer them.

        Raises:
            IngestionValidationError: when a flow does not match its config; nothing is buffered.
            RpcError: see :meth:`ingest`.
            TransportError: see :meth:`ingest`.
        """
        self.ingest(*self._service._requests_from_flows(flows))

    def flush(self) -> None:
        """Send everything buffered now, on one stream.

        Raises:
            RpcError: when the send fails; the requests stay buffered.
            TransportError: when the API cannot be reached; the requests stay buffered.
        """
        self._flush()

    @property
    def buffered(self) -> int:
        """How many requests are not delivered yet (buffered, or in a flush under way)."""
        with self._lock:
            return len(self._buffer)

    @property
    def last_error(self) -> BaseException | None:
        """The error of the last failed flush, until a flush delivers everything."""
        with self._lock:
            return self._error

    # -- flushing -------------------------------------------------------------------------------

    def _flush(self, *, periodic: bool = False) -> None:
        with self._send_lock:
            with self._lock:
                batch = list(self._buffer)
                self._timer.restart()
            if not batch:
                return
            try:
                self._service.ingest(*batch)
            except Exception as exc:
                with self._lock:
                    self._error = exc
                    # A caller's flush raises its own error: an older periodic one is superseded.
                    self._unraised = exc if periodic else None
                raise
            with self._lock:
                # Only flushes remove requests, from the front, and never two at once: what this
                # one sent is still the buffer's head, whatever producers appended meanwhile.
                del self._buffer[: len(batch)]
                self._error = None
                self._unraised = None

    # -- lifetime -------------------------------------------------------------------------------

    def _stop_thread(self) -> None:
        self._timer.stop()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(_JOIN_TIMEOUT_SEC)
            if thread.is_alive():
                _log.error("%s did not stop within %s s", thread.name, _JOIN_TIMEOUT_SEC)

    def close(self) -> None:
        """Stop the periodic flushes and flush what is left; calling it again does nothing.

        Raises:
            RpcError: when the final flush fails; the requests stay in :attr:`buffered`.
            TransportError: when the API cannot be reached.
        """
        if self._closed:
            return
        self._stop_thread()
        try:
            self._flush()
        finally:
            with self._lock:
                self._closed = True

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            _log.warning(
                "BufferedIngestionService was not properly closed: %d requests not sent",
                len(self._buffer),
            )
            self._timer.stop()

    def __enter__(self) -> BufferedIngestionService:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool | None:
        if exc_val is None:
            self.close()
            return None
        self._stop_thread()
        try:
            if self._on_error is not None:
                # The live buffer, as sift_py passes it: the callback may inspect or change it.
                self._on_error(exc_val, self._buffer, self.flush)
            else:
                try:
                    self._flush()
                except Exception as flush_error:
                    _log.warning("last flush after an error failed: %s", flush_error)
                    exc_val.add_note(f"the last flush of buffered requests failed: {flush_error}")
        finally:
            with self._lock:
                self._closed = True
        return None
