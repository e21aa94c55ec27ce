"""Telemetry configuration: the asset, its flows and their channels.

These mirror the shapes of Sift's Python client (``TelemetryConfig``, ``FlowConfig``,
``ChannelConfig``, ``ChannelDataType``, ``ChannelEnumType``, ``ChannelBitFieldElement``) so code
written against that client keeps working after an import change, and they convert to and from the
wire protobufs.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from daq_agent._proto.sift.common.type.v1 import (
    channel_bit_field_element_pb2,
    channel_data_type_pb2,
    channel_enum_type_pb2,
)
from daq_agent._proto.sift.ingestion_configs.v2 import ingestion_configs_pb2
from daq_agent.core.errors import TelemetryConfigError

__all__ = [
    "ChannelBitFieldElement",
    "ChannelConfig",
    "ChannelDataType",
    "ChannelEnumType",
    "FlowConfig",
    "TelemetryConfig",
]


class ChannelDataType(enum.IntEnum):
    """The type of a channel's values; the integer is the wire enum value."""

    DOUBLE = channel_data_type_pb2.CHANNEL_DATA_TYPE_DOUBLE
    STRING = channel_data_type_pb2.CHANNEL_DATA_TYPE_STRING
    ENUM = channel_data_type_pb2.CHANNEL_DATA_TYPE_ENUM
    BIT_FIELD = channel_data_type_pb2.CHANNEL_DATA_TYPE_BIT_FIELD
    BOOL = channel_data_type_pb2.CHANNEL_DATA_TYPE_BOOL
    FLOAT = channel_data_type_pb2.CHANNEL_DATA_TYPE_FLOAT
    INT_32 = channel_data_type_pb2.CHANNEL_DATA_TYPE_INT_32
    UINT_32 = channel_data_type_pb2.CHANNEL_DATA_TYPE_UINT_32
    INT_64 = channel_data_type_pb2.CHANNEL_DATA_TYPE_INT_64
    UINT_64 = channel_data_type_pb2.CHANNEL_DATA_TYPE_UINT_64
    BYTES = channel_data_type_pb2.CHANNEL_DATA_TYPE_BYTES

    @classmethod
    def from_pb(cls, value: int) -> ChannelDataType:
        """Return the member for a wire enum value.

        Raises:
            ValueError: for UNSPECIFIED or an unknown value.
        """
        return cls(value)

    @classmethod
    def from_str(cls, name: str) -> ChannelDataType | None:
        """The member named ``double``, ``int32``, ``CHANNEL_DATA_TYPE_INT_32``…, or None."""
        key = name.strip().upper().removeprefix("CHANNEL_DATA_TYPE_")
        return _DATA_TYPE_ALIASES.get(key.replace("_", ""))

    def as_human_str(self) -> str:
        """The lower-case name used in YAML configs (``double``, ``int32``, ``bit_field``)."""
        return _HUMAN_NAMES[self]

    @property
    def value_field(self) -> str:
        """Name of the ``IngestWithConfigDataChannelValue`` oneof field carrying this type (the
        YAML names are those field names)."""
        return _HUMAN_NAMES[self]


_HUMAN_NAMES = {
    ChannelDataType.DOUBLE: "double",
    ChannelDataType.STRING: "string",
    ChannelDataType.ENUM: "enum",
    ChannelDataType.BIT_FIELD: "bit_field",
    ChannelDataType.BOOL: "bool",
    ChannelDataType.FLOAT: "float",
    ChannelDataType.INT_32: "int32",
    ChannelDataType.UINT_32: "uint32",
    ChannelDataType.INT_64: "int64",
    ChannelDataType.UINT_64: "uint64",
    ChannelDataType.BYTES: "bytes",
}
_DATA_TYPE_ALIASES = {
    **{member.name.replace("_", ""): member for member in ChannelDataType},
    **{human.upper().replace("_", ""): member for member, human in _HUMAN_NAMES.items()},
    "BOOLEAN": ChannelDataType.BOOL,
}


@dataclass(frozen=True, slots=True)
class ChannelEnumType:
    """One named value of an enum channel."""

    name: str
    key: int
    is_signed: bool = False

    def as_pb(self) -> channel_enum_type_pb2.ChannelEnumType:
        """The wire message."""
        return channel_enum_type_pb2.ChannelEnumType(
            name=self.name, key=self.key, is_signed=self.is_signed
        )

    @classmethod
    def from_pb(cls, message: channel_enum_type_pb2.ChannelEnumType) -> ChannelEnumType:
        """Build from the wire message."""
        return cls(name=message.name, key=message.key, is_signed=message.is_signed)


@dataclass(frozen=True, slots=True)
class ChannelBitFieldElement:
    """One named group of bits of a bit-field channel."""

    name: str
    index: int
    bit_count: int

    def as_pb(self) -> channel_bit_field_element_pb2.ChannelBitFieldElement:
        """The wire message."""
        return channel_bit_field_element_pb2.ChannelBitFieldElement(
            name=self.name, index=self.index, bit_count=self.bit_count
        )

    @classmethod
    def from_pb(
        cls, message: channel_bit_field_element_pb2.ChannelBitFieldElement
    ) -> ChannelBitFieldElement:
        """Build from the wire message."""
        return cls(name=message.name, index=message.index, bit_count=message.bit_count)


@dataclass(slots=True)
class ChannelConfig:
    """A channel of a flow: its name, type, unit, description, enum keys or bit fields."""

    name: str
    data_type: ChannelDataType
    description: str | None = None
    unit: str | None = None
    enum_types: list[ChannelEnumType] = field(default_factory=list)
    bit_field_elements: list[ChannelBitFieldElement] = field(default_factory=list)

    def fqn(self) -> str:
        """The fully qualified channel name (the name: components are not used)."""
        return self.name

    def as_pb(self, klass: type[Any] = ingestion_configs_pb2.ChannelConfig) -> Any:
        """The wire message (``ingestion_configs.v2.ChannelConfig``)."""
        return klass(
            name=self.name,
            unit=self.unit or "",
            description=self.description or "",
            data_type=int(self.data_type),
            enum_types=[e.as_pb() for e in self.enum_types],
            bit_field_elements=[b.as_pb() for b in self.bit_field_elements],
        )

    @classmethod
    def from_pb(cls, message: ingestion_configs_pb2.ChannelConfig) -> ChannelConfig:
        """Build from the wire message."""
        return cls(
            name=message.name,
            data_type=ChannelDataType.from_pb(message.data_type),
            description=message.description or None,
            unit=message.unit or None,
            enum_types=[ChannelEnumType.from_pb(e) for e in message.enum_types],
            bit_field_elements=[
                ChannelBitFieldElement.from_pb(b) for b in message.bit_field_elements
            ],
        )


@dataclass(slots=True)
class FlowConfig:
    """A flow: a named group of channels whose values are sent together, in this order."""

    name: str
    channels: list[ChannelConfig] = field(default_factory=list)

    def as_pb(self) -> ingestion_configs_pb2.FlowConfig:
        """The wire message."""
        return ingestion_configs_pb2.FlowConfig(
            name=self.name, channels=[c.as_pb() for c in self.channels]
        )

    @classmethod
    def from_pb(cls, message: ingestion_configs_pb2.FlowConfig) -> FlowConfig:
        """Build from the wire message."""
        return cls(name=message.name, channels=[ChannelConfig.from_pb(c) for c in message.channels])


@dataclass(slots=True)
class TelemetryConfig:
    """What an asset sends: its name, the ingestion client key and its flows.

    Raises:
        TelemetryConfigError: on construction, when two flows share a name or a flow has two
            channels of the same name.
    """

    asset_name: str
    ingestion_client_key: str | None = None
    organization_id: str | None = None
    flows: list[FlowConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.asset_name:
            raise TelemetryConfigError("must not be empty", key="asset_name")
        seen: set[str] = set()
        for i, flow in enumerate(self.flows):
            if not flow.name:
                raise TelemetryConfigError("must not be empty", key=f"flows[{i}].name")
            if flow.name in seen:
                raise TelemetryConfigError(
                    f"duplicate flow name {flow.name!r}", key=f"flows[{i}].name"
                )
            seen.add(flow.name)
            names: set[str] = set()
            for j, channel in enumerate(flow.channels):
                if channel.name in names:
                    raise TelemetryConfigError(
                        f"duplicate channel name {channel.name!r} in flow {flow.name!r}",
                        key=f"flows[{i}].channels[{j}].name",
                    )
                names.add(channel.name)

    @classmethod
    def try_from_yaml(cls, path: str | Path) -> TelemetryConfig:
        """Load a telemetry config in the YAML layout of Sift's Python client.

        Raises:
            TelemetryConfigError: naming the file and the key path of the first problem.
        """
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise TelemetryConfigError(f"cannot read: {exc.strerror}", source=source) from exc
        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            problem = getattr(exc, "problem", None) or str(exc)
            raise TelemetryConfigError(
                f"invalid YAML: {problem}", source=source, line=line
            ) from exc
        try:
            return cls.from_dict(document)
        except TelemetryConfigError as exc:
            raise TelemetryConfigError(exc.reason, source=source, key=exc.key) from exc

    @classmethod
    def from_dict(cls, document: object) -> TelemetryConfig:
        """Build from a parsed YAML/JSON document (the layout of :meth:`try_from_yaml`).

        Raises:
            TelemetryConfigError: naming the key path of the first problem.
        """
        top = _mapping(
            document,
            "",
            {"asset_name", "ingestion_client_key", "organization_id", "flows", "channels", "rules"},
        )
        flows_raw = top.get("flows", [])
        if not isinstance(flows_raw, list):
            raise TelemetryConfigError("must be a list", key="flows")
        flows = [_flow_from_dict(raw, f"flows[{i}]") for i, raw in enumerate(flows_raw)]
        return cls(
            asset_name=_string(top, "asset_name", "", required=True) or "",
            ingestion_client_key=_string(top, "ingestion_client_key", ""),
            organization_id=_string(top, "organization_id", ""),
            flows=flows,
        )


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _mapping(raw: object, where: str, allowed: Iterable[str]) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise TelemetryConfigError("must be a mapping", key=where or "<document>")
    allowed = set(allowed)
    for key in raw:
        if key not in allowed:
            raise TelemetryConfigError(
                f"unknown key (expected one of {', '.join(sorted(allowed))})",
                key=_join(where, str(key)),
            )
    return raw


def _string(raw: Mapping[str, Any], key: str, where: str, *, required: bool = False) -> str | None:
    value = raw.get(key)
    if value is None:
        if required:
            raise TelemetryConfigError("is required", key=_join(where, key))
        return None
    if not isinstance(value, str):
        raise TelemetryConfigError(
            f"must be a string, not {type(value).__name__}", key=_join(where, key)
        )
    return value


def _int(raw: Mapping[str, Any], key: str, where: str, *, minimum: int = 0) -> int:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TelemetryConfigError("must be an integer", key=_join(where, key))
    if value < minimum:
        raise TelemetryConfigError(f"must be >= {minimum}", key=_join(where, key))
    return value


def _list(raw: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = raw.get(key, [])
    if value is None:
        return []
    if not isinstance(value, list):
        raise TelemetryConfigError("must be a list", key=_join(where, key))
    return value


def _flow_from_dict(raw: object, where: str) -> FlowConfig:
    flow = _mapping(raw, where, {"name", "channels"})
    channels = [
        _channel_from_dict(c, f"{where}.channels[{j}]")
        for j, c in enumerate(_list(flow, "channels", where))
    ]
    return FlowConfig(name=_string(flow, "name", where, required=True) or "", channels=channels)


def _channel_from_dict(raw: object, where: str) -> ChannelConfig:
    channel = _mapping(
        raw,
        where,
        {
            "name",
            "data_type",
            "unit",
            "description",
            "enum_types",
            "bit_field_elements",
            "component",
        },
    )
    type_name = _string(channel, "data_type", where, required=True) or ""
    data_type = ChannelDataType.from_str(type_name)
    if data_type is None:
        choices = ", ".join(t.as_human_str() for t in ChannelDataType)
        raise TelemetryConfigError(
            f"unknown data type {type_name!r} (expected one of {choices})",
            key=_join(where, "data_type"),
        )
    enum_types = []
    for k, raw_enum in enumerate(_list(channel, "enum_types", where)):
        at = f"{where}.enum_types[{k}]"
        item = _mapping(raw_enum, at, {"name", "key", "is_signed"})
        is_signed = item.get("is_signed", False)
        if not isinstance(is_signed, bool):
            raise TelemetryConfigError("must be true or false", key=_join(at, "is_signed"))
        enum_types.append(
            ChannelEnumType(
                name=_string(item, "name", at, required=True) or "",
                key=_int(item, "key", at),
                is_signed=is_signed,
            )
        )
    bit_fields = []
    for k, raw_bits in enumerate(_list(channel, "bit_field_elements", where)):
        at = f"{where}.bit_field_elements[{k}]"
        item = _mapping(raw_bits, at, {"name", "index", "bit_count"})
        bit_fields.append(
            ChannelBitFieldElement(
                name=_string(item, "name", at, required=True) or "",
                index=_int(item, "index", at),
                bit_count=_int(item, "bit_count", at, minimum=1),
            )
        )
    if data_type is ChannelDataType.ENUM and not enum_types:
        raise TelemetryConfigError(
            "an enum channel needs enum_types", key=_join(where, "enum_types")
        )
    if data_type is ChannelDataType.BIT_FIELD and not bit_fields:
        raise TelemetryConfigError(
            "a bit_field channel needs bit_field_elements", key=_join(where, "bit_field_elements")
        )
    name = _string(channel, "name", where, required=True) or ""
    component = _string(channel, "component", where)
    return ChannelConfig(
        name=f"{component}.{name}" if component else name,
        data_type=data_type,
        description=_string(channel, "description", where),
        unit=_string(channel, "unit", where),
        enum_types=enum_types,
        bit_field_elements=bit_fields,
    )
