"""Telemetry config: YAML loading, errors naming the key, wire conversion, the derived key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from daq_agent.core.errors import ConfigError
from daq_agent.ingestion import (
    ChannelBitFieldElement,
    ChannelConfig,
    ChannelDataType,
    ChannelEnumType,
    FlowConfig,
    TelemetryConfig,
    TelemetryConfigError,
    telemetry_config_hash,
)

_GOOD = """\
asset_name: bench-1
ingestion_client_key: bench-1-key
flows:
  - name: readings
    channels:
      - name: voltage
        data_type: double
        unit: V
        description: supply voltage
      - name: state
        data_type: enum
        enum_types:
          - {name: idle, key: 0}
          - {name: run, key: 1}
      - name: flags
        data_type: CHANNEL_DATA_TYPE_BIT_FIELD
        bit_field_elements:
          - {name: a, index: 0, bit_count: 1}
          - {name: b, index: 1, bit_count: 7}
      - name: temp
        component: motor
        data_type: float
  - name: log
    channels:
      - {name: line, data_type: string}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "telemetry.yml"
    path.write_text(text, encoding="utf-8")
    return path


def test_loads_the_sift_layout(tmp_path: Path) -> None:
    """A YAML file in Sift's layout loads into the typed config."""
    config = TelemetryConfig.try_from_yaml(_write(tmp_path, _GOOD))
    assert config.asset_name == "bench-1"
    assert config.ingestion_client_key == "bench-1-key"
    assert [f.name for f in config.flows] == ["readings", "log"]
    voltage, state, flags, temp = config.flows[0].channels
    assert voltage == ChannelConfig(
        "voltage", ChannelDataType.DOUBLE, description="supply voltage", unit="V"
    )
    assert state.enum_types == [ChannelEnumType("idle", 0), ChannelEnumType("run", 1)]
    assert flags.data_type is ChannelDataType.BIT_FIELD
    assert flags.bit_field_elements[1] == ChannelBitFieldElement("b", index=1, bit_count=7)
    assert temp.name == "motor.temp"
    assert temp.data_type is ChannelDataType.FLOAT


def test_flow_round_trips_through_the_wire_message(tmp_path: Path) -> None:
    """A flow converted to its protobuf and back is unchanged."""
    config = TelemetryConfig.try_from_yaml(_write(tmp_path, _GOOD))
    for flow in config.flows:
        assert FlowConfig.from_pb(flow.as_pb()) == flow


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("flows: []\n", "asset_name", "is required"),
        ("asset_name: 3\n", "asset_name", "must be a string"),
        ("asset_name: a\nflows: {}\n", "flows", "must be a list"),
        ("asset_name: a\nbogus: 1\n", "bogus", "unknown key"),
        ("asset_name: a\nflows: [{channels: []}]\n", "flows[0].name", "is required"),
        (
            "asset_name: a\nflows: [{name: f, channels: [{name: c, data_type: quad}]}]\n",
            "flows[0].channels[0].data_type",
            "unknown data type 'quad'",
        ),
        (
            "asset_name: a\nflows: [{name: f, channels: [{name: c}]}]\n",
            "flows[0].channels[0].data_type",
            "is required",
        ),
        (
            "asset_name: a\nflows: [{name: f, channels: [{name: c, data_type: enum}]}]\n",
            "flows[0].channels[0].enum_types",
            "needs enum_types",
        ),
        (
            (
                "asset_name: a\nflows: [{name: f, channels: [{name: c, data_type: enum,"
                " enum_types: [{name: x, key: -1}]}]}]\n"
            ),
            "flows[0].channels[0].enum_types[0].key",
            "must be >= 0",
        ),
        (
            (
                "asset_name: a\nflows: [{name: f, channels: [{name: c, data_type: bit_field,"
                " bit_field_elements: [{name: x, index: 0, bit_count: 0}]}]}]\n"
            ),
            "flows[0].channels[0].bit_field_elements[0].bit_count",
            "must be >= 1",
        ),
        (
            "asset_name: a\nflows: [{name: f}, {name: f}]\n",
            "flows[1].name",
            "duplicate flow name 'f'",
        ),
        (
            (
                "asset_name: a\nflows: [{name: f, channels: [{name: c, data_type: double},"
                " {name: c, data_type: int32}]}]\n"
            ),
            "flows[0].channels[1].name",
            "duplicate channel name 'c'",
        ),
    ],
)
def test_errors_name_the_file_and_key(tmp_path: Path, text: str, key: str, reason: str) -> None:
    """Each problem raises a TelemetryConfigError naming the file, the key path and the reason."""
    path = _write(tmp_path, text)
    with pytest.raises(TelemetryConfigError) as info:
        TelemetryConfig.try_from_yaml(path)
    assert info.value.key == key
    assert info.value.source == str(path)
    assert reason in info.value.reason
    assert f"{path}: {key}: " in str(info.value)
    assert isinstance(info.value, ConfigError)


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    """A YAML syntax error names the file and the line."""
    path = _write(tmp_path, "asset_name: a\nflows: [\n  - x: : y\n")
    with pytest.raises(TelemetryConfigError, match="invalid YAML") as info:
        TelemetryConfig.try_from_yaml(path)
    assert info.value.line is not None
    assert info.value.source == str(path)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A file that cannot be read raises a TelemetryConfigError naming it."""
    path = tmp_path / "absent.yml"
    with pytest.raises(TelemetryConfigError, match="cannot read") as info:
        TelemetryConfig.try_from_yaml(path)
    assert info.value.source == str(path)


def test_data_type_names() -> None:
    """Data types parse from the YAML spellings and render back to them."""
    assert ChannelDataType.from_str("int32") is ChannelDataType.INT_32
    assert ChannelDataType.from_str("INT_32") is ChannelDataType.INT_32
    assert ChannelDataType.from_str("CHANNEL_DATA_TYPE_UINT_64") is ChannelDataType.UINT_64
    assert ChannelDataType.from_str("boolean") is ChannelDataType.BOOL
    assert ChannelDataType.from_str("nope") is None
    assert [t.as_human_str() for t in ChannelDataType][:3] == ["double", "string", "enum"]


# -- the client key derived from a config's content -------------------------------------------


_IDLE_RUN = (ChannelEnumType("idle", 0), ChannelEnumType("run", 1))
_A_B = (ChannelBitFieldElement("a", 0, 1), ChannelBitFieldElement("b", 1, 7))


def _hash_config(
    *,
    asset: str = "bench-1",
    flow_name: str = "readings",
    channel_name: str = "voltage",
    data_type: ChannelDataType = ChannelDataType.DOUBLE,
    description: str = "supply",
    unit: str = "V",
    enum_types: tuple[ChannelEnumType, ...] = _IDLE_RUN,
    bits: tuple[ChannelBitFieldElement, ...] = _A_B,
    reverse_channels: bool = False,
    reverse_flows: bool = False,
    key: str | None = None,
    org: str | None = None,
) -> TelemetryConfig:
    """A config with every field the hash covers; each argument changes one of them."""
    channels = [
        ChannelConfig(channel_name, data_type, description=description, unit=unit),
        ChannelConfig("state", ChannelDataType.ENUM, enum_types=list(enum_types)),
        ChannelConfig("flags", ChannelDataType.BIT_FIELD, bit_field_elements=list(bits)),
    ]
    if reverse_channels:
        channels.reverse()
    flows = [
        FlowConfig(flow_name, channels),
        FlowConfig("log", [ChannelConfig("line", ChannelDataType.STRING)]),
    ]
    if reverse_flows:
        flows.reverse()
    return TelemetryConfig(
        asset_name=asset, ingestion_client_key=key, organization_id=org, flows=flows
    )


def test_derived_key_is_a_stable_sha256_of_the_content() -> None:
    """The key is 64 hex digits, the same for equal configs built apart, and does not depend on
    the order of flows, the organization or the config's own client key."""
    key = telemetry_config_hash(_hash_config())
    assert len(key) == 64
    int(key, 16)
    assert telemetry_config_hash(_hash_config()) == key
    assert telemetry_config_hash(_hash_config(reverse_flows=True)) == key
    assert telemetry_config_hash(_hash_config(org="org-7", key="explicit")) == key
    # The order of enum types and bit-field elements as written does not matter either.
    reordered = _hash_config(enum_types=_IDLE_RUN[::-1], bits=_A_B[::-1])
    assert telemetry_config_hash(reordered) == key


@pytest.mark.parametrize(
    "change",
    [
        {"asset": "bench-2"},
        {"flow_name": "readings2"},
        {"channel_name": "volts"},
        {"data_type": ChannelDataType.FLOAT},
        {"description": "main supply"},
        {"unit": "mV"},
        {"enum_types": (ChannelEnumType("idle", 0), ChannelEnumType("running", 1))},
        {"enum_types": (ChannelEnumType("idle", 0), ChannelEnumType("run", 2))},
        {"bits": (ChannelBitFieldElement("a", 0, 2), ChannelBitFieldElement("b", 2, 6))},
        {"bits": (ChannelBitFieldElement("x", 0, 1), ChannelBitFieldElement("b", 1, 7))},
        {"reverse_channels": True},
    ],
    ids=lambda change: next(iter(change)),
)
def test_derived_key_changes_with_the_telemetry(change: dict[str, Any]) -> None:
    """Any change to what the data means (names, types, units, enums, bits, channel order)
    gives another key, so a changed config never lands in the old ingestion config."""
    assert telemetry_config_hash(_hash_config(**change)) != telemetry_config_hash(_hash_config())
