"""The dead-letter file: requests the ingestion API can never accept, kept instead of retried.

A request the server rejects for what it is (malformed, invalid, too large) would wedge the
queue if it were retried forever. The flusher isolates it and appends it here with the reason,
then moves on. The file is append-only; each entry is length-prefixed and checksummed::

    magic       4s   b"DQDL"
    time_ns     i64  when it was dead-lettered (ns since the epoch)
    reason_len  u32
    payload_len u32
    reason          UTF-8
    payload         the serialized IngestWithConfigDataStreamRequest, as it was sent
    crc         u32  zlib.crc32 of everything after the magic

:func:`read_dead_letters` reads the entries back (skipping a torn tail), e.g. to re-send them by
hand once the cause is fixed.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from daq_agent.core.errors import SpoolError

__all__ = ["DeadLetter", "DeadLetterEntry", "read_dead_letters"]

log = logging.getLogger(__name__)

_MAGIC: Final = b"DQDL"
_HEAD: Final = struct.Struct("<4sqII")
_CRC: Final = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class DeadLetterEntry:
    """One dead-lettered request.

    Attributes:
        time_ns: when it was dead-lettered.
        reason: why the server refused it.
        payload: the serialized request.
    """

    time_ns: int
    reason: str
    payload: bytes


class DeadLetter:
    """An append-only dead-letter file (created on first use), fsynced at every append.

    Args:
        path: the file (its directory is created if missing).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self.count = 0
        """Requests appended by this object."""

    def append(self, payload: bytes, reason: str) -> None:
        """Append one request with the reason it was refused, and fsync.

        Raises:
            SpoolError: the file cannot be written (the caller must not drop the request).
        """
        reason_bytes = reason.encode("utf-8", "replace")[:4096]
        head = _HEAD.pack(_MAGIC, time.time_ns(), len(reason_bytes), len(payload))
        crc = zlib.crc32(payload, zlib.crc32(reason_bytes, zlib.crc32(head[4:])))
        entry = b"".join((head, reason_bytes, payload, _CRC.pack(crc)))
        with self._lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                try:
                    view = memoryview(entry)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise SpoolError(f"dead-letter file {self.path}: cannot append: {exc}") from exc
            self.count += 1
        log.error(
            "dead-lettered a request of %d bytes the ingestion API refused (%s) to %s",
            len(payload),
            reason,
            self.path,
        )


def read_dead_letters(path: str | Path) -> Iterator[DeadLetterEntry]:
    """The entries of a dead-letter file, in order; a torn or corrupt tail ends the iteration.

    Raises:
        OSError: the file cannot be read.
    """
    data = Path(path).read_bytes()
    pos = 0
    while pos + _HEAD.size + _CRC.size <= len(data):
        magic, time_ns, reason_len, payload_len = _HEAD.unpack_from(data, pos)
        end = pos + _HEAD.size + reason_len + payload_len
        if magic != _MAGIC or end + _CRC.size > len(data):
            return
        (crc,) = _CRC.unpack_from(data, end)
        if zlib.crc32(data[pos + 4 : end]) != crc:
            return
        reason = data[pos + _HEAD.size : pos + _HEAD.size + reason_len].decode("utf-8", "replace")
        payload = data[pos + _HEAD.size + reason_len : end]
        yield DeadLetterEntry(time_ns, reason, bytes(payload))
        pos = end + _CRC.size
