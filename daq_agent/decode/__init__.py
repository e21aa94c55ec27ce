"""Decoding frames into samples: CAN databases (DBC, KCD, ARXML, SYM) and candump logs."""

from __future__ import annotations

from daq_agent.decode.can_decoder import (
    DEFAULT_FLOW_NAME_TEMPLATE,
    CanDecoder,
    CompiledMessage,
    derive_flows,
    derive_flows_fingerprint,
    enum_key,
    enum_labels,
    frame_key,
)
from daq_agent.decode.candump import CandumpFrame, CandumpParser, parse_candump_line
from daq_agent.decode.dbc import DatabaseWarning, load_database

__all__ = [
    "DEFAULT_FLOW_NAME_TEMPLATE",
    "CanDecoder",
    "CandumpFrame",
    "CandumpParser",
    "CompiledMessage",
    "DatabaseWarning",
    "derive_flows",
    "derive_flows_fingerprint",
    "enum_key",
    "enum_labels",
    "frame_key",
    "load_database",
    "parse_candump_line",
]
