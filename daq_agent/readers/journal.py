"""Raw-frame journals: every frame a CAN bus (or every chunk a serial port) gives, on disk.

A journal belongs to one reader. The reader thread never touches the disk: after each read it
hands what it read (a list of ``can.Message``, or one ``(timestamp_ns, bytes)`` chunk) to
:meth:`Journal.submit`, which appends it to an in-memory queue bounded by ``queue_items``
frames (chunks) and returns at once. When the queue is full, what does not fit is dropped and
counted (``journal_dropped``), never waited for. The journal's own thread
(``daq-journal[<name>]``) drains the queue into the current file.

CAN files are written by python-can's writers: ``blf`` (:class:`can.BLFWriter`: ns
timestamps, error frames, remote frames, CAN FD flags), ``asc`` (:class:`can.ASCWriter`: µs
relative to the ``Begin Triggerblock`` date, error frames as ``ErrorFrame`` without their id) and
``log`` (:class:`can.CanutilsLogWriter`, ``candump -L``: µs, remote frames without their length,
error frames as a bus error). The frames handed to a CAN journal become its own: their
``channel`` is cleared (one journal is one bus: channel 1 in BLF and ASC, the bus alias in a
candump log). Each reads back with :class:`can.LogReader` or ``daq-agent replay``.

Serial journals (format ``hex``) are text, one line per read chunk, after a ``#`` header line::

    # daq-agent serial journal v1: <unix time, s, 9 decimals> <the bytes read, hex>
    1764593700.123456789 2447504747412c3132333531392e30302c...

Files: ``<dir>/<name>-<UTC start, YYYYmmddTHHMMSS.ffffff>Z.<format>``, one per journal start and
rotation, never renamed (a restart never overwrites an earlier file; a crash leaves the file
with everything flushed so far). python-can's ``SizedRotatingLogger`` does not fit: it writes
the live file under one fixed name, which a restarted agent would truncate, renames it at each
rollover, and has neither rotation by time nor retention. A file is opened at the first frame
(an idle bus makes no empty files), rotated at the first write after it reached ``rotate_bytes``
or is ``rotate_s`` old, and flushed to the OS every ``flush_interval_s`` (not fsynced). After
each new file the oldest files of this journal beyond ``keep_files``, and those last modified
more than ``keep_s`` ago, are deleted (never the current one).

A journal that cannot be written (a directory it cannot create, a full disk, no permission) is
an error logged once per change and counted (``journal_errors``); what it held then is counted
as ``journal_lost``, the file is abandoned, and a new file is tried after a back-off (1 s,
doubling up to 30 s). The reader is never affected.

Counters, in the reader's counters: ``journal_dropped`` (written by the reader thread),
``journal_written``, ``journal_lost``, ``journal_errors``, ``journal_files`` (by the journal
thread). Once the journal is closed: submitted = written + lost, and every frame the reader
received is submitted or dropped.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Final, Generic, TypeVar, cast

from daq_agent.core.errors import ConfigError

__all__ = [
    "CAN_FORMATS",
    "JOURNAL_COUNTERS",
    "SERIAL_FORMAT",
    "CanJournal",
    "Journal",
    "JournalCounters",
    "JournalSettings",
    "SerialJournal",
    "journal_files",
    "read_serial_journal",
]

log = logging.getLogger(__name__)

CAN_FORMATS: Final = ("blf", "asc", "log")
"""The CAN journal formats (file suffixes), each written by python-can's writer for it."""
SERIAL_FORMAT: Final = "hex"
"""The serial journal format (file suffix)."""
SERIAL_HEADER: Final = (
    "# daq-agent serial journal v1: <unix time, s, 9 decimals> <the bytes read, hex>\n"
)
JOURNAL_COUNTERS: Final = (
    "journal_dropped",
    "journal_written",
    "journal_lost",
    "journal_errors",
    "journal_files",
)
BLF_COMPRESSION: Final = 1
"""The zlib level of BLF journals (python-can's default is 6; see :func:`_blf_writer`)."""
_RETRY_INITIAL_S: Final = 1.0
_RETRY_MAX_S: Final = 30.0
_POLL_S: Final = 0.05


@dataclass(frozen=True, slots=True)
class JournalSettings:
    """Where and how a journal writes (the ``journal:`` mapping of a bus or serial device).

    Attributes:
        directory: the directory of the files (created when needed).
        format: ``blf``, ``asc`` or ``log`` for a bus; ``hex`` for a serial device.
        rotate_bytes: a new file once the current one holds this many bytes (None: no limit).
        rotate_s: a new file once the current one is this many seconds old (None: no limit).
        keep_files: the most files of this journal kept, the current one included (None: all).
        keep_s: files last written longer ago than this are deleted (None: kept).
        queue_items: the most frames (serial: chunks) waiting for the disk; beyond it, dropped.
        flush_interval_s: the longest written data waits in the process before the OS has it.
    """

    directory: Path
    format: str = "blf"
    rotate_bytes: int | None = 64 * 2**20
    rotate_s: float | None = None
    keep_files: int | None = None
    keep_s: float | None = None
    queue_items: int = 65536
    flush_interval_s: float = 1.0


class JournalCounters:
    """What a journal counts into (the reader's :class:`~daq_agent.readers.base.ReaderCounters`).

    Only the ``add(name, n)`` method and the ``values`` dict are used; each counter is written
    by one thread only (``journal_dropped`` by the reader, the others by the journal).
    """

    def __init__(self) -> None:
        self.values: dict[str, int] = dict.fromkeys(JOURNAL_COUNTERS, 0)

    def add(self, name: str, n: int = 1) -> None:
        """Count ``n`` more under ``name``."""
        self.values[name] = self.values.get(name, 0) + n


_FILE_RE = r"-(\d{8}T\d{6}\.\d{6})Z(?:-(\d+))?\."


def journal_files(directory: Path, name: str, fmt: str) -> list[Path]:
    """The files of journal ``name`` in ``directory``, oldest first."""
    pattern = re.compile("^" + re.escape(name) + _FILE_RE + re.escape(fmt) + "$")
    found: list[tuple[str, int, Path]] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    for entry in entries:
        match = pattern.match(entry.name)
        if match and entry.is_file():
            found.append((match.group(1), int(match.group(2) or 0), Path(entry.path)))
    return [path for _, _, path in sorted(found)]


Item = TypeVar("Item")


class Journal(Generic[Item]):
    """The queue, the thread, the files and the counters of a journal; subclasses write.

    Args:
        name: the reader's name: the file prefix and the thread ``daq-journal[<name>]``.
        settings: where and how.
        counters: where to count (the reader's counters); default: a counter of its own.
        clock: wall time in seconds (file names, rotation by time).

    Raises:
        ConfigError: invalid settings.
    """

    FORMATS: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        name: str,
        settings: JournalSettings,
        counters: Any = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if settings.format not in self.FORMATS:
            raise ConfigError(
                f"journal of {name!r}: format must be one of {', '.join(self.FORMATS)}, "
                f"got {settings.format!r}",
                key="journal.format",
            )
        if settings.queue_items < 1:
            raise ConfigError("journal queue_items must be >= 1", key="journal.queue_items")
        self.name = name
        self.settings = settings
        self.counters: Any = JournalCounters()
        self.attach(counters if counters is not None else self.counters)
        self._clock = clock
        self._queue: collections.deque[Sequence[Item]] = collections.deque()
        self._submitted = 0  # items queued, written by the reader thread only
        self._taken = 0  # items taken off the queue, written by the journal thread only
        self._closing = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._writer: Any = None
        self._path: Path | None = None
        self._opened_at = 0.0
        self._last_flush = 0.0
        self._retry_at = 0.0
        self._retry_s = _RETRY_INITIAL_S
        self._failing = ""
        self.last_error = ""
        """The text of the most recent write failure ("" if none)."""

    def attach(self, counters: Any) -> None:
        """Count into ``counters`` (the reader's; before :meth:`start`): its ``journal_*``
        counters are created at 0."""
        for key in JOURNAL_COUNTERS:
            counters.values.setdefault(key, 0)
        self.counters = counters

    # -- the reader's side --------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Items waiting for the disk."""
        return self._submitted - self._taken

    def submit(self, items: Sequence[Item]) -> None:
        """Queue ``items`` for the disk (on the reader thread: never blocks, never raises).

        What does not fit in the queue, or comes after :meth:`close`, is counted as dropped.
        """
        n = len(items)
        if not n:
            return
        room = self.settings.queue_items - (self._submitted - self._taken)
        if self._closed or room <= 0:
            self.counters.add("journal_dropped", n)
            return
        if n > room:
            self.counters.add("journal_dropped", n - room)
            items = items[:room]
            n = room
        self._queue.append(items)
        self._submitted += n

    # -- life ---------------------------------------------------------------------------------

    @property
    def path(self) -> Path | None:
        """The file being written, None when none is open."""
        return self._path

    @property
    def thread_name(self) -> str:
        """The name of the journal's thread."""
        return f"daq-journal[{self.name}]"

    @property
    def native_thread_id(self) -> int | None:
        """The OS id of the journal's thread (None before it started), for CPU accounting."""
        return None if self._thread is None else self._thread.native_id

    def start(self) -> None:
        """Start the journal thread (idempotent)."""
        if self._thread is not None or self._closed:
            return
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def close(self, timeout: float | None = 30.0) -> bool:
        """Write what is queued, close the file and join the thread; idempotent.

        Returns:
            True if the thread has ended (or never ran).
        """
        self._closed = True
        self._closing.set()
        thread = self._thread
        if thread is None:
            self._drain()  # never started: write what was submitted, on this thread
            self._close_file()
            return True
        thread.join(timeout)
        if thread.is_alive():
            log.warning("journal %s did not finish writing within %.1f s", self.name, timeout)
            return False
        # submitted after the thread's last look (a reader that outlived its stop): never written
        while self._queue:
            items = self._queue.popleft()
            self._taken += len(items)
            self.counters.add("journal_lost", len(items))
        return True

    # -- the journal thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._closing.is_set():
                self._drain()
                self._flush_if_due()
                self._closing.wait(_POLL_S)
            self._drain()
        except Exception as exc:  # a bug here must not go unnoticed, nor kill anything else
            log.exception("journal %s failed", self.name)
            self._error(exc, "write")
        finally:
            self._close_file()

    def _drain(self) -> None:
        queue = self._queue
        while queue:
            items = queue.popleft()
            self._taken += len(items)
            self._write_items(items)

    def _write_items(self, items: Sequence[Item]) -> None:
        now = self._clock()
        if self._writer is not None and self._should_rotate(now):
            self._close_file()
        if self._writer is None and not self._open(now):
            self.counters.add("journal_lost", len(items))
            return
        try:
            refused = self._write(items)
        except Exception as exc:  # OSError: ENOSPC, EIO…: the file is given up
            self._error(exc, f"write to {self._path}")
            self.counters.add("journal_lost", len(items))
            self._abandon_file()
            return
        if refused:
            self.counters.add("journal_lost", refused)
        self.counters.add("journal_written", len(items) - refused)
        if self._failing:
            log.warning("journal %s: writing again (%s)", self.name, self._path)
            self._failing = ""
            self._retry_s = _RETRY_INITIAL_S

    def _should_rotate(self, now: float) -> bool:
        settings = self.settings
        if settings.rotate_s is not None and now - self._opened_at >= settings.rotate_s:
            return True
        return settings.rotate_bytes is not None and self._size() >= settings.rotate_bytes

    def _open(self, now: float) -> bool:
        if now < self._retry_at:
            return False
        directory = self.settings.directory
        stamp = datetime.fromtimestamp(now, tz=UTC).strftime("%Y%m%dT%H%M%S.%f")
        path = directory / f"{self.name}-{stamp}Z.{self.settings.format}"
        suffix = 0
        while path.exists():
            suffix += 1
            path = directory / f"{self.name}-{stamp}Z-{suffix}.{self.settings.format}"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._writer = self._make_writer(path)
        except Exception as exc:
            self._error(exc, f"open {path}")
            self._retry_at = now + self._retry_s
            self._retry_s = min(self._retry_s * 2, _RETRY_MAX_S)
            return False
        self._path = path
        self._opened_at = now
        self._last_flush = time.monotonic()
        self.counters.add("journal_files")
        log.info("journal %s: writing %s", self.name, path)
        self._prune()
        return True

    def _flush_if_due(self) -> None:
        if self._writer is None or time.monotonic() - self._last_flush < (
            self.settings.flush_interval_s
        ):
            return
        self._last_flush = time.monotonic()
        try:
            self._flush()
        except Exception as exc:
            self._error(exc, f"flush {self._path}")
            self._abandon_file()

    def _close_file(self) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            self._finish(writer)
        except Exception as exc:
            self._error(exc, f"close {self._path}")
        self._path = None

    def _abandon_file(self) -> None:
        """Give up the current file after a failure (closed without raising)."""
        writer, self._writer = self._writer, None
        self._path = None
        self._retry_at = self._clock() + self._retry_s
        self._retry_s = min(self._retry_s * 2, _RETRY_MAX_S)
        if writer is not None:
            with contextlib.suppress(Exception):
                self._finish(writer)

    def _prune(self) -> None:
        """Delete this journal's oldest files beyond ``keep_files`` or older than ``keep_s``."""
        settings = self.settings
        if settings.keep_files is None and settings.keep_s is None:
            return
        files = journal_files(settings.directory, self.name, settings.format)
        files = [p for p in files if p != self._path]
        doomed: list[Path] = []
        keep = None if settings.keep_files is None else settings.keep_files - 1  # + the current
        if keep is not None and len(files) > keep:
            doomed.extend(files[: len(files) - keep])
        if settings.keep_s is not None:
            limit = self._clock() - settings.keep_s
            for path in files:
                with contextlib.suppress(OSError):
                    if path not in doomed and path.stat().st_mtime < limit:
                        doomed.append(path)
        for path in doomed:
            try:
                path.unlink()
                log.info("journal %s: deleted %s (retention)", self.name, path.name)
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._error(exc, f"delete {path}")

    def _error(self, exc: BaseException, during: str) -> None:
        self.counters.add("journal_errors")
        text = f"{during}: {getattr(exc, 'strerror', None) or exc}"
        self.last_error = text
        if text != self._failing:
            self._failing = text
            log.error(
                "journal %s: cannot %s (counted in journal_errors; frames meanwhile in "
                "journal_lost; the reader goes on)",
                self.name,
                text,
            )

    # -- the format ---------------------------------------------------------------------------

    def _make_writer(self, path: Path) -> Any:
        raise NotImplementedError

    def _write(self, items: Sequence[Item]) -> int:
        """Write ``items``; returns how many the format refused (each counted as an error).

        Raises:
            OSError: the file cannot be written.
        """
        raise NotImplementedError

    def _size(self) -> int:
        raise NotImplementedError

    def _flush(self) -> None:
        raise NotImplementedError

    def _finish(self, writer: Any) -> None:
        raise NotImplementedError


class CanJournal(Journal[Any]):
    """A CAN bus's journal: ``can.Message`` objects through python-can's writers."""

    FORMATS: ClassVar[tuple[str, ...]] = CAN_FORMATS

    def _make_writer(self, path: Path) -> Any:
        import can

        if self.settings.format == "blf":
            return _blf_writer(path)
        if self.settings.format == "asc":
            return can.ASCWriter(path)
        return can.CanutilsLogWriter(path, channel=self.name)

    def _write(self, items: Sequence[Any]) -> int:
        writer = self._writer
        batch = getattr(writer, "write_batch", None)
        if batch is not None:
            try:
                batch(items)
                return 0
            except OSError:
                raise
            except Exception:  # a frame the batch path cannot pack: frame by frame, below
                pass
        write = writer.on_message_received
        refused = 0
        for msg in items:
            # one journal is one bus: channel 1 in BLF and ASC, the bus alias in a candump log.
            # Cleared rather than parsed per frame: python-can's channel2int (a regex on the
            # interface's channel name) was half of BLFWriter's time, 4.2 -> 2.2 µs per frame;
            # it also maps a name ending in a big number (a virtual bus) beyond BLF's 16 bits
            msg.channel = None
            try:
                write(msg)
            except OSError:
                raise
            except Exception as exc:  # a frame the format cannot hold
                self._error(exc, f"write frame {msg.arbitration_id:X} to {self._path}")
                refused += 1
        return refused

    def _size(self) -> int:
        return int(self._writer.file_size())

    def _flush(self) -> None:
        writer = self._writer
        # BLFWriter keeps up to 128 KiB of objects in memory until a container is full; its
        # _flush writes (compresses) what it holds as a container of its own
        container = getattr(writer, "_flush", None)
        if callable(container):
            container()
        writer.file.flush()

    def _finish(self, writer: Any) -> None:
        writer.stop()


def _blf_writer(path: Path) -> Any:
    """python-can's BLF writer, with a batch path for CAN and CAN FD frames when its internals are
    those this was measured on (python-can 4.x: ``_buffer``, ``_buffer_size``, ``_flush``).

    Measured on this project's 2-core machine (benchmarks/can_pipeline.py --journal blf, CPU of
    every thread per frame): python-can's ``on_message_received`` made the journal cost 2.5 µs
    per frame (+20 % of the agent's CPU, over the 15 % target); its time goes to one call of
    ``_add_object`` and three ``struct.pack`` per frame. The batch path packs each classic
    frame's object (base header, V1 header with ns timestamps, CAN message) with one
    ``struct.pack`` into python-can's own container buffer, which python-can then compresses,
    writes and finishes (file header, object count) as always: the bytes written are the same
    as python-can's own (a test compares the files). CAN FD frames likewise; error frames go
    through ``on_message_received``.
    """
    import struct

    import can
    from can.io import blf

    # zlib level 1, not python-can's default 6: 1.1 µs less per frame (random payloads, this
    # machine), files 4 % larger
    writer = can.BLFWriter(path, compression_level=BLF_COMPRESSION)
    needed = ("_buffer", "_buffer_size", "_flush", "channel", "start_timestamp", "object_count")
    layout = (
        blf.OBJ_HEADER_BASE_STRUCT.format,
        blf.OBJ_HEADER_V1_STRUCT.format,
        blf.CAN_MSG_STRUCT.format,
    )
    if not all(hasattr(writer, name) for name in needed) or layout != (
        "<4sHHLL",
        "<LHHQ",
        "<HBBL8s",
    ):
        return writer  # another python-can: its own path only
    header_size = blf.OBJ_HEADER_BASE_STRUCT.size + blf.OBJ_HEADER_V1_STRUCT.size
    obj_size = header_size + blf.CAN_MSG_STRUCT.size  # 48; a multiple of 4: no padding
    if blf.CAN_FD_MSG_STRUCT.format != "<HBBLLBBB5x64s":
        return writer
    fd_size = header_size + blf.CAN_FD_MSG_STRUCT.size  # 116: no padding either
    # the object headers are the same for every frame of a kind up to the timestamp: packed once
    head = struct.Struct("<4sHHLLLHH")
    prefix = head.pack(b"LOBJ", header_size, 1, obj_size, blf.CAN_MESSAGE, blf.TIME_ONE_NANS, 0, 0)
    fd_prefix = head.pack(
        b"LOBJ", header_size, 1, fd_size, blf.CAN_FD_MESSAGE, blf.TIME_ONE_NANS, 0, 0
    )
    pack = struct.Struct("<QHBBL8s").pack
    pack_fd = struct.Struct("<QHBBLLBBB5x64s").pack
    ext, remote, tx = blf.CAN_MSG_EXT, blf.REMOTE_FLAG, blf.DIR
    edl, brs, esi = blf.EDL, blf.BRS, blf.ESI
    len2dlc = can.util.len2dlc
    limit = writer.max_container_size
    single = writer.on_message_received

    def write_batch(msgs: Sequence[Any]) -> None:
        w = writer
        channel = w.channel
        start = w.start_timestamp
        buffer = w._buffer
        size = w._buffer_size
        count = 0
        ts = w.stop_timestamp
        try:
            for msg in msgs:
                msg.channel = None  # see CanJournal._write
                if msg.is_error_frame:
                    w._buffer_size, w.stop_timestamp = size, ts
                    w.object_count += count
                    count = 0
                    single(msg)
                    start, buffer, size = w.start_timestamp, w._buffer, w._buffer_size
                    ts = w.stop_timestamp
                    continue
                ts = msg.timestamp
                if start is None:  # as python-can: the file's start, to the millisecond
                    start = w.start_timestamp = int(ts * 1000) / 1000
                arb = msg.arbitration_id | ext if msg.is_extended_id else msg.arbitration_id
                flags = (remote if msg.is_remote_frame else 0) | (0 if msg.is_rx else tx)
                at = int((ts - start) * 1e9)
                if at < 0:
                    at = 0
                if msg.is_fd:
                    data = bytes(msg.data)
                    fd_flags = (
                        edl
                        | (brs if msg.bitrate_switch else 0)
                        | (esi if msg.error_state_indicator else 0)
                    )
                    buffer.append(
                        fd_prefix
                        + pack_fd(
                            at,
                            channel,
                            flags,
                            len2dlc(msg.dlc),
                            arb,
                            0,
                            0,
                            fd_flags,
                            len(data),
                            data,
                        )
                    )
                    size += fd_size
                else:
                    buffer.append(prefix + pack(at, channel, flags, msg.dlc, arb, bytes(msg.data)))
                    size += obj_size
                count += 1
                if size >= limit:
                    w._buffer_size, w.stop_timestamp = size, ts
                    w.object_count += count
                    count = 0
                    w._flush()
                    buffer, size = w._buffer, w._buffer_size
        finally:
            w._buffer_size, w.stop_timestamp = size, ts
            w.object_count += count

    cast(Any, writer).write_batch = write_batch  # an instance attribute: _write looks for it
    return writer


class _SerialWriter:
    __slots__ = ("file",)

    def __init__(self, path: Path) -> None:
        self.file = path.open("x", encoding="ascii")
        self.file.write(SERIAL_HEADER)


class SerialJournal(Journal[tuple[int, bytes]]):
    """A serial device's journal: ``(timestamp_ns, bytes)`` read chunks, one line each."""

    FORMATS: ClassVar[tuple[str, ...]] = (SERIAL_FORMAT,)

    def _make_writer(self, path: Path) -> Any:
        return _SerialWriter(path)

    def _write(self, items: Sequence[tuple[int, bytes]]) -> int:
        out = self._writer.file
        for timestamp_ns, data in items:
            seconds, nanos = divmod(timestamp_ns, 1_000_000_000)
            out.write(f"{seconds}.{nanos:09d} {data.hex()}\n")
        return 0

    def _size(self) -> int:
        return int(self._writer.file.tell())

    def _flush(self) -> None:
        self._writer.file.flush()

    def _finish(self, writer: Any) -> None:
        writer.file.close()


def read_serial_journal(path: Path) -> list[tuple[int, bytes]]:
    """The ``(timestamp_ns, bytes)`` chunks of a serial journal file.

    Raises:
        ConfigError: a line that is not ``<seconds>.<9 digits> <hex>`` (named by number).
    """
    out: list[tuple[int, bytes]] = []
    with path.open(encoding="ascii") as lines:
        for number, line in enumerate(lines, 1):
            if line.startswith("#") or not line.strip():
                continue
            try:
                stamp, hex_data = line.split()
                seconds, _, nanos = stamp.partition(".")
                out.append((int(seconds) * 1_000_000_000 + int(nanos), bytes.fromhex(hex_data)))
            except ValueError as exc:
                raise ConfigError(f"{path}:{number}: not a serial journal line: {exc}") from exc
    return out
