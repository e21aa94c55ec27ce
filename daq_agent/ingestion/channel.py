"""Channel values: helpers that build ``IngestWithConfigDataChannelValue`` messages, and the dict
shapes (``ChannelValue``, ``Flow``, ``FlowOrderedChannelValues``) the ingestion API accepts."""

from __future__ import annotations

from datetime import datetime
from typing import NotRequired, TypedDict

from google.protobuf.empty_pb2 import Empty

from daq_agent._proto.sift.ingest.v1.ingest_pb2 import IngestWithConfigDataChannelValue
from daq_agent.core.model import ChannelBitFieldElement, ChannelDataType

__all__ = [
    "ChannelValue",
    "Flow",
    "FlowOrderedChannelValues",
    "bit_field_value",
    "bool_value",
    "bytes_value",
    "double_value",
    "empty_value",
    "enum_value",
    "float_value",
    "int32_value",
    "int64_value",
    "is_data_type",
    "string_value",
    "uint32_value",
    "uint64_value",
]


class ChannelValue(TypedDict):
    """A value addressed to a channel by name."""

    channel_name: str
    value: IngestWithConfigDataChannelValue
    component: NotRequired[str]


class Flow(TypedDict):
    """A flow's values addressed by channel name; missing channels are sent as empty."""

    flow_name: str
    timestamp: datetime | int
    channel_values: list[ChannelValue]


class FlowOrderedChannelValues(TypedDict):
    """A flow's values in the order of the flow's channels, one per channel."""

    flow_name: str
    timestamp: datetime | int
    channel_values: list[IngestWithConfigDataChannelValue]


def string_value(value: str) -> IngestWithConfigDataChannelValue:
    """A string channel value."""
    return IngestWithConfigDataChannelValue(string=value)


def double_value(value: float) -> IngestWithConfigDataChannelValue:
    """A double channel value."""
    return IngestWithConfigDataChannelValue(double=value)


def float_value(value: float) -> IngestWithConfigDataChannelValue:
    """A float (32-bit) channel value."""
    return IngestWithConfigDataChannelValue(float=value)


def bool_value(value: bool) -> IngestWithConfigDataChannelValue:
    """A bool channel value."""
    return IngestWithConfigDataChannelValue(bool=value)


def int32_value(value: int) -> IngestWithConfigDataChannelValue:
    """An int32 channel value."""
    return IngestWithConfigDataChannelValue(int32=value)


def uint32_value(value: int) -> IngestWithConfigDataChannelValue:
    """A uint32 channel value."""
    return IngestWithConfigDataChannelValue(uint32=value)


def int64_value(value: int) -> IngestWithConfigDataChannelValue:
    """An int64 channel value."""
    return IngestWithConfigDataChannelValue(int64=value)


def uint64_value(value: int) -> IngestWithConfigDataChannelValue:
    """A uint64 channel value."""
    return IngestWithConfigDataChannelValue(uint64=value)


def enum_value(value: int) -> IngestWithConfigDataChannelValue:
    """An enum channel value: the key of one of the channel's enum types."""
    return IngestWithConfigDataChannelValue(enum=value)


def bytes_value(value: bytes) -> IngestWithConfigDataChannelValue:
    """A bytes channel value."""
    return IngestWithConfigDataChannelValue(bytes=value)


def bit_field_value(
    value: bytes | dict[str, int], elements: list[ChannelBitFieldElement] | None = None
) -> IngestWithConfigDataChannelValue:
    """A bit-field channel value.

    Args:
        value: the packed bytes (little-endian, bit 0 of byte 0 first), or element values by name,
            packed according to ``elements``.
        elements: the channel's bit-field elements; required when ``value`` is a dict.

    Raises:
        ValueError: when a dict names an unknown element or a value does not fit its bits.
    """
    if isinstance(value, bytes):
        return IngestWithConfigDataChannelValue(bit_field=value)
    if elements is None:
        raise ValueError("bit_field_value() needs the channel's elements to pack a dict")
    by_name = {e.name: e for e in elements}
    packed = 0
    for name, bits in value.items():
        element = by_name.get(name)
        if element is None:
            raise ValueError(f"unknown bit-field element {name!r}")
        if not 0 <= bits < (1 << element.bit_count):
            raise ValueError(f"{bits} does not fit {element.bit_count} bits of {name!r}")
        packed |= bits << element.index
    width = max((e.index + e.bit_count for e in elements), default=8)
    return IngestWithConfigDataChannelValue(bit_field=packed.to_bytes((width + 7) // 8, "little"))


def empty_value() -> IngestWithConfigDataChannelValue:
    """An empty value: the channel has no value in this sample."""
    return IngestWithConfigDataChannelValue(empty=Empty())


def is_data_type(value: IngestWithConfigDataChannelValue, data_type: ChannelDataType) -> bool:
    """Whether ``value`` carries ``data_type`` (an empty value fits every type)."""
    kind: str | None = value.WhichOneof("type")
    return kind == "empty" or kind == data_type.value_field
