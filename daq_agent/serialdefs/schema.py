"""A JSON Schema (draft 2020-12) of the frame-definition language, for editors.

The schema describes the shape (keys, types, enumerations); the loader additionally checks what a
schema cannot say (positions inside the frame, unique names, the checksum span). Export it with::

    python -m daq_agent.serialdefs > serial-frames.schema.json
"""

from __future__ import annotations

from typing import Any

from daq_agent.serialdefs.model import (
    BINARY_FIELD_TYPES,
    TEXT_FIELD_TYPES,
    TIMESTAMP_PARTS,
    ChecksumKind,
    FormatKind,
    FramingKind,
)

__all__ = ["json_schema"]

_BYTE_ORDER = {"enum": ["little", "big"]}
_NAME = {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_.\-]*$"}
_NUMBER = {"type": "number"}
_BYTES = {
    "description": "hex string like 'B5 62' or a list of byte values",
    "oneOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}},
    ],
}
_VALUES = {
    "description": "value table: raw value → name; the channel becomes an enum",
    "type": "object",
    "additionalProperties": {"type": "string", "minLength": 1},
    "minProperties": 1,
}


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a frame-definition file."""
    bit = {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "start"],
        "properties": {
            "name": _NAME,
            "start": {"type": "integer", "minimum": 0, "description": "LSB of the group"},
            "length": {"type": "integer", "minimum": 1, "maximum": 64, "default": 1},
            "scale": _NUMBER,
            "offset": _NUMBER,
            "unit": {"type": "string"},
            "description": {"type": "string"},
            "values": _VALUES,
            "min": _NUMBER,
            "max": _NUMBER,
        },
    }
    field = {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "type"],
        "properties": {
            "name": _NAME,
            "type": {"enum": sorted(BINARY_FIELD_TYPES | TEXT_FIELD_TYPES | {"group"})},
            "repeat": {"type": "integer", "minimum": 1, "description": "group: instances"},
            "count": {"type": "string", "description": "group: the field counting instances"},
            "fields": {
                "type": "array",
                "items": {"$ref": "#/$defs/field"},
                "minItems": 1,
                "description": "group: one instance's fields",
            },
            "at": {"type": "integer", "minimum": 0, "description": "binary: byte offset"},
            "size": {"type": "integer", "minimum": 1, "description": "binary string/bytes"},
            "byte_order": _BYTE_ORDER,
            "word_order": {
                **_BYTE_ORDER,
                "description": "binary 32/64-bit: order of the 16-bit words (Modbus word swap)",
            },
            "column": {"type": "integer", "minimum": 0, "description": "csv: column"},
            "index": {"type": "integer", "minimum": 1, "description": "nmea: field index"},
            "key": {"type": "string", "description": "key_value: the key"},
            "group": {"type": "string", "description": "regex: the named group"},
            "scale": _NUMBER,
            "offset": _NUMBER,
            "unit": {"type": "string"},
            "description": {"type": "string"},
            "values": _VALUES,
            "bits": {"type": "array", "items": bit, "minItems": 1},
            "sign": {
                "description": "csv/nmea: the sign comes from another field (E/W, N/S)",
                "type": "object",
                "additionalProperties": False,
                "required": ["field"],
                "properties": {
                    "field": {"type": "string"},
                    "negative": {
                        "oneOf": [
                            {"type": "string", "minLength": 1},
                            {"type": "array", "items": {"type": "string"}, "minItems": 1},
                        ]
                    },
                    "positive": {"type": "string"},
                },
            },
            "min": _NUMBER,
            "max": _NUMBER,
        },
    }
    frame = {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "fields"],
        "properties": {
            "name": _NAME,
            "id": {"type": ["integer", "string"], "description": "discriminator value"},
            "description": {"type": "string"},
            "length": {"type": "integer", "minimum": 1},
            "pattern": {"type": "string", "description": "regex: matched against the line"},
            "render": {"type": "string", "description": "regex: str.format template"},
            "rate": {
                "type": "number",
                "exclusiveMinimum": 0,
                "description": "frames per second the device sends (simulator schedule)",
            },
            "fields": {"type": "array", "items": {"$ref": "#/$defs/field"}, "minItems": 1},
        },
    }
    return {
        "$defs": {"field": field},
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://daq-agent.invalid/schemas/serial-frames.json",
        "title": "daq-agent serial frame definitions",
        "type": "object",
        "additionalProperties": False,
        "required": ["format", "frames"],
        "properties": {
            "version": {"const": 1},
            "name": _NAME,
            "description": {"type": "string"},
            "format": {"enum": [k.value for k in FormatKind]},
            "byte_order": _BYTE_ORDER,
            "word_order": {**_BYTE_ORDER, "description": "default word order of 32/64-bit fields"},
            "framing": {
                "type": "object",
                "additionalProperties": False,
                "required": ["kind"],
                "properties": {
                    "kind": {"enum": [k.value for k in FramingKind]},
                    "max_length": {"type": "integer", "minimum": 1},
                    "terminator": {"type": "string"},
                    "sync": _BYTES,
                    "length": {"type": "integer", "minimum": 1},
                    "length_field": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["at"],
                        "properties": {
                            "at": {"type": "integer", "minimum": 0},
                            "type": {"enum": ["uint8", "uint16", "uint32"]},
                            "byte_order": _BYTE_ORDER,
                            "adjust": {"type": "integer"},
                        },
                    },
                },
            },
            "checksum": {
                "type": "object",
                "additionalProperties": False,
                "required": ["kind"],
                "properties": {
                    "kind": {"enum": [k.value for k in ChecksumKind]},
                    "poly": {
                        "type": "integer",
                        "description": "crc: polynomial with its top bit (0x11021)",
                    },
                    "init": {"type": "integer", "minimum": 0, "description": "crc: initial value"},
                    "reflect": {"type": "boolean", "description": "crc: reflected in and out"},
                    "xorout": {"type": "integer", "minimum": 0, "description": "crc: final XOR"},
                    "at": {"type": "integer"},
                    "byte_order": _BYTE_ORDER,
                    "span": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"start": {"type": "integer"}, "end": {"type": "integer"}},
                    },
                },
            },
            "discriminator": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "at": {"type": "integer", "minimum": 0},
                    "type": {"type": "string"},
                    "byte_order": _BYTE_ORDER,
                    "column": {"type": "integer", "minimum": 0},
                    "key": {"type": "string"},
                },
            },
            "timestamp": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "source": {"enum": ["host", "field", "fields"]},
                    "field": {"type": "string"},
                    "unit": {"enum": ["s", "ms", "us", "µs", "ns"]},
                    "epoch": {"type": "string", "description": "unix, gps, host or ISO 8601"},
                    "rollover": {
                        "type": "integer",
                        "minimum": 2,
                        "description": "the device counter wraps at this value",
                    },
                    **{
                        role: {"type": "string", "description": f"the field holding the {role}"}
                        for role in TIMESTAMP_PARTS
                    },
                },
            },
            "delimiter": {"type": "string", "minLength": 1},
            "pair_separator": {"type": "string", "minLength": 1},
            "kv_separator": {"type": "string", "minLength": 1},
            "require_checksum": {"type": "boolean"},
            "text_encoding": {"type": "string"},
            "frames": {"type": "array", "items": frame, "minItems": 1},
        },
    }
