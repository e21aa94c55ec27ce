"""The serial frame-definition model: what a YAML definition file says, validated and typed.

These are plain, frozen values produced by :mod:`daq_agent.serialdefs.loader`; the codec
(:mod:`daq_agent.serialdefs.codec`) compiles them once into fast decoders and encoders.

::

    SerialDefinitions            one device type (a file)
    ├── FramingDef               how frames are cut from the byte stream
    ├── ChecksumDef | None       binary only: kind, position, span
    ├── DiscriminatorDef | None  which bytes / column / key select the frame type
    ├── TimestampDef | None      a device timestamp field (else host receive time)
    └── FrameDef ...             one per frame type (one flow each)
        └── FieldDef ...         one channel each (or one per BitDef when split into bits)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "BINARY_FIELD_TYPES",
    "FIXED_SIZE_TYPES",
    "STRUCT_INTEGER_TYPES",
    "TEXT_FIELD_TYPES",
    "TIMESTAMP_PARTS",
    "BitDef",
    "ByteOrder",
    "ChecksumDef",
    "ChecksumKind",
    "DiscriminatorDef",
    "FieldDef",
    "FormatKind",
    "FrameDef",
    "FramingDef",
    "FramingKind",
    "LengthFieldDef",
    "SerialDefinitions",
    "TimestampDef",
    "ValueTable",
]


class FormatKind(enum.StrEnum):
    """How a frame's content is laid out."""

    BINARY = "binary"
    CSV = "csv"
    KEY_VALUE = "key_value"
    REGEX = "regex"
    NMEA = "nmea"

    @property
    def is_text(self) -> bool:
        """True for the line-oriented text formats."""
        return self is not FormatKind.BINARY


class FramingKind(enum.StrEnum):
    """How frames are cut out of the byte stream."""

    LINE = "line"
    COBS = "cobs"
    SLIP = "slip"
    FIXED = "fixed"
    SYNC_LENGTH = "sync_length"


class ChecksumKind(enum.StrEnum):
    """The supported checksums (CRCs from crcmod's predefined catalogue)."""

    CRC8 = "crc8"
    CRC16_CCITT_FALSE = "crc16_ccitt_false"
    CRC16_MODBUS = "crc16_modbus"
    CRC16_XMODEM = "crc16_xmodem"
    CRC32 = "crc32"
    XOR8 = "xor8"
    SUM8 = "sum8"
    FLETCHER8 = "fletcher8"
    CRC = "crc"
    """A CRC with explicit parameters (``poly``, ``init``, ``reflect``, ``xorout``)."""

    @property
    def size(self) -> int:
        """Bytes the checksum occupies in the frame (a custom ``crc``: see ChecksumDef.size)."""
        return _CHECKSUM_SIZES[self]


_CHECKSUM_SIZES: Final = {
    ChecksumKind.CRC8: 1,
    ChecksumKind.CRC16_CCITT_FALSE: 2,
    ChecksumKind.CRC16_MODBUS: 2,
    ChecksumKind.CRC16_XMODEM: 2,
    ChecksumKind.CRC32: 4,
    ChecksumKind.XOR8: 1,
    ChecksumKind.SUM8: 1,
    ChecksumKind.FLETCHER8: 2,
    ChecksumKind.CRC: 0,
}


class ByteOrder(enum.StrEnum):
    """Endianness of a multi-byte value."""

    LITTLE = "little"
    BIG = "big"

    @property
    def struct_prefix(self) -> str:
        """The :mod:`struct` byte-order character."""
        return "<" if self is ByteOrder.LITTLE else ">"


FIXED_SIZE_TYPES: Final[dict[str, tuple[str, int]]] = {
    "int8": ("b", 1),
    "uint8": ("B", 1),
    "int16": ("h", 2),
    "uint16": ("H", 2),
    "int32": ("i", 4),
    "uint32": ("I", 4),
    "int64": ("q", 8),
    "uint64": ("Q", 8),
    "float32": ("f", 4),
    "float64": ("d", 8),
    "int24": ("3s", 3),
    "uint24": ("3s", 3),
}
"""Binary numeric types: their :mod:`struct` code and size in bytes (24-bit integers are read as
3 bytes and converted with ``int.from_bytes``)."""

STRUCT_INTEGER_TYPES: Final = frozenset(
    {"int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64"}
)
"""Integer types :mod:`struct` reads directly (discriminators, length fields)."""

BINARY_FIELD_TYPES: Final = frozenset({*FIXED_SIZE_TYPES, "bool", "string", "bytes"})
"""Every type a binary field may have (``bool`` is one byte, non-zero is true)."""

TEXT_FIELD_TYPES: Final = frozenset(
    {
        *(name for name in FIXED_SIZE_TYPES),
        "int",
        "uint",
        "float",
        "bool",
        "string",
        "lat",
        "lon",
        "time",
        "date",
        "skip",
        "talker",
    }
)
"""Every type a text field may have (``lat``/``lon``/``time``/``date``/``skip``/``talker``: NMEA
only; ``talker`` occupies no field: it is the first two letters of the address)."""

ValueTable = tuple[tuple[int | str, str], ...]
"""A value table: (raw value, name) pairs in declaration order."""


@dataclass(frozen=True, slots=True)
class BitDef:
    """A group of bits of an integer field, decoded as its own channel.

    Attributes:
        name: the channel name.
        start: the least significant bit of the group (0 = LSB of the field).
        length: the number of bits (1 bit without a value table is a bool channel).
        scale: multiplied with the raw bits.
        offset: added after scaling.
        unit: the channel unit.
        description: the channel description.
        values: a value table (raw → name): the channel becomes an enum.
        minimum: lowest physical value (simulator range).
        maximum: highest physical value (simulator range).
    """

    name: str
    start: int
    length: int
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""
    description: str = ""
    values: ValueTable = ()
    minimum: float | None = None
    maximum: float | None = None


@dataclass(frozen=True, slots=True)
class FieldDef:
    """One field of a frame.

    Attributes:
        name: the channel name (unique within its frame).
        type: a name from :data:`BINARY_FIELD_TYPES` or :data:`TEXT_FIELD_TYPES`.
        at: binary: byte offset in the frame; csv: column; nmea: field index after the address.
        key: key_value: the key; regex: the named group.
        size: binary ``string``/``bytes``: the size in bytes.
        byte_order: binary multi-byte types (within each 16-bit word when ``word_order`` is set).
        word_order: binary 32/64-bit types: the order of their 16-bit words (None: the same as
            ``byte_order``, a plain value; ``little`` with big ``byte_order`` is the Modbus
            "word-swapped" layout, low word first).
        scale: multiplied with the raw value.
        offset: added after scaling.
        unit: the channel unit.
        description: the channel description.
        values: a value table (raw → name): the channel becomes an enum.
        bits: when given, the field is split into these channels and is not a channel itself.
        sign_field: text formats: the name of another field of the frame whose text gives this
            value's sign (NMEA's E/W after a magnetic variation).
        sign_negative: the texts of ``sign_field`` that make the value negative.
        sign_positive: what the encoder writes in ``sign_field`` for a value >= 0.
        group: the repeated group this field is an instance member of ("" for none).
        group_index: its instance, 0-based (the channel is named ``{group}{index+1}_{name}``).
        group_count: the field whose value says how many instances a frame carries ("": as
            many as the frame has room for).
        minimum: lowest physical value (simulator range).
        maximum: highest physical value (simulator range).
    """

    name: str
    type: str
    at: int = 0
    key: str = ""
    size: int = 0
    byte_order: ByteOrder = ByteOrder.LITTLE
    word_order: ByteOrder | None = None
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""
    description: str = ""
    values: ValueTable = ()
    bits: tuple[BitDef, ...] = ()
    sign_field: str = ""
    sign_negative: tuple[str, ...] = ()
    sign_positive: str = ""
    group: str = ""
    group_index: int = 0
    group_count: str = ""
    minimum: float | None = None
    maximum: float | None = None

    @property
    def scaled(self) -> bool:
        """True when scale or offset change the raw value."""
        return self.scale != 1.0 or self.offset != 0.0

    @property
    def columns(self) -> int:
        """Text formats: the fields/columns occupied (``lat``/``lon`` 2, ``talker`` 0)."""
        if self.type in ("lat", "lon"):
            return 2
        return 0 if self.type == "talker" else 1

    def extent(self, text: bool) -> int:
        """What the field occupies: columns for text formats, bytes for binary."""
        return self.columns if text else self.width

    @property
    def width(self) -> int:
        """Binary: bytes occupied (text formats: see :attr:`columns`)."""
        if self.type in FIXED_SIZE_TYPES:
            return FIXED_SIZE_TYPES[self.type][1]
        if self.type in ("string", "bytes"):
            return max(self.size, 1)  # text strings have no size: one column
        if self.type in ("lat", "lon"):
            return 2
        if self.type == "talker":
            return 0
        return 1


@dataclass(frozen=True, slots=True)
class FrameDef:
    """One frame type: one flow.

    Attributes:
        name: the frame type name (part of the flow name).
        id: the discriminator value selecting this layout (None: the only frame type).
        fields: the fields in declaration order (the flow's channel order).
        description: what the frame is.
        length: binary: the exact frame length in bytes (None: at least the layout's extent).
        pattern: regex: the pattern (named groups are fields), matched against the whole line.
        render: regex: a ``str.format`` template to encode a frame (simulator, tests).
        rate: how many of these frames the device sends per second (the simulator's schedule).
        line: the line in the definition file, for error messages.
    """

    name: str
    id: int | str | None
    fields: tuple[FieldDef, ...]
    description: str = ""
    length: int | None = None
    pattern: str = ""
    render: str = ""
    rate: float | None = None
    line: int | None = None


@dataclass(frozen=True, slots=True)
class LengthFieldDef:
    """The length field of ``sync_length`` framing: total frame length = value + adjust.

    Attributes:
        at: byte offset of the length field from the start of the frame (sync included).
        type: ``uint8``, ``uint16`` or ``uint32``.
        byte_order: endianness of the length field.
        adjust: added to the field's value to obtain the total frame length in bytes.
    """

    at: int
    type: str = "uint8"
    byte_order: ByteOrder = ByteOrder.LITTLE
    adjust: int = 0

    @property
    def size(self) -> int:
        """Bytes occupied by the length field."""
        return FIXED_SIZE_TYPES[self.type][1]


@dataclass(frozen=True, slots=True)
class FramingDef:
    """How frames are cut out of the byte stream.

    Attributes:
        kind: the framing kind.
        max_length: longest frame accepted, bytes; longer input is discarded and counted.
        terminator: line framing: the bytes ending a line.
        sync: fixed / sync_length framing: the bytes starting every frame.
        length: fixed framing: the frame length in bytes.
        length_field: sync_length framing: where the length is and how to read it.
    """

    kind: FramingKind
    max_length: int = 1024
    terminator: bytes = b"\n"
    sync: bytes = b""
    length: int = 0
    length_field: LengthFieldDef | None = None


@dataclass(frozen=True, slots=True)
class ChecksumDef:
    """A binary frame's checksum.

    Attributes:
        kind: the algorithm.
        at: offset of the checksum in the frame; negative counts from the end (default: the
            last ``kind.size`` bytes).
        start: first byte covered (negative: from the end).
        end: one past the last byte covered (None: the checksum's own offset; negative: from
            the end).
        byte_order: how the checksum is stored (fletcher8: always CK_A then CK_B).
        poly: ``crc``: the generator polynomial with its top bit (0x11021 for a 16-bit CRC).
        init: ``crc``: the initial register value (as in the usual catalogues).
        reflect: ``crc``: bit-reflected input and output.
        xorout: ``crc``: XORed with the final value.
    """

    kind: ChecksumKind
    at: int | None = None
    start: int = 0
    end: int | None = None
    byte_order: ByteOrder = ByteOrder.BIG
    poly: int = 0
    init: int = 0
    reflect: bool = False
    xorout: int = 0

    @property
    def size(self) -> int:
        """Bytes the checksum occupies in the frame."""
        if self.kind is ChecksumKind.CRC:
            return (self.poly.bit_length() - 1) // 8
        return self.kind.size


@dataclass(frozen=True, slots=True)
class DiscriminatorDef:
    """What selects the frame type.

    Attributes:
        at: binary: byte offset; csv: column.
        type: binary: the integer type read at ``at``.
        byte_order: binary: endianness.
        key: key_value: the key whose value is the frame id.
    """

    at: int = 0
    type: str = "uint8"
    byte_order: ByteOrder = ByteOrder.LITTLE
    key: str = ""


TIMESTAMP_PARTS: Final = (
    "date",
    "time",
    "year",
    "month",
    "day",
    "hour",
    "minute",
    "second",
    "nanosecond",
)
"""The roles of the fields a timestamp can be built from: ``date`` (an NMEA ``date``, ISO text)
or ``year``/``month``/``day``; ``time`` (seconds since midnight, an NMEA ``time``) or
``hour``/``minute``/``second`` (+ ``nanosecond``, which may be negative as in UBX)."""


@dataclass(frozen=True, slots=True)
class TimestampDef:
    """A device timestamp: one time field (epoch + value * unit), or UTC date and time fields.

    Attributes:
        field: the name of the field holding the time ("" when built from ``parts``; frames
            without the field(s) use host time).
        unit_ns: nanoseconds per unit of the field's physical value.
        epoch_ns: the epoch, ns since the Unix epoch.
        epoch_host: the field is a device clock with no epoch of its own (a counter since power
            on): the first frame's host time anchors it, later frames follow the device's clock.
        rollover: the counter wraps at this value (e.g. 65536 for a uint16 ms counter): a value
            smaller than the previous one counts one more wrap (None: it never wraps).
        parts: (role, field name) pairs of a UTC date and time (see :data:`TIMESTAMP_PARTS`).
    """

    field: str
    unit_ns: int = 1_000_000_000
    epoch_ns: int = 0
    epoch_host: bool = False
    rollover: int | None = None
    parts: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class SerialDefinitions:
    """A device type's frame definitions (one YAML file).

    Attributes:
        name: the device type name.
        format: the content format.
        framing: how frames are cut from the stream.
        frames: the frame types.
        description: what the device is.
        checksum: binary: the checksum, if any.
        discriminator: what selects the frame type (None: exactly one frame type, or NMEA /
            regex, which select by sentence id / pattern).
        timestamp: a device timestamp field (None: host receive time).
        delimiter: csv: the column delimiter.
        pair_separator: key_value: between pairs (None: any whitespace).
        kv_separator: key_value: between a key and its value.
        require_checksum: nmea: reject sentences without ``*hh``.
        text_encoding: text formats: how bytes become text.
        source: the file the definitions came from.
    """

    name: str
    format: FormatKind
    framing: FramingDef
    frames: tuple[FrameDef, ...]
    description: str = ""
    checksum: ChecksumDef | None = None
    discriminator: DiscriminatorDef | None = None
    timestamp: TimestampDef | None = None
    delimiter: str = ","
    pair_separator: str | None = None
    kv_separator: str = "="
    require_checksum: bool = True
    text_encoding: str = "ascii"
    source: str = field(default="", compare=False)

    def frame(self, name: str) -> FrameDef:
        """The frame type called ``name``.

        Raises:
            KeyError: there is none.
        """
        for frame in self.frames:
            if frame.name == name:
                return frame
        raise KeyError(name)
