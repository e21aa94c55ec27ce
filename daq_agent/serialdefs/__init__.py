"""Serial frame definitions: a YAML language describing a device's frames, compiled to a codec.

Load a definition file, compile it for one device, and feed it bytes::

    defs = load_definitions("configs/serial/imu_cobs.yaml")
    codec = SerialCodec(defs, device="imu0")          # flows: codec.flows
    stream = FrameStream(codec)
    samples = stream.feed(chunk, host_time_ns)        # faults are counted, never raised

The language is documented in ``docs/serial-frames.md``; :func:`json_schema` exports a JSON Schema
for editors.
"""

from __future__ import annotations

from daq_agent.serialdefs.checksums import FrameChecksum, checksum_function, custom_crc
from daq_agent.serialdefs.codec import (
    DEFAULT_FLOW_NAME_TEMPLATE,
    ChannelSpec,
    CompiledFrame,
    FrameFault,
    SerialCodec,
)
from daq_agent.serialdefs.framing import (
    CobsFramer,
    Framer,
    LineFramer,
    NmeaFramer,
    SlipFramer,
    SyncFramer,
    make_framer,
)
from daq_agent.serialdefs.loader import load_definitions, loads_definitions, parse_definitions
from daq_agent.serialdefs.model import (
    BitDef,
    ByteOrder,
    ChecksumDef,
    ChecksumKind,
    DiscriminatorDef,
    FieldDef,
    FormatKind,
    FrameDef,
    FramingDef,
    FramingKind,
    LengthFieldDef,
    SerialDefinitions,
    TimestampDef,
)
from daq_agent.serialdefs.schema import json_schema
from daq_agent.serialdefs.stream import COUNTER_NAMES, FrameStream

__all__ = [
    "COUNTER_NAMES",
    "DEFAULT_FLOW_NAME_TEMPLATE",
    "BitDef",
    "ByteOrder",
    "ChannelSpec",
    "ChecksumDef",
    "ChecksumKind",
    "CobsFramer",
    "CompiledFrame",
    "DiscriminatorDef",
    "FieldDef",
    "FormatKind",
    "FrameChecksum",
    "FrameDef",
    "FrameFault",
    "FrameStream",
    "Framer",
    "FramingDef",
    "FramingKind",
    "LengthFieldDef",
    "LineFramer",
    "NmeaFramer",
    "SerialCodec",
    "SerialDefinitions",
    "SlipFramer",
    "SyncFramer",
    "TimestampDef",
    "checksum_function",
    "custom_crc",
    "json_schema",
    "load_definitions",
    "loads_definitions",
    "make_framer",
    "parse_definitions",
]
