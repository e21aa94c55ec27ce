"""Modbus register maps: a YAML description of a device's registers, compiled to flows and blocks.

A map describes what to read from one kind of device (a power meter, a PLC) and how each value
is encoded; a :class:`RegisterCodec` compiles it for one device alias into flows (one per poll
group), read blocks (contiguous runs of registers or bits, at most one request each) and a
decoder that turns the blocks' replies into the values of the group's sample::

    version: 1
    name: pm5560
    word_order: little        # default for 32/64-bit values: big (ABCD) or little (CDAB)
    max_gap: 4                # merge two reads separated by at most this many unused registers
    groups:                   # one flow per group: {device}.{group}
      - name: power
        points:
          - {name: voltage_an, function: holding, address: 3027, type: float32, unit: V}
          - {name: energy, function: holding, address: 3203, type: int64, scale: 0.001}
          - {name: mode, function: holding, address: 3300, type: uint16,
             values: {0: off, 1: run, 2: fault}}
          - name: status
            function: holding
            address: 3301
            type: uint16
            bits: [{name: alarm, bit: 0}, {name: phase_seq, bit: 1, length: 2}]

The format is documented in ``docs/devices.md``. A block's registers are decoded with one
``struct`` unpack, equal to pymodbus's :meth:`ModbusClientMixin.convert_from_registers` (which
decodes points that overlap, and which the tests use as the oracle).
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from pymodbus.client.mixin import ModbusClientMixin

from daq_agent.core.errors import ConfigError
from daq_agent.core.model import ChannelConfig, ChannelDataType, ChannelEnumType, FlowConfig
from daq_agent.core.sample import Value
from daq_agent.core.yamlfile import parse_yaml, read_text

__all__ = [
    "MAX_BITS_PER_REQUEST",
    "MAX_REGISTERS_PER_REQUEST",
    "BitField",
    "Block",
    "CompiledGroup",
    "Function",
    "Point",
    "PointGroup",
    "RegisterCodec",
    "RegisterMap",
    "load_register_map",
    "loads_register_map",
    "parse_register_map",
    "plan_blocks",
]

MAX_REGISTERS_PER_REQUEST: Final = 125
"""The most registers one read (function 3 or 4) may ask for (Modbus application protocol)."""
MAX_BITS_PER_REQUEST: Final = 2000
"""The most coils or discrete inputs one read (function 1 or 2) may ask for."""

_DT = ModbusClientMixin.DATATYPE
_U32: Final = 0xFFFFFFFF


class Function(enum.IntEnum):
    """The Modbus read function of a point (the integer is the function code)."""

    COIL = 1
    DISCRETE = 2
    HOLDING = 3
    INPUT = 4

    @property
    def is_bit(self) -> bool:
        """True for coils and discrete inputs (one bit per address)."""
        return self in (Function.COIL, Function.DISCRETE)


_FUNCTIONS: Final = {
    "holding": Function.HOLDING,
    "input": Function.INPUT,
    "coil": Function.COIL,
    "discrete": Function.DISCRETE,
}
_TYPES: Final[dict[str, tuple[Any, int]]] = {
    # type → (pymodbus data type, registers)
    "int16": (_DT.INT16, 1),
    "uint16": (_DT.UINT16, 1),
    "int32": (_DT.INT32, 2),
    "uint32": (_DT.UINT32, 2),
    "int64": (_DT.INT64, 4),
    "uint64": (_DT.UINT64, 4),
    "float32": (_DT.FLOAT32, 2),
    "float64": (_DT.FLOAT64, 4),
    "string": (_DT.STRING, 0),
    "bool": (_DT.UINT16, 1),
}
_INT_RANGES: Final = {
    "int16": (-(1 << 15), (1 << 15) - 1),
    "uint16": (0, (1 << 16) - 1),
    "int32": (-(1 << 31), (1 << 31) - 1),
    "uint32": (0, (1 << 32) - 1),
    "int64": (-(1 << 63), (1 << 63) - 1),
    "uint64": (0, (1 << 64) - 1),
}
_NATIVE: Final = {
    "int16": ChannelDataType.INT_32,
    "uint16": ChannelDataType.UINT_32,
    "int32": ChannelDataType.INT_32,
    "uint32": ChannelDataType.UINT_32,
    "int64": ChannelDataType.INT_64,
    "uint64": ChannelDataType.UINT_64,
    "float32": ChannelDataType.FLOAT,
    "float64": ChannelDataType.DOUBLE,
    "string": ChannelDataType.STRING,
    "bool": ChannelDataType.BOOL,
}

WordOrder = Literal["big", "little"]


@dataclass(frozen=True, slots=True)
class BitField:
    """Bits of an integer point that form a channel of their own.

    Attributes:
        name: the channel name.
        bit: the lowest bit (0 = least significant).
        length: how many bits (1: a bool channel, more: an unsigned integer).
        values: an enum over the field's value, (key, label) pairs.
        unit: the unit.
        description: what it means.
    """

    name: str
    bit: int
    length: int = 1
    values: tuple[tuple[int, str], ...] = ()
    unit: str = ""
    description: str = ""


@dataclass(frozen=True, slots=True)
class Point:
    """One value of the device: where it is, how it is encoded, what it becomes.

    Attributes:
        name: the channel name (unused when the point has bit fields: each is a channel).
        function: the read function.
        address: the first register (or bit) address, 0-based as on the wire.
        type: ``int16``… ``float64``, ``string`` or ``bool``.
        count: registers the point spans (only chosen for ``string``; the type's size else).
        word_order: for 32/64-bit values: ``big`` (high word first) or ``little``.
        scale: engineering value = raw * scale + offset.
        offset: see ``scale``.
        unit: the unit.
        description: what it means.
        values: an enum: (raw key, label) pairs.
        bits: bit fields: each becomes a channel instead of the point.
        minimum: the lowest expected value (documentation; the simulator's range).
        maximum: the highest expected value.
        line: the line of the point in its file (errors).
    """

    name: str
    function: Function
    address: int
    type: str
    count: int = 1
    word_order: WordOrder = "big"
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""
    description: str = ""
    values: tuple[tuple[int, str], ...] = ()
    bits: tuple[BitField, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    line: int | None = field(default=None, compare=False)

    @property
    def end(self) -> int:
        """One past the last address the point spans."""
        return self.address + self.count

    @property
    def scaled(self) -> bool:
        """True when scale or offset change the raw value."""
        return self.scale != 1.0 or self.offset != 0.0


@dataclass(frozen=True, slots=True)
class PointGroup:
    """Points read together and sent as one flow (one sample per poll).

    Attributes:
        name: the group name (``{frame}`` in the flow name template).
        points: the points, in channel order.
        rate_hz: the group's own poll rate (None: the device's).
        description: what it is.
    """

    name: str
    points: tuple[Point, ...]
    rate_hz: float | None = None
    description: str = ""


@dataclass(frozen=True, slots=True)
class RegisterMap:
    """A device type's register map (one YAML file).

    Attributes:
        name: the device type.
        groups: the poll groups.
        description: what the device is.
        max_gap: unused registers (or bits) a block may span to merge two reads.
        max_registers: the most registers per request (devices may allow fewer than 125).
        max_bits: the most coils/discrete inputs per request.
        source: the file.
    """

    name: str
    groups: tuple[PointGroup, ...]
    description: str = ""
    max_gap: int = 0
    max_registers: int = MAX_REGISTERS_PER_REQUEST
    max_bits: int = MAX_BITS_PER_REQUEST
    source: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class Block:
    """One read request: a contiguous run of addresses of one function.

    Attributes:
        function: the read function.
        address: the first address.
        count: how many registers (or bits).
        points: the points read by it, with each one's offset into the reply.
    """

    function: Function
    address: int
    count: int
    points: tuple[tuple[Point, int], ...]


def plan_blocks(
    points: Sequence[Point],
    *,
    max_gap: int = 0,
    max_registers: int = MAX_REGISTERS_PER_REQUEST,
    max_bits: int = MAX_BITS_PER_REQUEST,
) -> tuple[Block, ...]:
    """The fewest read requests covering ``points``, per function in address order.

    Points of one function are merged into a block while the block stays within the request
    limit and the unused addresses between two points are at most ``max_gap`` (overlapping
    points share the block).

    Raises:
        ConfigError: one point alone is larger than a request may be.
    """
    out: list[Block] = []
    for function in Function:
        mine = sorted((p for p in points if p.function is function), key=lambda p: p.address)
        limit = max_bits if function.is_bit else max_registers
        start = end = -1
        members: list[Point] = []
        for point in mine:
            if point.count > limit:
                raise ConfigError(
                    f"point {point.name!r} spans {point.count} addresses, more than one "
                    f"request may read ({limit})",
                    line=point.line,
                )
            if members and point.address - end <= max_gap and max(end, point.end) - start <= limit:
                members.append(point)
                end = max(end, point.end)
                continue
            if members:
                out.append(_block(function, start, end, members))
            members, start, end = [point], point.address, point.end
        if members:
            out.append(_block(function, start, end, members))
    return tuple(out)


def _block(function: Function, start: int, end: int, members: list[Point]) -> Block:
    return Block(function, start, end - start, tuple((p, p.address - start) for p in members))


# -- compiled ---------------------------------------------------------------------------------


class CompiledGroup:
    """A group compiled for one device: its flow, blocks and decoder.

    Attributes:
        group: the definition.
        flow: the flow name.
        blocks: the read requests of one poll.
        flow_config: the flow and its channels.
    """

    __slots__ = ("_layouts", "_slots", "blocks", "flow", "flow_config", "group")

    def __init__(self, group: PointGroup, flow: str, blocks: tuple[Block, ...]) -> None:
        self.group = group
        self.flow = flow
        self.blocks = blocks
        channels: list[ChannelConfig] = []
        slot: dict[str, int] = {}
        for point in group.points:
            if point.bits:
                for bit in point.bits:
                    slot[f"{point.name}\0{bit.name}"] = len(channels)
                    channels.append(_bit_channel(bit))
            else:
                slot[point.name] = len(channels)
                channels.append(_point_channel(point))
        self.flow_config = FlowConfig(flow, channels)
        # per block: (point, offset into the reply, first channel index)
        self._slots = tuple(
            tuple(
                (p, off, slot[f"{p.name}\0{p.bits[0].name}"] if p.bits else slot[p.name])
                for p, off in block.points
            )
            for block in blocks
        )
        self._layouts = tuple(_BlockLayout.build(block) for block in blocks)

    @property
    def width(self) -> int:
        """How many channels the flow has."""
        return len(self.flow_config.channels)

    def decode_block(
        self, index: int, data: Sequence[int] | Sequence[bool], out: list[Value]
    ) -> None:
        """Decode the reply to block ``index`` (registers or bits) into ``out`` (channel order).

        Raises:
            ValueError: the reply is shorter than the block or a value does not convert.
        """
        block = self.blocks[index]
        if len(data) < block.count:
            raise ValueError(
                f"reply to {block.function.name.lower()} {block.address}+{block.count} has "
                f"{len(data)} values"
            )
        layout = self._layouts[index]
        raws: Sequence[Any] = (
            layout.unpack(data)
            if layout is not None
            else [
                bool(data[off])
                if p.function.is_bit
                else _convert(p, [int(v) for v in data[off : off + p.count]])
                for p, off, _ in self._slots[index]
            ]
        )
        for (point, _, at), raw in zip(self._slots[index], raws, strict=True):
            if point.function.is_bit:
                out[at] = bool(raw)
                continue
            if point.bits:
                number = int(raw)
                for i, bit in enumerate(point.bits):
                    part = (number >> bit.bit) & ((1 << bit.length) - 1)
                    out[at + i] = bool(part) if bit.length == 1 and not bit.values else part
            elif point.type == "bool":
                out[at] = bool(raw)
            elif point.values or not point.scaled or point.type == "string":
                out[at] = raw
            else:
                out[at] = float(raw) * point.scale + point.offset


_STRUCT_CODES: Final = {
    "int16": "h",
    "uint16": "H",
    "int32": "i",
    "uint32": "I",
    "int64": "q",
    "uint64": "Q",
    "float32": "f",
    "float64": "d",
    "bool": "H",
}


class _BlockLayout:
    """A register block decoded with one ``struct`` unpack (the words of little-word-order
    points reordered first), equal to pymodbus's ``convert_from_registers`` point by point
    (tests/unit/test_register_map.py checks it on random registers).

    Why not the library: on the 250-float map of benchmarks/modbus_poll.py, one
    ``convert_from_registers`` call per point cost ~3 us of client CPU per register read, more
    than the whole request path (1.7 us per register); one unpack per block is far below it.
    """

    __slots__ = ("_count", "_perm", "_strings", "_struct")

    def __init__(
        self, count: int, perm: tuple[int, ...] | None, fmt: str, strings: tuple[int, ...]
    ) -> None:
        self._count = count
        self._perm = perm
        self._struct = struct.Struct(fmt)
        self._strings = strings

    @classmethod
    def build(cls, block: Block) -> _BlockLayout | None:
        """The layout of a register block (None for bits, or points that overlap)."""
        if block.function.is_bit:
            return None
        fmt = [">"]
        perm = list(range(block.count))
        strings: list[int] = []
        at = 0
        for i, (point, off) in enumerate(block.points):
            if off < at:
                return None  # overlapping points: decoded one by one
            fmt.append("x" * (2 * (off - at)))
            if point.type == "string":
                fmt.append(f"{2 * point.count}s")
                strings.append(i)
            else:
                fmt.append(_STRUCT_CODES[point.type])
                if point.word_order == "little" and point.count > 1:
                    perm[off : off + point.count] = reversed(range(off, off + point.count))
            at = off + point.count
        fmt.append("x" * (2 * (block.count - at)))
        identity = perm == list(range(block.count))
        return cls(block.count, None if identity else tuple(perm), "".join(fmt), tuple(strings))

    def unpack(self, data: Sequence[int] | Sequence[bool]) -> list[Any]:
        """The raw value of every point of the block, in block order.

        Raises:
            ValueError: a register is not 16-bit or a string is not UTF-8.
        """
        words = data[: self._count]
        if self._perm is not None:
            words = [words[i] for i in self._perm]
        try:
            raw = self._struct.unpack(struct.pack(f">{self._count}H", *words))
        except struct.error as exc:
            raise ValueError(f"not a 16-bit register: {exc}") from exc
        values: list[Any] = list(raw)
        for i in self._strings:
            values[i] = values[i].rstrip(b"\0").decode("utf-8")
        return values


def _convert(point: Point, registers: list[int]) -> int | float | str:
    data_type, _ = _TYPES[point.type]
    value = ModbusClientMixin.convert_from_registers(registers, data_type, point.word_order)
    if isinstance(value, list):  # a multiple of the type's size: cannot happen for a point
        raise ValueError(f"point {point.name!r}: {len(registers)} registers for one value")
    return value


def encode_point(point: Point, value: float | int | str | bool) -> list[int] | list[bool]:
    """The registers (or bits) holding ``value`` (an engineering value) for ``point``; what a
    device would answer. For a point with bit fields, ``value`` is the whole raw integer."""
    if point.function.is_bit:
        return [bool(value)]
    data_type, _ = _TYPES[point.type]
    raw: int | float | str
    if point.type == "string":
        text = str(value).encode()[: point.count * 2].ljust(point.count * 2, b"\0")
        return [int.from_bytes(text[i : i + 2], "big") for i in range(0, len(text), 2)]
    if point.type == "bool":
        raw = int(bool(value))
    elif point.scaled and not point.values and not point.bits:
        raw = (float(value) - point.offset) / point.scale
    else:
        raw = value if not isinstance(value, str) else 0
    if point.type in _INT_RANGES:
        low, high = _INT_RANGES[point.type]
        raw = min(max(round(raw), low), high)
    else:
        raw = float(raw)
    return ModbusClientMixin.convert_to_registers(raw, data_type, point.word_order)


def _enum_types(values: tuple[tuple[int, str], ...]) -> list[ChannelEnumType]:
    return [ChannelEnumType(label, key & _U32, is_signed=key < 0) for key, label in values]


def _point_channel(point: Point) -> ChannelConfig:
    desc, unit = point.description or None, point.unit or None
    if point.values:
        return ChannelConfig(
            point.name, ChannelDataType.ENUM, desc, unit, enum_types=_enum_types(point.values)
        )
    if point.function.is_bit:
        return ChannelConfig(point.name, ChannelDataType.BOOL, desc, unit)
    if point.scaled and point.type not in ("string", "bool"):
        return ChannelConfig(point.name, ChannelDataType.DOUBLE, desc, unit)
    return ChannelConfig(point.name, _NATIVE[point.type], desc, unit)


def _bit_channel(bit: BitField) -> ChannelConfig:
    desc, unit = bit.description or None, bit.unit or None
    if bit.values:
        return ChannelConfig(
            bit.name, ChannelDataType.ENUM, desc, unit, enum_types=_enum_types(bit.values)
        )
    if bit.length == 1:
        return ChannelConfig(bit.name, ChannelDataType.BOOL, desc, unit)
    return ChannelConfig(bit.name, ChannelDataType.UINT_32, desc, unit)


class RegisterCodec:
    """A register map compiled for one device.

    Args:
        register_map: the map.
        device: the device alias (``{device}`` in flow names).
        flow_name_template: flow names from ``{device}`` and ``{frame}`` (the group's name).

    Raises:
        ConfigError: two groups get one flow name, or a point is too large for one request.
    """

    __slots__ = ("device", "groups", "map")

    def __init__(
        self,
        register_map: RegisterMap,
        device: str,
        flow_name_template: str = "{device}.{frame}",
    ) -> None:
        self.map = register_map
        self.device = device
        groups: list[CompiledGroup] = []
        names: set[str] = set()
        for group in register_map.groups:
            try:
                flow = flow_name_template.format(device=device, frame=group.name)
            except (KeyError, IndexError, ValueError) as exc:
                raise ConfigError(
                    f"invalid flow name template {flow_name_template!r}: {exc}"
                ) from exc
            if flow in names:
                raise ConfigError(f"flow name {flow!r} is not unique", source=register_map.source)
            names.add(flow)
            try:
                blocks = plan_blocks(
                    group.points,
                    max_gap=register_map.max_gap,
                    max_registers=register_map.max_registers,
                    max_bits=register_map.max_bits,
                )
            except ConfigError as exc:
                raise ConfigError(
                    exc.reason,
                    source=register_map.source,
                    key=f"groups.{group.name}",
                    line=exc.line,
                ) from exc
            groups.append(CompiledGroup(group, flow, blocks))
        self.groups: tuple[CompiledGroup, ...] = tuple(groups)

    @property
    def flows(self) -> list[FlowConfig]:
        """One flow per group, in map order."""
        return [g.flow_config for g in self.groups]

    @property
    def requests_per_poll(self) -> int:
        """Read requests one poll of every group makes."""
        return sum(len(g.blocks) for g in self.groups)


# -- loading ----------------------------------------------------------------------------------


def load_register_map(path: str | Path) -> RegisterMap:
    """Load a register map file.

    Raises:
        ConfigError: the file cannot be read, is not YAML, or is invalid (names file, line, key).
    """
    return loads_register_map(read_text(path), source=str(path))


def loads_register_map(text: str, *, source: str = "<string>") -> RegisterMap:
    """Parse a register map from YAML text.

    Raises:
        ConfigError: invalid YAML or an invalid map (names source, line, key).
    """
    document, lines = parse_yaml(text, source)
    return parse_register_map(document, source=source, lines=lines)


def parse_register_map(
    document: object, *, source: str = "", lines: Mapping[str, int] | None = None
) -> RegisterMap:
    """Validate a parsed register map document.

    Raises:
        ConfigError: naming the source, line and key path of the first problem.
    """
    return _MapParser(source, lines or {}).parse(document)


_TOP_KEYS: Final = frozenset(
    {
        "version",
        "name",
        "description",
        "word_order",
        "max_gap",
        "max_registers",
        "max_bits",
        "groups",
    }
)
_GROUP_KEYS: Final = frozenset({"name", "description", "rate_hz", "points"})
_POINT_KEYS: Final = frozenset(
    {
        "name",
        "function",
        "address",
        "type",
        "count",
        "word_order",
        "scale",
        "offset",
        "unit",
        "description",
        "values",
        "bits",
        "min",
        "max",
    }
)
_BIT_KEYS: Final = frozenset({"name", "bit", "length", "values", "unit", "description"})


class _MapParser:
    __slots__ = ("lines", "source")

    def __init__(self, source: str, lines: Mapping[str, int]) -> None:
        self.source = source
        self.lines = lines

    def error(self, reason: str, key: str) -> ConfigError:
        line = self.lines.get(key)
        probe = key
        while line is None and probe:
            probe = probe.rsplit(".", 1)[0] if "." in probe else ""
            line = self.lines.get(probe)
        return ConfigError(reason, source=self.source or None, key=key or None, line=line)

    def mapping(self, raw: object, where: str, allowed: frozenset[str]) -> Mapping[str, Any]:
        if not isinstance(raw, Mapping):
            raise self.error(f"must be a mapping, not {type(raw).__name__}", where or "<document>")
        for key in raw:
            if key not in allowed:
                known = ", ".join(sorted(allowed))
                raise self.error(f"unknown key (expected one of: {known})", _join(where, key))
        return raw

    def string(self, raw: Mapping[str, Any], key: str, where: str, default: str | None) -> str:
        value = raw.get(key, default)
        if not isinstance(value, str) or (default is None and not value):
            what = "is required" if value is None else f"must be a string, not {value!r}"
            raise self.error(what, _join(where, key))
        return value

    def integer(
        self, raw: Mapping[str, Any], key: str, where: str, default: int | None, low: int, high: int
    ) -> int:
        value = raw.get(key, default)
        if value is None:
            raise self.error("is required", _join(where, key))
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"must be an integer, not {value!r}", _join(where, key))
        if not low <= value <= high:
            raise self.error(f"must be between {low} and {high}, got {value}", _join(where, key))
        return value

    def number(self, raw: Mapping[str, Any], key: str, where: str) -> float | None:
        value = raw.get(key)
        if value is None:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise self.error(f"must be a finite number, not {value!r}", _join(where, key))
        return float(value)

    def word_order(self, raw: Mapping[str, Any], where: str, default: WordOrder) -> WordOrder:
        value = raw.get("word_order", default)
        if value not in ("big", "little"):
            raise self.error(f"must be big or little, not {value!r}", _join(where, "word_order"))
        return value  # type: ignore[no-any-return]  # checked above

    def enum(self, raw: Mapping[str, Any], where: str) -> tuple[tuple[int, str], ...]:
        values = raw.get("values")
        if values is None:
            return ()
        at = _join(where, "values")
        if not isinstance(values, Mapping) or not values:
            raise self.error("must be a non-empty mapping of integer → label", at)
        out = []
        for key, label in values.items():
            if isinstance(key, bool) or not isinstance(key, int):
                raise self.error(f"keys must be integers, not {key!r}", at)
            if not isinstance(label, str) or not label:
                hint = (
                    " (quote it: YAML reads off/on/yes/no as booleans)"
                    if isinstance(label, bool)
                    else ""
                )
                raise self.error(
                    f"labels must be non-empty strings, not {label!r}{hint}", f"{at}.{key}"
                )
            out.append((key, label))
        return tuple(out)

    def parse(self, document: object) -> RegisterMap:
        if document is None:
            raise self.error("the register map is empty", "")
        top = self.mapping(document, "", _TOP_KEYS)
        version = top.get("version", 1)
        if version != 1:
            raise self.error(f"unsupported version {version!r} (expected 1)", "version")
        word_order = self.word_order(top, "", "big")
        groups_raw = top.get("groups")
        if not isinstance(groups_raw, list) or not groups_raw:
            raise self.error("must be a non-empty list of poll groups", "groups")
        groups: list[PointGroup] = []
        names: set[str] = set()
        for i, item in enumerate(groups_raw):
            group = self.group(item, f"groups[{i}]", word_order)
            if group.name in names:
                raise self.error(f"duplicate group name {group.name!r}", f"groups[{i}].name")
            names.add(group.name)
            groups.append(group)
        return RegisterMap(
            name=self.string(top, "name", "", None),
            description=self.string(top, "description", "", ""),
            groups=tuple(groups),
            max_gap=self.integer(top, "max_gap", "", 0, 0, MAX_BITS_PER_REQUEST),
            max_registers=self.integer(
                top, "max_registers", "", MAX_REGISTERS_PER_REQUEST, 1, MAX_REGISTERS_PER_REQUEST
            ),
            max_bits=self.integer(
                top, "max_bits", "", MAX_BITS_PER_REQUEST, 1, MAX_BITS_PER_REQUEST
            ),
            source=self.source,
        )

    def group(self, raw: object, where: str, word_order: WordOrder) -> PointGroup:
        group = self.mapping(raw, where, _GROUP_KEYS)
        name = self.string(group, "name", where, None)
        rate = self.number(group, "rate_hz", where)
        if rate is not None and rate <= 0:
            raise self.error(f"must be > 0, got {rate}", f"{where}.rate_hz")
        points_raw = group.get("points")
        if not isinstance(points_raw, list) or not points_raw:
            raise self.error("must be a non-empty list of points", f"{where}.points")
        points = [
            self.point(item, f"{where}.points[{i}]", word_order)
            for i, item in enumerate(points_raw)
        ]
        channels: set[str] = set()
        for i, point in enumerate(points):
            for channel in [b.name for b in point.bits] or [point.name]:
                if channel in channels:
                    raise self.error(
                        f"channel {channel!r} appears twice in group {name!r}",
                        f"{where}.points[{i}].name",
                    )
                channels.add(channel)
        return PointGroup(
            name=name,
            points=tuple(points),
            rate_hz=rate,
            description=self.string(group, "description", where, ""),
        )

    def point(self, raw: object, where: str, word_order: WordOrder) -> Point:
        point = self.mapping(raw, where, _POINT_KEYS)
        name = self.string(point, "name", where, None)
        fname = self.string(point, "function", where, "holding")
        function = _FUNCTIONS.get(fname)
        if function is None:
            known = ", ".join(_FUNCTIONS)
            raise self.error(f"unknown function {fname!r} (known: {known})", f"{where}.function")
        address = self.integer(point, "address", where, None, 0, 0xFFFF)
        kind = self.string(point, "type", where, "bool" if function.is_bit else "uint16")
        if kind not in _TYPES:
            known = ", ".join(_TYPES)
            raise self.error(f"unknown type {kind!r} (known: {known})", f"{where}.type")
        if function.is_bit and kind != "bool":
            raise self.error(f"{fname} points are bool, not {kind}", f"{where}.type")
        size = _TYPES[kind][1]
        if kind == "string":
            count = self.integer(point, "count", where, None, 1, MAX_REGISTERS_PER_REQUEST)
        else:
            if "count" in point and point["count"] != size:
                raise self.error(
                    f"a {kind} spans {size} register(s); count is only for strings",
                    f"{where}.count",
                )
            count = size
        if address + count > 0x10000:
            raise self.error("runs past the last address (65535)", f"{where}.address")
        scale = self.number(point, "scale", where)
        offset = self.number(point, "offset", where)
        if scale == 0.0:
            raise self.error("must not be 0", f"{where}.scale")
        values = self.enum(point, where)
        bits = self.bits(point, where, kind)
        numeric = kind not in ("string", "bool") and not function.is_bit
        if (scale is not None or offset is not None) and not numeric:
            raise self.error(f"a {kind} point cannot be scaled", f"{where}.scale")
        if (values or bits) and (kind not in _INT_RANGES or function.is_bit):
            raise self.error(f"values and bits need an integer type, not {kind}", f"{where}.type")
        if values and bits:
            raise self.error("give values on the bit fields, not on the point", f"{where}.values")
        if (values or bits) and (scale is not None or offset is not None):
            raise self.error("an enum or bit-field point cannot be scaled", f"{where}.scale")
        return Point(
            name=name,
            function=function,
            address=address,
            type=kind,
            count=count,
            # the map's word order is for 32/64-bit values; a string's registers are in order
            word_order=self.word_order(point, where, word_order if size > 1 else "big"),
            scale=1.0 if scale is None else scale,
            offset=0.0 if offset is None else offset,
            unit=self.string(point, "unit", where, ""),
            description=self.string(point, "description", where, ""),
            values=values,
            bits=bits,
            minimum=self.number(point, "min", where),
            maximum=self.number(point, "max", where),
            line=self.lines.get(where),
        )

    def bits(self, point: Mapping[str, Any], where: str, kind: str) -> tuple[BitField, ...]:
        raw = point.get("bits")
        if raw is None:
            return ()
        at = f"{where}.bits"
        if not isinstance(raw, list) or not raw:
            raise self.error("must be a non-empty list of bit fields", at)
        width = _TYPES[kind][1] * 16
        out: list[BitField] = []
        for i, item in enumerate(raw):
            here = f"{at}[{i}]"
            entry = self.mapping(item, here, _BIT_KEYS)
            bit = self.integer(entry, "bit", here, None, 0, width - 1)
            length = self.integer(entry, "length", here, 1, 1, 32)
            if bit + length > width:
                raise self.error(f"runs past bit {width - 1} of a {kind}", f"{here}.length")
            out.append(
                BitField(
                    name=self.string(entry, "name", here, None),
                    bit=bit,
                    length=length,
                    values=self.enum(entry, here),
                    unit=self.string(entry, "unit", here, ""),
                    description=self.string(entry, "description", here, ""),
                )
            )
        return tuple(out)


def _join(prefix: str, key: object) -> str:
    return f"{prefix}.{key}" if prefix else str(key)
