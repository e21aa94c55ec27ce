"""The durable spool: batches on disk between the flusher and the network stream.

Each batch (the serialized ``IngestWithConfigDataStreamRequest`` payloads of one flush, with its
sample count and oldest/newest sample timestamps) is appended with a sequence number and a
checksum *before* it is sent. The sender reads unacknowledged records back from disk, in order,
and acknowledges up to the last sequence number of a window the server answered OK. Nothing is
held only in memory: the backlog lives in the segment files (the spool keeps a small index of
32 bytes per record and a bounded cache of the most recently appended records).

Directory layout::

    <directory>/LOCK                            fcntl.flock'ed by the owner; holds its pid
    <directory>/ack                             the ack cursor (replaced atomically)
    <directory>/seg-<first seq, 20 digits>.spool  segment files, rolled at ``segment_bytes``

Record format (little-endian), self-delimiting and resynchronisable::

    magic      4s   b"DQSR"
    body_len   u32  bytes of the body
    seq        u64  sequence number (strictly increasing, from 1)
    count      u32  samples in the batch
    oldest_ns  i64  oldest sample timestamp
    newest_ns  i64  newest sample timestamp
    n          u32  number of payloads
    lengths    n x u32  the length of each payload
    payloads        the payloads, one after the other
    crc        u32  zlib.crc32 over everything after the magic up to the end of the body

Cursor format: ``b"DQAK"``, u64 acknowledged seq, u64 seq through which losses were already
counted (the last seq at the previous open), u32 crc32 of the two u64. It is written when the
spool is created and at every open that found something new, so a loss is reported by one open
only, and sequence numbers continue after it even when every segment is gone.

Segments are rolled when the next record would take one past ``segment_bytes``; an open never
appends to a segment it recovered (the first append starts a new one).

Durability: every append is one ``write()`` to the OS at once. A background thread named
``daq-spool-sync`` wakes every ``fsync_interval`` seconds and, if anything was appended, fsyncs
the segment being written, the segments rolled since (then closes them) and the directory after
a segment was created (group commit: an append is durable within about ``fsync_interval`` plus
one fsync); with ``fsync_interval=0`` every append is fsynced before it returns and no thread
runs.
:meth:`Spool.sync` fsyncs now. The ack cursor is written to a temporary file, fsynced, renamed
over ``ack`` and the directory fsynced, before fully acknowledged segments are deleted.

Recovery at open never refuses to start because of the spool's content:

* a missing or corrupt cursor means everything present is unacknowledged
  (``stats().cursor_state`` says which, ``stats().recovered_records`` how much is pending);
* a torn tail of the newest segment holding a valid record (a record cut short by a crash) is
  truncated and its bytes counted in ``torn_bytes``, as are segments after it with no valid record
  (created, never synced); a segment with no valid record is removed;
* a corrupt record (bad magic, length or CRC) is skipped by scanning forward to the next magic that
  starts a record with a valid CRC and a higher seq. ``corrupt_records`` counts the
  *unacknowledged* sequence numbers missing between two valid records (or between the start of a
  segment, whose name gives its first seq, and its first valid record) — this is exact, because
  seqs are consecutive within and across segments. Damage at the very end of the newest segment,
  with no valid record after it, cannot be counted by seq: it counts as one corrupt record when a
  complete record (its declared length fits in the file) fails its CRC, otherwise as torn bytes.
  A record found corrupt later, by :meth:`Spool.read`, is skipped and counted too. Each loss is
  counted by one open only (the cursor remembers the seq through which losses were counted).
* Sequence numbers continue after the highest seq seen (valid records, segment names, the cursor).
  Records cut from the tail of the newest segment (not synced before a crash) may see their seqs
  handed out again; a seq that was acknowledged, or seen by an open, never is.

Quota: when an append would make the segment files exceed ``quota_bytes``, the oldest segments are
deleted, even unacknowledged ones, and their unacknowledged records and samples are counted in
``dropped_records``/``dropped_samples`` (reason: "spool quota"). The segment being written is never
deleted while it is written to: if it alone is over the quota, it is closed first (the next record
starts a new segment). A single record larger than the quota is still written.

Failure: any ``OSError`` from a write, an fsync or the cursor update raises :class:`SpoolError`
and the spool stops trusting itself: every later append, sync and acknowledge raises
:class:`SpoolError` too (reads of what is on disk still work; ``stats().failed`` says why). An
fsync error in the sync thread is raised by the next append. The agent is expected to exit
non-zero so that the service manager restarts it; recovery then keeps what is intact on disk and
truncates a partly written record. The quota is applied before writing, so a full filesystem
(ENOSPC) means the quota is larger than the free space: set it below.

Memory: the spool holds no backlog: an index of 32 bytes per record on disk (seq, offset, size,
samples) and a cache of the most recent records (``cache_bytes``, 4 MiB by default) that serves
the steady-state reads; other reads come from disk with one ``pread`` per segment.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import logging
import mmap
import os
import re
import struct
import sys
import threading
import time
import weakref
import zlib
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Final, Literal

from daq_agent.core.errors import SpoolError

__all__ = ["CursorState", "Spool", "SpoolRecord", "SpoolStats", "encode_record"]

log = logging.getLogger(__name__)

MAGIC: Final = b"DQSR"
_HEADER: Final = struct.Struct("<4sIQIqqI")
_HEADER_SIZE: Final = _HEADER.size  # 40
_CRC_SIZE: Final = 4
_OVERHEAD: Final = _HEADER_SIZE + _CRC_SIZE
_MAX_BODY: Final = 2**31
_U32: Final = struct.Struct("<I")
_CURSOR: Final = struct.Struct("<4sQQI")
_CURSOR_MAGIC: Final = b"DQAK"
_SEGMENT_RE: Final = re.compile(r"^seg-(\d{20})\.spool$")
_CACHE_BYTES: Final = 4 * 2**20
_THREAD_NAME: Final = "daq-spool-sync"
_BIG_ENDIAN: Final = sys.byteorder == "big"

CursorState = Literal["new", "ok", "missing", "corrupt"]


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    """One appended batch.

    Attributes:
        seq: its sequence number.
        count: samples in the batch.
        oldest_ns: the oldest sample timestamp (ns).
        newest_ns: the newest sample timestamp (ns).
        payloads: the serialized requests, in order.
    """

    seq: int
    count: int
    oldest_ns: int
    newest_ns: int
    payloads: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class SpoolStats:
    """A snapshot of a spool's counters.

    Attributes:
        bytes_on_disk: bytes in the segment files.
        segments: segment files.
        records_appended: records appended since open.
        acked_seq: the acknowledged sequence number.
        last_seq: the last sequence number appended (or recovered).
        pending_records: unacknowledged records on disk.
        pending_samples: samples in those records.
        pending_bytes: bytes of those records.
        corrupt_records: unacknowledged records lost to corruption (see the module docstring).
        dropped_records: unacknowledged records deleted by the quota ("spool quota").
        dropped_samples: samples in those records.
        torn_bytes: bytes truncated from a torn tail at open.
        recovered_records: unacknowledged records found at open.
        cursor_state: the ack cursor at open: "new", "ok", "missing" or "corrupt".
        fsyncs: fsync calls made on segments, the cursor and the directory.
        last_fsync_age: seconds since the last completed segment fsync (None: none yet).
        failed: the error that made the spool stop trusting itself, or None.
    """

    bytes_on_disk: int
    segments: int
    records_appended: int
    acked_seq: int
    last_seq: int
    pending_records: int
    pending_samples: int
    pending_bytes: int
    corrupt_records: int
    dropped_records: int
    dropped_samples: int
    torn_bytes: int
    recovered_records: int
    cursor_state: CursorState
    fsyncs: int
    last_fsync_age: float | None
    failed: str | None


class _Segment:
    """One segment file and the index of its valid records (no payloads)."""

    __slots__ = ("counts", "first_seq", "offsets", "path", "seqs", "size", "sizes")

    def __init__(self, path: Path, first_seq: int, size: int = 0) -> None:
        self.path = path
        self.first_seq = first_seq
        self.size = size
        self.seqs = array("q")
        self.offsets = array("q")
        self.sizes = array("q")
        self.counts = array("q")

    def add(self, seq: int, offset: int, size: int, count: int) -> None:
        self.seqs.append(seq)
        self.offsets.append(offset)
        self.sizes.append(size)
        self.counts.append(count)

    @property
    def last_seq(self) -> int:
        return self.seqs[-1] if self.seqs else self.first_seq - 1

    def tally_after(self, seq: int) -> tuple[int, int, int]:
        """(records, samples, bytes) of the records with a seq above ``seq``."""
        start = bisect.bisect_right(self.seqs, seq)
        return len(self.seqs) - start, sum(self.counts[start:]), sum(self.sizes[start:])

    def tally_between(self, low: int, high: int) -> tuple[int, int, int]:
        """(records, samples, bytes) of the records with ``low < seq <= high``."""
        start = bisect.bisect_right(self.seqs, low)
        stop = bisect.bisect_right(self.seqs, high)
        return stop - start, sum(self.counts[start:stop]), sum(self.sizes[start:stop])


def _segment_name(first_seq: int) -> str:
    return f"seg-{first_seq:020d}.spool"


def encode_record(
    seq: int, payloads: Sequence[bytes], count: int, oldest_ns: int, newest_ns: int
) -> bytes:
    """The bytes of one record (see the module docstring for the format)."""
    lengths = array("I", [len(payload) for payload in payloads])
    if _BIG_ENDIAN:
        lengths.byteswap()
    body_len = 4 * len(lengths) + sum(len(payload) for payload in payloads)
    header = _HEADER.pack(MAGIC, body_len, seq, count, oldest_ns, newest_ns, len(payloads))
    record = bytearray(header)
    record += lengths.tobytes()
    for payload in payloads:
        record += payload
    crc = zlib.crc32(memoryview(record)[4:])
    record += _U32.pack(crc)
    return bytes(record)


def _parse(
    buf: bytes | mmap.mmap, pos: int, end: int, *, payloads: bool = True
) -> SpoolRecord | int:
    """Parse the record at ``buf[pos:]`` (not past ``end``).

    Args:
        buf: the bytes (a segment file's, or part of it).
        pos: where the record starts.
        end: where the data ends.
        payloads: False checks the record but leaves its payloads out (recovery scan).

    Returns:
        the record, or an int: -1 when the record runs past ``end`` or its header is short
        (torn), -2 when it is complete but invalid (bad magic, length, CRC or payload framing).
    """
    if end - pos < _OVERHEAD:
        return -1
    magic, body_len, seq, count, oldest, newest, n = _HEADER.unpack_from(buf, pos)
    if magic != MAGIC or body_len > _MAX_BODY or body_len < 4 * n:
        return -2
    body_start = pos + _HEADER_SIZE
    body_end = body_start + body_len
    if body_end + _CRC_SIZE > end:
        return -1
    (crc,) = _U32.unpack_from(buf, body_end)
    with memoryview(buf) as view:
        if zlib.crc32(view[pos + 4 : body_end]) != crc:
            return -2
    lengths = array("I")
    lengths.frombytes(buf[body_start : body_start + 4 * n])
    if _BIG_ENDIAN:
        lengths.byteswap()
    if 4 * n + sum(lengths) != body_len:
        return -2
    if not payloads:
        return SpoolRecord(seq, count, oldest, newest, ())
    bounds = list(accumulate(lengths, initial=body_start + 4 * n))
    cut = map(slice, bounds[:-1], bounds[1:])  # slicing in C: no per-payload Python frame
    return SpoolRecord(seq, count, oldest, newest, tuple(map(buf.__getitem__, cut)))


def _fsync_dir(directory: Path, fsync: Callable[[int], None]) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """An append-only, checksummed, segment-file spool with an ack cursor (see the module doc).

    Thread-safety: ``append`` (the flusher), ``read``/``acknowledge`` (the sender) and the sync
    thread may run concurrently. ``write`` and ``fsync`` are a documented seam for fault-injection
    tests (an ``OSError`` they raise is handled exactly as one from the OS); leave them alone
    otherwise.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        segment_bytes: int = 64 * 2**20,
        fsync_interval: float = 0.1,
        quota_bytes: int | None = None,
        cache_bytes: int = _CACHE_BYTES,
        write: Callable[[int, memoryview], int] = os.write,
        fsync: Callable[[int], None] = os.fsync,
    ) -> None:
        """Open (create) the spool, lock it and recover its content.

        Args:
            directory: the spool directory (created if missing).
            segment_bytes: a segment is rolled once it holds this many bytes.
            fsync_interval: the longest time (s) an append stays unsynced; 0 fsyncs every append.
            quota_bytes: the most bytes the segment files may use (None: no quota).
            cache_bytes: the most bytes of recent records kept in memory for ``read``.
            write: ``os.write`` (a seam for fault-injection tests).
            fsync: ``os.fsync`` (a seam for fault-injection tests).

        Raises:
            SpoolError: a parameter is out of range, the directory cannot be created or read
                (an I/O error, never its content), or another process (or another Spool) owns
                it.
        """
        if (
            segment_bytes <= 0
            or fsync_interval < 0
            or (quota_bytes is not None and quota_bytes <= 0)
        ):
            raise SpoolError(
                f"spool {directory}: segment_bytes and quota_bytes must be > 0, fsync_interval >= 0"
            )
        self.directory = Path(directory)
        self._segment_bytes = segment_bytes
        self._fsync_interval = fsync_interval
        self._quota = quota_bytes
        self._cache_limit = cache_bytes
        self._write = write
        self._fsync = fsync

        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._active: _Segment | None = None
        self._fd: int | None = None
        # segments no longer written whose descriptor still waits for its fsync and close
        self._retired: list[tuple[int, Path]] = []
        self._syncing = False
        self._dir_dirty = False
        self._synced: dict[Path, int] = {}
        self._dirty = False
        self._cache: deque[tuple[SpoolRecord, int]] = deque()
        self._cache_bytes = 0
        self._failed: BaseException | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()

        self._acked = 0
        self._counted = 0
        self._last_seq = 0
        self._pending_records = 0
        self._pending_samples = 0
        self._pending_bytes = 0
        self._records_appended = 0
        self._corrupt = 0
        self._dropped_records = 0
        self._dropped_samples = 0
        self._torn = 0
        self._recovered = 0
        self._cursor_state: CursorState = "new"
        self._fsyncs = 0
        self._last_fsync: float | None = None

        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"spool {self.directory}: cannot create: {exc}") from exc
        self._lock_fd = self._take_lock()
        try:
            self._recover()
        except OSError as exc:
            self._release_lock()
            raise SpoolError(f"spool {self.directory}: cannot recover: {exc}") from exc
        except BaseException:
            self._release_lock()
            raise
        if fsync_interval > 0:
            self._thread = threading.Thread(
                target=_sync_loop, args=(weakref.ref(self), fsync_interval), name=_THREAD_NAME
            )
            self._thread.daemon = True
            self._thread.start()

    # -- lock ---------------------------------------------------------------------------------

    def _take_lock(self) -> int:
        path = self.directory / "LOCK"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SpoolError(f"spool {self.directory}: cannot open {path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            try:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            except OSError:
                holder = ""
            os.close(fd)
            by = f" by pid {holder}" if holder.isdigit() else ""
            raise SpoolError(f"spool {self.directory} is locked{by}") from exc
        with contextlib.suppress(OSError):  # the pid is a courtesy: the flock is the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        return fd

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = -1

    # -- recovery -----------------------------------------------------------------------------

    def _read_cursor(self) -> tuple[int, int] | None:
        """(acked seq, seq through which losses were counted), or None when missing or corrupt."""
        path = self.directory / "ack"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("spool %s: cannot read the ack cursor (%s): all is unacked", path, exc)
            self._cursor_state = "corrupt"
            return None
        if len(data) == _CURSOR.size:
            magic, acked, counted, crc = _CURSOR.unpack(data)
            if magic == _CURSOR_MAGIC and zlib.crc32(data[4:20]) == crc:
                self._cursor_state = "ok"
                return int(acked), int(counted)
        log.warning("spool %s: corrupt ack cursor: everything present is unacknowledged", path)
        self._cursor_state = "corrupt"
        return None

    def _recover(self) -> None:
        cursor = self._read_cursor()
        found: list[tuple[int, Path]] = []
        for entry in os.scandir(self.directory):
            match = _SEGMENT_RE.match(entry.name)
            if match and entry.is_file():
                found.append((int(match.group(1)), Path(entry.path)))
        found.sort()
        # stale temporary cursor from a crash during acknowledge
        with contextlib.suppress(FileNotFoundError):
            (self.directory / "ack.tmp").unlink()
        if cursor is None:
            if found and self._cursor_state == "new":
                self._cursor_state = "missing"
                log.warning(
                    "spool %s: ack cursor missing: everything present is unacknowledged",
                    self.directory,
                )
            acked, counted = (found[0][0] - 1 if found else 0), 0
        else:
            acked, counted = cursor
        self._acked = acked
        self._counted = counted

        prev = found[0][0] - 1 if found else acked
        scans: list[tuple[_Segment, int, int, int]] = []
        for first_seq, path in found:
            segment, prev, valid_end, tail_state = self._scan(path, first_seq, prev)
            scans.append((segment, valid_end, tail_state, segment.size))
        # the newest segment with a valid record is the one that was being written when the
        # process stopped: damage after its last valid record is a torn tail
        newest = max((i for i, scan in enumerate(scans) if scan[0].seqs), default=-1)
        for position, (segment, valid_end, tail_state, size) in enumerate(scans):
            if not segment.seqs:
                if position > newest:
                    self._torn += size
                log.warning("spool %s: no valid record, removed", segment.path)
                with contextlib.suppress(FileNotFoundError):
                    segment.path.unlink()
                self._dir_dirty = True
                continue
            if position == newest and valid_end < size:
                if tail_state == -2:
                    self._corrupt += 1
                self._torn += size - valid_end
                log.warning(
                    "spool %s: truncated %d damaged bytes at the tail",
                    segment.path,
                    size - valid_end,
                )
                os.truncate(segment.path, valid_end)
                segment.size = valid_end
            # an older segment keeps a damaged tail: the seqs that follow counted its losses
            self._segments.append(segment)

        highest_name = found[-1][0] if found else 0
        self._last_seq = max(acked, counted, prev, highest_name)
        for segment in self._segments:
            records, samples, size = segment.tally_after(acked)
            self._pending_records += records
            self._pending_samples += samples
            self._pending_bytes += size
            self._synced[segment.path] = segment.size
        self._recovered = self._pending_records
        # segments fully acked whose deletion did not happen before a crash
        self._delete_acked(acked)
        if cursor is None or counted < self._last_seq:
            # losses up to here are counted once: the next open does not count them again
            # best effort (a full disk must not stop the start): if it fails, the next open
            # reports the same losses again
            try:
                self._write_cursor(acked, self._last_seq)
                self._counted = self._last_seq
            except OSError as exc:
                log.warning("spool %s: cannot update the ack cursor: %s", self.directory, exc)
                with contextlib.suppress(OSError):
                    (self.directory / "ack.tmp").unlink()
        elif self._dir_dirty:
            self._sync_directory()
        self._dir_dirty = False
        if self._recovered or self._corrupt or self._torn:
            log.info(
                "spool %s: recovered %d unacknowledged records (%d corrupt, %d torn bytes)",
                self.directory,
                self._recovered,
                self._corrupt,
                self._torn,
            )

    def _scan(self, path: Path, first_seq: int, prev: int) -> tuple[_Segment, int, int, int]:
        """Index one segment and count the records missing between its valid ones.

        Returns:
            the segment (its ``size`` is the file's), the highest valid seq seen so far, the end
            of its last valid record, and how the data after that end failed to parse (-1: cut
            short, -2: complete but invalid, 0: nothing after it).
        """
        size = path.stat().st_size
        segment = _Segment(path, first_seq, size)
        valid_end = 0
        tail_state = 0
        if size:
            with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                pos = 0
                while pos < size:
                    parsed = _parse(mm, pos, size, payloads=False)
                    if isinstance(parsed, SpoolRecord) and parsed.seq > prev:
                        self._count_lost(prev, parsed.seq)
                        end = pos + _OVERHEAD + _U32.unpack_from(mm, pos + 4)[0]
                        segment.add(parsed.seq, pos, end - pos, parsed.count)
                        prev = parsed.seq
                        pos = valid_end = end
                        continue
                    if pos == valid_end:
                        tail_state = parsed if isinstance(parsed, int) else -2
                    pos = self._resync(mm, pos + 1, size, prev)
        return segment, prev, valid_end, tail_state

    @staticmethod
    def _resync(mm: mmap.mmap, start: int, size: int, prev: int) -> int:
        """The offset of the next valid record with a seq above ``prev`` (``size``: none)."""
        pos = mm.find(MAGIC, start)
        while pos >= 0:
            parsed = _parse(mm, pos, size, payloads=False)
            if isinstance(parsed, SpoolRecord) and parsed.seq > prev:
                return pos
            pos = mm.find(MAGIC, pos + 1)
        return size

    def _count_lost(self, prev: int, seq: int) -> None:
        low = max(prev, self._acked, self._counted)
        if seq - 1 > low:
            self._corrupt += seq - 1 - low

    # -- append -------------------------------------------------------------------------------

    def append(self, payloads: Sequence[bytes], count: int, oldest_ns: int, newest_ns: int) -> int:
        """Append one batch; it is written to the OS at once and fsynced by group commit.

        Args:
            payloads: the serialized requests of the batch.
            count: samples in the batch.
            oldest_ns: the oldest sample timestamp (ns).
            newest_ns: the newest sample timestamp (ns).

        Returns:
            the record's sequence number.

        Raises:
            SpoolError: the spool is closed, failed before, or the write failed now (it then
                stops trusting itself).
        """
        with self._lock:
            self._check_writable()
            seq = self._last_seq + 1
            record = encode_record(seq, payloads, count, oldest_ns, newest_ns)
            size = len(record)
            if self._quota is not None:
                self._enforce_quota(size)
            active = self._active
            if active is not None and active.size > 0 and active.size + size > self._segment_bytes:
                self._retire_active()
            try:
                if self._active is None:
                    self._open_segment(seq)
                assert self._fd is not None
                assert self._active is not None
                self._write_all(self._fd, record)
            except OSError as exc:
                raise self._fail(exc, "write") from exc
            segment = self._active
            segment.add(seq, segment.size, size, count)
            segment.size += size
            self._last_seq = seq
            self._records_appended += 1
            self._pending_records += 1
            self._pending_samples += count
            self._pending_bytes += size
            self._dirty = True
            if self._cache_limit > 0:
                self._cache.append(
                    (SpoolRecord(seq, count, oldest_ns, newest_ns, tuple(payloads)), size)
                )
                self._cache_bytes += size
                while self._cache_bytes > self._cache_limit and self._cache:
                    self._cache_bytes -= self._cache.popleft()[1]
        if self._fsync_interval == 0:
            self.sync()
        return seq

    def _write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = self._write(fd, view)
            if written <= 0:
                raise OSError(errno.EIO, "short write")
            view = view[written:]

    def _check_writable(self) -> None:
        if self._closed:
            raise SpoolError(f"spool {self.directory} is closed")
        if self._failed is not None:
            raise SpoolError(
                f"spool {self.directory} failed earlier and is no longer trusted: {self._failed}"
            )

    def _fail(self, exc: BaseException, what: str) -> SpoolError:
        """Stop trusting the spool; the error to raise."""
        first = self._failed is None
        if first:
            self._failed = exc
        error = SpoolError(f"spool {self.directory}: {what} failed: {exc}")
        if first:
            log.error("spool %s: %s failed, no longer trusted: %s", self.directory, what, exc)
        return error

    def _open_segment(self, first_seq: int) -> None:
        path = self.directory / _segment_name(first_seq)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        segment = _Segment(path, first_seq)
        self._segments.append(segment)
        self._synced[path] = 0
        self._active = segment
        self._fd = fd
        self._dir_dirty = True

    def _retire_active(self) -> None:
        """Stop writing the active segment; the sync thread fsyncs and closes its descriptor."""
        if self._fd is not None and self._active is not None:
            self._retired.append((self._fd, self._active.path))
        self._fd = None
        self._active = None

    def _enforce_quota(self, incoming: int) -> None:
        assert self._quota is not None
        total = sum(segment.size for segment in self._segments)
        while total + incoming > self._quota and self._segments:
            oldest = self._segments[0]
            if oldest is self._active:
                if oldest.size == 0:
                    break
                self._retire_active()
            total -= oldest.size
            self._drop_segment(oldest)

    def _drop_segment(self, segment: _Segment) -> None:
        records, samples, size = segment.tally_after(self._acked)
        self._segments.remove(segment)
        self._synced.pop(segment.path, None)
        self._pending_records -= records
        self._pending_samples -= samples
        self._pending_bytes -= size
        if records:
            self._dropped_records += records
            self._dropped_samples += samples
            log.warning(
                "spool %s: quota: dropped %s (%d records, %d samples unacknowledged)",
                self.directory,
                segment.path.name,
                records,
                samples,
            )
        if not self._syncing:
            # a deleted file keeps its blocks while it is open: close it now, no fsync needed
            # (not while a sync runs: it may be fsyncing this very descriptor)
            for entry in [e for e in self._retired if e[1] == segment.path]:
                self._retired.remove(entry)
                os.close(entry[0])
        last = segment.last_seq
        while self._cache and self._cache[0][0].seq <= last:
            self._cache_bytes -= self._cache.popleft()[1]
        try:
            segment.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._fail(exc, f"deleting {segment.path.name}") from exc
        self._dir_dirty = True

    # -- sync ---------------------------------------------------------------------------------

    def sync(self) -> None:
        """Fsync what was appended (and the directory, when a segment was created) now.

        Raises:
            SpoolError: the fsync failed (the spool stops trusting itself), or failed before.
        """
        with self._sync_lock:
            with self._lock:
                if self._failed is not None:
                    raise SpoolError(
                        f"spool {self.directory} failed earlier and is no longer trusted: "
                        f"{self._failed}"
                    )
                retired = self._retired
                self._retired = []
                self._syncing = True
                fd = self._fd
                active = self._active
                extent = active.size if active is not None else 0
                dir_dirty = self._dir_dirty
                dirty = self._dirty
                self._dirty = False
                self._dir_dirty = False
            fsyncs = 0
            try:
                try:
                    for old, _ in retired:
                        self._fsync(old)
                        fsyncs += 1
                finally:
                    for old, _ in retired:
                        os.close(old)
                if fd is not None and dirty:
                    self._fsync(fd)
                    fsyncs += 1
                if dir_dirty:
                    _fsync_dir(self.directory, self._fsync)
                    fsyncs += 1
            except OSError as exc:
                with self._lock:
                    self._syncing = False
                    raise self._fail(exc, "fsync") from exc
            with self._lock:
                self._syncing = False
                self._fsyncs += fsyncs
                if retired or (fd is not None and dirty):
                    self._last_fsync = time.monotonic()
                retired_paths = {path for _, path in retired}
                for segment in self._segments:
                    if segment.path in retired_paths:
                        self._synced[segment.path] = segment.size
                if active is not None and active.path in self._synced:
                    self._synced[active.path] = max(self._synced[active.path], extent)

    def _sync_directory(self) -> None:
        _fsync_dir(self.directory, self._fsync)
        self._fsyncs += 1

    def synced_sizes(self) -> dict[Path, int]:
        """Bytes of each segment file known to be on stable storage (for crash tests).

        Returns:
            segment path → synced length.
        """
        with self._lock:
            return dict(self._synced)

    # -- read ---------------------------------------------------------------------------------

    def read(
        self, after_seq: int, *, max_records: int = 1000, max_bytes: int = 8 * 2**20
    ) -> list[SpoolRecord]:
        """The next records with a seq above ``after_seq``, in order, from disk.

        Dropped and corrupt records are skipped. At least one record is returned when there is
        one, even if it is larger than ``max_bytes``.

        Args:
            after_seq: return records after this seq (usually the last one sent or acked).
            max_records: return at most this many records.
            max_bytes: stop before the records' on-disk size exceeds this.

        Returns:
            the records (empty: none after ``after_seq``).

        Raises:
            SpoolError: a segment file cannot be read.
        """
        if max_records <= 0:
            return []
        with self._lock:
            if self._cache and self._cache[0][0].seq <= after_seq + 1:
                cached = self._from_cache(after_seq, max_records, max_bytes)
                if cached is not None:
                    return cached
            plan: list[tuple[Path, array[int], array[int], array[int], int, int]] = []
            budget_records = max_records
            budget_bytes = max_bytes
            index = bisect.bisect_right([s.last_seq for s in self._segments], after_seq)
            for segment in self._segments[index:]:
                start = bisect.bisect_right(segment.seqs, after_seq)
                stop = start
                while stop < len(segment.seqs) and budget_records > 0:
                    size = segment.sizes[stop]
                    if size > budget_bytes and (plan or stop > start):
                        budget_records = 0
                        break
                    budget_bytes -= size
                    budget_records -= 1
                    stop += 1
                if stop > start:
                    plan.append(
                        (segment.path, segment.seqs, segment.offsets, segment.sizes, start, stop)
                    )
                if budget_records <= 0:
                    break
            # open under the lock: a quota drop may unlink the file, the descriptor stays valid
            handles: list[tuple[int, Path, list[tuple[int, int, int]]]] = []
            try:
                for path, seqs, offsets, sizes, start, stop in plan:
                    fd = os.open(path, os.O_RDONLY)
                    handles.append(
                        (fd, path, [(seqs[i], offsets[i], sizes[i]) for i in range(start, stop)])
                    )
            except OSError as exc:
                for fd, _, _ in handles:
                    os.close(fd)
                raise SpoolError(f"spool {self.directory}: cannot open a segment: {exc}") from exc
        records: list[SpoolRecord] = []
        corrupt: list[int] = []
        try:
            for fd, path, entries in handles:
                base = entries[0][1]
                end = entries[-1][1] + entries[-1][2]
                data = os.pread(fd, end - base, base)
                for seq, offset, size in entries:
                    parsed = _parse(data, offset - base, offset - base + size)
                    if isinstance(parsed, SpoolRecord) and parsed.seq == seq:
                        records.append(parsed)
                    else:
                        corrupt.append(seq)
                        log.warning("spool %s: record %d is corrupt on disk, skipped", path, seq)
        except OSError as exc:
            raise SpoolError(f"spool {self.directory}: cannot read a segment: {exc}") from exc
        finally:
            for fd, _, _ in handles:
                os.close(fd)
        if corrupt:
            with self._lock:
                for seq in corrupt:
                    self._forget(seq)
        return records

    def _forget(self, seq: int) -> None:
        """Take a record found corrupt out of the index and the pending counters (lock held)."""
        for segment in self._segments:
            at = bisect.bisect_left(segment.seqs, seq)
            if at < len(segment.seqs) and segment.seqs[at] == seq:
                if seq > self._acked:
                    self._corrupt += 1
                    self._pending_records -= 1
                    self._pending_samples -= segment.counts[at]
                    self._pending_bytes -= segment.sizes[at]
                for column in (segment.seqs, segment.offsets, segment.sizes, segment.counts):
                    del column[at]
                if not segment.seqs and segment is not self._active:
                    self._drop_segment(segment)
                return

    def _from_cache(
        self, after_seq: int, max_records: int, max_bytes: int
    ) -> list[SpoolRecord] | None:
        """Records from the recent cache, or None when it does not cover the start."""
        cache = self._cache
        first = cache[0][0].seq
        start = after_seq + 1 - first
        if start < 0:
            return None
        # seqs in the cache are consecutive: they were appended one after the other
        out: list[SpoolRecord] = []
        budget = max_bytes
        for i in range(start, len(cache)):
            record, size = cache[i]
            if len(out) >= max_records or (size > budget and out):
                break
            budget -= size
            out.append(record)
        return out

    # -- acknowledge --------------------------------------------------------------------------

    def acknowledge(self, seq: int) -> None:
        """Everything up to ``seq`` is delivered: persist the cursor, delete acked segments.

        The cursor is written to ``ack.tmp``, fsynced, renamed over ``ack`` and the directory
        fsynced; only then are the segments whose records are all acknowledged deleted (the
        segment being written too, once all of it is acknowledged: the next append starts a new
        one). Acknowledging a seq at or below the current one does nothing.

        Args:
            seq: the last sequence number delivered.

        Raises:
            SpoolError: ``seq`` was never appended, the spool is closed or failed, or the cursor
                could not be written (the spool then stops trusting itself).
        """
        with self._lock:
            self._check_writable()
            if seq <= self._acked:
                return
            if seq > self._last_seq:
                raise SpoolError(
                    f"spool {self.directory}: cannot acknowledge seq {seq}: "
                    f"the last appended is {self._last_seq}"
                )
            try:
                self._write_cursor(seq, self._counted)
            except OSError as exc:
                raise self._fail(exc, "writing the ack cursor") from exc
            for segment in self._segments:
                records, samples, size = segment.tally_between(self._acked, seq)
                self._pending_records -= records
                self._pending_samples -= samples
                self._pending_bytes -= size
            self._acked = seq
            self._delete_acked(seq)
            if self._dir_dirty:
                try:
                    self._sync_directory()
                except OSError as exc:
                    raise self._fail(exc, "fsync") from exc
                self._dir_dirty = False

    def _write_cursor(self, acked: int, counted: int) -> None:
        """Replace the cursor atomically: tmp file, fsync, rename, fsync the directory."""
        body = struct.pack("<QQ", acked, counted)
        data = _CURSOR.pack(_CURSOR_MAGIC, acked, counted, zlib.crc32(body))
        tmp = self.directory / "ack.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self._write_all(fd, data)
            self._fsync(fd)
            self._fsyncs += 1
        finally:
            os.close(fd)
        os.replace(tmp, self.directory / "ack")
        self._sync_directory()

    def _delete_acked(self, seq: int) -> None:
        """Delete the segments whose records are all at or below ``seq`` (lock held)."""
        for segment in list(self._segments):
            if segment.last_seq > seq:
                break
            if segment is self._active:
                self._retire_active()
            self._drop_segment(segment)

    # -- properties ---------------------------------------------------------------------------

    @property
    def acked_seq(self) -> int:
        """The acknowledged sequence number (0: none yet)."""
        return self._acked

    @property
    def last_seq(self) -> int:
        """The last sequence number appended or recovered (0: none yet)."""
        return self._last_seq

    @property
    def pending_records(self) -> int:
        """Unacknowledged records on disk."""
        return self._pending_records

    @property
    def pending_samples(self) -> int:
        """Samples in the unacknowledged records on disk."""
        return self._pending_samples

    @property
    def pending_bytes(self) -> int:
        """Bytes of the unacknowledged records on disk."""
        return self._pending_bytes

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def stats(self) -> SpoolStats:
        """A snapshot of the counters."""
        with self._lock:
            return SpoolStats(
                bytes_on_disk=sum(segment.size for segment in self._segments),
                segments=len(self._segments),
                records_appended=self._records_appended,
                acked_seq=self._acked,
                last_seq=self._last_seq,
                pending_records=self._pending_records,
                pending_samples=self._pending_samples,
                pending_bytes=self._pending_bytes,
                corrupt_records=self._corrupt,
                dropped_records=self._dropped_records,
                dropped_samples=self._dropped_samples,
                torn_bytes=self._torn,
                recovered_records=self._recovered,
                cursor_state=self._cursor_state,
                fsyncs=self._fsyncs,
                last_fsync_age=(
                    None if self._last_fsync is None else time.monotonic() - self._last_fsync
                ),
                failed=None if self._failed is None else str(self._failed),
            )

    # -- close --------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the sync thread, fsync, close the files and release the lock (idempotent).

        Raises:
            SpoolError: the final fsync failed (the files are closed and the lock released
                anyway).
        """
        if self._closed:
            return
        self._stop_thread()
        error: SpoolError | None = None
        if self._failed is None:
            try:
                self.sync()
            except SpoolError as exc:
                error = exc
        self._close_files()
        if error is not None:
            raise error

    def _stop_thread(self) -> None:
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def _close_files(self) -> None:
        with self._lock:
            self._closed = True
            for fd in [
                *(e[0] for e in self._retired),
                *([self._fd] if self._fd is not None else []),
            ]:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._retired = []
            self._fd = None
            self._active = None
            self._cache.clear()
            self._cache_bytes = 0
        self._release_lock()

    def _abandon(self) -> None:
        """Close everything *without* the final fsync, as if the process died (for tests)."""
        if self._closed:
            return
        self._stop_thread()
        self._close_files()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_lock_fd", -1) >= 0 and not getattr(self, "_closed", True):
            log.warning("%r was not properly closed", self)

    def __repr__(self) -> str:
        return f"Spool({str(self.directory)!r}, acked={self._acked}, last={self._last_seq})"


def _sync_loop(ref: weakref.ref[Spool], interval: float) -> None:
    """The ``daq-spool-sync`` thread: fsync dirty data every ``interval`` seconds."""
    while True:
        spool = ref()
        if spool is None:
            return
        wake = spool._wake
        if spool._closed or spool._failed is not None:
            return
        if spool._dirty or spool._retired or spool._dir_dirty:
            try:
                spool.sync()
            except SpoolError:
                return  # _fail logged it; appends now raise
        del spool
        if wake.wait(interval):
            return
