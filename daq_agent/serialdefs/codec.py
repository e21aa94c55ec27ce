"""The serial frame codec: definitions compiled once into flows, a decoder and an encoder.

:class:`SerialCodec` turns :class:`~daq_agent.serialdefs.model.SerialDefinitions` into

- flows: one per frame type, named from a template (``{device}``, ``{frame}``); one channel per
  field (or per bit group of a field split into bits), typed like CAN signals: a value table →
  ``ENUM``; a 1-bit group → ``BOOL``; float32 → ``FLOAT``; float64 and any non-integer scale or
  offset → ``DOUBLE``; integers → the smallest of ``UINT_32``/``INT_32``/``UINT_64``/``INT_64``
  holding the scaled range; strings → ``STRING``; bytes → ``BYTES``;
- a decoder: binary frame layouts are compiled to one small Python function per frame type
  (``struct`` formats precomputed, one ``unpack_from`` per run of fields of one byte order, scale
  and bit extraction inlined), so decoding a frame is a checksum, a dict lookup and one call;
- an encoder, the exact inverse, used by the simulator and the round-trip tests.

Decoding never raises for a bad frame: :meth:`SerialCodec.decode` returns a :class:`FrameFault`
that the caller counts.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from daq_agent.core.errors import ConfigError, DecodeError
from daq_agent.core.model import (
    ChannelConfig,
    ChannelDataType,
    ChannelEnumType,
    FlowConfig,
)
from daq_agent.core.sample import Value
from daq_agent.serialdefs.checksums import FrameChecksum
from daq_agent.serialdefs.framing import Framer, NmeaFramer, make_framer
from daq_agent.serialdefs.model import (
    FIXED_SIZE_TYPES,
    BitDef,
    FieldDef,
    FormatKind,
    FrameDef,
    FramingKind,
    SerialDefinitions,
)
from daq_agent.serialdefs.nmea import nmea_checksum, parse_nmea_field, render_nmea_field

__all__ = [
    "DEFAULT_FLOW_NAME_TEMPLATE",
    "ChannelSpec",
    "CompiledFrame",
    "FrameFault",
    "SerialCodec",
]

DEFAULT_FLOW_NAME_TEMPLATE: Final = "{device}.{frame}"
"""Flow names know ``{device}`` (the reader's name) and ``{frame}`` (the frame type name)."""

_U32: Final = 0xFFFFFFFF
_INT_TYPES: Final = frozenset(n for n in FIXED_SIZE_TYPES if "int" in n) | {"int", "uint"}
_TEXT_INT_BITS: Final = {"int": 64, "uint": 64}


class FrameFault(enum.IntEnum):
    """Why a frame produced no sample."""

    CHECKSUM = 1
    """The checksum does not match."""
    UNKNOWN_TYPE = 2
    """The discriminator (id, sentence, pattern) matches no frame type."""
    DECODE = 3
    """The frame is too short, not text, or a field does not parse."""
    NO_CHECKSUM = 4
    """NMEA: the sentence has no ``*hh`` checksum and the definitions require one."""


Decoded = tuple["CompiledFrame", tuple[Value, ...]]
"""A decoded frame: its compiled frame type and its values in flow-channel order."""


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    """One channel of a frame type, as decoded (also what the simulator generates).

    Attributes:
        name: the channel name.
        field: the field it comes from.
        bit: the bit group it comes from (None: the whole field).
        config: the channel's flow config.
        minimum: the lowest physical value the channel takes (declared or from the type).
        maximum: the highest physical value.
        keys: enum channels: the keys, in declaration order.
    """

    name: str
    field: FieldDef
    bit: BitDef | None
    config: ChannelConfig
    minimum: float
    maximum: float
    keys: tuple[int, ...] = ()


class CompiledFrame:
    """One frame type compiled for decoding and encoding.

    Attributes:
        definition: the frame definition.
        flow: the flow name.
        channels: the channels in flow order.
        timestamp_index: index of the device-timestamp channel in the values (-1: none).
    """

    __slots__ = (
        "_decode",
        "channels",
        "definition",
        "flow",
        "min_length",
        "timestamp_index",
        "timestamp_parts",
    )

    def __init__(
        self,
        definition: FrameDef,
        flow: str,
        channels: tuple[ChannelSpec, ...],
        decode: Callable[[Any], tuple[Value, ...]],
        min_length: int,
        timestamp_index: int,
    ) -> None:
        self.definition = definition
        self.flow = flow
        self.channels = channels
        self._decode = decode
        self.min_length = min_length
        self.timestamp_index = timestamp_index
        self.timestamp_parts: tuple[tuple[str, int], ...] = ()
        """(role, value index) of a timestamp built from date and time fields."""

    @property
    def name(self) -> str:
        """The frame type name."""
        return self.definition.name

    def flow_config(self) -> FlowConfig:
        """The flow of this frame type (a fresh object)."""
        return FlowConfig(
            name=self.flow,
            channels=[
                ChannelConfig(
                    name=c.config.name,
                    data_type=c.config.data_type,
                    description=c.config.description,
                    unit=c.config.unit,
                    enum_types=list(c.config.enum_types),
                )
                for c in self.channels
            ],
        )

    def __repr__(self) -> str:
        return f"CompiledFrame({self.name!r}, flow={self.flow!r})"


class SerialCodec:
    """Frame definitions compiled into flows, a decoder and an encoder.

    Args:
        defs: the definitions.
        device: the device name (``{device}`` in flow names).
        flow_name_template: how flow names are built from ``{device}`` and ``{frame}``.

    Raises:
        ConfigError: the flow name template is invalid or gives two frames the same name.
    """

    __slots__ = (
        "_anchor",
        "_by_id",
        "_checksum",
        "_disc",
        "_last_counter",
        "_misses",
        "_only",
        "_regexes",
        "_verify",
        "_wraps",
        "defs",
        "device",
        "frames",
        "last_unknown",
    )

    def __init__(
        self,
        defs: SerialDefinitions,
        device: str = "serial",
        flow_name_template: str = DEFAULT_FLOW_NAME_TEMPLATE,
    ) -> None:
        self.defs = defs
        self.device = device
        self._checksum = FrameChecksum(defs.checksum) if defs.checksum is not None else None
        sync_framed = defs.framing.kind in (FramingKind.FIXED, FramingKind.SYNC_LENGTH)
        # sync framings verify the checksum while framing (to resynchronise); do not repeat it
        self._verify = None if sync_framed or self._checksum is None else self._checksum.verify
        self._misses = _Tally()
        compiled: list[CompiledFrame] = []
        names: set[str] = set()
        for frame in defs.frames:
            flow = _flow_name(flow_name_template, device, frame.name)
            if flow in names:
                raise ConfigError(f"flow name {flow!r} is not unique", key="flow_name_template")
            names.add(flow)
            compiled.append(self._compile(frame, flow))
        self.frames: tuple[CompiledFrame, ...] = tuple(compiled)
        self._by_id: dict[object, CompiledFrame] = {
            c.definition.id: c for c in compiled if c.definition.id is not None
        }
        single = len(compiled) == 1 and defs.discriminator is None
        self._only = compiled[0] if single else None
        self._regexes = [
            (re.compile(c.definition.pattern), c) for c in compiled if c.definition.pattern
        ]
        self._disc: Callable[[Any], object] | None = None
        disc = defs.discriminator
        if defs.format is FormatKind.BINARY and disc is not None:
            code, _ = FIXED_SIZE_TYPES[disc.type]
            unpack = struct.Struct(disc.byte_order.struct_prefix + code).unpack_from
            at = disc.at
            self._disc = lambda frame: unpack(frame, at)[0]
            self._only = None
        self.last_unknown: object = None
        """The id of the last frame that matched no frame type (for per-id counting)."""
        self._anchor: int | None = None
        self._last_counter: float | None = None
        self._wraps = 0

    # -- public ------------------------------------------------------------------------------

    @property
    def unmatched_values(self) -> int:
        """Text values outside their field's value table (the channel was left empty)."""
        return self._misses.count

    @property
    def flows(self) -> list[FlowConfig]:
        """One flow per frame type, in definition order."""
        return [c.flow_config() for c in self.frames]

    def frame(self, name: str) -> CompiledFrame:
        """The compiled frame type ``name``.

        Raises:
            KeyError: there is none.
        """
        for compiled in self.frames:
            if compiled.name == name:
                return compiled
        raise KeyError(name)

    def make_framer(self, byte_ns: int = 0) -> Framer:
        """A new framer for these definitions (checksum-aware for sync framings)."""
        if self.defs.format is FormatKind.NMEA:
            return NmeaFramer(self.defs.framing.max_length, byte_ns)
        accept = self._checksum.verify if self._checksum is not None else None
        return make_framer(self.defs.framing, accept=accept, byte_ns=byte_ns)

    def device_time_ns(
        self, compiled: CompiledFrame, values: Sequence[Value], host_ns: int = 0
    ) -> int | None:
        """The device timestamp of a decoded frame (None: the frame has none, it is empty, or
        its date and time fields do not make a valid UTC time).

        Args:
            compiled: the frame's type.
            values: its decoded values.
            host_ns: its host receive time (anchors a device clock with ``epoch: host``).
        """
        index = compiled.timestamp_index
        if index < 0:
            return None
        spec = self.defs.timestamp
        assert spec is not None
        if compiled.timestamp_parts:
            return _utc_from_parts(compiled.timestamp_parts, values)
        value = values[index]
        if value is None or isinstance(value, str | bytes):
            return None
        if spec.rollover is not None:
            value = self._unwrap(float(value), spec.rollover)
        stamp = spec.epoch_ns + round(float(value) * spec.unit_ns)
        if spec.epoch_host:
            if self._anchor is None:
                self._anchor = host_ns - stamp
            stamp += self._anchor
        return stamp

    def _unwrap(self, value: float, rollover: int) -> float:
        last = self._last_counter
        if last is not None and value < last:
            self._wraps += 1
        self._last_counter = value
        return value + self._wraps * rollover

    def reset_device_clock(self) -> None:
        """Forget the device clock's anchor and wraps (the device was reopened or restarted)."""
        self._anchor = None
        self._last_counter = None
        self._wraps = 0

    def decoder(self) -> Callable[[bytes], Decoded | FrameFault]:
        """The fastest equivalent of :meth:`decode` for these definitions (no format dispatch)."""
        if self.defs.format is FormatKind.BINARY:
            return self._decode_binary
        if self.defs.format is FormatKind.NMEA:
            return self._decode_sentence
        return self.decode

    def _decode_sentence(self, frame: bytes) -> Decoded | FrameFault:
        """:meth:`decode` for what :class:`NmeaFramer` delivers: one sentence from its ``$``."""
        try:
            return self._decode_nmea_body(frame.decode(self.defs.text_encoding)[1:])
        except UnicodeDecodeError:
            return FrameFault.DECODE

    def decode(self, frame: bytes) -> Decoded | FrameFault:
        """Decode one frame as delivered by the framer.

        Returns:
            (compiled frame type, values in flow-channel order), or why it could not be decoded;
            for ``UNKNOWN_TYPE`` the id is left in :attr:`last_unknown`.
        """
        fmt = self.defs.format
        if fmt is FormatKind.BINARY:
            return self._decode_binary(frame)
        if fmt is FormatKind.NMEA:
            # a sentence starts at its last '$' (or '!'): line noise before it is ignored
            start = max(frame.rfind(b"$"), frame.rfind(b"!"))
            if start < 0:
                return FrameFault.DECODE
            frame = frame[start:]
        try:
            line = frame.decode(self.defs.text_encoding).strip()
        except UnicodeDecodeError:
            return FrameFault.DECODE
        if fmt is FormatKind.NMEA:
            return self._decode_nmea(line)
        if fmt is FormatKind.CSV:
            return self._decode_csv(line)
        if fmt is FormatKind.KEY_VALUE:
            return self._decode_kv(line)
        return self._decode_regex(line)

    def describe_fault(self, frame: bytes, fault: FrameFault) -> str:
        """A one-line account of why ``frame`` did not decode, for people (the ``decode``
        command): text frames are shown as text, binary ones in hex."""
        name = {
            FrameFault.CHECKSUM: "checksum",
            FrameFault.UNKNOWN_TYPE: "unknown type",
            FrameFault.DECODE: "decode",
            FrameFault.NO_CHECKSUM: "no checksum",
        }[fault]
        if not self.defs.format.is_text:
            detail = f" (id {self.last_unknown!r})" if fault is FrameFault.UNKNOWN_TYPE else ""
            return f"{name}{detail}: {frame.hex(' ')}"
        text = frame.decode(self.defs.text_encoding, errors="backslashreplace").strip()
        shown = repr(text)[1:-1] if not text.isprintable() else text
        detail = ""
        if fault is FrameFault.UNKNOWN_TYPE:
            detail = f" (id {self.last_unknown!r})"
        elif fault is FrameFault.CHECKSUM and self.defs.format is FormatKind.NMEA:
            body, _, given = text.lstrip("$!").partition("*")
            detail = f" (*{given} given, *{nmea_checksum(body):02X} computed)"
        return f"{name}{detail}: {shown}"

    def decode_or_raise(self, frame: bytes) -> Decoded:
        """Like :meth:`decode` (checksum included) but raising on a bad frame.

        Raises:
            DecodeError: naming the fault.
        """
        if self._checksum is not None and self._verify is None and not self._checksum.verify(frame):
            raise DecodeError("checksum mismatch")
        result = self.decode(frame)
        if isinstance(result, FrameFault):
            detail = f" (id {self.last_unknown!r})" if result is FrameFault.UNKNOWN_TYPE else ""
            raise DecodeError(f"{result.name.lower()}{detail}")
        return result

    def encode(self, frame_name: str, values: Mapping[str, Value]) -> bytes:
        """The bytes on the wire for one frame (framing and checksum included).

        Args:
            frame_name: the frame type.
            values: physical values by channel name (enum channels: the key; missing: 0/empty).

        Returns:
            The encoded frame, ready to write to a port.

        Raises:
            KeyError: no frame type is called ``frame_name``.
            DecodeError: a value does not fit its field.
        """
        compiled = self.frame(frame_name)
        payload = self.encode_frame(compiled, values)
        return self._framer_for_encoding().encode(payload)

    def encode_frame(self, compiled: CompiledFrame, values: Mapping[str, Value]) -> bytes:
        """The frame as the framer delivers it (no COBS/SLIP/terminator), checksum included.

        Raises:
            DecodeError: a value does not fit its field.
        """
        try:
            if self.defs.format is FormatKind.BINARY:
                return self._encode_binary(compiled, values)
            return self._encode_text(compiled, values).encode(self.defs.text_encoding)
        except (struct.error, OverflowError, ValueError, TypeError, UnicodeEncodeError) as exc:
            raise DecodeError(f"frame {compiled.name!r}: cannot encode: {exc}") from exc

    # -- compile ------------------------------------------------------------------------------

    def _compile(self, frame: FrameDef, flow: str) -> CompiledFrame:
        channels: list[ChannelSpec] = []
        for item in frame.fields:
            if item.type == "skip":
                continue
            if item.bits:
                channels.extend(_bit_channel(item, bit) for bit in item.bits)
            else:
                channels.append(_field_channel(item))
        timestamp_index = -1
        parts: list[tuple[str, int]] = []
        stamp = self.defs.timestamp
        if stamp is not None:
            index_of = {c.name: i for i, c in enumerate(channels) if c.bit is None}
            if stamp.parts:
                found = [(role, index_of.get(name, -1)) for role, name in stamp.parts]
                if all(i >= 0 for _, i in found):  # frames without all of them: host time
                    parts = found
                    timestamp_index = found[0][1]
            else:
                timestamp_index = index_of.get(stamp.field, -1)
        if self.defs.format is FormatKind.BINARY:
            decode, min_length = _compile_binary(frame, tuple(channels), self.defs, self._misses)
        else:
            decode = _compile_text(frame, tuple(channels), self.defs, self._misses)
            min_length = 0
        counted = [
            (i, c.field.group_index, c.field.group_count)
            for i, c in enumerate(channels)
            if c.field.group_count
        ]
        if counted:
            decode = _counted_groups(decode, counted, channels)
        compiled = CompiledFrame(frame, flow, tuple(channels), decode, min_length, timestamp_index)
        compiled.timestamp_parts = tuple(parts)
        return compiled

    def _framer_for_encoding(self) -> Framer:
        return make_framer(self.defs.framing)

    # -- decode -------------------------------------------------------------------------------

    def _decode_binary(self, frame: bytes) -> Decoded | FrameFault:
        verify = self._verify
        if verify is not None and not verify(frame):
            return FrameFault.CHECKSUM
        compiled = self._only
        if compiled is None:
            disc = self._disc
            if disc is None:
                return FrameFault.UNKNOWN_TYPE
            try:
                key = disc(frame)
            except struct.error:
                return FrameFault.DECODE
            compiled = self._by_id.get(key)
            if compiled is None:
                self.last_unknown = key
                return FrameFault.UNKNOWN_TYPE
        if len(frame) < compiled.min_length:
            return FrameFault.DECODE
        length = compiled.definition.length
        if length is not None and len(frame) != length:
            return FrameFault.DECODE
        return compiled, compiled._decode(frame)

    def _decode_text_fields(self, compiled: CompiledFrame, parts: Any) -> Decoded | FrameFault:
        try:
            return compiled, compiled._decode(parts)
        except (ValueError, IndexError, KeyError):
            return FrameFault.DECODE

    def _decode_nmea(self, line: str) -> Decoded | FrameFault:
        start = max(line.rfind("$"), line.rfind("!"))
        if start < 0:
            return FrameFault.DECODE
        return self._decode_nmea_body(line[start + 1 :])

    def _decode_nmea_body(self, body: str) -> Decoded | FrameFault:
        """A sentence after its ``$`` or ``!``, checksum included."""
        star = body.find("*")
        if star >= 0:
            given = body[star + 1 :]
            body = body[:star]
            if len(given) != 2 or given not in _HEX_BYTES[nmea_checksum(body)]:
                return FrameFault.CHECKSUM
        elif self.defs.require_checksum:
            return FrameFault.NO_CHECKSUM
        if not body.isprintable():
            return FrameFault.DECODE
        parts = body.split(",")
        address = parts[0]
        compiled = self._by_id.get(address) or self._by_id.get(address[2:])
        if compiled is None:
            self.last_unknown = address
            return FrameFault.UNKNOWN_TYPE
        return self._decode_text_fields(compiled, parts)

    def _decode_csv(self, line: str) -> Decoded | FrameFault:
        parts = line.split(self.defs.delimiter)
        compiled = self._only
        if compiled is None:
            disc = self.defs.discriminator
            if disc is None or disc.at >= len(parts):
                return FrameFault.DECODE
            compiled = self._by_id.get(parts[disc.at].strip())
            if compiled is None:
                self.last_unknown = parts[disc.at].strip()
                return FrameFault.UNKNOWN_TYPE
        return self._decode_text_fields(compiled, parts)

    def _decode_kv(self, line: str) -> Decoded | FrameFault:
        pairs: dict[str, str] = {}
        sep = self.defs.kv_separator
        for item in line.split(self.defs.pair_separator):
            key, found, value = item.partition(sep)
            if found:
                pairs[key.strip()] = value.strip()
            elif item.strip():
                return FrameFault.DECODE
        compiled = self._only
        if compiled is None:
            disc = self.defs.discriminator
            if disc is None or disc.key not in pairs:
                return FrameFault.DECODE
            compiled = self._by_id.get(pairs[disc.key])
            if compiled is None:
                self.last_unknown = pairs[disc.key]
                return FrameFault.UNKNOWN_TYPE
        return self._decode_text_fields(compiled, pairs)

    def _decode_regex(self, line: str) -> Decoded | FrameFault:
        for pattern, compiled in self._regexes:
            match = pattern.fullmatch(line)
            if match is not None:
                return self._decode_text_fields(compiled, match.groupdict())
        self.last_unknown = "<no pattern matched>"
        return FrameFault.UNKNOWN_TYPE

    # -- encode -------------------------------------------------------------------------------

    def _encode_binary(self, compiled: CompiledFrame, values: Mapping[str, Value]) -> bytes:
        defs = self.defs
        frame = compiled.definition
        size = _binary_frame_size(frame, defs)
        buf = bytearray(size)
        sync = defs.framing.sync
        buf[: len(sync)] = sync
        disc = defs.discriminator
        if disc is not None:
            code, _ = FIXED_SIZE_TYPES[disc.type]
            struct.pack_into(disc.byte_order.struct_prefix + code, buf, disc.at, frame.id)
        lf = defs.framing.length_field
        if lf is not None:
            code, _ = FIXED_SIZE_TYPES[lf.type]
            struct.pack_into(lf.byte_order.struct_prefix + code, buf, lf.at, size - lf.adjust)
        for item in frame.fields:
            if item.bits:
                raw = 0
                for bit in item.bits:
                    bits = _raw_from_physical(values.get(bit.name), bit.scale, bit.offset, True)
                    assert isinstance(bits, int)
                    if not 0 <= bits < 1 << bit.length:
                        raise ValueError(f"{bit.name}: {bits} does not fit {bit.length} bits")
                    raw |= bits << bit.start
                if not item.type.startswith("u") and raw >= 1 << (item.width * 8 - 1):
                    raw -= 1 << (item.width * 8)
                _pack_field(item, buf, raw)
                continue
            value = values.get(item.name)
            if item.type in ("string", "bytes"):
                if item.type == "string":
                    if item.values:
                        value = _string_for_key(item, value)
                    data = str(value or "").encode(defs.text_encoding)
                else:
                    data = bytes(value) if isinstance(value, bytes | bytearray) else b""
                _pack_field(item, buf, data)
            elif item.type == "bool":
                _pack_field(item, buf, bool(value))
            else:
                integer = item.type in _INT_TYPES
                raw_value = _raw_from_physical(value, item.scale, item.offset, integer)
                if integer and item.values and isinstance(raw_value, int) and raw_value > _I32_MAX:
                    raw_value = _from_u32_key(raw_value, item)
                _pack_field(item, buf, raw_value)
        if self._checksum is not None:
            self._checksum.apply(buf)
        return bytes(buf)

    def _encode_text(self, compiled: CompiledFrame, values: Mapping[str, Value]) -> str:
        defs = self.defs
        frame = compiled.definition
        rendered: list[tuple[int | str, list[str]]] = []  # (column or key, text fields)
        talker = ""
        sign_texts: dict[str, str] = {}  # the text of a sign field, by its name
        for item in frame.fields:
            if item.type == "talker":
                talker = str(values.get(item.name) or "")
                continue
            if item.sign_field:
                value = values.get(item.name)
                negative = isinstance(value, int | float) and value < 0
                sign_texts[item.sign_field] = (
                    item.sign_negative[0] if negative else item.sign_positive
                )
                if negative:
                    value = -value  # type: ignore[operator]  # a number, checked above
                rendered.append((item.at, _render_text(item, value)))
                continue
            if item.type == "skip":
                rendered.append((item.key or item.at, [""]))
                continue
            if item.bits:
                raw = 0
                for bit in item.bits:
                    bits = _raw_from_physical(values.get(bit.name), bit.scale, bit.offset, True)
                    assert isinstance(bits, int)
                    raw |= bits << bit.start
                rendered.append((item.key or item.at, [str(raw)]))
                continue
            rendered.append((item.key or item.at, _render_text(item, values.get(item.name))))
        if sign_texts:
            by_name = {f.name: f.at for f in frame.fields}
            rendered.extend((by_name[name], [text]) for name, text in sign_texts.items())
        fmt = defs.format
        if fmt in (FormatKind.CSV, FormatKind.NMEA):
            width = max((int(pos) + len(parts) for pos, parts in rendered), default=0)
            columns = [""] * width
            for pos, parts in rendered:
                assert isinstance(pos, int)
                columns[pos : pos + len(parts)] = parts
            if fmt is FormatKind.CSV:
                disc = defs.discriminator
                if disc is not None and frame.id is not None:
                    if disc.at >= len(columns):
                        columns.extend([""] * (disc.at + 1 - len(columns)))
                    columns[disc.at] = str(frame.id)
                return defs.delimiter.join(columns)
            assert isinstance(frame.id, str)
            address = (
                frame.id
                if len(frame.id) >= 5 or frame.id.startswith("P")
                else (talker or "GP") + frame.id
            )
            columns[0] = address
            body = ",".join(columns)
            return f"${body}*{nmea_checksum(body):02X}"
        if fmt is FormatKind.KEY_VALUE:
            sep = defs.kv_separator
            pairs = []
            disc = defs.discriminator
            if disc is not None and frame.id is not None:
                pairs.append(f"{disc.key}{sep}{frame.id}")
            pairs.extend(f"{key}{sep}{parts[0]}" for key, parts in rendered)
            return (defs.pair_separator or " ").join(pairs)
        if not frame.render:
            raise ValueError(f"regex frame {frame.name!r} has no render template to encode with")
        return frame.render.format(**{str(key): parts[0] for key, parts in rendered})


_I32_MAX: Final = (1 << 31) - 1
_HEX_BYTES: Final = tuple(frozenset({f"{i:02X}", f"{i:02x}"}) for i in range(256))
"""The two spellings of each checksum value (NMEA uses upper case; some devices do not)."""


def _from_u32_key(key: int, item: FieldDef) -> int:
    """An enum key sent as a 32-bit two's complement, back to the negative raw value."""
    return key - (1 << 32) if not item.type.startswith("u") else key


_EPOCH_DAY: Final = dt.date(1970, 1, 1).toordinal()


def _utc_from_parts(parts: tuple[tuple[str, int], ...], values: Sequence[Value]) -> int | None:
    """ns since the Unix epoch from date and time values; None if one is empty or invalid."""
    got: dict[str, Value] = {role: values[i] for role, i in parts}
    try:
        date = got.get("date")
        if date is not None:
            day = dt.date.fromisoformat(str(date))
        else:
            day = dt.date(int(got["year"]), int(got["month"]), int(got["day"]))  # type: ignore[arg-type]
        seconds = got.get("time")
        if seconds is None and "time" not in got:
            hour, minute, second = (int(got[k]) for k in ("hour", "minute", "second"))  # type: ignore[arg-type]
            if not (0 <= hour < 24 and 0 <= minute < 60 and 0 <= second <= 60):
                return None
            nanos = (hour * 3600 + minute * 60 + second) * 1_000_000_000
            nanos += int(got.get("nanosecond") or 0)
        elif seconds is None or isinstance(seconds, str | bytes):
            return None
        else:
            nanos = round(float(seconds) * 1_000_000_000)
    except (KeyError, TypeError, ValueError):
        return None
    return (day.toordinal() - _EPOCH_DAY) * 86_400_000_000_000 + nanos


def _flow_name(template: str, device: str, frame: str) -> str:
    try:
        name = template.format(device=device, frame=frame)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"invalid flow name template {template!r}: {exc!r} (known: {{device}}, {{frame}})",
            key="flow_name_template",
        ) from None
    if not name:
        raise ConfigError("the flow name template gives an empty name", key="flow_name_template")
    return name


# -- channel types ------------------------------------------------------------------------------


def _is_integral(value: float) -> bool:
    return math.isfinite(value) and float(value).is_integer()


def _raw_range(kind: str, bits: int | None = None) -> tuple[float, float]:
    if bits is not None:
        return 0, (1 << bits) - 1
    if kind in ("int", "uint"):
        width = 64
        return (0, (1 << 64) - 1) if kind == "uint" else (-(1 << 63), (1 << 63) - 1)
    if kind in FIXED_SIZE_TYPES and "int" in kind:
        width = FIXED_SIZE_TYPES[kind][1] * 8
        if kind.startswith("u"):
            return 0, (1 << width) - 1
        return -(1 << (width - 1)), (1 << (width - 1)) - 1
    if kind == "float32":
        return -3.4e38, 3.4e38
    if kind == "lat":
        return -90.0, 90.0
    if kind == "lon":
        return -180.0, 180.0
    if kind == "time":
        return 0.0, 86_400.0
    if kind == "bool":
        return 0, 1
    return -1.7e308, 1.7e308


def _numeric_type(
    kind: str, scale: float, offset: float, bits: int | None
) -> tuple[ChannelDataType, float, float]:
    low, high = _raw_range(kind, bits)
    if _is_integral(scale) and _is_integral(offset) and isinstance(low, int):
        iscale, ioffset = int(scale), int(offset)
        ends: tuple[float, float] = (low * iscale + ioffset, high * iscale + ioffset)
    else:
        ends = (low * scale + offset, high * scale + offset)
    lowest, highest = min(ends), max(ends)
    integer = bits is not None or kind in _INT_TYPES
    if not integer:
        if kind == "float32" and scale == 1.0 and offset == 0.0:
            return ChannelDataType.FLOAT, lowest, highest
        return ChannelDataType.DOUBLE, lowest, highest
    if bits == 1 and scale == 1.0 and offset == 0.0:
        return ChannelDataType.BOOL, 0, 1
    if not (_is_integral(scale) and _is_integral(offset)):
        return ChannelDataType.DOUBLE, lowest, highest
    if lowest >= 0:
        if highest <= _U32:
            return ChannelDataType.UINT_32, lowest, highest
        if highest < 1 << 64:
            return ChannelDataType.UINT_64, lowest, highest
    elif lowest >= -(1 << 31) and highest < 1 << 31:
        return ChannelDataType.INT_32, lowest, highest
    elif lowest >= -(1 << 63) and highest < 1 << 63:
        return ChannelDataType.INT_64, lowest, highest
    return ChannelDataType.DOUBLE, lowest, highest


def _enum_config(
    name: str, table: Sequence[tuple[int | str, str]], unit: str, description: str
) -> tuple[ChannelConfig, tuple[int, ...]]:
    enum_types: list[ChannelEnumType] = []
    keys: list[int] = []
    for index, (raw, label) in enumerate(table):
        key = raw if isinstance(raw, int) else index
        keys.append(key & _U32)
        enum_types.append(ChannelEnumType(label, key & _U32, is_signed=key < 0))
    config = ChannelConfig(
        name, ChannelDataType.ENUM, description or None, unit or None, enum_types=enum_types
    )
    return config, tuple(keys)


def _field_channel(item: FieldDef) -> ChannelSpec:
    if item.values:
        config, keys = _enum_config(item.name, item.values, item.unit, item.description)
        return ChannelSpec(item.name, item, None, config, 0, max(len(keys) - 1, 0), keys)
    if item.type in ("string", "date", "talker"):
        data_type = ChannelDataType.STRING
        low, high = 0.0, 0.0
    elif item.type == "bytes":
        data_type = ChannelDataType.BYTES
        low, high = 0.0, 0.0
    elif item.type == "bool":
        data_type, low, high = ChannelDataType.BOOL, 0, 1
    else:
        data_type, low, high = _numeric_type(item.type, item.scale, item.offset, None)
    config = ChannelConfig(item.name, data_type, item.description or None, item.unit or None)
    low = item.minimum if item.minimum is not None else low
    high = item.maximum if item.maximum is not None else high
    return ChannelSpec(item.name, item, None, config, low, high)


def _bit_channel(item: FieldDef, bit: BitDef) -> ChannelSpec:
    if bit.values:
        config, keys = _enum_config(bit.name, bit.values, bit.unit, bit.description)
        return ChannelSpec(bit.name, item, bit, config, 0, max(len(keys) - 1, 0), keys)
    data_type, low, high = _numeric_type(item.type, bit.scale, bit.offset, bit.length)
    config = ChannelConfig(bit.name, data_type, bit.description or None, bit.unit or None)
    low = bit.minimum if bit.minimum is not None else low
    high = bit.maximum if bit.maximum is not None else high
    return ChannelSpec(bit.name, item, bit, config, low, high)


# -- binary compile -----------------------------------------------------------------------------


def _struct_code(item: FieldDef) -> str:
    if item.type in ("string", "bytes"):
        return f"{item.size}s"
    if item.word_order is not None:
        return f"{item.width}s"  # read as bytes, words reordered, then unpacked
    if item.type == "bool":
        return "?"
    return FIXED_SIZE_TYPES[item.type][0]


def _binary_frame_size(frame: FrameDef, defs: SerialDefinitions) -> int:
    if frame.length is not None:
        return frame.length
    if defs.framing.kind is FramingKind.FIXED:
        return defs.framing.length
    extent = len(defs.framing.sync)
    lf = defs.framing.length_field
    if lf is not None:
        extent = max(extent, lf.at + lf.size)
    disc = defs.discriminator
    if disc is not None:
        extent = max(extent, disc.at + FIXED_SIZE_TYPES[disc.type][1])
    extent = max([extent, *(f.at + f.width for f in frame.fields)])
    checksum = defs.checksum
    if checksum is not None:
        size = checksum.size
        if checksum.at is None or checksum.at < 0:
            extent += size if checksum.at is None else max(0, -checksum.at)
        else:
            extent = max(extent, checksum.at + size)
    return extent


def _compile_binary(
    frame: FrameDef, channels: tuple[ChannelSpec, ...], defs: SerialDefinitions, misses: _Tally
) -> tuple[Callable[[Any], tuple[Value, ...]], int]:
    """Generate ``decode(frame) -> values`` for one binary layout; also its minimum length."""
    fields = [f for f in frame.fields if f.type != "skip"]
    fixed_size = frame.length is not None or defs.framing.kind is FramingKind.FIXED
    # a variable-length frame carries as many group instances as it has room for: those are
    # read one by one, each only if the frame reaches its end
    optional = {i for i, f in enumerate(fields) if f.group and not fixed_size}
    # runs of fields in offset order, one byte order, not overlapping → one Struct each
    order = sorted((i for i in range(len(fields)) if i not in optional), key=lambda i: fields[i].at)
    runs: list[tuple[int, str, list[int]]] = []  # (start, format, field indexes)
    run_end = -1
    for i in order:
        item = fields[i]
        prefix = item.byte_order.struct_prefix if item.width > 1 else None
        if runs:
            start, fmt, members = runs[-1]
            run_prefix = fmt[0]
            if item.at >= run_end and (prefix is None or prefix == run_prefix):
                gap = item.at - run_end
                runs[-1] = (start, fmt + ("x" * gap) + _struct_code(item), [*members, i])
                run_end = item.at + item.width
                continue
        runs.append((item.at, (prefix or "<") + _struct_code(item), [i]))
        run_end = item.at + item.width
    namespace: dict[str, Any] = {"_misses": misses}
    lines = ["def decode(frame):"]
    slot: dict[int, str] = {}
    for r, (start, fmt, members) in enumerate(runs):
        namespace[f"_u{r}"] = struct.Struct(fmt).unpack_from
        targets = [f"v{i}" for i in members]
        lines.append(f"    {', '.join(targets)}, = _u{r}(frame, {start})")
        for i in members:
            slot[i] = f"v{i}"
    if optional:
        checksum = defs.checksum
        tail = 0
        if checksum is not None and (checksum.at is None or checksum.at < 0):
            tail = checksum.size if checksum.at is None else -checksum.at
        lines.append(f"    n = len(frame) - {tail}")
        for i in sorted(optional):
            item = fields[i]
            code = (item.byte_order.struct_prefix if item.width > 1 else "<") + _struct_code(item)
            namespace[f"_o{i}"] = struct.Struct(code).unpack_from
            end = item.at + item.width
            lines.append(f"    v{i} = _o{i}(frame, {item.at})[0] if n >= {end} else None")
            slot[i] = f"v{i}"
    expressions: list[str] = []
    index_of = {id(f): i for i, f in enumerate(fields)}
    for channel in channels:
        item = channel.field
        i = index_of[id(item)]
        var = slot[i]
        expression = _binary_expression(channel, var, namespace, defs)
        if i in optional:
            expression = f"(None if {var} is None else {expression})"
        expressions.append(expression)
    lines.append(f"    return ({', '.join(expressions)},)")
    source = "\n".join(lines)
    exec(compile(source, f"<serial frame {frame.name}>", "exec"), namespace)
    min_length = max((f.at + f.width for i, f in enumerate(fields) if i not in optional), default=0)
    return namespace["decode"], min_length


def _const(value: object, namespace: dict[str, Any]) -> str:
    name = f"_k{len(namespace)}"
    namespace[name] = value
    return name


def _binary_expression(
    channel: ChannelSpec, var: str, namespace: dict[str, Any], defs: SerialDefinitions
) -> str:
    item = channel.field
    bit = channel.bit
    data_type = channel.config.data_type
    if item.type in _INT24:
        namespace["_from_bytes"] = int.from_bytes
        signed = item.type == "int24"
        var = f"_from_bytes({var}, {item.byte_order.value!r}, signed={signed})"
    elif item.word_order is not None:
        var = f"{_const(_word_unpacker(item), namespace)}({var})"
    if bit is not None:
        expr = f"(({var} >> {bit.start}) & {(1 << bit.length) - 1})"
        if data_type is ChannelDataType.BOOL:
            return f"{expr} != 0"
        if data_type is ChannelDataType.ENUM:
            return expr
        return _scaled(expr, bit.scale, bit.offset, data_type)
    if item.type == "string":
        decode = _const(_string_decoder(defs.text_encoding), namespace)
        if item.values:
            table = {raw: i for i, (raw, _) in enumerate(item.values)}
            misses: _Tally = namespace["_misses"]

            def lookup(raw: bytes, table: dict[int | str, int] = table) -> Value:
                key = table.get(raw.split(b"\x00", 1)[0].decode(defs.text_encoding, "replace"))
                if key is None:
                    misses.count += 1
                return key

            return f"{_const(lookup, namespace)}({var})"
        return f"{decode}({var})"
    if item.type in ("bytes", "bool"):
        return var
    if data_type is ChannelDataType.ENUM:
        return f"({var} & {_U32})" if not item.type.startswith("u") else var
    return _scaled(var, item.scale, item.offset, data_type)


_INT24: Final = frozenset({"int24", "uint24"})


def _swap_words(raw: bytes) -> bytes:
    """The 16-bit words of ``raw`` in the opposite order (bytes inside each word unchanged)."""
    return b"".join(raw[i : i + 2] for i in range(len(raw) - 2, -1, -2))


def _word_unpacker(item: FieldDef) -> Callable[[bytes], Any]:
    """Raw bytes of a word-ordered field → its value: the words are put in the byte order's
    order (most significant first for big, least for little), then unpacked as usual."""
    unpack = struct.Struct(item.byte_order.struct_prefix + FIXED_SIZE_TYPES[item.type][0]).unpack

    def decode(raw: bytes) -> Any:
        return unpack(_swap_words(raw))[0]

    return decode


def _pack_field(item: FieldDef, buf: bytearray, value: Any) -> None:
    """Write one binary field's raw value into ``buf`` at its offset."""
    if item.type in _INT24:
        data = int(value).to_bytes(3, item.byte_order.value, signed=item.type == "int24")
        buf[item.at : item.at + 3] = data
        return
    if item.word_order is not None:
        code = item.byte_order.struct_prefix + FIXED_SIZE_TYPES[item.type][0]
        buf[item.at : item.at + item.width] = _swap_words(struct.pack(code, value))
        return
    struct.pack_into(item.byte_order.struct_prefix + _struct_code(item), buf, item.at, value)


def _scaled(expr: str, scale: float, offset: float, data_type: ChannelDataType) -> str:
    if scale == 1.0 and offset == 0.0:
        return expr
    integer = data_type not in (ChannelDataType.DOUBLE, ChannelDataType.FLOAT)
    if integer:
        return f"({expr} * {int(scale)} + {int(offset)})"
    return f"({expr} * {scale!r} + {offset!r})"


def _string_decoder(encoding: str) -> Callable[[bytes], str]:
    def decode(raw: bytes) -> str:
        return raw.split(b"\x00", 1)[0].decode(encoding, errors="replace")

    return decode


def _string_for_key(item: FieldDef, key: Value) -> str:
    if isinstance(key, int) and not isinstance(key, bool) and 0 <= key < len(item.values):
        return str(item.values[key][0])
    return ""


def _raw_from_physical(value: Value, scale: float, offset: float, integer: bool) -> int | float:
    if value is None:
        return 0
    if isinstance(value, str | bytes):
        raise ValueError(f"expected a number, got {value!r}")
    number = (float(value) - offset) / scale if (scale != 1.0 or offset != 0.0) else value
    if integer:
        if isinstance(number, bool):
            return int(number)
        if isinstance(number, int):
            return number
        return round(number)
    return float(number)


# -- text compile -------------------------------------------------------------------------------


def _compile_text(
    frame: FrameDef, channels: tuple[ChannelSpec, ...], defs: SerialDefinitions, misses: _Tally
) -> Callable[[Any], tuple[Value, ...]]:
    """``decode(parts) -> values``: parts is a column list (csv, nmea) or a str → str mapping."""
    by_field: dict[int, list[ChannelSpec]] = {}
    for channel in channels:
        by_field.setdefault(id(channel.field), []).append(channel)
    steps: list[tuple[int | str, Callable[[str], Value], tuple[Callable[[Any], Value], ...]]] = []
    for item in frame.fields:
        if item.type == "skip":
            continue
        position: int | str = (
            item.key if defs.format in (FormatKind.KEY_VALUE, FormatKind.REGEX) else item.at
        )
        parse = _text_parser(item, misses)
        post = tuple(_bit_extractor(c) for c in by_field[id(item)]) if item.bits else ()
        steps.append((position, parse, post))
    # fields whose sign another column gives: (value index, that column, negative texts)
    columns_of = {f.name: f.at for f in frame.fields}
    signs: list[tuple[int, int, frozenset[str]]] = []
    index = 0
    for item in frame.fields:
        if item.type == "skip":
            continue
        if item.sign_field:
            signs.append((index, columns_of[item.sign_field], frozenset(item.sign_negative)))
        index += len(item.bits) if item.bits else 1
    nmea = defs.format is FormatKind.NMEA
    if defs.format in (FormatKind.KEY_VALUE, FormatKind.REGEX):

        def decode_mapping(parts: Any) -> tuple[Value, ...]:
            out: list[Value] = []
            for position, parse, post in steps:
                text = parts.get(position)
                value: Value = None if text is None or text == "" else parse(text)
                if post:
                    out.extend(p(value) for p in post)
                else:
                    out.append(value)
            return tuple(out)

        return decode_mapping
    # columns: (index, parse, post, reads two columns)
    columns = [
        (int(position), parse, post, nmea and parse in _TWO_PART) for position, parse, post in steps
    ]

    def decode(parts: Any) -> tuple[Value, ...]:
        out: list[Value] = []
        count = len(parts)
        for position, parse, post, two in columns:
            if position >= count:
                value: Value = None
            else:
                text = parts[position]
                if two:
                    second = parts[position + 1] if position + 1 < count else ""
                    value = None if text == "" and second == "" else parse(text + "," + second)
                else:
                    value = None if text == "" else parse(text)
            if post:
                out.extend(p(value) for p in post)
            else:
                out.append(value)
        return tuple(out)

    if not signs:
        return decode

    def decode_signed(parts: Any) -> tuple[Value, ...]:
        out = decode(parts)
        count = len(parts)
        changed: list[Value] | None = None
        for index, column, negative in signs:
            value = out[index]
            if value is not None and column < count and parts[column].strip() in negative:
                if changed is None:
                    changed = list(out)
                changed[index] = -value  # type: ignore[operator]  # a numeric field
        return out if changed is None else tuple(changed)

    return decode_signed


def _counted_groups(
    decode: Callable[[Any], tuple[Value, ...]],
    counted: list[tuple[int, int, str]],
    channels: Sequence[ChannelSpec],
) -> Callable[[Any], tuple[Value, ...]]:
    """Empty the channels of group instances beyond the count the frame's count field gives."""
    position = {c.name: i for i, c in enumerate(channels) if c.bit is None}
    gated = [(i, instance, position[name]) for i, instance, name in counted]

    def decode_counted(parts: Any) -> tuple[Value, ...]:
        values = decode(parts)
        out: list[Value] | None = None
        for i, instance, at in gated:
            count = values[at]
            if not isinstance(count, int) or instance >= count:
                if out is None:
                    out = list(values)
                out[i] = None
        return values if out is None else tuple(out)

    return decode_counted


class _Tally:
    """A count shared by the compiled decoders of one codec (text outside a value table)."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


def _talker(address: str) -> Value:
    """The talker of an NMEA address: ``GP`` of ``GPGGA``; ``P`` for proprietary sentences."""
    return "P" if address.startswith("P") else address[:2]


def _parse_lat(text: str) -> Value:
    return parse_nmea_field("lat", text)


def _parse_lon(text: str) -> Value:
    return parse_nmea_field("lon", text)


_TWO_PART: Final = (_parse_lat, _parse_lon)
"""NMEA parsers that read two fields (value, hemisphere)."""


def _text_parser(item: FieldDef, misses: _Tally) -> Callable[[str], Value]:
    kind = item.type
    if kind == "talker":
        return _talker
    if kind in ("lat", "lon"):
        return _parse_lat if kind == "lat" else _parse_lon
    if kind in ("time", "date"):
        return lambda text: parse_nmea_field(kind, text)
    if kind == "string":
        if item.values:
            table = {str(raw): i for i, (raw, _) in enumerate(item.values)}

            def lookup(text: str) -> Value:
                key = table.get(text.strip())
                if key is None:
                    misses.count += 1
                return key

            return lookup
        return lambda text: text
    if kind == "bool":
        return _parse_bool
    integer = kind in _INT_TYPES
    scale, offset = item.scale, item.offset
    if integer:
        if item.values:
            return lambda text: int(text) & _U32
        if _is_integral(scale) and _is_integral(offset):
            iscale, ioffset = int(scale), int(offset)
            if iscale == 1 and ioffset == 0:
                return lambda text: int(text)
            return lambda text: int(text) * iscale + ioffset
        return lambda text: int(text) * scale + offset
    if scale == 1.0 and offset == 0.0:
        return lambda text: float(text)
    return lambda text: float(text) * scale + offset


def _parse_bool(text: str) -> Value:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "t", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "f", "no", "n", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _bit_extractor(channel: ChannelSpec) -> Callable[[Any], Value]:
    bit = channel.bit
    assert bit is not None
    mask = (1 << bit.length) - 1
    start = bit.start
    data_type = channel.config.data_type
    scale, offset = bit.scale, bit.offset

    def extract(value: Any) -> Value:
        if value is None:
            return None
        raw = (int(value) >> start) & mask
        if data_type is ChannelDataType.BOOL:
            return raw != 0
        if (scale == 1.0 and offset == 0.0) or data_type is ChannelDataType.ENUM:
            return raw
        if data_type is ChannelDataType.DOUBLE:
            return raw * scale + offset
        return raw * int(scale) + int(offset)

    return extract


def _render_text(item: FieldDef, value: Value) -> list[str]:
    kind = item.type
    if kind in ("lat", "lon", "time", "date"):
        return render_nmea_field(kind, value)
    if value is None:
        return [""]
    if kind == "string":
        if item.values:
            return [_string_for_key(item, value)]
        return [str(value)]
    if kind == "bool":
        return ["1" if value else "0"]
    if isinstance(value, str | bytes):
        raise ValueError(f"{item.name}: expected a number, got {value!r}")
    integer = kind in _INT_TYPES
    if integer and item.values:
        key = int(value)
        return [str(_from_u32_key(key, item) if key > _I32_MAX else key)]
    raw = _raw_from_physical(value, item.scale, item.offset, integer)
    if integer:
        return [str(int(raw))]
    return [repr(float(raw))]
