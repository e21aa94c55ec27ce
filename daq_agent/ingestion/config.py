"""The telemetry config under the name sift_py gives it (``sift_py.ingestion.config``).

The model itself lives in :mod:`daq_agent.core.model`, which the decoders, readers and pipeline
share; this module keeps the ingestion API's import path, and derives the client key of a config
that has none (:func:`telemetry_config_hash`).
"""

from __future__ import annotations

import hashlib

from daq_agent._proto.sift.common.type.v1 import channel_data_type_pb2
from daq_agent.core.model import (
    ChannelBitFieldElement,
    ChannelConfig,
    ChannelDataType,
    ChannelEnumType,
    FlowConfig,
    TelemetryConfig,
)

__all__ = [
    "ChannelBitFieldElement",
    "ChannelConfig",
    "ChannelDataType",
    "ChannelEnumType",
    "FlowConfig",
    "TelemetryConfig",
    "telemetry_config_hash",
]


# The wire enum's names (``CHANNEL_DATA_TYPE_DOUBLE``…), as sift_py's hash spells the types.
_TYPE_NAMES = {
    member: channel_data_type_pb2.ChannelDataType.Name(
        channel_data_type_pb2.ChannelDataType.ValueType(member)
    ).encode()
    for member in ChannelDataType
}


def telemetry_config_hash(config: TelemetryConfig) -> str:
    """A stable client key for ``config``: the SHA-256 (hex) of what defines its telemetry.

    It is the scheme sift_py uses for a config without an ``ingestion_client_key``, so the same
    config gets the same key here and there, on every start: the asset name, then each flow in
    the order of its name with its channels in their own order (the order matters), each channel
    by name, wire data type name (``CHANNEL_DATA_TYPE_DOUBLE``), description, component (none
    here) and unit, its bit-field elements by index and its enum types by key. The organization
    and the config's own client key take no part.
    """
    digest = hashlib.sha256()
    update = digest.update
    update(config.asset_name.encode())
    for flow in sorted(config.flows, key=lambda f: f.name):
        update(flow.name.encode())
        for channel in flow.channels:
            update(channel.name.encode())
            update(_TYPE_NAMES[channel.data_type])
            update((channel.description or "").encode())
            update((channel.unit or "").encode())  # (the component, always empty, adds nothing)
            for element in sorted(channel.bit_field_elements, key=lambda e: e.index):
                update(element.name.encode())
                update(str(element.index).encode())
                update(str(element.bit_count).encode())
            for enum_type in sorted(channel.enum_types, key=lambda e: e.key):
                update(str(enum_type.key).encode())
                update(enum_type.name.encode())
    return digest.hexdigest()
