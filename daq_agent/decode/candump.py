"""Parsing candump lines, as written by can-utils: the log format and the plain output.

The log format (``candump -l`` / ``-L``)::

    (1700000000.123456) can0 1F0#0102030405060708        classic frame, 11-bit id
    (1700000000.123456) can0 18FF50E5#0102               8 hex digits: 29-bit id
    (1700000000.123456) can0 1F0#R                       remote frame (optionally #R<len>)
    (1700000000.123456) can0 1F0##1<data>                CAN FD; the digit holds the FD flags
    (1700000000.123456) can0 20000080#0000000000000000   error frame (CAN_ERR_FLAG in the id)

The plain output of ``candump can0`` (what ``candump can0 | daq-agent decode ...`` reads)::

      can0  1F0   [8]  01 02 03 04 05 06 07 08          classic frame (``[%d]``)
      can0  1F0  [12]  01 02 ... 0C                     CAN FD (``[%02d]``: two digits)
      can0  1F0   [4]  remote request                   remote frame
      can0  20000080   [8]  00 00 00 00 00 00 00 00   ERRORFRAME
     (1700000000.123456)  can0  1F0   [8]  01 ...       ``-t a``: absolute time
     (000.000123)  can0  1F0   [8]  01 ...              ``-t d`` / ``-t z``: relative seconds
     (2023-11-14 22:13:20.123456)  can0  1F0   [8] ...  ``-t A``: local date and time
      can0  RX - -  1F0   [8]  01 ...                   ``-x``: direction and FD flags (B, E)

An ASCII column (``-a``: ``'....'``) after the data is ignored. A plain line without a timestamp
gets the host's time when it is parsed (live from a pipe, that is the time it was printed).

A bad line is counted with its line number and skipped; parsing never raises on input.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

from daq_agent.core.errors import DecodeError

__all__ = ["CandumpFrame", "CandumpParser", "parse_candump_line"]

_CAN_ERR_FLAG = 0x20000000
_FD_BRS = 0x01
_FD_ESI = 0x02
_FD_LENGTHS = frozenset({0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64})
_LINE = re.compile(
    r"^\((?P<sec>\d+)(?:\.(?P<frac>\d{1,9}))?\)\s+(?P<channel>\S+)\s+"
    r"(?P<id>[0-9A-Fa-f]{3}|[0-9A-Fa-f]{8})(?P<sep>##?)(?P<payload>\S*)(?:\s+[RT])?\s*$"
)
_HEX = re.compile(r"^(?:[0-9A-Fa-f]{2})*$")
_PLAIN = re.compile(
    r"^(?:\((?P<ts>[^)]*)\)\s+)?(?P<channel>\S+)\s+"
    r"(?:(?P<dir>TX|RX)\s+(?P<brs>[B-])\s+(?P<esi>[E-])\s+)?"
    r"(?P<id>[0-9A-Fa-f]{3}|[0-9A-Fa-f]{8})\s+\[(?P<len>\d{1,2})\](?P<rest>.*)$"
)
_SECONDS = re.compile(r"^(?P<sec>\d+)(?:\.(?P<frac>\d{1,9}))?$")
_DATE_TIME = re.compile(r"^(?P<date>\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})(?:\.(?P<frac>\d{1,9}))?$")
_HEX_BYTE = re.compile(r"^[0-9A-Fa-f]{2}$")


@dataclass(frozen=True, slots=True)
class CandumpFrame:
    """One frame of a candump log.

    Attributes:
        timestamp_ns: the logged time, nanoseconds since the Unix epoch.
        channel: the interface name in the log (``can0``).
        frame_id: the CAN id (for an error frame: the error class bits).
        is_extended: True when the log wrote the id with 8 hex digits.
        is_remote: a remote-transmission request (no data to decode).
        is_error: an error frame (never decoded as data).
        is_fd: a CAN FD frame.
        bitrate_switch: the FD BRS flag.
        error_state_indicator: the FD ESI flag.
        data: the payload (for a remote frame: empty).
        dlc: the requested length of a remote frame, else ``len(data)``.
    """

    timestamp_ns: int
    channel: str
    frame_id: int
    is_extended: bool
    data: bytes
    is_remote: bool = False
    is_error: bool = False
    is_fd: bool = False
    bitrate_switch: bool = False
    error_state_indicator: bool = False
    dlc: int = 0


def parse_candump_line(line: str, now_ns: int | None = None) -> CandumpFrame | None:
    """Parse one candump line, in the log format or candump's plain output.

    Args:
        line: the line.
        now_ns: the time given to a plain line without a timestamp (default: the host's time
            now).

    Returns:
        The frame, or None for a blank line or a ``#`` comment.

    Raises:
        DecodeError: the line is not a candump line (the message says why).
    """
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    match = _LINE.match(text)
    if match is None:
        if "[" in text:
            plain = _PLAIN.match(text)
            if plain is not None:
                return _parse_plain(plain, now_ns)
        raise DecodeError(f"not a candump log line: {_clip(text)!r}")
    fraction = match["frac"] or ""
    timestamp_ns = int(match["sec"]) * 1_000_000_000 + int(fraction.ljust(9, "0") or "0")
    raw_id = match["id"]
    frame_id = int(raw_id, 16)
    is_extended = len(raw_id) == 8
    payload = match["payload"]
    channel = match["channel"]
    if match["sep"] == "##":
        if not payload:
            raise DecodeError("CAN FD frame without its flags digit")
        flags = int(payload[0], 16) if payload[0] in "0123456789abcdefABCDEF" else -1
        if flags < 0:
            raise DecodeError(f"bad CAN FD flags {payload[0]!r}")
        data = _hex(payload[1:])
        if len(data) not in _FD_LENGTHS:
            raise DecodeError(f"{len(data)} bytes is not a CAN FD length")
        return CandumpFrame(
            timestamp_ns,
            channel,
            frame_id & 0x1FFFFFFF,
            is_extended,
            data,
            is_fd=True,
            bitrate_switch=bool(flags & _FD_BRS),
            error_state_indicator=bool(flags & _FD_ESI),
            dlc=len(data),
        )
    if payload[:1] in ("R", "r"):
        rest = payload[1:]
        if rest and not (len(rest) == 1 and rest.isdigit()):
            raise DecodeError(f"bad remote frame length {rest!r}")
        return CandumpFrame(
            timestamp_ns,
            channel,
            frame_id & 0x1FFFFFFF,
            is_extended,
            b"",
            is_remote=True,
            dlc=int(rest) if rest else 0,
        )
    if "_" in payload:  # classic frame with a DLC above 8 noted: 1122334455667788_E
        payload, _, dlc_code = payload.partition("_")
        if len(dlc_code) != 1 or dlc_code not in "9ABCDEFabcdef":
            raise DecodeError(f"bad DLC code {dlc_code!r}")
    data = _hex(payload)
    if len(data) > 8:
        raise DecodeError(f"{len(data)} bytes in a classic CAN frame")
    is_error = is_extended and bool(frame_id & _CAN_ERR_FLAG)
    return CandumpFrame(
        timestamp_ns,
        channel,
        frame_id & 0x1FFFFFFF,
        is_extended and not is_error,
        data,
        is_error=is_error,
        dlc=len(data),
    )


def _plain_timestamp(text: str | None, now_ns: int | None) -> int:
    if text is None:
        return time.time_ns() if now_ns is None else now_ns
    text = text.strip()
    seconds = _SECONDS.match(text)
    if seconds is not None:
        fraction = seconds["frac"] or ""
        return int(seconds["sec"]) * 1_000_000_000 + int(fraction.ljust(9, "0") or "0")
    dated = _DATE_TIME.match(text)
    if dated is not None:  # candump -t A prints local time
        whole = datetime.strptime(dated["date"], "%Y-%m-%d %H:%M:%S").timestamp()
        fraction = dated["frac"] or ""
        return int(whole) * 1_000_000_000 + int(fraction.ljust(9, "0") or "0")
    raise DecodeError(f"bad timestamp ({_clip(text)})")


def _parse_plain(match: re.Match[str], now_ns: int | None) -> CandumpFrame:
    timestamp_ns = _plain_timestamp(match["ts"], now_ns)
    raw_id = match["id"]
    frame_id = int(raw_id, 16)
    is_extended = len(raw_id) == 8
    length_text = match["len"]
    length = int(length_text)
    # candump prints a classic length as [%d] and a CAN FD one as [%02d]
    is_fd = len(length_text) == 2 or match["brs"] not in (None, "-") or length > 8
    rest = match["rest"].split()
    channel = match["channel"]
    if rest[:2] == ["remote", "request"] and len(rest) == 2:
        if is_fd or length > 8:
            raise DecodeError("a CAN FD frame cannot be a remote request")
        return CandumpFrame(
            timestamp_ns,
            channel,
            frame_id & 0x1FFFFFFF,
            is_extended,
            b"",
            is_remote=True,
            dlc=length,
        )
    count = 0
    while count < len(rest) and _HEX_BYTE.match(rest[count]):
        count += 1
    tail = rest[count:]
    if tail and not (tail[0].startswith("'") or tail[0] == "ERRORFRAME"):
        raise DecodeError(f"bad data {_clip(' '.join(tail))!r} after [{length_text}]")
    data = bytes(int(token, 16) for token in rest[:count])
    if len(data) != length:
        raise DecodeError(f"[{length_text}] but {len(data)} data bytes")
    if is_fd:
        if len(data) not in _FD_LENGTHS:
            raise DecodeError(f"{len(data)} bytes is not a CAN FD length")
        return CandumpFrame(
            timestamp_ns,
            channel,
            frame_id & 0x1FFFFFFF,
            is_extended,
            data,
            is_fd=True,
            bitrate_switch=match["brs"] == "B",
            error_state_indicator=match["esi"] == "E",
            dlc=len(data),
        )
    is_error = is_extended and bool(frame_id & _CAN_ERR_FLAG)
    return CandumpFrame(
        timestamp_ns,
        channel,
        frame_id & 0x1FFFFFFF,
        is_extended and not is_error,
        data,
        is_error=is_error,
        dlc=len(data),
    )


def _hex(text: str) -> bytes:
    if not _HEX.match(text):
        raise DecodeError(f"bad hex payload {_clip(text)!r}")
    return bytes.fromhex(text)


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(slots=True)
class CandumpParser:
    """Parses a stream of candump lines, counting what it skips.

    Attributes:
        lines: lines read.
        frames: frames parsed.
        bad: lines that are not candump log lines.
        bad_lines: ``(line number, reason)`` of the first ``keep_bad`` bad lines.
        keep_bad: how many bad lines to remember.
    """

    lines: int = 0
    frames: int = 0
    bad: int = 0
    bad_lines: list[tuple[int, str]] = field(default_factory=list)
    keep_bad: int = 100

    def parse(
        self,
        lines: Iterable[str | bytes],
        on_bad: Callable[[int, str], None] | None = None,
    ) -> Iterator[tuple[int, CandumpFrame]]:
        """Yield ``(line number, frame)`` for every frame in ``lines``; bad lines are counted.

        Args:
            lines: the log lines (text or bytes).
            on_bad: called with ``(line number, reason)`` for each bad line, as it is met.
        """
        for line in lines:
            self.lines += 1
            text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
            try:
                frame = parse_candump_line(text)
            except DecodeError as exc:
                self.bad += 1
                if len(self.bad_lines) < self.keep_bad:
                    self.bad_lines.append((self.lines, str(exc)))
                if on_bad is not None:
                    on_bad(self.lines, str(exc))
                continue
            if frame is None:
                continue
            self.frames += 1
            yield self.lines, frame
