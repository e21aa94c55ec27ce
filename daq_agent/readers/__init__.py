"""Readers: one thread per source (CAN bus, serial port, polled device, recorded log), a table of
reader kinds.

The concrete readers are imported lazily (``from daq_agent.readers import CanReader`` imports
python-can only then); :func:`get_reader_class` resolves a kind from :data:`BACKENDS`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from daq_agent.readers.base import (
    BACKENDS,
    ErrorCallback,
    KeyedCounter,
    ReaderABC,
    ReaderCounters,
    ReaderState,
    Sink,
    describe,
    get_reader_class,
)

if TYPE_CHECKING:
    from daq_agent.readers.can import CanReader
    from daq_agent.readers.modbus import ModbusReader
    from daq_agent.readers.replay import ReplayReader
    from daq_agent.readers.scpi import ScpiReader
    from daq_agent.readers.serial import SerialReader

__all__ = [
    "BACKENDS",
    "CanReader",
    "ErrorCallback",
    "KeyedCounter",
    "ModbusReader",
    "ReaderABC",
    "ReaderCounters",
    "ReaderState",
    "ReplayReader",
    "ScpiReader",
    "SerialReader",
    "Sink",
    "describe",
    "get_reader_class",
]

_LAZY = {
    "CanReader": "can",
    "ModbusReader": "modbus",
    "ReplayReader": "replay",
    "ScpiReader": "scpi",
    "SerialReader": "serial",
}


def __getattr__(name: str) -> Any:
    kind = _LAZY.get(name)
    if kind is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return get_reader_class(kind)
