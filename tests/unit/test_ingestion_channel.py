"""Channel value helpers and type checks."""

from __future__ import annotations

import math

import pytest

from daq_agent.ingestion import (
    ChannelBitFieldElement,
    ChannelDataType,
    bit_field_value,
    bool_value,
    bytes_value,
    double_value,
    empty_value,
    enum_value,
    float_value,
    int32_value,
    int64_value,
    is_data_type,
    string_value,
    uint32_value,
    uint64_value,
)

_CASES = [
    (double_value(1.5), ChannelDataType.DOUBLE, "double", 1.5),
    (float_value(0.25), ChannelDataType.FLOAT, "float", 0.25),
    (string_value("hi"), ChannelDataType.STRING, "string", "hi"),
    (bool_value(True), ChannelDataType.BOOL, "bool", True),
    (int32_value(-(2**31)), ChannelDataType.INT_32, "int32", -(2**31)),
    (uint32_value(2**32 - 1), ChannelDataType.UINT_32, "uint32", 2**32 - 1),
    (int64_value(-(2**63)), ChannelDataType.INT_64, "int64", -(2**63)),
    (uint64_value(2**64 - 1), ChannelDataType.UINT_64, "uint64", 2**64 - 1),
    (enum_value(7), ChannelDataType.ENUM, "enum", 7),
    (bytes_value(b"\x00\xff"), ChannelDataType.BYTES, "bytes", b"\x00\xff"),
    (bit_field_value(b"\x05"), ChannelDataType.BIT_FIELD, "bit_field", b"\x05"),
]


@pytest.mark.parametrize(("value", "data_type", "field", "expected"), _CASES)
def test_helper_sets_its_field(
    value: object, data_type: ChannelDataType, field: str, expected: object
) -> None:
    """Each helper fills the oneof field of its type with the value."""
    assert value.WhichOneof("type") == field  # type: ignore[attr-defined]
    assert getattr(value, field) == expected
    assert data_type.value_field == field


@pytest.mark.parametrize(("value", "data_type", "field", "expected"), _CASES)
def test_is_data_type_matches_only_its_type(
    value: object, data_type: ChannelDataType, field: str, expected: object
) -> None:
    """is_data_type accepts a value's own type and refuses every other."""
    matching = [t for t in ChannelDataType if is_data_type(value, t)]  # type: ignore[arg-type]
    assert matching == [data_type]


def test_empty_fits_every_type() -> None:
    """An empty value fits a channel of any type."""
    assert all(is_data_type(empty_value(), t) for t in ChannelDataType)
    assert empty_value().WhichOneof("type") == "empty"


def test_special_doubles_are_kept() -> None:
    """NaN and infinities survive a serialization round trip."""
    for x in (math.nan, math.inf, -math.inf):
        value = double_value(x)
        back = type(value).FromString(value.SerializeToString())
        assert math.isnan(back.double) if math.isnan(x) else back.double == x


def test_out_of_range_integer_is_refused() -> None:
    """A value that does not fit its wire type is refused by protobuf."""
    with pytest.raises(ValueError, match="out of range"):
        int32_value(2**31)
    with pytest.raises(ValueError, match="out of range"):
        uint64_value(-1)


_ELEMENTS = [
    ChannelBitFieldElement("low", index=0, bit_count=4),
    ChannelBitFieldElement("flag", index=4, bit_count=1),
    ChannelBitFieldElement("high", index=8, bit_count=8),
]


def test_bit_field_packs_by_name() -> None:
    """A dict of element values is packed little-endian at each element's index."""
    value = bit_field_value({"low": 0xA, "flag": 1, "high": 0x81}, _ELEMENTS)
    assert value.bit_field == bytes([0x1A, 0x81])


def test_bit_field_missing_elements_are_zero() -> None:
    """Elements not named are packed as zero bits, the width still covers all elements."""
    assert bit_field_value({"flag": 1}, _ELEMENTS).bit_field == bytes([0x10, 0x00])


def test_bit_field_refuses_unknown_element() -> None:
    """An element name the channel does not have is refused."""
    with pytest.raises(ValueError, match="unknown bit-field element 'nope'"):
        bit_field_value({"nope": 1}, _ELEMENTS)


def test_bit_field_refuses_value_too_wide() -> None:
    """A value that does not fit its element's bits is refused."""
    with pytest.raises(ValueError, match="does not fit 1 bits of 'flag'"):
        bit_field_value({"flag": 2}, _ELEMENTS)


def test_bit_field_dict_needs_elements() -> None:
    """Packing a dict without the channel's elements is refused."""
    with pytest.raises(ValueError, match="needs the channel's elements"):
        bit_field_value({"low": 1})
