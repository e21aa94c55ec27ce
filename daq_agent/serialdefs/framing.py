"""Framers: cut a byte stream into frames, resynchronising after garbage, with bounded buffers.

A framer is fed the chunks a port returns, each with the host time it was read, and returns the
complete frames with the host time their first byte arrived. Every framer keeps at most one
partial frame (at most ``max_length`` bytes) between calls and counts what it throws away:

- ``framing_errors``: runs of bytes that are not a frame (garbage, an oversized frame, a bad
  COBS/SLIP encoding, an impossible length field);
- ``dropped_bytes``: bytes thrown away;
- ``checksum_errors``: (sync framings only) candidates rejected by the checksum; the framer then
  looks for the next sync *inside* the rejected candidate, so a frame that follows a false or
  truncated one is never lost.

Frame times: a chunk's bytes arrived up to ``read time``; with ``byte_ns`` (the time one
character takes on the line, e.g. 10 bits / baud) the arrival of each byte is interpolated
backwards from the read time, otherwise every frame starting in a chunk gets the chunk's time.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable

import cobs.cobs  # type: ignore[import-untyped]  # the package ships no type information

from daq_agent.core.errors import ConfigError
from daq_agent.serialdefs.model import FramingDef, FramingKind

__all__ = [
    "CobsFramer",
    "DelimitedFramer",
    "Framer",
    "LineFramer",
    "NmeaFramer",
    "SlipFramer",
    "SyncFramer",
    "make_framer",
]

Frames = list[tuple[bytes, int]]
"""Complete frames with the host time (ns) their first byte arrived."""

_SLIP_END = b"\xc0"
_SLIP_ESC = b"\xdb"
_SLIP_ESC_END = b"\xdb\xdc"
_SLIP_ESC_ESC = b"\xdb\xdd"


class Framer(abc.ABC):
    """Cuts frames from a byte stream; see the module docstring for the counters."""

    __slots__ = (
        "_buf",
        "_buf_t",
        "byte_ns",
        "checksum_errors",
        "dropped_bytes",
        "framing_errors",
        "max_length",
        "prev_t",
    )

    def __init__(self, max_length: int, byte_ns: int = 0) -> None:
        if max_length < 1:
            raise ConfigError(f"max_length must be >= 1, got {max_length}")
        self.max_length = max_length
        self.byte_ns = byte_ns
        self.framing_errors = 0
        self.dropped_bytes = 0
        self.checksum_errors = 0
        self._buf = b""
        self._buf_t = 0
        self.prev_t = 0
        """The read time of the previous chunk: no interpolated time goes before it."""

    @abc.abstractmethod
    def feed(self, data: bytes, t_ns: int) -> Frames:
        """Add bytes read at host time ``t_ns``; return the frames completed by them."""

    @abc.abstractmethod
    def encode(self, frame: bytes) -> bytes:
        """The bytes to send for ``frame`` (the inverse of :meth:`feed`)."""

    @property
    def buffered(self) -> int:
        """Bytes held as a partial frame."""
        return len(self._buf)

    def reset(self) -> None:
        """Forget any partial frame (after the port was reopened)."""
        self._buf = b""


class DelimitedFramer(Framer):
    """Frames separated by a delimiter; the base of line, COBS and SLIP framing."""

    __slots__ = ("_delim", "_discarding", "_limit")

    def __init__(self, delimiter: bytes, max_length: int, byte_ns: int = 0) -> None:
        super().__init__(max_length, byte_ns)
        if not delimiter:
            raise ConfigError("the frame delimiter must not be empty")
        self._delim = delimiter
        self._discarding = False
        self._limit = self._encoded_limit(max_length)

    def _encoded_limit(self, max_length: int) -> int:
        return max_length

    def _unwrap(self, piece: bytes) -> bytes | None:
        """The frame inside a delimited piece; None if it is not a valid encoding."""
        return piece

    def feed(self, data: bytes, t_ns: int) -> Frames:
        """Add bytes read at host time ``t_ns``; return the frames completed by them."""
        out: Frames = []
        old = len(self._buf)
        if old:
            data = self._buf + data
        total = len(data)
        byte_ns = self.byte_ns
        floor, self.prev_t = self.prev_t, t_ns
        # the time of byte i (i >= old) is t_last - (total - 1 - i) * byte_ns, but the bytes of
        # this chunk were not there at the previous read
        t_first_new = max(floor, t_ns - (total - 1 - old) * byte_ns) if byte_ns else t_ns
        buf_t = self._buf_t if old else t_first_new
        delim = self._delim
        dlen = len(delim)
        limit = self._limit
        pos = 0
        while True:
            end = data.find(delim, pos)
            if end < 0:
                break
            if self._discarding:
                self._discarding = False
                self.dropped_bytes += end - pos
            elif end > pos:
                if end - pos > limit:
                    self.framing_errors += 1
                    self.dropped_bytes += end - pos
                else:
                    frame = self._unwrap(data[pos:end])
                    if frame is None:
                        self.framing_errors += 1
                        self.dropped_bytes += end - pos
                    elif frame:
                        if pos < old:
                            t = buf_t
                        elif byte_ns:
                            t = max(floor, t_ns - (total - 1 - pos) * byte_ns)
                        else:
                            t = t_ns
                        out.append((frame, t))
            pos = end + dlen
        rest = total - pos
        if rest > limit + dlen:
            # an oversized partial frame: drop it and everything up to the next delimiter
            self.framing_errors += 1
            self.dropped_bytes += rest
            self._discarding = True
            self._buf = b""
        elif self._discarding:
            self.dropped_bytes += rest
            self._buf = b""
        else:
            self._buf = data[pos:] if pos else data
            if pos >= old:
                self._buf_t = max(floor, t_ns - (total - 1 - pos) * byte_ns) if byte_ns else t_ns
            elif pos == 0 and old:
                self._buf_t = buf_t
        return out

    def encode(self, frame: bytes) -> bytes:
        """The frame followed by the delimiter."""
        return frame + self._delim

    def reset(self) -> None:
        """Forget any partial frame (after the port was reopened)."""
        super().reset()
        self._discarding = False


class LineFramer(DelimitedFramer):
    """Text lines ending with a configurable terminator (the terminator is removed)."""

    __slots__ = ()


_NMEA_TOKEN = re.compile(rb"([^$!]*)([$!][^$!*\r\n]*)?(\*[^$!*\r\n]{2}|\*|[\r\n])?")
"""What lies before a sentence, the sentence up to its first stop character, and that stop: a
checksum, a lone ``*`` (a checksum cut short, or still arriving), or a line end (none: a new
sentence or the end of the data follows)."""
_NMEA_STOP_CHARS = frozenset(b"$!*\r\n")
_BLANKS = frozenset({b"\r\n", b"\n", b"\r", b""})
_REJECT_KEEP = 256
"""The most faults a framer keeps in :attr:`NmeaFramer.rejects` until they are read."""


class NmeaFramer(Framer):
    """NMEA 0183 sentences, cut by their own structure rather than by one line terminator.

    A sentence starts at ``$`` or ``!`` and ends at the first of:

    - its checksum, ``*`` and two characters (whatever follows: a CR LF, an LF alone, nothing);
    - a line end (CR or LF) when it has no checksum (the decoder then reports a missing checksum);
    - the next ``$`` or ``!`` before either: the sentence was truncated; it is dropped and
      counted, and the next sentence starts there.

    Bytes between sentences other than line ends and blanks are garbage (one framing error per
    run). A sentence running past ``max_length`` without an end is dropped and the framer
    resynchronises at the next ``$`` or ``!``. The partial sentence kept between reads is at
    most ``max_length`` bytes.

    ``rejects``: when set to a list (the ``decode`` command does), each fault is appended as
    ``(reason, bytes)`` with reason ``garbage``, ``truncated`` or ``overlong`` (bounded; the
    reader leaves it None and only counts).
    """

    __slots__ = ("_discarding", "rejects")

    def __init__(self, max_length: int, byte_ns: int = 0) -> None:
        super().__init__(max_length, byte_ns)
        self._discarding = False
        self.rejects: list[tuple[str, bytes]] | None = None

    def _reject(self, reason: str, data: bytes) -> None:
        self.framing_errors += 1
        self.dropped_bytes += len(data)
        rejects = self.rejects
        if rejects is not None and len(rejects) < _REJECT_KEEP:
            rejects.append((reason, data[: self.max_length]))

    def feed(self, data: bytes, t_ns: int) -> Frames:
        """Add bytes read at host time ``t_ns``; return the sentences completed by them."""
        out: Frames = []
        old = len(self._buf)
        if old:
            data = self._buf + data
        total = len(data)
        byte_ns = self.byte_ns
        floor, self.prev_t = self.prev_t, t_ns
        buf_t = self._buf_t
        limit = self.max_length
        match_token = _NMEA_TOKEN.match
        pos = 0
        keep = total
        while pos < total:
            m = match_token(data, pos)
            assert m is not None  # every group may be empty
            start = m.end(1)
            if start > pos:
                gap = data[pos:start]
                if gap not in _BLANKS:
                    if self._discarding:
                        self.dropped_bytes += len(gap)
                    else:
                        junk = gap.strip()
                        if junk:
                            self._reject("garbage", junk)
                        self.dropped_bytes += len(gap) - len(junk)
            if start >= total:  # no sentence starts in the rest
                break
            self._discarding = False
            stop = m.end(2)
            tail = m.group(3)
            if tail is None:
                if stop >= total:  # the sentence goes on in the next read
                    keep = start
                    break
                # a '$' or '!' before its end: cut short
                self._reject("truncated" if stop - start <= limit else "overlong", data[start:stop])
                pos = stop
                continue
            if len(tail) == 3:  # '*hh'
                frame_end = after = m.end()
            elif tail != b"*":  # a line end without a checksum
                frame_end, after = stop, m.end()
            else:  # '*' with fewer than two characters before a stop, or the end of the data
                cut = stop + 1
                if cut < total and data[cut] not in _NMEA_STOP_CHARS:
                    cut += 1
                if cut >= total:  # the checksum is still arriving
                    keep = start
                    break
                frame_end = after = cut  # a broken checksum: the decoder rejects it
            if frame_end - start > limit:
                self._reject("overlong", data[start:frame_end])
            else:
                if start < old:
                    t = buf_t
                elif byte_ns:
                    t = max(floor, t_ns - (total - 1 - start) * byte_ns)
                else:
                    t = t_ns
                out.append((data[start:frame_end], t))
            pos = after
        if total - keep > limit:  # a sentence with no end in sight: resynchronise at the next $
            self._reject("overlong", data[keep:])
            self._discarding = True
            keep = total
        if keep >= total:
            self._buf = b""
        else:
            if keep >= old:
                self._buf_t = max(floor, t_ns - (total - 1 - keep) * byte_ns) if byte_ns else t_ns
            else:
                self._buf_t = buf_t
            self._buf = data[keep:]
        return out

    def encode(self, frame: bytes) -> bytes:
        """The sentence followed by CR LF."""
        return frame + b"\r\n"

    def reset(self) -> None:
        """Forget any partial sentence (after the port was reopened)."""
        super().reset()
        self._discarding = False


class CobsFramer(DelimitedFramer):
    """COBS-encoded frames delimited by 0x00; sent with a leading 0x00 as well."""

    __slots__ = ()

    def __init__(self, max_length: int, byte_ns: int = 0) -> None:
        super().__init__(b"\x00", max_length, byte_ns)

    def _encoded_limit(self, max_length: int) -> int:
        return max_length + max_length // 254 + 1

    def _unwrap(self, piece: bytes) -> bytes | None:
        try:
            frame: bytes = cobs.cobs.decode(piece)
        except cobs.cobs.DecodeError:
            return None
        return frame if len(frame) <= self.max_length else None

    def encode(self, frame: bytes) -> bytes:
        """0x00, the COBS encoding of the frame, 0x00 (so line noise never swallows it)."""
        encoded: bytes = cobs.cobs.encode(frame)
        return b"\x00" + encoded + b"\x00"


class SlipFramer(DelimitedFramer):
    """SLIP (RFC 1055) frames delimited by 0xC0; sent with a leading 0xC0 as well."""

    __slots__ = ()

    def __init__(self, max_length: int, byte_ns: int = 0) -> None:
        super().__init__(_SLIP_END, max_length, byte_ns)

    def _encoded_limit(self, max_length: int) -> int:
        return 2 * max_length

    def _unwrap(self, piece: bytes) -> bytes | None:
        if _SLIP_ESC not in piece:
            return piece if len(piece) <= self.max_length else None
        escapes = piece.count(_SLIP_ESC)
        if escapes != piece.count(_SLIP_ESC_END) + piece.count(_SLIP_ESC_ESC):
            return None
        frame = piece.replace(_SLIP_ESC_END, _SLIP_END).replace(_SLIP_ESC_ESC, _SLIP_ESC)
        return frame if len(frame) <= self.max_length else None

    def encode(self, frame: bytes) -> bytes:
        """0xC0, the escaped frame, 0xC0."""
        escaped = frame.replace(_SLIP_ESC, _SLIP_ESC_ESC).replace(_SLIP_END, _SLIP_ESC_END)
        return _SLIP_END + escaped + _SLIP_END


class SyncFramer(Framer):
    """Frames starting with sync bytes, of a fixed length or with a length field.

    Args:
        sync: the bytes every frame starts with (may be empty for fixed framing: then only
            the checksum can tell a frame boundary).
        max_length: the longest frame accepted.
        fixed_length: the frame length for fixed framing (0: use the length field).
        length_at: offset of the length field.
        length_size: its size in bytes.
        length_order: ``"little"`` or ``"big"``.
        length_adjust: added to the field's value to get the total frame length.
        accept: the checksum check; a rejected candidate is counted and the search resumes one
            byte after its start.
        byte_ns: time of one character on the line, for interpolating frame times.
    """

    __slots__ = (
        "_accept",
        "_fixed",
        "_header",
        "_len_adjust",
        "_len_at",
        "_len_order",
        "_len_size",
        "_min_length",
        "_sync",
    )

    def __init__(
        self,
        sync: bytes,
        max_length: int,
        *,
        fixed_length: int = 0,
        length_at: int = 0,
        length_size: int = 1,
        length_order: str = "little",
        length_adjust: int = 0,
        accept: Callable[[bytes], bool] | None = None,
        byte_ns: int = 0,
    ) -> None:
        super().__init__(max_length, byte_ns)
        self._sync = sync
        self._fixed = fixed_length
        self._len_at = length_at
        self._len_size = length_size
        self._len_order = "little" if length_order == "little" else "big"
        self._len_adjust = length_adjust
        self._accept = accept
        self._header = len(sync) if fixed_length else max(len(sync), length_at + length_size)
        self._min_length = max(self._header, 1)

    def feed(self, data: bytes, t_ns: int) -> Frames:
        """Add bytes read at host time ``t_ns``; return the frames completed by them."""
        out: Frames = []
        old = len(self._buf)
        if old:
            data = self._buf + data
        total = len(data)
        byte_ns = self.byte_ns
        floor, self.prev_t = self.prev_t, t_ns
        buf_t = self._buf_t
        sync = self._sync
        accept = self._accept
        fixed = self._fixed
        header = self._header
        pos = 0
        keep = total
        while True:
            start = data.find(sync, pos)
            if start < 0:
                # keep what could be the beginning of a sync sequence
                keep = max(pos, total - len(sync) + 1)
                if keep > pos:
                    self.framing_errors += 1
                    self.dropped_bytes += keep - pos
                break
            if start > pos:
                self.framing_errors += 1
                self.dropped_bytes += start - pos
            if total - start < header:
                keep = start
                break
            if fixed:
                length = fixed
            else:
                at = start + self._len_at
                length = (
                    int.from_bytes(data[at : at + self._len_size], self._len_order)  # type: ignore[arg-type]
                    + self._len_adjust
                )
                if length < self._min_length or length > self.max_length:
                    self.framing_errors += 1
                    self.dropped_bytes += 1
                    pos = start + 1
                    continue
            if total - start < length:
                keep = start
                break
            frame = data[start : start + length]
            if accept is not None and not accept(frame):
                self.checksum_errors += 1
                self.dropped_bytes += 1
                pos = start + 1
                continue
            if start < old:
                t = buf_t
            elif byte_ns:
                t = max(floor, t_ns - (total - 1 - start) * byte_ns)
            else:
                t = t_ns
            out.append((frame, t))
            pos = start + length
        if keep >= total:
            self._buf = b""
        else:
            if keep >= old:
                self._buf_t = max(floor, t_ns - (total - 1 - keep) * byte_ns) if byte_ns else t_ns
            else:
                self._buf_t = buf_t
            self._buf = data[keep:]
        return out

    def encode(self, frame: bytes) -> bytes:
        """The frame itself (sync bytes and length are part of the frame)."""
        return frame


def make_framer(
    spec: FramingDef, *, accept: Callable[[bytes], bool] | None = None, byte_ns: int = 0
) -> Framer:
    """Build the framer a :class:`FramingDef` describes.

    Args:
        spec: the framing definition.
        accept: for fixed and sync_length framing, the checksum check used to resynchronise.
        byte_ns: the time one character takes on the line (0: no interpolation).

    Returns:
        A new framer.

    Raises:
        ConfigError: the definition is inconsistent.
    """
    kind = spec.kind
    if kind is FramingKind.LINE:
        return LineFramer(spec.terminator, spec.max_length, byte_ns)
    if kind is FramingKind.COBS:
        return CobsFramer(spec.max_length, byte_ns)
    if kind is FramingKind.SLIP:
        return SlipFramer(spec.max_length, byte_ns)
    if kind is FramingKind.FIXED:
        return SyncFramer(
            spec.sync, spec.max_length, fixed_length=spec.length, accept=accept, byte_ns=byte_ns
        )
    lf = spec.length_field
    if lf is None:
        raise ConfigError("sync_length framing needs a length_field")
    return SyncFramer(
        spec.sync,
        spec.max_length,
        length_at=lf.at,
        length_size=lf.size,
        length_order=lf.byte_order.value,
        length_adjust=lf.adjust,
        accept=accept,
        byte_ns=byte_ns,
    )
