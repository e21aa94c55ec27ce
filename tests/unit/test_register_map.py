"""Register maps: parsing with errors naming file/line/key, block planning, decoding."""

from __future__ import annotations

import math
import random
import struct
from pathlib import Path

import pytest
from pymodbus.client.mixin import ModbusClientMixin

from daq_agent.core.errors import ConfigError
from daq_agent.core.model import ChannelDataType
from daq_agent.decode.registers import (
    Function,
    Point,
    PointGroup,
    RegisterCodec,
    RegisterMap,
    load_register_map,
    loads_register_map,
    plan_blocks,
)

REPO = Path(__file__).resolve().parents[2]
PM_MAP = REPO / "configs" / "devices" / "pm_meter.yaml"


def _words(data: bytes) -> list[int]:
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


def _point(address: int, count: int = 1, function: Function = Function.HOLDING) -> Point:
    kind = "bool" if function.is_bit else ("string" if count > 1 else "uint16")
    return Point(f"p{address}", function, address, kind, count)


def test_shipped_power_meter_map_compiles_to_flows_and_one_block_per_run() -> None:
    """The example map gives two flows with typed channels; the power group is one request."""
    codec = RegisterCodec(load_register_map(PM_MAP), "pm1")
    assert [f.name for f in codec.flows] == ["pm1.power", "pm1.state"]
    power, state = codec.groups
    assert [(b.function, b.address, b.count) for b in power.blocks] == [
        (Function.HOLDING, 3000, 11)
    ]
    types = {c.name: c.data_type for c in state.flow_config.channels}
    assert types == {
        "mode": ChannelDataType.ENUM,
        "alarm": ChannelDataType.BOOL,
        "breaker_closed": ChannelDataType.BOOL,
        "phase_sequence": ChannelDataType.ENUM,
        "energy": ChannelDataType.DOUBLE,
        "serial_number": ChannelDataType.STRING,
        "remote_enabled": ChannelDataType.BOOL,
        "door_open": ChannelDataType.BOOL,
    }
    channels = {c.name: c for c in power.flow_config.channels}
    assert channels["voltage_an"].data_type is ChannelDataType.FLOAT
    assert channels["voltage_an"].unit == "V"
    assert channels["frequency"].data_type is ChannelDataType.DOUBLE  # scaled uint16


def test_blocks_merge_contiguous_points_and_gaps_up_to_max_gap() -> None:
    """Adjacent points share a request; a gap merges only when it is at most max_gap."""
    points = [_point(0), _point(1), _point(2), _point(6), _point(20)]
    assert [(b.address, b.count) for b in plan_blocks(points)] == [(0, 3), (6, 1), (20, 1)]
    merged = plan_blocks(points, max_gap=3)
    assert [(b.address, b.count) for b in merged] == [(0, 7), (20, 1)]
    assert [offset for _, offset in merged[0].points] == [0, 1, 2, 6]


def test_blocks_respect_the_request_limits_and_functions() -> None:
    """130 registers take two requests (125 + 5); 2001 coils take two; functions never mix."""
    registers = [_point(a) for a in range(130)]
    assert [(b.address, b.count) for b in plan_blocks(registers)] == [(0, 125), (125, 5)]
    coils = [_point(a, function=Function.COIL) for a in range(2001)]
    assert [(b.address, b.count) for b in plan_blocks(coils)] == [(0, 2000), (2000, 1)]
    mixed = [_point(0), _point(1, function=Function.INPUT), _point(2)]
    assert [(b.function, b.address, b.count) for b in plan_blocks(mixed, max_gap=5)] == [
        (Function.HOLDING, 0, 3),
        (Function.INPUT, 1, 1),
    ]
    with pytest.raises(ConfigError, match="more than one request"):
        plan_blocks([_point(0, 10)], max_registers=8)


def test_decode_word_orders_scale_enum_and_bit_fields() -> None:
    """Registers built with struct (big-endian words) decode in both word orders."""
    text = """
version: 1
name: t
groups:
  - name: g
    points:
      - {name: f_big, address: 0, type: float32}
      - {name: f_little, address: 2, type: float32, word_order: little}
      - {name: i64, address: 4, type: int64, word_order: little, scale: 0.5, offset: 1}
      - {name: s16, address: 8, type: int16}
      - {name: mode, address: 9, type: uint16, values: {0: idle, 7: run}}
      - name: flags
        address: 10
        type: uint16
        bits: [{name: a, bit: 0}, {name: b, bit: 3}, {name: n, bit: 4, length: 3}]
      - {name: label, address: 11, type: string, count: 3}
"""
    codec = RegisterCodec(loads_register_map(text), "dev")
    (group,) = codec.groups
    (block,) = group.blocks
    assert (block.address, block.count) == (0, 14)
    little = _words(struct.pack(">f", -12.25))
    i64 = _words(struct.pack(">q", -1234567890123))
    registers = (
        _words(struct.pack(">f", 230.5))
        + little[1:]
        + little[:1]
        + i64[::-1]
        + _words(struct.pack(">h", -2))
        + [7, 0b1011001]
        + _words(b"AB-12\0")
    )
    out: list[object] = [None] * group.width
    group.decode_block(0, registers, out)  # type: ignore[arg-type]
    assert out == [230.5, -12.25, -1234567890123 * 0.5 + 1, -2, 7, True, True, 5, "AB-12"]
    with pytest.raises(ValueError, match="has 3 values"):
        group.decode_block(0, registers[:3], out)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("body", "key", "line", "reason"),
    [
        (
            "      - {name: x, address: 1, type: float16}\n",
            "groups[0].points[0].type",
            7,
            "unknown type",
        ),
        (
            "      - {name: x, address: 65535, type: int32}\n",
            "groups[0].points[0].address",
            7,
            "past",
        ),
        (
            "      - {name: x, address: 1, function: coil, type: int16}\n",
            "groups[0].points[0].type",
            7,
            "bool",
        ),
        (
            "      - {name: x, address: 1, values: {0: off}}\n",
            "groups[0].points[0].values.0",
            7,
            "quote",
        ),
        (
            "      - {name: x, address: 1, bits: [{name: b, bit: 15, length: 2}]}\n",
            "groups[0].points[0].bits[0].length",
            7,
            "past bit 15",
        ),
        (
            "      - {name: x, address: 1}\n      - {name: x, address: 2}\n",
            "groups[0].points[1].name",
            8,
            "twice",
        ),
        (
            "      - {name: x, address: 1, colour: red}\n",
            "groups[0].points[0].colour",
            7,
            "unknown key",
        ),
    ],
)
def test_invalid_maps_name_the_file_line_and_key(
    tmp_path: Path, body: str, key: str, line: int, reason: str
) -> None:
    """Each mistake is reported with the file, the line and the key path."""
    path = tmp_path / "bad.yaml"
    path.write_text("version: 1\nname: t\ngroups:\n  - name: g\n    points:\n" + "\n" + body)
    with pytest.raises(ConfigError) as caught:
        load_register_map(path)
    error = caught.value
    assert (error.source, error.key, error.line) == (str(path), key, line)
    assert reason in error.reason


def test_block_unpack_equals_pymodbus_conversion_on_random_registers() -> None:
    """The one-unpack-per-block fast path gives what pymodbus's converter gives, point by point."""
    rng = random.Random(12)
    kinds = ["int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64"]
    for _ in range(300):
        points: list[Point] = []
        address = 0
        for i in range(rng.randint(1, 12)):
            address += rng.randint(0, 3)
            kind = rng.choice([*kinds, "string", "bool"])
            size = (
                rng.randint(1, 5)
                if kind == "string"
                else {
                    "int16": 1,
                    "uint16": 1,
                    "bool": 1,
                    "int32": 2,
                    "uint32": 2,
                    "float32": 2,
                }.get(kind, 4)
            )
            order = rng.choice(["big", "little"]) if size > 1 and kind != "string" else "big"
            points.append(Point(f"p{i}", Function.HOLDING, address, kind, size, order))
            address += size
        (block,) = plan_blocks(points, max_gap=3)
        registers = [rng.randrange(0x10000) for _ in range(block.count)]
        for point, off in block.points:  # strings: printable text, as a device sends
            if point.type == "string":
                for j in range(off, off + point.count):
                    registers[j] = 0x4142 + (registers[j] & 0x0F0F)
        codec_group = RegisterCodec(
            RegisterMap("t", (PointGroup("g", tuple(points)),), max_gap=3), "d"
        ).groups[0]
        fast: list[object] = [None] * codec_group.width
        codec_group.decode_block(0, registers, fast)  # type: ignore[arg-type]
        for (point, off), value in zip(block.points, fast, strict=True):
            words = registers[off : off + point.count]
            kind = point.type if point.type != "bool" else "uint16"
            data_type = ModbusClientMixin.DATATYPE[kind.upper()]
            expected = ModbusClientMixin.convert_from_registers(words, data_type, point.word_order)
            if point.type == "bool":
                expected = bool(expected)
            if isinstance(expected, float) and math.isnan(expected):
                assert isinstance(value, float)
                assert math.isnan(value)
            else:
                assert value == expected, (point, words)
