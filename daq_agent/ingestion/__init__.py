"""The ingestion API, shaped like Sift's Python client (``sift_py.ingestion``).

Code written against that client switches by changing its imports::

    from daq_agent.ingestion import IngestionService, TelemetryConfig, use_sift_channel

Modules: ``config`` (telemetry config), ``channel`` (channel values), ``transport`` (the channel,
error mapping), ``errors`` (:class:`RpcError`, a ``grpc.RpcError``), ``service`` and ``buffer``
(ingestion), ``stream`` (data streams on Sift's own streaming client, sift_stream).
"""

from __future__ import annotations

from daq_agent._proto.sift.ingest.v1.ingest_pb2 import (
    IngestWithConfigDataChannelValue,
    IngestWithConfigDataStreamRequest,
)
from daq_agent.core.errors import IngestionValidationError, TelemetryConfigError
from daq_agent.core.model import (
    ChannelBitFieldElement,
    ChannelConfig,
    ChannelDataType,
    ChannelEnumType,
    FlowConfig,
    TelemetryConfig,
)
from daq_agent.core.sample import Sample
from daq_agent.ingestion.buffer import (
    DEFAULT_BUFFER_SIZE,
    BufferedIngestionService,
    OnErrorCallback,
)
from daq_agent.ingestion.channel import (
    ChannelValue,
    Flow,
    FlowOrderedChannelValues,
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
from daq_agent.ingestion.config import telemetry_config_hash
from daq_agent.ingestion.errors import RpcError
from daq_agent.ingestion.service import MAX_MESSAGE_BYTES, IngestionService
from daq_agent.ingestion.stream import IngestStream
from daq_agent.ingestion.transport import (
    SiftChannel,
    SiftChannelConfig,
    map_rpc_errors,
    use_sift_channel,
)

__all__ = [
    "DEFAULT_BUFFER_SIZE",
    "MAX_MESSAGE_BYTES",
    "BufferedIngestionService",
    "ChannelBitFieldElement",
    "ChannelConfig",
    "ChannelDataType",
    "ChannelEnumType",
    "ChannelValue",
    "Flow",
    "FlowConfig",
    "FlowOrderedChannelValues",
    "IngestStream",
    "IngestWithConfigDataChannelValue",
    "IngestWithConfigDataStreamRequest",
    "IngestionService",
    "IngestionValidationError",
    "OnErrorCallback",
    "RpcError",
    "Sample",
    "SiftChannel",
    "SiftChannelConfig",
    "TelemetryConfig",
    "TelemetryConfigError",
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
    "map_rpc_errors",
    "string_value",
    "telemetry_config_hash",
    "uint32_value",
    "uint64_value",
    "use_sift_channel",
]
