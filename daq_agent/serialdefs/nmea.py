"""NMEA 0183 helpers: the sentence checksum and the NMEA-specific field types.

A sentence is ``$<address>,<field>,...*<hh>\\r\\n`` where ``hh`` is the XOR of every character
between ``$`` and ``*`` in hexadecimal. Field types beyond numbers and strings:

- ``lat`` / ``lon``: ``ddmm.mmmm`` / ``dddmm.mmmm`` followed by a hemisphere field (N/S, E/W),
  decoded to signed decimal degrees (south and west negative);
- ``time``: ``hhmmss.sss`` UTC, decoded to seconds since midnight;
- ``date``: ``ddmmyy``, decoded to an ISO date string ``YYYY-MM-DD`` (years 80-99 are 19xx).
"""

from __future__ import annotations

import functools
import operator

from daq_agent.core.sample import Value

__all__ = ["nmea_checksum", "parse_nmea_field", "render_nmea_field"]


def nmea_checksum(body: str) -> int:
    """The XOR of the characters of ``body`` (the text between ``$`` and ``*``)."""
    return functools.reduce(operator.xor, body.encode("ascii", errors="replace"), 0)


def parse_nmea_field(kind: str, text: str) -> Value:
    """Decode one NMEA-specific field.

    Args:
        kind: ``lat``, ``lon`` (text is ``value,hemisphere``), ``time`` or ``date``.
        text: the field text.

    Returns:
        Degrees, seconds since midnight, an ISO date string, or None for an empty field.

    Raises:
        ValueError: the text is not a valid field of that kind.
    """
    if kind in ("lat", "lon"):
        value, _, hemisphere = text.partition(",")
        if not value:
            return None
        number = float(value)
        degrees = int(number // 100)
        result = degrees + (number - degrees * 100) / 60.0
        hemisphere = hemisphere.strip().upper()
        if hemisphere in ("S", "W"):
            return -result
        if hemisphere not in ("N", "E", ""):
            raise ValueError(f"bad hemisphere {hemisphere!r}")
        return result
    if kind == "time":
        if len(text) < 6:
            raise ValueError(f"bad NMEA time {text!r}")
        hours, minutes, seconds = int(text[0:2]), int(text[2:4]), float(text[4:])
        if hours > 23 or minutes > 59 or seconds >= 61:
            raise ValueError(f"bad NMEA time {text!r}")
        return hours * 3600 + minutes * 60 + seconds
    if kind == "date":
        if len(text) != 6 or not text.isdigit():
            raise ValueError(f"bad NMEA date {text!r}")
        day, month, year = int(text[0:2]), int(text[2:4]), int(text[4:6])
        if not (1 <= day <= 31 and 1 <= month <= 12):
            raise ValueError(f"bad NMEA date {text!r}")
        year += 1900 if year >= 80 else 2000
        return f"{year:04d}-{month:02d}-{day:02d}"
    raise ValueError(f"not an NMEA field type: {kind!r}")


def render_nmea_field(kind: str, value: Value) -> list[str]:
    """Encode one NMEA-specific field (the inverse of :func:`parse_nmea_field`).

    Returns:
        The NMEA fields it occupies (two for ``lat``/``lon``).

    Raises:
        ValueError: the value cannot be rendered as that kind.
    """
    if kind in ("lat", "lon"):
        if value is None:
            return ["", ""]
        if isinstance(value, str | bytes):
            raise ValueError(f"{kind}: expected degrees, got {value!r}")
        number = float(value)
        hemisphere = (
            ("N" if number >= 0 else "S") if kind == "lat" else ("E" if number >= 0 else "W")
        )
        number = abs(number)
        degrees = int(number)
        minutes = round((number - degrees) * 60.0, 7)
        if minutes >= 60.0:
            degrees, minutes = degrees + 1, 0.0
        width = 2 if kind == "lat" else 3
        return [f"{degrees:0{width}d}{minutes:010.7f}", hemisphere]
    if value is None:
        return [""]
    if kind == "time":
        if isinstance(value, str | bytes):
            raise ValueError(f"time: expected seconds, got {value!r}")
        total = round(float(value), 3) % 86_400.0
        hours = int(total // 3600)
        minutes = int((total - hours * 3600) // 60)
        seconds = total - hours * 3600 - minutes * 60
        return [f"{hours:02d}{minutes:02d}{seconds:06.3f}"]
    if kind == "date":
        text = str(value)
        year, month, day = text.split("-")
        return [f"{int(day):02d}{int(month):02d}{int(year) % 100:02d}"]
    raise ValueError(f"not an NMEA field type: {kind!r}")
