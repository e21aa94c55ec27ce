"""Load and validate serial frame definitions (YAML) into :class:`SerialDefinitions`.

Every problem raises :class:`~daq_agent.core.errors.ConfigError` naming the file, the line, the key
path (``frames[1].fields[3].scale``) and the reason, for example::

    configs/serial/imu.yaml:27: frames[0].fields[4].type: unknown value 'uint12' (expected ...)
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

from daq_agent.core.errors import ConfigError
from daq_agent.core.yamlfile import line_for, parse_yaml, read_text
from daq_agent.serialdefs.model import (
    BINARY_FIELD_TYPES,
    FIXED_SIZE_TYPES,
    STRUCT_INTEGER_TYPES,
    TEXT_FIELD_TYPES,
    TIMESTAMP_PARTS,
    BitDef,
    ByteOrder,
    ChecksumDef,
    ChecksumKind,
    DiscriminatorDef,
    FieldDef,
    FormatKind,
    FrameDef,
    FramingDef,
    FramingKind,
    LengthFieldDef,
    SerialDefinitions,
    TimestampDef,
    ValueTable,
)

__all__ = ["load_definitions", "loads_definitions", "parse_definitions"]

_INTEGER_TYPES: Final = frozenset(n for n in FIXED_SIZE_TYPES if "int" in n)
_WORD_TYPES: Final = frozenset({"int32", "uint32", "float32", "int64", "uint64", "float64"})
_COUNT_TYPES: Final = frozenset(
    {"int8", "uint8", "int16", "uint16", "int24", "uint24", "int32", "uint32", "int", "uint"}
)
_NMEA_ONLY: Final = frozenset({"lat", "lon", "time", "date", "skip", "talker"})
_UNITS_NS: Final = {
    "s": 1_000_000_000,
    "ms": 1_000_000,
    "us": 1_000,
    "µs": 1_000,
    "ns": 1,
}
_NAMED_EPOCHS: Final = {
    "unix": 0,
    "gps": 315_964_800_000_000_000,  # 1980-01-06T00:00:00Z (no leap-second correction)
}
_NAME_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_TOP_KEYS: Final = frozenset(
    {
        "version",
        "name",
        "description",
        "format",
        "framing",
        "checksum",
        "byte_order",
        "word_order",
        "discriminator",
        "timestamp",
        "delimiter",
        "pair_separator",
        "kv_separator",
        "require_checksum",
        "text_encoding",
        "frames",
    }
)


def load_definitions(path: str | Path) -> SerialDefinitions:
    """Load a definition file.

    Args:
        path: the YAML file.

    Returns:
        The validated definitions.

    Raises:
        ConfigError: the file cannot be read, is not YAML, or is invalid (names file, line, key).
    """
    return loads_definitions(read_text(path), source=str(path))


def loads_definitions(text: str, *, source: str = "<string>") -> SerialDefinitions:
    """Load definitions from YAML text.

    Args:
        text: the YAML document.
        source: the name used in error messages.

    Returns:
        The validated definitions.

    Raises:
        ConfigError: the text is not YAML or is invalid (names source, line, key).
    """
    document, lines = parse_yaml(text, source)
    try:
        return parse_definitions(document, source=source, lines=lines)
    except ConfigError as exc:
        if exc.source is not None:
            raise
        line = line_for(exc.key or "", lines)
        raise ConfigError(exc.reason, source=source, key=exc.key, line=line) from None


def parse_definitions(
    document: object, *, source: str = "", lines: Mapping[str, int] | None = None
) -> SerialDefinitions:
    """Validate a parsed document (the YAML layout) into definitions.

    Args:
        document: the parsed YAML/JSON document.
        source: recorded as the definitions' source.
        lines: key path → line, used for frame line numbers.

    Returns:
        The validated definitions.

    Raises:
        ConfigError: naming the key path of the first problem (no source: the caller adds it).
    """
    return _Parser(lines or {}).parse(document, source)


# -- line index ----------------------------------------------------------------------------------


# -- validation ----------------------------------------------------------------------------------


def _join(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else key


def _mapping(raw: object, where: str, allowed: frozenset[str] | set[str]) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"must be a mapping, not {_type_name(raw)}", key=where or "<document>")
    for key in raw:
        if key not in allowed:
            raise ConfigError(
                f"unknown key (expected one of {', '.join(sorted(allowed))})",
                key=_join(where, str(key)),
            )
    return raw


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _str(raw: Mapping[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = raw.get(key)
    if value is None:
        if default is None:
            raise ConfigError("is required", key=_join(where, key))
        return default
    if not isinstance(value, str):
        raise ConfigError(f"must be a string, not {_type_name(value)}", key=_join(where, key))
    return value


def _int(
    raw: Mapping[str, Any],
    key: str,
    where: str,
    default: int | None = None,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int:
    value = raw.get(key)
    if value is None:
        if default is None:
            raise ConfigError("is required", key=_join(where, key))
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"must be an integer, not {_type_name(value)}", key=_join(where, key))
    if minimum is not None and value < minimum:
        raise ConfigError(f"must be >= {minimum}, got {value}", key=_join(where, key))
    if maximum is not None and value > maximum:
        raise ConfigError(f"must be <= {maximum}, got {value}", key=_join(where, key))
    return value


def _opt_int(
    raw: Mapping[str, Any], key: str, where: str, *, minimum: int | None = None
) -> int | None:
    if raw.get(key) is None:
        return None
    return _int(raw, key, where, minimum=minimum)


def _float(raw: Mapping[str, Any], key: str, where: str, default: float | None) -> float | None:
    value = raw.get(key)
    if value is None:
        return default
    if isinstance(value, str):
        # YAML 1.1 reads 1e-7 (no dot) as a string; accept what is clearly a number
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"must be a number, not {value!r}", key=_join(where, key)) from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"must be a number, not {_type_name(value)}", key=_join(where, key))
    if not math.isfinite(value):
        raise ConfigError("must be a finite number", key=_join(where, key))
    return float(value)


def _bool(raw: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
    value = raw.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError("must be true or false", key=_join(where, key))
    return value


def _choice(raw: Mapping[str, Any], key: str, where: str, choices: Any, default: str | None) -> str:
    value = _str(raw, key, where, default)
    allowed = [str(c) for c in choices]
    if value not in allowed:
        raise ConfigError(
            f"unknown value {value!r} (expected one of {', '.join(sorted(allowed))})",
            key=_join(where, key),
        )
    return value


def _list(raw: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = raw.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"must be a list, not {_type_name(value)}", key=_join(where, key))
    return value


def _bytes(raw: Mapping[str, Any], key: str, where: str, default: bytes) -> bytes:
    """Bytes from a hex string (``"B5 62"``, ``"0xB562"``) or a list of integers."""
    value = raw.get(key)
    if value is None:
        return default
    at = _join(where, key)
    if isinstance(value, list):
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value):
            raise ConfigError("must be a list of byte values 0..255", key=at)
        return bytes(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 255:
        return bytes([value])
    if not isinstance(value, str):
        raise ConfigError("must be a hex string like 'B5 62' or a list of bytes", key=at)
    text = value.replace(" ", "").replace(",", "")
    text = text.removeprefix("0x").removeprefix("0X")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"not a hex byte string: {value!r}", key=at) from None


def _name(raw: Mapping[str, Any], where: str) -> str:
    name = _str(raw, "name", where)
    if not _NAME_RE.match(name):
        raise ConfigError(
            f"invalid name {name!r} (letters, digits, '_', '.', '-'; not starting with a digit)",
            key=_join(where, "name"),
        )
    return name


class _Parser:
    __slots__ = ("_format", "_lines", "_word_order")

    def __init__(self, lines: Mapping[str, int]) -> None:
        self._lines = lines
        self._format = FormatKind.BINARY
        self._word_order: ByteOrder | None = None

    def parse(self, document: object, source: str) -> SerialDefinitions:
        top = _mapping(document, "", _TOP_KEYS)
        version = _int(top, "version", "", 1)
        if version != 1:
            raise ConfigError(f"unsupported version {version} (expected 1)", key="version")
        fmt = FormatKind(_choice(top, "format", "", [k.value for k in FormatKind], None))
        self._format = fmt
        byte_order = ByteOrder(_choice(top, "byte_order", "", ["little", "big"], "little"))
        if top.get("word_order") is not None:
            if fmt is not FormatKind.BINARY:
                raise ConfigError("only for the binary format", key="word_order")
            self._word_order = ByteOrder(_choice(top, "word_order", "", ["little", "big"], None))
        framing = self._framing(top.get("framing"), fmt)
        checksum = self._checksum(top.get("checksum"), fmt)
        discriminator = self._discriminator(top.get("discriminator"), fmt, byte_order)
        header_end = self._header_end(framing, discriminator)
        raw_frames = _list(top, "frames", "")
        if not raw_frames:
            raise ConfigError("at least one frame type is required", key="frames")
        frames = tuple(
            self._frame(raw, f"frames[{i}]", fmt, byte_order, header_end, discriminator, framing)
            for i, raw in enumerate(raw_frames)
        )
        self._check_frames(frames, fmt, discriminator)
        if checksum is not None:
            self._check_checksum(checksum, frames, framing)
        timestamp = self._timestamp(top.get("timestamp"), frames)
        delimiter = _str(top, "delimiter", "", ",")
        if fmt is FormatKind.CSV and not delimiter:
            raise ConfigError("must not be empty", key="delimiter")
        pair_sep = top.get("pair_separator")
        if pair_sep is not None and (not isinstance(pair_sep, str) or not pair_sep):
            raise ConfigError(
                "must be a non-empty string (omit for whitespace)", key="pair_separator"
            )
        kv_sep = _str(top, "kv_separator", "", "=")
        if not kv_sep:
            raise ConfigError("must not be empty", key="kv_separator")
        text_encoding = _str(top, "text_encoding", "", "ascii")
        try:
            "".encode(text_encoding)
        except LookupError:
            raise ConfigError(
                f"unknown text encoding {text_encoding!r}", key="text_encoding"
            ) from None
        return SerialDefinitions(
            name=_str(top, "name", "", Path(source).stem if source else "serial"),
            description=_str(top, "description", "", ""),
            format=fmt,
            framing=framing,
            frames=frames,
            checksum=checksum,
            discriminator=discriminator,
            timestamp=timestamp,
            delimiter=delimiter,
            pair_separator=pair_sep,
            kv_separator=kv_sep,
            require_checksum=_bool(top, "require_checksum", "", True),
            text_encoding=text_encoding,
            source=source,
        )

    # -- framing, checksum, discriminator --------------------------------------------------------

    def _framing(self, raw: object, fmt: FormatKind) -> FramingDef:
        where = "framing"
        if raw is None:
            if fmt is FormatKind.BINARY:
                raise ConfigError("is required for the binary format", key=where)
            raw = {"kind": "line"}
        spec = _mapping(
            raw, where, {"kind", "max_length", "terminator", "sync", "length", "length_field"}
        )
        kind = FramingKind(_choice(spec, "kind", where, [k.value for k in FramingKind], None))
        if fmt.is_text and kind is not FramingKind.LINE:
            raise ConfigError(f"text format {fmt.value!r} needs line framing", key=f"{where}.kind")
        if not fmt.is_text and kind is FramingKind.LINE:
            raise ConfigError("line framing is for text formats", key=f"{where}.kind")
        max_length = _int(spec, "max_length", where, 1024, minimum=1, maximum=1 << 20)
        terminator = b"\n"
        if kind is FramingKind.LINE:
            default_term = "\r\n" if fmt is FormatKind.NMEA else "\n"
            term = spec.get("terminator", default_term)
            if isinstance(term, str):
                terminator = term.encode("latin-1", errors="replace")
            else:
                terminator = _bytes(spec, "terminator", where, b"\n")
            if not terminator:
                raise ConfigError("must not be empty", key=f"{where}.terminator")
            if fmt is FormatKind.NMEA and terminator not in (b"\r\n", b"\n", b"\r"):
                raise ConfigError(
                    "NMEA sentences end with CR LF, LF or CR (all three are accepted; omit it)",
                    key=f"{where}.terminator",
                )
        sync = _bytes(spec, "sync", where, b"")
        length = 0
        length_field = None
        if kind is FramingKind.FIXED:
            length = _int(spec, "length", where, minimum=1, maximum=max_length)
            if len(sync) > length:
                raise ConfigError("sync is longer than the frame", key=f"{where}.sync")
        elif spec.get("length") is not None:
            raise ConfigError("only for fixed framing", key=f"{where}.length")
        if kind is FramingKind.SYNC_LENGTH:
            if not sync:
                raise ConfigError("sync_length framing needs sync bytes", key=f"{where}.sync")
            at = f"{where}.length_field"
            lf = _mapping(spec.get("length_field"), at, {"at", "type", "byte_order", "adjust"})
            length_field = LengthFieldDef(
                at=_int(lf, "at", at, minimum=0),
                type=_choice(lf, "type", at, ["uint8", "uint16", "uint32"], "uint8"),
                byte_order=ByteOrder(_choice(lf, "byte_order", at, ["little", "big"], "little")),
                adjust=_int(lf, "adjust", at, 0),
            )
            if length_field.at + length_field.size > max_length:
                raise ConfigError("length field lies beyond max_length", key=f"{at}.at")
        elif spec.get("length_field") is not None:
            raise ConfigError("only for sync_length framing", key=f"{where}.length_field")
        if sync and kind not in (FramingKind.FIXED, FramingKind.SYNC_LENGTH):
            raise ConfigError(
                "sync bytes are for fixed or sync_length framing", key=f"{where}.sync"
            )
        return FramingDef(
            kind=kind,
            max_length=max_length,
            terminator=terminator,
            sync=sync,
            length=length,
            length_field=length_field,
        )

    def _checksum(self, raw: object, fmt: FormatKind) -> ChecksumDef | None:
        where = "checksum"
        if raw is None:
            return None
        if fmt is not FormatKind.BINARY:
            raise ConfigError(
                "only for the binary format (NMEA verifies its own checksum)", key=where
            )
        spec = _mapping(
            raw,
            where,
            {"kind", "at", "span", "byte_order", "poly", "init", "reflect", "xorout"},
        )
        kind = ChecksumKind(_choice(spec, "kind", where, [k.value for k in ChecksumKind], None))
        default_order = "little" if kind is ChecksumKind.CRC16_MODBUS else "big"
        poly = init = xorout = 0
        reflect = False
        if kind is ChecksumKind.CRC:
            poly = _int(spec, "poly", where, minimum=0x100)
            width = poly.bit_length() - 1
            if width not in (8, 16, 24, 32, 64):
                raise ConfigError(
                    f"a {width}-bit polynomial (give it with its top bit, e.g. 0x11021 for "
                    "CRC-16; widths 8, 16, 24, 32, 64)",
                    key=f"{where}.poly",
                )
            init = _int(spec, "init", where, 0, minimum=0, maximum=(1 << width) - 1)
            xorout = _int(spec, "xorout", where, 0, minimum=0, maximum=(1 << width) - 1)
            reflect = _bool(spec, "reflect", where, False)
        else:
            for key in ("poly", "init", "reflect", "xorout"):
                if spec.get(key) is not None:
                    raise ConfigError("only for kind: crc", key=f"{where}.{key}")
        if kind is ChecksumKind.FLETCHER8 and spec.get("byte_order") is not None:
            raise ConfigError(
                "fletcher8 is always stored CK_A then CK_B", key=f"{where}.byte_order"
            )
        start, end = 0, None
        span = spec.get("span")
        if span is not None:
            at = f"{where}.span"
            sp = _mapping(span, at, {"start", "end"})
            start = _int(sp, "start", at, 0)
            end = _opt_int(sp, "end", at)
        return ChecksumDef(
            kind=kind,
            at=_opt_int(spec, "at", where),
            start=start,
            end=end,
            byte_order=ByteOrder(
                _choice(spec, "byte_order", where, ["little", "big"], default_order)
            ),
            poly=poly,
            init=init,
            reflect=reflect,
            xorout=xorout,
        )

    def _discriminator(
        self, raw: object, fmt: FormatKind, byte_order: ByteOrder
    ) -> DiscriminatorDef | None:
        where = "discriminator"
        if raw is None:
            return None
        if fmt is FormatKind.BINARY:
            spec = _mapping(raw, where, {"at", "type", "byte_order"})
            kind = _choice(spec, "type", where, sorted(STRUCT_INTEGER_TYPES), "uint8")
            return DiscriminatorDef(
                at=_int(spec, "at", where, minimum=0),
                type=kind,
                byte_order=ByteOrder(
                    _choice(spec, "byte_order", where, ["little", "big"], byte_order.value)
                ),
            )
        if fmt is FormatKind.CSV:
            spec = _mapping(raw, where, {"column"})
            return DiscriminatorDef(at=_int(spec, "column", where, minimum=0))
        if fmt is FormatKind.KEY_VALUE:
            spec = _mapping(raw, where, {"key"})
            return DiscriminatorDef(key=_str(spec, "key", where))
        raise ConfigError(
            f"not used by the {fmt.value} format (frames are selected by "
            + ("sentence id)" if fmt is FormatKind.NMEA else "pattern)"),
            key=where,
        )

    @staticmethod
    def _header_end(framing: FramingDef, disc: DiscriminatorDef | None) -> int:
        end = len(framing.sync)
        if framing.length_field is not None:
            end = max(end, framing.length_field.at + framing.length_field.size)
        if disc is not None and not disc.key:
            end = max(end, disc.at + FIXED_SIZE_TYPES[disc.type][1])
        return end

    # -- frames and fields ---------------------------------------------------------------------

    def _frame(
        self,
        raw: object,
        where: str,
        fmt: FormatKind,
        byte_order: ByteOrder,
        header_end: int,
        disc: DiscriminatorDef | None,
        framing: FramingDef,
    ) -> FrameDef:
        spec = _mapping(
            raw,
            where,
            {"name", "id", "description", "length", "fields", "pattern", "render", "rate"},
        )
        name = _name(spec, where)
        frame_id = spec.get("id")
        if frame_id is not None:
            if fmt is FormatKind.BINARY and (
                isinstance(frame_id, bool) or not isinstance(frame_id, int)
            ):
                raise ConfigError("must be an integer", key=f"{where}.id")
            if fmt.is_text and (isinstance(frame_id, bool) or not isinstance(frame_id, str | int)):
                raise ConfigError("must be a string", key=f"{where}.id")
            if fmt.is_text:
                frame_id = str(frame_id)
        if fmt is FormatKind.BINARY and disc is not None:
            bits = FIXED_SIZE_TYPES[disc.type][1] * 8
            signed = not disc.type.startswith("u")
            lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
            if frame_id is None:
                raise ConfigError("is required (the discriminator value)", key=f"{where}.id")
            assert isinstance(frame_id, int)
            if not lo <= frame_id <= hi:
                raise ConfigError(
                    f"does not fit the discriminator's {disc.type}", key=f"{where}.id"
                )
        if fmt is FormatKind.NMEA and frame_id is None:
            raise ConfigError("is required (the sentence id, like GGA or GPGGA)", key=f"{where}.id")
        pattern = _str(spec, "pattern", where, "")
        render = _str(spec, "render", where, "")
        group_names: set[str] = set()
        if fmt is FormatKind.REGEX:
            if not pattern:
                raise ConfigError("is required for the regex format", key=f"{where}.pattern")
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                raise ConfigError(
                    f"invalid regular expression: {exc}", key=f"{where}.pattern"
                ) from None
            group_names = set(compiled.groupindex)
        elif pattern or render:
            raise ConfigError(
                "only for the regex format", key=f"{where}.{'pattern' if pattern else 'render'}"
            )
        length = _opt_int(spec, "length", where, minimum=1)
        if length is not None and fmt is not FormatKind.BINARY:
            raise ConfigError("only for the binary format", key=f"{where}.length")
        raw_fields = _list(spec, "fields", where)
        if not raw_fields:
            raise ConfigError("a frame needs at least one field", key=f"{where}.fields")
        fields: list[FieldDef] = []
        if fmt is FormatKind.BINARY:
            cursor = header_end
        elif fmt is FormatKind.NMEA:
            cursor = 1
        else:
            cursor = 0
        skip_column = disc.at if fmt is FormatKind.CSV and disc is not None else None
        for j, raw_field in enumerate(raw_fields):
            at = f"{where}.fields[{j}]"
            if fmt is FormatKind.CSV and skip_column is not None and cursor == skip_column:
                cursor += 1
            if isinstance(raw_field, Mapping) and raw_field.get("type") == "group":
                members, cursor = self._group(raw_field, at, fmt, byte_order, cursor)
                for item in members:
                    end = item.at + item.width
                    limit = length if length is not None else framing.max_length
                    if fmt is FormatKind.BINARY and end > limit:
                        raise ConfigError(
                            f"{item.name} ends at byte {end}, beyond the frame ({limit} bytes)",
                            key=at,
                        )
                fields.extend(members)
                continue
            item = self._field(raw_field, at, fmt, byte_order, cursor)
            if fmt in (FormatKind.BINARY, FormatKind.CSV, FormatKind.NMEA) and item.extent(
                fmt.is_text
            ):
                cursor = item.at + item.extent(fmt.is_text)
            if fmt is FormatKind.REGEX and item.key not in group_names:
                raise ConfigError(f"the pattern has no group named {item.key!r}", key=f"{at}.name")
            if fmt is FormatKind.BINARY:
                end = item.at + item.width
                limit = length if length is not None else framing.max_length
                if end > limit:
                    raise ConfigError(
                        f"ends at byte {end}, beyond the frame ({limit} bytes)", key=at
                    )
            fields.append(item)
        by_name = {f.name: f for f in fields}
        for j, item in enumerate(fields):
            if item.group_count:
                counter = by_name.get(item.group_count)
                if (
                    counter is None
                    or counter.group
                    or counter.bits
                    or counter.type not in _COUNT_TYPES
                ):
                    raise ConfigError(
                        f"no integer field named {item.group_count!r} before the group",
                        key=f"{where}.fields.count",
                    )
            if item.sign_field:
                other = by_name.get(item.sign_field)
                if other is None or other is item or other.columns != 1:
                    raise ConfigError(
                        f"no other one-column field named {item.sign_field!r} in this frame",
                        key=f"{where}.fields[{j}].sign.field",
                    )
        names: set[str] = set()
        for j, item in enumerate(fields):
            for channel in (b.name for b in item.bits) if item.bits else (item.name,):
                if item.type == "skip":
                    continue
                if channel in names:
                    raise ConfigError(
                        f"duplicate channel name {channel!r}", key=f"{where}.fields[{j}]"
                    )
                names.add(channel)
        if fmt is FormatKind.BINARY and framing.kind is FramingKind.FIXED:
            if length is not None and length != framing.length:
                raise ConfigError(
                    f"differs from the fixed framing length {framing.length}", key=f"{where}.length"
                )
            extent = max(f.at + f.width for f in fields)
            if extent > framing.length:
                raise ConfigError(
                    f"fields extend to byte {extent}, beyond the fixed length {framing.length}",
                    key=f"{where}.fields",
                )
        rate = _float(spec, "rate", where, None)
        if rate is not None and rate <= 0:
            raise ConfigError(f"must be > 0, got {rate}", key=f"{where}.rate")
        return FrameDef(
            name=name,
            id=frame_id,
            rate=rate,
            fields=tuple(fields),
            description=_str(spec, "description", where, ""),
            length=length,
            pattern=pattern,
            render=render,
            line=self._lines.get(where),
        )

    def _field(
        self, raw: object, where: str, fmt: FormatKind, byte_order: ByteOrder, cursor: int
    ) -> FieldDef:
        allowed = {
            "name",
            "type",
            "scale",
            "offset",
            "unit",
            "description",
            "values",
            "bits",
            "min",
            "max",
        }
        if fmt is FormatKind.BINARY:
            allowed |= {"at", "size", "byte_order", "word_order"}
        elif fmt is FormatKind.CSV:
            allowed |= {"column", "sign"}
        elif fmt is FormatKind.NMEA:
            allowed |= {"index", "sign"}
        elif fmt is FormatKind.KEY_VALUE:
            allowed.add("key")
        elif fmt is FormatKind.REGEX:
            allowed.add("group")
        spec = _mapping(raw, where, allowed)
        types = BINARY_FIELD_TYPES if fmt is FormatKind.BINARY else TEXT_FIELD_TYPES
        if fmt.is_text and fmt is not FormatKind.NMEA:
            types = types - _NMEA_ONLY
        kind = _choice(spec, "type", where, sorted(types), None)
        name = _name(spec, where) if kind != "skip" else _str(spec, "name", where, "_skip")
        position = {
            FormatKind.BINARY: "at",
            FormatKind.CSV: "column",
            FormatKind.NMEA: "index",
        }.get(fmt)
        if kind == "talker":
            if spec.get("index") is not None:
                raise ConfigError(
                    "the talker is part of the address, not a field", key=f"{where}.index"
                )
            at = 0
        else:
            at = (
                _int(spec, position, where, cursor, minimum=0 if fmt is not FormatKind.NMEA else 1)
                if position
                else 0
            )
        key = ""
        if fmt is FormatKind.KEY_VALUE:
            key = _str(spec, "key", where, name)
        elif fmt is FormatKind.REGEX:
            key = _str(spec, "group", where, name)
        size = 0
        if fmt is FormatKind.BINARY:
            if kind in ("string", "bytes"):
                size = _int(spec, "size", where, minimum=1, maximum=1 << 16)
            elif spec.get("size") is not None:
                raise ConfigError(
                    f"only for string and bytes (a {kind} has a fixed size)", key=f"{where}.size"
                )
        order = ByteOrder(_choice(spec, "byte_order", where, ["little", "big"], byte_order.value))
        word_order: ByteOrder | None = None
        if spec.get("word_order") is not None or (
            self._word_order is not None and kind in _WORD_TYPES
        ):
            if kind not in _WORD_TYPES:
                raise ConfigError(
                    f"only for 32- and 64-bit types, not {kind}", key=f"{where}.word_order"
                )
            default_words = self._word_order.value if self._word_order else order.value
            word_order = ByteOrder(
                _choice(spec, "word_order", where, ["little", "big"], default_words)
            )
            if word_order is order:
                word_order = None  # the plain layout
        scale = _float(spec, "scale", where, 1.0)
        offset = _float(spec, "offset", where, 0.0)
        assert scale is not None
        assert offset is not None
        if scale == 0:
            raise ConfigError("must not be 0", key=f"{where}.scale")
        numeric = kind in FIXED_SIZE_TYPES or kind in ("int", "uint", "float")
        if (scale != 1.0 or offset != 0.0) and not numeric:
            raise ConfigError(f"scale/offset need a numeric type, not {kind}", key=f"{where}.scale")
        integer = kind in _INTEGER_TYPES or kind in ("int", "uint")
        values = self._values(spec, f"{where}.values", integer)
        if values and (scale != 1.0 or offset != 0.0):
            raise ConfigError("a field with a value table cannot be scaled", key=f"{where}.values")
        if values and not integer and kind != "string":
            raise ConfigError(
                f"value tables need an integer or string type, not {kind}", key=f"{where}.values"
            )
        bits = tuple(
            self._bit(b, f"{where}.bits[{k}]", kind, fmt)
            for k, b in enumerate(_list(spec, "bits", where))
        )
        if bits and (values or scale != 1.0 or offset != 0.0):
            raise ConfigError(
                "a field split into bits has no scale, offset or values itself", key=f"{where}.bits"
            )
        minimum = _float(spec, "min", where, None)
        maximum = _float(spec, "max", where, None)
        if minimum is not None and maximum is not None and minimum > maximum:
            raise ConfigError(f"min {minimum} is greater than max {maximum}", key=f"{where}.min")
        sign_field, negative, positive = "", (), ""
        if spec.get("sign") is not None:
            at_sign = f"{where}.sign"
            if not numeric or values or bits:
                raise ConfigError(f"a sign needs a plain numeric field, not {kind}", key=at_sign)
            sign = _mapping(spec["sign"], at_sign, {"field", "negative", "positive"})
            sign_field = _str(sign, "field", at_sign)
            raw_negative = sign.get("negative", ["W", "S"])
            if isinstance(raw_negative, str):
                raw_negative = [raw_negative]
            if (
                not isinstance(raw_negative, list)
                or not raw_negative
                or not all(isinstance(n, str) and n for n in raw_negative)
            ):
                raise ConfigError("must be a text or a list of texts", key=f"{at_sign}.negative")
            negative = tuple(raw_negative)
            positive = _str(sign, "positive", at_sign, "")
        return FieldDef(
            name=name,
            type=kind,
            at=at,
            key=key,
            size=size,
            byte_order=order,
            word_order=word_order,
            scale=scale,
            offset=offset,
            unit=_str(spec, "unit", where, ""),
            description=_str(spec, "description", where, ""),
            values=values,
            bits=bits,
            sign_field=sign_field,
            sign_negative=negative,
            sign_positive=positive,
            minimum=minimum,
            maximum=maximum,
        )

    def _group(
        self,
        raw: Mapping[str, Any],
        where: str,
        fmt: FormatKind,
        byte_order: ByteOrder,
        cursor: int,
    ) -> tuple[list[FieldDef], int]:
        """A repeated group, expanded into its instances' fields (``sat1_prn``, ``sat2_prn``…);
        returns them and the position after the last instance."""
        if fmt not in (FormatKind.BINARY, FormatKind.CSV, FormatKind.NMEA):
            raise ConfigError(f"repeated groups are not for the {fmt.value} format", key=where)
        spec = _mapping(
            raw,
            where,
            {"name", "type", "repeat", "count", "fields", "description", "at", "index", "column"},
        )
        name = _name(spec, where)
        repeat = _int(spec, "repeat", where, minimum=1, maximum=256)
        count = _str(spec, "count", where, "")
        position = {FormatKind.BINARY: "at", FormatKind.CSV: "column", FormatKind.NMEA: "index"}[
            fmt
        ]
        for key in ("at", "index", "column"):
            if key != position and spec.get(key) is not None:
                raise ConfigError(f"not for the {fmt.value} format", key=f"{where}.{key}")
        start = _int(spec, position, where, cursor, minimum=0)
        raw_members = _list(spec, "fields", where)
        if not raw_members:
            raise ConfigError("a group needs at least one field", key=f"{where}.fields")
        first: list[FieldDef] = []
        inner = start
        for k, raw_member in enumerate(raw_members):
            at = f"{where}.fields[{k}]"
            if isinstance(raw_member, Mapping) and raw_member.get("type") in ("group", "talker"):
                raise ConfigError("not inside a group", key=f"{at}.type")
            item = self._field(raw_member, at, fmt, byte_order, inner)
            if item.sign_field:
                raise ConfigError("not inside a group", key=f"{at}.sign")
            inner = item.at + item.extent(fmt.is_text)
            first.append(item)
        stride = max(f.at + f.extent(fmt.is_text) for f in first) - start
        members = [
            replace(
                item,
                name=f"{name}{i + 1}_{item.name}",
                at=item.at + i * stride,
                group=name,
                group_index=i,
                group_count=count,
            )
            for i in range(repeat)
            for item in first
        ]
        return members, start + repeat * stride

    def _bit(self, raw: object, where: str, container: str, fmt: FormatKind) -> BitDef:
        if container in FIXED_SIZE_TYPES and container in _INTEGER_TYPES:
            width = FIXED_SIZE_TYPES[container][1] * 8
        elif container in ("int", "uint"):
            width = 64
        else:
            raise ConfigError(f"bits need an integer field, not {container}", key=where)
        spec = _mapping(
            raw,
            where,
            {
                "name",
                "start",
                "length",
                "scale",
                "offset",
                "unit",
                "description",
                "values",
                "min",
                "max",
            },
        )
        start = _int(spec, "start", where, minimum=0, maximum=width - 1)
        length = _int(spec, "length", where, 1, minimum=1, maximum=64)
        if start + length > width:
            raise ConfigError(
                f"bits {start}..{start + length - 1} exceed the {width}-bit field",
                key=f"{where}.length",
            )
        scale = _float(spec, "scale", where, 1.0)
        offset = _float(spec, "offset", where, 0.0)
        assert scale is not None
        assert offset is not None
        if scale == 0:
            raise ConfigError("must not be 0", key=f"{where}.scale")
        values = self._values(spec, f"{where}.values", True)
        if values and (scale != 1.0 or offset != 0.0):
            raise ConfigError("a value table cannot be scaled", key=f"{where}.values")
        for raw_key, _ in values:
            assert isinstance(raw_key, int)
            if not 0 <= raw_key < (1 << length):
                raise ConfigError(
                    f"value {raw_key} does not fit {length} bits", key=f"{where}.values"
                )
        return BitDef(
            name=_name(spec, where),
            start=start,
            length=length,
            scale=scale,
            offset=offset,
            unit=_str(spec, "unit", where, ""),
            description=_str(spec, "description", where, ""),
            values=values,
            minimum=_float(spec, "min", where, None),
            maximum=_float(spec, "max", where, None),
        )

    @staticmethod
    def _values(spec: Mapping[str, Any], where: str, integer: bool) -> ValueTable:
        raw = spec.get(where.rsplit(".", 1)[-1])
        if raw is None:
            return ()
        if not isinstance(raw, Mapping) or not raw:
            raise ConfigError("must be a non-empty mapping of raw value to name", key=where)
        out: list[tuple[int | str, str]] = []
        names: set[str] = set()
        for key, name in raw.items():
            at = f"{where}.{key}"
            if integer and (isinstance(key, bool) or not isinstance(key, int)):
                raise ConfigError("raw values of an integer field must be integers", key=at)
            if not integer and not isinstance(key, str | int):
                raise ConfigError("raw values must be strings", key=at)
            if isinstance(name, bool):
                raise ConfigError(
                    f"the name must be a string, not {name} (quote it: YAML reads "
                    "yes/no/on/off/true/false as booleans)",
                    key=at,
                )
            if not isinstance(name, str) or not name:
                raise ConfigError("the name must be a non-empty string", key=at)
            if name in names:
                raise ConfigError(f"duplicate name {name!r}", key=at)
            names.add(name)
            out.append((key if integer else str(key), name))
        return tuple(out)

    # -- whole-file checks ---------------------------------------------------------------------

    def _check_frames(
        self, frames: tuple[FrameDef, ...], fmt: FormatKind, disc: DiscriminatorDef | None
    ) -> None:
        seen_names: set[str] = set()
        seen_ids: set[object] = set()
        for i, frame in enumerate(frames):
            if frame.name in seen_names:
                raise ConfigError(f"duplicate frame name {frame.name!r}", key=f"frames[{i}].name")
            seen_names.add(frame.name)
            if frame.id is not None:
                if frame.id in seen_ids:
                    raise ConfigError(f"duplicate frame id {frame.id!r}", key=f"frames[{i}].id")
                seen_ids.add(frame.id)
        needs_disc = fmt in (FormatKind.BINARY, FormatKind.CSV, FormatKind.KEY_VALUE)
        if needs_disc and len(frames) > 1 and disc is None:
            raise ConfigError(
                "several frame types need a discriminator to tell them apart", key="discriminator"
            )
        if needs_disc and disc is not None:
            for i, frame in enumerate(frames):
                if frame.id is None:
                    raise ConfigError(
                        "is required (the discriminator value)", key=f"frames[{i}].id"
                    )

    def _check_checksum(
        self, checksum: ChecksumDef, frames: tuple[FrameDef, ...], framing: FramingDef
    ) -> None:
        size = checksum.size
        for i, frame in enumerate(frames):
            length = frame.length
            if length is None and framing.kind is FramingKind.FIXED:
                length = framing.length
            at = checksum.at if checksum.at is not None else -size
            if at < 0:
                if length is None:
                    continue  # placed after the last field of each frame
                at += length
            for j, item in enumerate(frame.fields):
                if item.at < at + size and at < item.at + item.width:
                    raise ConfigError(
                        f"overlaps the checksum at byte {at}", key=f"frames[{i}].fields[{j}]"
                    )
        if framing.kind is FramingKind.FIXED and framing.length < size:
            raise ConfigError("the fixed frame is shorter than its checksum", key="checksum")

    def _timestamp(self, raw: object, frames: tuple[FrameDef, ...]) -> TimestampDef | None:
        where = "timestamp"
        if raw is None:
            return None
        spec = _mapping(
            raw, where, {"source", "field", "unit", "epoch", "rollover", *TIMESTAMP_PARTS}
        )
        parts = [(role, spec[role]) for role in TIMESTAMP_PARTS if spec.get(role) is not None]
        default_source = "field" if "field" in spec else "fields" if parts else "host"
        source = _choice(spec, "source", where, ["host", "field", "fields"], default_source)
        if source == "host":
            for key in ("field", "unit", "epoch", "rollover", *TIMESTAMP_PARTS):
                if spec.get(key) is not None:
                    raise ConfigError("only with a device time", key=f"{where}.{key}")
            return None
        fields_by_name: dict[str, list[FieldDef]] = {}
        for frame in frames:
            for item in frame.fields:
                if not item.bits:
                    fields_by_name.setdefault(item.name, []).append(item)
        if source == "fields":
            return self._timestamp_parts(spec, parts, fields_by_name)
        for role, _ in parts:
            raise ConfigError("not with field (use one or the other)", key=f"{where}.{role}")
        field_name = _str(spec, "field", where)
        candidates = fields_by_name.get(field_name, [])
        if not candidates:
            raise ConfigError(f"no frame has a field named {field_name!r}", key=f"{where}.field")
        for item in candidates:
            if (
                item.type in ("string", "bytes", "bool", "date", "lat", "lon", "skip", "talker")
                or item.values
            ):
                raise ConfigError(f"field {field_name!r} is not numeric", key=f"{where}.field")
        unit = _choice(spec, "unit", where, list(_UNITS_NS), "s")
        rollover = _opt_int(spec, "rollover", where, minimum=2)
        epoch_raw = spec.get("epoch")
        epoch_host = epoch_raw == "host"
        return TimestampDef(
            field=field_name,
            unit_ns=_UNITS_NS[unit],
            epoch_ns=0 if epoch_host else self._epoch(epoch_raw, where),
            epoch_host=epoch_host,
            rollover=rollover,
        )

    @staticmethod
    def _timestamp_parts(
        spec: Mapping[str, Any],
        parts: list[tuple[str, Any]],
        fields_by_name: Mapping[str, list[FieldDef]],
    ) -> TimestampDef:
        where = "timestamp"
        for key in ("unit", "epoch", "rollover"):
            if spec.get(key) is not None:
                raise ConfigError("only with field", key=f"{where}.{key}")
        roles = {role for role, _ in parts}
        has_date = "date" in roles or {"year", "month", "day"} <= roles
        has_time = "time" in roles or {"hour", "minute", "second"} <= roles
        if not (has_date and has_time):
            raise ConfigError(
                "a timestamp from fields needs a date (date, or year, month and day) and a time "
                "of day (time, or hour, minute and second)",
                key=where,
            )
        if "date" in roles and roles & {"year", "month", "day"}:
            raise ConfigError("date or year/month/day, not both", key=f"{where}.date")
        if "time" in roles and roles & {"hour", "minute", "second", "nanosecond"}:
            raise ConfigError("time or hour/minute/second, not both", key=f"{where}.time")
        out: list[tuple[str, str]] = []
        for role, name in parts:
            at = f"{where}.{role}"
            if not isinstance(name, str):
                raise ConfigError("must be a field name", key=at)
            candidates = fields_by_name.get(name, [])
            if not candidates:
                raise ConfigError(f"no frame has a field named {name!r}", key=at)
            want = {"date": ("date",), "time": ("time", "float", "float32", "float64")}.get(role)
            for item in candidates:
                ok = (
                    item.type in want
                    if want
                    else (item.type in _INTEGER_TYPES or item.type in ("int", "uint"))
                )
                if not ok or item.values or item.scaled:
                    expected = " or ".join(want) if want else "an unscaled integer"
                    raise ConfigError(f"field {name!r} must be {expected}", key=at)
            out.append((role, name))
        return TimestampDef(field="", parts=tuple(out))

    @staticmethod
    def _epoch(raw: object, where: str) -> int:
        at = f"{where}.epoch"
        if raw is None:
            return 0
        if isinstance(raw, str):
            if raw in _NAMED_EPOCHS:
                return _NAMED_EPOCHS[raw]
            try:
                raw = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
            except ValueError:
                raise ConfigError(
                    f"unknown epoch {raw!r} (unix, gps or an ISO 8601 date/time)", key=at
                ) from None
        if isinstance(raw, dt.datetime):
            moment = raw if raw.tzinfo else raw.replace(tzinfo=dt.UTC)
        elif isinstance(raw, dt.date):
            moment = dt.datetime(raw.year, raw.month, raw.day, tzinfo=dt.UTC)
        else:
            raise ConfigError("must be unix, gps or an ISO 8601 date/time", key=at)
        delta = moment - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
        return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000
