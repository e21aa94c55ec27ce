"""Pure parts of the store browser: time bounds, signed enum keys, name patterns."""

from __future__ import annotations

import pytest

from daq_agent._proto.sift.common.type.v1 import channel_data_type_pb2 as cdt
from daq_agent._proto.sift.common.type.v1 import channel_enum_type_pb2 as cet
from daq_agent._proto.sift.ingestion_configs.v2 import ingestion_configs_pb2 as ic
from daq_agent.core.errors import DaqError
from daq_agent.server.browse import ChannelView, match_names, parse_time_bound


def test_time_bounds_iso_ns_and_relative() -> None:
    """ISO 8601 with ns and offsets (UTC when none), integer ns, and relative bounds."""
    assert parse_time_bound("2025-06-15T15:06:40.123456789Z").ns == 1_750_000_000_123_456_789
    assert parse_time_bound("2025-06-15T17:06:40+02:00").ns == 1_750_000_000_000_000_000
    assert parse_time_bound("2025-06-15T15:06:40.5").ns == 1_750_000_000_500_000_000
    assert parse_time_bound("1750000000000000000").ns == 1_750_000_000_000_000_000
    relative = parse_time_bound("+1.5")
    assert relative.relative
    assert relative.ns == 1_500_000_000
    assert parse_time_bound("+250ms").ns == 250_000_000
    assert parse_time_bound("+2m").resolve(10) == 120_000_000_010
    assert parse_time_bound("+1s").resolve(None) is None
    with pytest.raises(DaqError, match="--end: 'soon' is not ISO 8601"):
        parse_time_bound("soon", "--end")


def _enum(*entries: tuple[str, int, bool]) -> ChannelView:
    return ChannelView.from_pb(
        ic.ChannelConfig(
            name="Gear",
            data_type=cdt.CHANNEL_DATA_TYPE_ENUM,
            enum_types=[cet.ChannelEnumType(name=n, key=k, is_signed=s) for n, k, s in entries],
        )
    )


def test_signed_value_table_keys_read_signed() -> None:
    """A uint32 key of a signed table reads as its signed number, with its label."""
    gear = _enum(("Reverse", 0xFFFFFFFF, True), ("Neutral", 0, False), ("Drive", 1, False))
    assert gear.signed
    assert dict(gear.labels) == {-1: "Reverse", 0: "Neutral", 1: "Drive"}
    assert gear.number(4294967295) == -1
    assert gear.number(-1) == -1  # a decoder that already gives signed keys
    assert gear.label(4294967295) == "Reverse"
    assert gear.label(1) == "Drive"
    assert gear.label(7) is None
    unsigned = _enum(("Off", 0, False), ("High", 0xFFFFFFFF, False))
    assert unsigned.number(4294967295) == 4294967295
    assert unsigned.label(4294967295) == "High"


def test_patterns_match_names_or_name_the_nearest() -> None:
    """Exact names and globs select in the given order; a miss names the pattern and near names."""
    names = ["PackVoltage", "PackCurrent", "CellVoltage01", "Gear"]
    assert match_names(["Gear", "Pack*"], names, "channel") == [
        "PackVoltage",
        "PackCurrent",
        "Gear",
    ]
    with pytest.raises(DaqError, match=r"no channel matches 'PakVoltage' \(near: PackVoltage"):
        match_names(["PakVoltage"], names, "channel")
    with pytest.raises(DaqError, match=r"no flow matches 'x\*' \(the store has no flows\)"):
        match_names(["x*"], [], "flow")
