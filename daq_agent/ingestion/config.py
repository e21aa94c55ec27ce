"""The telemetry config under the name sift_py gives it (``sift_py.ingestion.config``).

The model itself lives in :mod:`daq_agent.core.model`, which the decoders, readers and pipeline
share; this module keeps the ingestion API's import path.
"""

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
]
