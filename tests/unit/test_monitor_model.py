"""The monitor's view model without a terminal: labels, readings, rates, ages, filter, health."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from daq_agent.core.model import ChannelConfig, ChannelDataType, ChannelEnumType, FlowConfig
from daq_agent.core.sample import Sample
from daq_agent.decode.can_decoder import CanDecoder
from daq_agent.decode.dbc import load_database
from daq_agent.monitor.model import (
    MonitorModel,
    SortKey,
    format_age,
    format_rate,
    format_value,
)
from daq_agent.pipeline.latest import EnumLabels, LatestValues, RateMeter
from daq_agent.pipeline.spool import SpoolStats
from daq_agent.pipeline.status import AgentStatus, FlusherStats, RingStats, SourceStats
from daq_agent.status_json import status_document

DBC = """VERSION ""

NS_ :

BS_:

BU_: ECU

BO_ 256 Pack: 8 ECU
 SG_ PackVoltage : 0|16@1+ (0.01,0) [0|655.35] "V" ECU
 SG_ ContactorState : 16|3@1+ (1,0) [0|4] "" ECU
 SG_ Gear : 24|8@1- (1,0) [-1|3] "" ECU

VAL_ 256 ContactorState 2 "Closed" 1 "Precharge" 0 "Open" ;
VAL_ 256 Gear -1 "Reverse" 0 "Neutral" 1 "Drive" ;
"""

NS = 1_000_000_000


def gear() -> ChannelConfig:
    return ChannelConfig(
        "Gear",
        ChannelDataType.ENUM,
        enum_types=[
            ChannelEnumType("Reverse", 0xFFFFFFFF, is_signed=True),
            ChannelEnumType("Neutral", 0),
            ChannelEnumType("Drive", 1),
        ],
    )


def flows() -> list[FlowConfig]:
    return [
        FlowConfig(
            "can0.Pack",
            [
                ChannelConfig("PackVoltage", ChannelDataType.DOUBLE, unit="V"),
                gear(),
                ChannelConfig("Fault", ChannelDataType.BOOL),
            ],
        ),
        FlowConfig(
            "can0.Temps", [ChannelConfig("CoolantTemp", ChannelDataType.INT_32, "", "degC")]
        ),
    ]


def test_signed_enum_keys_read_as_signed_numbers_with_their_label() -> None:
    """A signed value table's key shows as -1 'Reverse', whether the sample carries the 32-bit
    two's complement or the negative number; other keys keep their number."""
    labels = EnumLabels(gear())
    assert (labels.number(0xFFFFFFFF), labels.label(0xFFFFFFFF)) == (-1, "Reverse")
    assert (labels.number(-1), labels.label(-1)) == (-1, "Reverse")
    assert (labels.number(1), labels.label(1)) == (1, "Drive")
    assert labels.label(7) == ""
    unsigned = EnumLabels(
        ChannelConfig("S", ChannelDataType.ENUM, enum_types=[ChannelEnumType("Hi", 0xFFFFFFFF)])
    )
    assert (unsigned.number(0xFFFFFFFF), unsigned.label(0xFFFFFFFF)) == (0xFFFFFFFF, "Hi")


def test_labels_follow_the_decoder_of_a_dbc(tmp_path: Path) -> None:
    """Decoded by the project's CAN decoder, a signed table's -1 reads as -1 'Reverse' and an
    unsigned table's 2 as 'Closed'; the unit comes with the value."""
    path = tmp_path / "t.dbc"
    path.write_text(DBC)
    decoder = CanDecoder("can0", [load_database(path)])
    tap = LatestValues(decoder.flows)
    data = (3517).to_bytes(2, "little") + bytes([2, 0xFF, 0, 0, 0, 0])
    sample = decoder.decode(0x100, False, data, 5 * NS)
    assert sample is not None
    tap.observe([sample])
    got = {r.name: (r.value, r.unit, r.label) for r in tap.readings()}
    assert got == {
        "PackVoltage": (35.17, "V", ""),
        "ContactorState": (2, "", "Closed"),
        "Gear": (-1, "", "Reverse"),
    }


def test_the_tap_keeps_the_last_sample_of_each_flow_and_counts_them() -> None:
    """observe() keeps each flow's last sample and counts every sample; absent values are left
    out, bools are not enum-labelled, and an unknown flow's values are numbered."""
    tap = LatestValues(flows(), watch_s=None)
    tap.observe(
        [
            Sample("can0.Pack", 1 * NS, (1.0, 0, False)),
            Sample("can0.Temps", 2 * NS, (20,)),
            Sample("can0.Pack", 3 * NS, (2.5, 0xFFFFFFFF, None)),
        ]
    )
    assert tap.put_many(iter([Sample("other", 4 * NS, (7, b"\x01"))])) == 1
    assert tap.counts() == {"can0.Pack": 2, "can0.Temps": 1, "other": 1}
    readings = {(r.flow, r.name): r for r in tap.readings()}
    assert set(readings) == {
        ("can0.Pack", "PackVoltage"),
        ("can0.Pack", "Gear"),
        ("can0.Temps", "CoolantTemp"),
        ("other", "value[0]"),
        ("other", "value[1]"),
    }
    assert readings["can0.Pack", "PackVoltage"].value == 2.5
    assert readings["can0.Pack", "PackVoltage"].timestamp_ns == 3 * NS
    assert (readings["can0.Pack", "Gear"].value, readings["can0.Pack", "Gear"].label) == (
        -1,
        "Reverse",
    )
    assert readings["can0.Temps", "CoolantTemp"].unit == "degC"
    assert readings["other", "value[1]"].as_dict()["value"] == "01"


def test_a_multiplexed_flow_shows_every_group_with_its_own_time() -> None:
    """Samples that leave values out (multiplexed groups) add up: each channel keeps its last
    value and that value's timestamp; a later group replaces only its own channels."""
    flow = FlowConfig(
        "can0.Cells",
        [
            ChannelConfig("CellMux", ChannelDataType.UINT_32),
            ChannelConfig("Cell01", ChannelDataType.DOUBLE, unit="V"),
            ChannelConfig("Cell04", ChannelDataType.DOUBLE, unit="V"),
        ],
    )
    tap = LatestValues([flow], watch_s=None)
    tap.observe([Sample("can0.Cells", 1 * NS, (0, 3.1, None))])
    tap.observe([Sample("can0.Cells", 2 * NS, (1, None, 3.4))])
    got = {r.name: (r.value, r.timestamp_ns) for r in tap.readings()}
    assert got == {"CellMux": (1, 2 * NS), "Cell01": (3.1, 1 * NS), "Cell04": (3.4, 2 * NS)}
    tap.observe([Sample("can0.Cells", 3 * NS, (0, 3.0, None))])
    got = {r.name: (r.value, r.timestamp_ns) for r in tap.readings()}
    assert got == {"CellMux": (0, 3 * NS), "Cell01": (3.0, 3 * NS), "Cell04": (3.4, 2 * NS)}


def test_samples_are_counted_only_while_the_tap_is_read() -> None:
    """An unread tap keeps the last values but counts nothing; a read starts the counting (and
    the rates from there), which stops watch_s after the last read."""
    tap = LatestValues(flows(), watch_s=0.3)
    tap.observe([Sample("can0.Temps", NS, (1,))] * 5)
    assert tap.counts() == {}
    (reading,) = tap.readings()
    assert (reading.value, reading.count, reading.rate) == (1, 0, None)
    tap.observe([Sample("can0.Temps", 2 * NS, (2,))] * 3)
    assert tap.counts() == {"can0.Temps": 3}
    (reading,) = tap.readings()
    assert (reading.value, reading.count) == (2, 3)
    assert reading.rate is not None
    assert reading.rate > 0
    deadline = time.monotonic() + 0.35
    while time.monotonic() < deadline:
        time.sleep(0.05)
    tap.observe([Sample("can0.Temps", 3 * NS, (3,))] * 4)
    assert tap.counts() == {"can0.Temps": 3}


def test_the_rate_is_measured_over_a_sliding_window() -> None:
    """Rates compare the counts with the oldest record of the window (the start before that)."""
    meter = RateMeter(window_s=5.0, start=0.0)
    assert meter.update(1.0, {"a": 10}) == {"a": 10.0}
    assert meter.update(2.0, {"a": 30, "b": 4}) == {"a": 15.0, "b": 2.0}
    # at 6 s the record of 1 s is the oldest one at least 5 s old: (70 - 10) / 5
    assert meter.update(6.0, {"a": 70, "b": 4}) == {"a": 12.0, "b": 0.8}
    assert meter.update(20.0, {"a": 70, "b": 4}) == {"a": 0.0, "b": 0.0}


def test_formatting_of_values_rates_and_ages() -> None:
    """Cells: floats to 7 digits, bools as words, rates and ages scaled to be read at a glance."""
    assert format_value(35.17) == "35.17"
    assert format_value(1 / 3) == "0.3333333"
    assert format_value(math.nan) == "nan"
    assert format_value(True) == "true"
    assert format_value(None) == ""
    assert format_rate(None) == "-"
    assert format_rate(9.876) == "9.88"
    assert format_rate(123.45) == "123.5"
    assert format_rate(12_345.0) == "12.3k"
    assert format_age(-1.0) == "0.00 s"
    assert format_age(0.123) == "0.12 s"
    assert format_age(42.4) == "42 s"
    assert format_age(185) == "3m05s"
    assert format_age(7380) == "2h03m"
    assert format_age(3 * 86400 + 4 * 3600 + 5) == "3d04h"


def channel(flow: str, name: str, ts: int, rate: float | None, **extra: object) -> dict:
    return {"flow": flow, "name": name, "timestamp_ns": ts, "rate": rate, "value": 1, **extra}


def doc(*channels: dict) -> dict:
    return {"version": 1, "status": {"sources": []}, "channels": list(channels)}


def test_filter_sort_pause_and_ages_of_the_rows() -> None:
    """The filter keeps a part of flow.name (or a glob) case-insensitively; the order is by name,
    busiest or freshest; a paused model keeps its rows; ages are measured against now."""
    model = MonitorModel()
    model.update(
        doc(
            channel("can0.Pack", "PackVoltage", 9 * NS, 10.0, unit="V", value=35.17),
            channel("can0.Pack", "Gear", 9 * NS, 10.0, value=-1, label="Reverse"),
            channel("can0.Temps", "CoolantTemp", 7 * NS, 1.0),
            channel("can1.Slow", "Odometer", 8 * NS, 0.1),
        )
    )
    rows = model.signal_rows(now_ns=10 * NS)
    assert [r.name for r in rows] == ["Gear", "PackVoltage", "CoolantTemp", "Odometer"]
    assert rows[0].cells == ("can0.Pack", "Gear", "-1", "", "Reverse", "10.00", "1.00 s")
    assert rows[1].value == "35.17"
    assert rows[1].unit == "V"
    assert rows[2].age == "3.00 s"
    model.filter = "volt"
    assert [r.name for r in model.signal_rows(10 * NS)] == ["PackVoltage"]
    model.filter = "CAN0.*"
    assert [r.name for r in model.signal_rows(10 * NS)] == ["Gear", "PackVoltage", "CoolantTemp"]
    model.filter = "*temp"
    assert [r.name for r in model.signal_rows(10 * NS)] == ["CoolantTemp"]
    model.filter = ""
    assert model.cycle_sort() is SortKey.RATE
    assert [r.name for r in model.signal_rows(10 * NS)][2:] == ["CoolantTemp", "Odometer"]
    assert model.cycle_sort() is SortKey.AGE
    assert [r.name for r in model.signal_rows(10 * NS)][2:] == ["Odometer", "CoolantTemp"]
    assert model.cycle_sort() is SortKey.NAME
    assert model.toggle_pause() is True
    assert model.update(doc(channel("x", "y", NS, None))) is False
    assert model.total_channels == 4
    assert model.toggle_pause() is False
    assert model.update(doc(channel("x", "y", NS, None))) is True
    assert [r.cells[1:] for r in model.signal_rows(10 * NS)] == [("y", "1", "", "", "-", "9.00 s")]


def agent_status(received: int, *, ring_dropped: int = 0, failed: str = "") -> AgentStatus:
    return AgentStatus(
        time_s=0.0,
        uptime_s=1.0,
        sources=(
            SourceStats(
                "can0",
                "can",
                "running",
                received=received,
                decoded=received - 3,
                unknown=1,
                errors=2,
                counters={"decode_errors": 2},
            ),
        ),
        ring=RingStats(
            capacity=1000, depth=5, high_water=50, put_count=0, got=0, dropped=ring_dropped
        ),
        flusher=FlusherStats(delivered=90, pending=4, latency_p50_ms=12.0, latency_p99_ms=40.0),
        spool=SpoolStats(
            bytes_on_disk=2048,
            segments=1,
            pending_records=1,
            pending_samples=4,
            pending_bytes=100,
            acked_seq=1,
            last_seq=2,
            recovered_records=0,
            corrupt_records=0,
            dropped_records=0,
            dropped_samples=0,
            torn_bytes=0,
            cursor_state="ok",
            fsyncs=3,
            records_appended=2,
            last_fsync_age=0.1,
            failed=failed or None,
        ),
        stream={"windows": 7.0, "windows_failed": 0.0},
    )


def test_health_rows_of_a_source_the_ring_the_spool_and_the_stream() -> None:
    """The status of /status.json becomes a row per source (with its frame rate) and one each for
    the ring, the spool and the stream; dropping and failures show in the state."""
    model = MonitorModel(rate_window_s=5.0)
    tap = LatestValues(flows())
    first = json.loads(json.dumps(status_document(agent_status(100), tap)))
    model.update(first, now=1000.0)
    model.update(json.loads(json.dumps(status_document(agent_status(300), tap))), now=1002.0)
    rows = {r.part: r for r in model.health_rows()}
    assert model.run_line == "run (none)  up 0:00:01"
    assert list(rows) == ["can0 (can)", "ring", "spool", "stream"]
    assert rows["can0 (can)"].state == "running"
    assert rows["can0 (can)"].detail.startswith("100.0 frames/s  received 300  decoded 297")
    assert "errors 2 (decode_errors 2)" in rows["can0 (can)"].detail
    assert rows["ring"].cells == ("ring", "ok", "depth 5/1000  high-water 50  dropped 0")
    assert rows["spool"].state == "ok"
    assert "pending 4 samples" in rows["spool"].detail
    assert rows["stream"].state == "ok"
    assert "delivered 90  pending 4" in rows["stream"].detail
    assert "latency p50 12 ms p99 40 ms" in rows["stream"].detail
    assert "windows 7 committed 0 failed" in rows["stream"].detail
    model.update(status_document(agent_status(300, ring_dropped=3, failed="disk full"), tap))
    rows = {r.part: r for r in model.health_rows()}
    assert rows["ring"].state == "dropping"
    assert rows["spool"].state == "FAILED"
    assert "disk full" in rows["spool"].detail


def test_a_direct_document_has_no_ring_spool_or_stream() -> None:
    """Read directly, the health says so instead of showing empty pipeline rows."""
    model = MonitorModel()
    model.update({"version": 1, "mode": "direct", "status": {"sources": []}, "channels": []})
    assert [r.cells[:2] for r in model.health_rows()] == [("pipeline", "direct")]
    assert model.run_line == ""


def test_the_status_document_is_json_with_non_finite_values_as_text() -> None:
    """/status.json's document serialises strictly (no NaN token): a NaN value travels as
    "nan", the status snapshot as AgentStatus.as_dict()."""
    tap = LatestValues(flows())
    tap.observe([Sample("can0.Pack", NS, (math.nan, 1, True))])
    document = status_document(agent_status(10), tap)
    text = json.dumps(document, allow_nan=False)
    back = json.loads(text)
    assert back["version"] == 1
    assert back["status"] == json.loads(json.dumps(agent_status(10).as_dict()))
    values = {c["name"]: (c["value"], c["label"]) for c in back["channels"]}
    assert values == {"PackVoltage": ("nan", ""), "Gear": (1, "Drive"), "Fault": (True, "")}


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_rate_meter_with_no_elapsed_time_gives_no_rate(bad: float) -> None:
    """A record at (or before) the start gives no rate rather than a division by zero."""
    assert RateMeter(start=0.0).update(bad, {"a": 1}) == {}
