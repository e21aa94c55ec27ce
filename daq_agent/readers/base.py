"""The reader layer: one thread per source, its counters, and its open/read/reopen loop.

A reader owns one named thread (``daq-reader[<name>]``). The thread opens the source, reads it,
decodes what it reads into :class:`~daq_agent.core.sample.Sample` objects handed to a ``sink``
(in practice the :class:`~daq_agent.pipeline.ring_buffer.RingBuffer`), and when the source fails it
reports the failure (log, ``on_error`` callback, counter), backs off
(:class:`~daq_agent.core.backoff.Backoff`: capped exponential, full jitter) and reopens it. The
agent never stops because a bus went away.

A source is :attr:`~ReaderABC.live` or not. A live source (a bus, a serial port) cannot wait: what
is not read in time is lost, so its samples go in under the ring's overflow policy. A source that
can wait (a recorded log) is never dropped: it blocks on a full ring (``put_many(block=True)``)
until the consumer makes room, waking every ``poll_interval`` to notice a stop. If it is stopped
(or the ring is closed) while it waits, the samples it could not hand over are counted in
``unsent`` and the reader stops (``stopped``, not ``ended``).

A subclass implements three private hooks, like a python-can backend implements
``_recv_internal``::

    _open()          open the source; raise on failure (ConfigError = do not retry)
    _read(timeout)   read and emit whatever is available within ``timeout`` seconds;
                     return False once a finite source (a recorded log) is exhausted
    _close()         release the source; called after every successful _open

Per-frame faults (unknown id, wrong length, undecodable) are counted by the subclass, never raised.
"""

from __future__ import annotations

import abc
import enum
import errno
import importlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Final, Protocol, Self

from daq_agent.core.backoff import Backoff, RetryPolicy
from daq_agent.core.errors import ConfigError, ReaderError
from daq_agent.core.sample import Sample

__all__ = [
    "BACKENDS",
    "READER_RETRY",
    "ErrorCallback",
    "KeyedCounter",
    "ReaderABC",
    "ReaderCounters",
    "ReaderState",
    "SampleQueue",
    "Sink",
    "describe",
    "get_reader_class",
]

log = logging.getLogger(__name__)


class SampleQueue(Protocol):
    """A sink taking samples in batches (a :class:`~daq_agent.pipeline.ring_buffer.RingBuffer`)."""

    def put_many(
        self, items: Iterable[Sample], *, block: bool = False, timeout: float | None = None
    ) -> int:
        """Enqueue ``items`` in order; returns how many were enqueued.

        Without ``block`` the queue's overflow policy applies when it is full. With ``block`` the
        items go in as room is made, until all are in, the queue is closed or ``timeout`` seconds
        have passed; those not enqueued were not offered (the caller still holds them).
        """
        ...

    @property
    def closed(self) -> bool:
        """True once the queue takes no more items."""
        ...


Sink = Callable[[Sample], object] | SampleQueue
"""Where a reader hands its decoded samples: a callable taking one sample (its result is ignored),
or a queue with ``put_many`` that receives each read's samples in one call (one lock, not one per
frame). Only a queue lets a source that is not live wait for room."""

READER_RETRY: Final = RetryPolicy(initial_s=0.1, max_s=5.0)
"""The readers' default delays between reopen attempts (full jitter under a cap that doubles
from 0.1 s up to 5 s)."""

ErrorCallback = Callable[["ReaderABC", BaseException], None]
"""Called from the reader thread with the reader and the error whenever the source fails."""

OTHER_KEY: Final = "other"

BACKENDS: dict[str, str] = {
    "can": "daq_agent.readers.can:CanReader",
    "modbus": "daq_agent.readers.modbus:ModbusReader",
    "replay": "daq_agent.readers.replay:ReplayReader",
    "scpi": "daq_agent.readers.scpi:ScpiReader",
    "serial": "daq_agent.readers.serial:SerialReader",
}
"""Reader kinds, each ``"module:Class"``, imported lazily by :func:`get_reader_class`."""

_INSTALL_HINTS: Final = {
    "can": "python-can",
    "modbus": "pymodbus",
    "scpi": "pyserial",
    "replay": "python-can (and asammdf for MF4 logs)",
    "serial": "pyserial",
}

_ENTRY_POINT_GROUP: Final = "daq_agent.readers"
_entry_points_loaded = False


def _load_entry_points() -> None:
    """Add reader kinds that other distributions register under ``daq_agent.readers``."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for entry in entry_points(group=_ENTRY_POINT_GROUP):
        BACKENDS.setdefault(entry.name, entry.value)


def get_reader_class(kind: str) -> type[ReaderABC]:
    """The reader class registered for ``kind``, imported on first use.

    Args:
        kind: a key of :data:`BACKENDS` (``"can"``, ``"replay"``, ``"serial"``) or a kind
            registered by another distribution under the ``daq_agent.readers`` entry-point group.

    Returns:
        The reader class.

    Raises:
        ConfigError: ``kind`` is not a known reader kind.
        ReaderError: the module implementing it cannot be imported (the message says what to
            install).
    """
    _load_entry_points()
    try:
        target = BACKENDS[kind]
    except KeyError:
        known = ", ".join(sorted(BACKENDS))
        raise ConfigError(f"unknown reader kind {kind!r} (known: {known})") from None
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == module_name:
            raise ReaderError(
                f"reader kind {kind!r} is unavailable: no module {module_name}"
            ) from exc
        hint = _INSTALL_HINTS.get(kind, "the package that provides it")
        raise ReaderError(f"reader kind {kind!r} is unavailable ({exc}); install {hint}") from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, ReaderABC)):
        raise ReaderError(f"reader kind {kind!r}: {target} is not a ReaderABC subclass")
    return cls


class ReaderState(enum.Enum):
    """Where a reader is in its life."""

    NEW = "new"
    """Constructed, thread not started."""
    OPENING = "opening"
    """The thread is opening the source."""
    RUNNING = "running"
    """The source is open and being read."""
    BACKOFF = "backoff"
    """The source failed; waiting before reopening it."""
    ENDED = "ended"
    """A finite source (a recorded log) is exhausted; everything read was emitted."""
    FAILED = "failed"
    """The source cannot work with this configuration (a ConfigError); not retried."""
    STOPPED = "stopped"
    """Stopped by :meth:`ReaderABC.stop`."""


class KeyedCounter:
    """Counts per key (a CAN id, a frame type) with a bounded number of keys.

    Once ``limit`` distinct keys are held, new keys are counted under ``"other"``, so a bus full
    of garbage cannot grow memory without bound. Only the owning thread writes; readers take
    :meth:`snapshot`.
    """

    __slots__ = ("_counts", "_lock", "limit")

    def __init__(self, limit: int = 1024) -> None:
        if limit < 1:
            raise ConfigError(f"keyed counter limit must be >= 1, got {limit}")
        self.limit = limit
        self._counts: dict[object, int] = {}
        self._lock = threading.Lock()

    def add(self, key: object, n: int = 1) -> None:
        """Count ``n`` more for ``key`` (or for ``"other"`` once the map is full)."""
        counts = self._counts
        if key in counts:
            counts[key] += n
            return
        with self._lock:  # only a new key changes the dict's size; snapshot() iterates it
            if len(counts) >= self.limit:
                key = OTHER_KEY
            counts[key] = counts.get(key, 0) + n

    def get(self, key: object) -> int:
        """The count for ``key`` (0 when never seen or folded into ``"other"``)."""
        return self._counts.get(key, 0)

    def total(self) -> int:
        """The sum over every key."""
        return sum(self.snapshot().values())

    def snapshot(self) -> dict[object, int]:
        """A copy of the counts."""
        with self._lock:
            return dict(self._counts)

    def __len__(self) -> int:
        return len(self._counts)


class ReaderCounters:
    """A reader's metrics: named integer counters and bounded per-key maps.

    Only the reader thread writes; any thread may read an attribute-style value with
    :meth:`get` or take a consistent-enough :meth:`snapshot` (ints are replaced atomically).

    Attributes:
        last_error: the text of the most recent source failure, "" if none.
        last_error_time_ns: when it happened (ns since the epoch), 0 if never.
    """

    __slots__ = ("_keyed", "_values", "last_error", "last_error_time_ns")

    def __init__(
        self, names: Iterable[str] = (), keyed: Iterable[str] = (), *, key_limit: int = 1024
    ) -> None:
        self._values: dict[str, int] = dict.fromkeys(names, 0)
        self._keyed: dict[str, KeyedCounter] = {k: KeyedCounter(key_limit) for k in keyed}
        self.last_error = ""
        self.last_error_time_ns = 0

    def add(self, name: str, n: int = 1) -> None:
        """Count ``n`` more under ``name`` (created at 0 if new)."""
        self._values[name] = self._values.get(name, 0) + n

    @property
    def values(self) -> dict[str, int]:
        """The live dict of named counters, for hot paths on the reader thread only
        (``counters.values["received"] += 1``); other threads use :meth:`get` or :meth:`snapshot`.
        """
        return self._values

    def get(self, name: str) -> int:
        """The value of counter ``name`` (0 if never counted)."""
        return self._values.get(name, 0)

    def keyed(self, name: str) -> KeyedCounter:
        """The per-key map ``name``.

        Raises:
            KeyError: no such map was declared.
        """
        return self._keyed[name]

    def add_key(self, name: str, key: object, n: int = 1) -> None:
        """Count ``n`` more for ``key`` in the per-key map ``name``."""
        self._keyed[name].add(key, n)

    def snapshot(self) -> dict[str, Any]:
        """Every counter, every per-key map and the last error, as plain values."""
        out: dict[str, Any] = dict(self._values)
        for name, counter in self._keyed.items():
            out[name] = counter.snapshot()
        out["last_error"] = self.last_error
        return out

    def __repr__(self) -> str:
        return f"ReaderCounters({self._values!r}, last_error={self.last_error!r})"


class ReaderABC(abc.ABC):
    """A source of samples with its own named thread and an open → read → reopen loop.

    Args:
        name: the reader's name (the bus or port alias); the thread is ``daq-reader[<name>]``.
        sink: receives every decoded sample, on the reader thread; must not block for long
            (a queue sink of a reader that is not :attr:`live` is asked to wait for room).
        on_error: called on the reader thread with (reader, error) whenever the source fails.
        retry: the delays between reopen attempts (default :data:`READER_RETRY`).
        rng: the random source of the back-off's jitter (seed it for reproducible delays).
        poll_interval: the longest a single ``_read`` (or a wait for room in the sink) lasts,
            seconds; bounds stop latency.

    Raises:
        ConfigError: an argument is invalid.
    """

    kind: ClassVar[str] = "abstract"
    LIVE: ClassVar[bool] = True
    """Whether this kind of source is live (see :attr:`live`); a recorded log sets False."""
    COUNTERS: ClassVar[tuple[str, ...]] = ("opens", "reopens", "failures", "sink_errors", "unsent")
    """Counters every reader has; subclasses extend this tuple. ``unsent``: samples decoded but
    never handed over, because a source that is not live was stopped (or its sink closed) while it
    waited for room."""
    KEYED_COUNTERS: ClassVar[tuple[str, ...]] = ()
    """Bounded per-key maps a subclass declares."""

    def __init__(
        self,
        name: str,
        sink: Sink,
        *,
        on_error: ErrorCallback | None = None,
        retry: RetryPolicy | None = None,
        rng: random.Random | None = None,
        poll_interval: float = 0.1,
        key_limit: int = 1024,
    ) -> None:
        if not name:
            raise ConfigError("a reader needs a name")
        if poll_interval <= 0:
            raise ConfigError(f"poll_interval must be > 0, got {poll_interval}")
        self.name = name
        self._sink = sink
        self._batch: list[Sample] | None = [] if hasattr(sink, "put_many") else None
        self._on_error = on_error
        self.backoff = Backoff(retry or READER_RETRY, rng)
        """The reader's own back-off between reopen attempts (reset by a successful read)."""
        self.poll_interval = poll_interval
        self.counters = ReaderCounters(self.COUNTERS, self.KEYED_COUNTERS, key_limit=key_limit)
        self._stop = threading.Event()
        self._failing = ""  # the failure being repeated (logged once), "" while working
        self._failing_count = 0
        self._state = ReaderState.NEW
        self._state_cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._shut_down = False

    # -- public -----------------------------------------------------------------------------

    @property
    def state(self) -> ReaderState:
        """The reader's current state."""
        return self._state

    @property
    def live(self) -> bool:
        """True for a source that cannot wait (a bus, a serial port): what is not read in time is
        lost, so its samples go to the sink under the sink's overflow policy and may be dropped.
        False for a source that can wait (a recorded log): it blocks on a full sink and is never
        dropped."""
        return self.LIVE

    @property
    def ended(self) -> bool:
        """True once a finite source is exhausted and everything read was emitted."""
        return self._state is ReaderState.ENDED

    @property
    def thread_name(self) -> str:
        """The name of the reader's thread."""
        return f"daq-reader[{self.name}]"

    def is_alive(self) -> bool:
        """True while the reader thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the reader thread (idempotent while running).

        Raises:
            ReaderError: the reader was already shut down.
        """
        if self._shut_down:
            raise ReaderError(f"reader {self.name!r} was shut down; create a new one")
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> bool:
        """Stop the thread, close the source and join; idempotent.

        Args:
            timeout: how long to wait for the thread, seconds (None: forever).

        Returns:
            True if the thread has ended (or never ran).
        """
        self._shut_down = True
        self._stop.set()
        self._wake()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return thread is None
        thread.join(timeout)
        if thread.is_alive():
            log.warning("reader %s did not stop within %.1f s", self.name, timeout or 0.0)
            return False
        return True

    def shutdown(self) -> None:
        """Stop the reader (alias of :meth:`stop` with the default timeout); idempotent."""
        self.stop()

    def wait_state(self, *states: ReaderState, timeout: float | None = None) -> bool:
        """Wait until the reader is in one of ``states``; True if it is, False on timeout."""
        with self._state_cond:
            return self._state_cond.wait_for(lambda: self._state in states, timeout)

    def wait_ended(self, timeout: float | None = None) -> bool:
        """Wait until a finite source is exhausted; False on timeout or if it stopped otherwise."""
        self.wait_state(ReaderState.ENDED, ReaderState.FAILED, ReaderState.STOPPED, timeout=timeout)
        return self.ended

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:
        if self._thread is not None and not self._shut_down:
            log.warning("reader %s was not properly shut down", getattr(self, "name", "?"))
            self._stop.set()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, state={self._state.value})"

    # -- hooks --------------------------------------------------------------------------------

    @abc.abstractmethod
    def _open(self) -> None:
        """Open the source.

        Raises:
            ConfigError: the source can never work as configured (not retried).
            Exception: any other failure is reported and the open retried after a back-off.
        """

    @abc.abstractmethod
    def _read(self, timeout: float) -> bool:
        """Read and emit whatever is available within ``timeout`` seconds.

        Returns:
            False once a finite source is exhausted (the reader becomes ``ended``), else True.

        Raises:
            ConfigError: the source can never be read further (not retried: the reader fails).
            Exception: the source failed; it is closed, reported and reopened.
        """

    @abc.abstractmethod
    def _close(self) -> None:
        """Release the source; must not raise for a source that is already broken."""

    def _wake(self) -> None:
        """Interrupt a blocking ``_read`` from another thread (optional; default: nothing)."""
        return

    # -- for subclasses -----------------------------------------------------------------------

    def _emit(self, sample: Sample) -> None:
        """Hand one sample to the sink (batched per read); a failure is counted, never raised."""
        batch = self._batch
        if batch is not None:
            batch.append(sample)
            return
        try:
            self._sink(sample)  # type: ignore[operator]  # not a SampleQueue: no batch
        except Exception as exc:  # the sink is someone else's code; the reader must survive
            self._sink_failed(exc, 1)

    def _flush_batch(self) -> bool:
        """Hand the samples of the last read to a batching sink.

        Returns:
            False if some were left unsent (not live, stopped or sink closed while it was full).
        """
        batch = self._batch
        if not batch:
            return True
        self._batch = []
        sink: SampleQueue = self._sink  # type: ignore[assignment]  # _batch implies put_many
        if not self.live:
            return self._put_waiting(sink, batch)
        try:
            sink.put_many(batch)
        except Exception as exc:
            self._sink_failed(exc, len(batch))
        return True

    def _put_waiting(self, sink: SampleQueue, batch: list[Sample]) -> bool:
        """Put ``batch`` into a full sink as room is made, noticing a stop every poll interval."""
        while True:
            try:
                n = sink.put_many(batch, block=True, timeout=self.poll_interval)
            except Exception as exc:
                self._sink_failed(exc, len(batch))
                return True
            if n >= len(batch):
                return True
            batch = batch[n:]
            if self._stop.is_set() or sink.closed:
                self.counters.add("unsent", len(batch))
                log.warning(
                    "reader %s: %d samples not handed over: %s while waiting for room",
                    self.name,
                    len(batch),
                    "the sink closed" if sink.closed else "stopped",
                )
                return False

    def _sink_failed(self, exc: Exception, samples: int) -> None:
        self.counters.add("sink_errors", samples)
        if self.counters.get("sink_errors") == samples:
            log.error(
                "reader %s: sink failed (counted from now on): %s",
                self.name,
                exc,
                exc_info=(type(exc), exc, exc.__traceback__),
            )

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called; long hooks should return promptly."""
        return self._stop.is_set()

    # -- the thread ---------------------------------------------------------------------------

    def _set_state(self, state: ReaderState) -> None:
        with self._state_cond:
            self._state = state
            self._state_cond.notify_all()

    def _report(self, exc: BaseException, during: str) -> None:
        counters = self.counters
        counters.add("failures")
        counters.last_error = f"{during}: {type(exc).__name__}: {exc}"
        counters.last_error_time_ns = time.time_ns()
        # log text, not the exception: a record holding it would keep the traceback's frames alive;
        # the same failure again is logged at DEBUG only (once per change of state)
        text = f"{during} failed: {exc}"
        if text == self._failing:
            self._failing_count += 1
            log.debug("reader %s: %s (%d times)", self.name, text, self._failing_count)
        else:
            self._failing = text
            self._failing_count = 1
            hint = explain_open_error(exc) if during == "open" else ""
            log.warning("reader %s: %s%s", self.name, text, f" ({hint})" if hint else "")
        if self._on_error is not None:
            try:
                self._on_error(self, exc)
            except Exception:
                log.exception("reader %s: on_error callback failed", self.name)

    def _run(self) -> None:
        backoff = self.backoff
        final = ReaderState.STOPPED
        try:
            while not self._stop.is_set():
                self._set_state(ReaderState.OPENING)
                try:
                    self._open()
                except ConfigError as exc:
                    self._report(exc, "open")
                    final = ReaderState.FAILED
                    return
                except Exception as exc:
                    self._report(exc, "open")
                    self._back_off()
                    continue
                if self.counters.get("opens"):
                    self.counters.add("reopens")
                self.counters.add("opens")
                if self._failing:
                    log.warning(
                        "reader %s: open again after %d failures", self.name, self._failing_count
                    )
                    self._failing = ""
                self._set_state(ReaderState.RUNNING)
                done: ReaderState | None = None
                failed = False
                try:
                    while not self._stop.is_set():
                        more = self._read(self.poll_interval)
                        if not self._flush_batch():
                            # a source that waits was stopped, or its sink closed, while the
                            # sink was full: nothing more can go in
                            done = ReaderState.STOPPED
                            break
                        if not more:
                            done = ReaderState.ENDED
                            break
                        if backoff.attempts:
                            backoff.reset()
                except ConfigError as exc:
                    self._report(exc, "read")
                    done = ReaderState.FAILED
                except Exception as exc:
                    self._report(exc, "read")
                    failed = True
                finally:
                    self._flush_batch()  # what a failing read decoded before it failed
                    try:
                        self._close()
                    except Exception as exc:
                        log.warning("reader %s: close failed: %s", self.name, exc)
                if done is not None:
                    final = done
                    return
                if failed:
                    self._back_off()
        finally:
            self._set_state(final)

    def _back_off(self) -> None:
        if self._stop.is_set():
            return
        self._set_state(ReaderState.BACKOFF)
        self._stop.wait(self.backoff.failure())


def explain_open_error(exc: BaseException) -> str:
    """The likely cause of a source that does not open, in words a person can act on ("" when
    there is nothing to add to the error itself)."""
    errno_ = getattr(exc, "errno", None) or getattr(exc.__cause__, "errno", None)
    text = str(exc)
    if errno_ == errno.EAFNOSUPPORT or "Address family not supported" in text:
        return (
            "this kernel has no SocketCAN: load its modules (modprobe can_raw) or pick the "
            "adapter's own python-can interface (pcan, kvaser, gs_usb, slcan…)"
        )
    if errno_ == errno.ENODEV or "No such device" in text:
        return "no such interface: check `ip link` (a CAN interface must be up, e.g. can0)"
    if errno_ in (errno.EACCES, errno.EPERM) or isinstance(exc, PermissionError):
        return "permission denied: a serial port needs the dialout group (usermod -aG dialout)"
    if errno_ == errno.ENOENT or isinstance(exc, FileNotFoundError):
        return "no such device or file: is the adapter plugged in? (ls /dev/serial/by-id)"
    return ""


def describe(reader: ReaderABC) -> Mapping[str, Any]:
    """A reader's name, kind, liveness, state and counters as plain values (status, metrics)."""
    return {
        "name": reader.name,
        "kind": reader.kind,
        "live": reader.live,
        "state": reader.state.value,
        "counters": reader.counters.snapshot(),
    }
