"""DBC → flows and the compiled CAN decoder, checked against cantools' own decoding."""

from __future__ import annotations

import dataclasses
import math
import random
import struct
from pathlib import Path
from typing import Any

import pytest
from cantools.database.can import Database, Message, Signal
from cantools.database.conversion import BaseConversion
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daq_agent.core.errors import ConfigError, DecodeError
from daq_agent.core.model import ChannelDataType, ChannelEnumType, TelemetryConfig
from daq_agent.core.sample import Sample
from daq_agent.decode.can_decoder import (
    CanDecoder,
    derive_flows,
    derive_flows_fingerprint,
    frame_key,
)
from daq_agent.decode.dbc import load_database

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "dbc" / "bench.dbc"
MESSY = ROOT / "tests" / "data" / "dbc" / "messy_cp1252.dbc"


@pytest.fixture(scope="module")
def bench() -> Database:
    """The demo bench database."""
    return load_database(BENCH)


@pytest.fixture(scope="module")
def decoder(bench: Database) -> CanDecoder:
    """A decoder of the bench database on bus ``can0``."""
    return CanDecoder("can0", [bench])


def _same(expected: Any, got: Any) -> bool:
    if isinstance(expected, float) and math.isnan(expected):
        return isinstance(got, float) and math.isnan(got)
    return bool(expected == got) and type(expected) is type(got)


def _assert_matches_cantools(decoder: CanDecoder, message: Message, data: bytes) -> None:
    compiled = decoder.message(message.frame_id, message.is_extended_frame)
    assert compiled is not None
    expected = message.decode(data, decode_choices=False, scaling=True)
    got = compiled.signals(data)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert _same(value, got[name]), (message.name, name, value, got[name])
    sample = decoder.decode(message.frame_id, message.is_extended_frame, data, 7)
    assert sample is not None
    raw = message.decode(data, decode_choices=False, scaling=False)
    for channel, signal_name, value in zip(
        compiled.flow.channels, compiled.signal_names, sample.values, strict=True
    ):
        if signal_name not in expected:
            assert value is None
        elif channel.data_type is ChannelDataType.ENUM:
            assert value == raw[signal_name] & 0xFFFFFFFF
        elif channel.data_type is ChannelDataType.BOOL:
            assert value is (raw[signal_name] != 0)
        elif channel.data_type is ChannelDataType.DOUBLE and isinstance(expected[signal_name], int):
            assert _same(float(expected[signal_name]), value)  # an integer range too wide for int64
        else:
            assert _same(expected[signal_name], value)


# --- flows ---------------------------------------------------------------------------------


def test_one_flow_per_message_with_a_channel_per_signal(bench: Database) -> None:
    """Each message becomes a flow named by the bus, with its signals as channels in order."""
    flows = derive_flows("can0", [bench])
    assert [f.name for f in flows] == [f"can0.{m.name}" for m in bench.messages]
    for flow, message in zip(flows, bench.messages, strict=True):
        assert [c.name for c in flow.channels] == [s.name for s in message.signals]
    TelemetryConfig(asset_name="bench", flows=flows)  # unique names, valid enum channels


def test_units_comments_and_types_follow_the_signals(decoder: CanDecoder) -> None:
    """Units, comments and the data type rules carry over to the channels."""
    channels = {(f.name, c.name): c for f in decoder.flows for c in f.channels}
    voltage = channels["can0.BMS_PackStatus", "PackVoltage"]
    assert voltage.data_type is ChannelDataType.DOUBLE
    assert voltage.unit == "V"
    assert voltage.description == "Pack voltage measured behind the main contactors."
    expected = {
        ("can0.BMS_PackStatus", "BmsFault"): ChannelDataType.BOOL,
        ("can0.BMS_PackStatus", "ContactorState"): ChannelDataType.ENUM,
        ("can0.BMS_PackStatus", "PackAliveCounter"): ChannelDataType.UINT_32,
        ("can0.BMS_CellTemps", "CellTempMin"): ChannelDataType.INT_32,
        ("can0.INV_Speed", "MotorSpeed"): ChannelDataType.INT_32,
        ("can0.INV_Speed", "MechanicalPower"): ChannelDataType.DOUBLE,
        ("can0.INV_PhaseCurrentsFD", "PhaseCurrentU"): ChannelDataType.DOUBLE,
        ("can0.GNSS_Status", "Altitude"): ChannelDataType.DOUBLE,
        ("can0.BMS_Isolation", "IsolationResistance"): ChannelDataType.UINT_32,
    }
    assert {key: channels[key].data_type for key in expected} == expected
    assert channels["can0.BMS_PackStatus", "ContactorState"].enum_types[:2] == [
        ChannelEnumType("Open", 0),
        ChannelEnumType("Precharge", 1),
    ]


def test_negative_enum_keys_are_signed_two_complement(decoder: CanDecoder) -> None:
    """A value table with a negative key sends it as uint32 two's complement with is_signed."""
    direction = next(
        c
        for f in decoder.flows
        if f.name == "can0.VCU_Command"
        for c in f.channels
        if c.name == "Direction"
    )
    assert ChannelEnumType("Reverse", 0xFFFFFFFF, is_signed=True) in direction.enum_types
    assert ChannelEnumType("Forward", 1, is_signed=False) in direction.enum_types
    message = decoder.message(0x150, False)
    assert message is not None
    data = bytes([0, 0, 0b11 << 2, 0, 0, 0, 0, 0])  # Direction = -1
    sample = decoder.decode(0x150, False, data, 0)
    assert sample is not None
    assert sample.values[message.signal_names.index("Direction")] == 0xFFFFFFFF
    assert message.signals(data)["Direction"] == -1


def test_integer_types_widen_to_64_bits_and_fall_back_to_double(tmp_path: Path) -> None:
    """Integer channels take the smallest int32/uint32/int64/uint64 holding the scaled raw range."""
    path = tmp_path / "wide.dbc"
    path.write_text(
        'VERSION ""\n\nNS_ :\n\nBS_:\n\nBU_: A\n\n'
        "BO_ 1 Wide: 8 A\n"
        ' SG_ U40 : 0|40@1+ (1,0) [0|0] "" A\n'
        ' SG_ S24 : 40|24@1- (1,0) [0|0] "" A\n\n'
        "BO_ 2 Huge: 8 A\n"
        ' SG_ U64 : 0|64@1+ (1,-1) [0|0] "" A\n\n'
        "BO_ 3 Scaled: 8 A\n"
        ' SG_ S32x2 : 0|32@1- (2,0) [0|0] "" A\n'
        ' SG_ U31 : 32|31@1+ (1,0) [0|0] "" A\n'
        ' SG_ Neg : 63|1@1+ (1,-1) [0|0] "" A\n',
        encoding="utf-8",
    )
    decoder = CanDecoder("b", [load_database(path)])
    types = {c.name: c.data_type for f in decoder.flows for c in f.channels}
    assert types == {
        "U40": ChannelDataType.UINT_64,
        "S24": ChannelDataType.INT_32,
        "U64": ChannelDataType.DOUBLE,
        "S32x2": ChannelDataType.INT_64,
        "U31": ChannelDataType.UINT_32,
        "Neg": ChannelDataType.INT_32,
    }
    sample = decoder.decode(2, False, b"\xff" * 8, 0)
    assert sample is not None
    assert sample.values == (float(2**64 - 2),)


def test_same_database_on_two_buses_gives_distinct_flow_names(bench: Database) -> None:
    """Two buses carrying the same database never share a flow name."""
    flows = derive_flows("front", [bench]) + derive_flows("rear", [bench])
    assert len({f.name for f in flows}) == 2 * len(bench.messages)
    TelemetryConfig(asset_name="car", flows=flows)


def test_flow_name_template_is_configurable(bench: Database) -> None:
    """The flow name template sees the bus, the message and the frame id."""
    flows = derive_flows("c1", [bench], flow_name_template="{bus}/{frame_id:X}/{message}")
    assert flows[0].name == "c1/100/BMS_PackStatus"
    with pytest.raises(ConfigError, match="flow_name_template"):
        derive_flows("c1", [bench], flow_name_template="{bus}.{nope}")


def test_duplicate_message_names_get_the_frame_id(caplog: pytest.LogCaptureFixture) -> None:
    """Two messages with one name become two flows, the second suffixed with its frame id."""
    decoder = CanDecoder("x", [load_database(MESSY)])
    names = [f.name for f in decoder.flows]
    assert "x.Engine" in names
    assert "x.Engine_0x1F5" in names
    assert any("is taken" in w for w in decoder.warnings)


def test_fingerprint_is_stable_and_tracks_schema_changes(bench: Database) -> None:
    """The fingerprint ignores flow order and descriptions but follows names, types and units."""
    flows = derive_flows("can0", [bench])
    again = derive_flows("can0", [load_database(BENCH)])
    reference = derive_flows_fingerprint(flows)
    assert len(reference) == 64
    assert derive_flows_fingerprint(reversed(again)) == reference
    again[0].channels[0].description = "edited comment"
    assert derive_flows_fingerprint(again) == reference
    again[0].channels[0].unit = "mV"
    assert derive_flows_fingerprint(again) != reference
    assert derive_flows_fingerprint(derive_flows("can1", [bench])) != reference


# --- decoding ------------------------------------------------------------------------------


def test_standard_and_extended_ids_of_the_same_number_are_different_frames(
    decoder: CanDecoder,
) -> None:
    """Standard 0x100 is BMS_PackStatus; extended 0x100 is GNSS_Position."""
    data = bytes(range(8))
    standard = decoder.decode(0x100, False, data, 1)
    extended = decoder.decode(0x100, True, data, 2)
    assert standard is not None
    assert extended is not None
    assert standard.flow == "can0.BMS_PackStatus"
    assert extended.flow == "can0.GNSS_Position"
    assert frame_key(0x100, True) != frame_key(0x100, False)


def test_unknown_id_is_none_and_short_payload_raises(decoder: CanDecoder) -> None:
    """An unknown id returns None; a short payload raises DecodeError; excess bytes are ignored."""
    assert decoder.decode(0x7FF, False, bytes(8), 0) is None
    assert decoder.decode(0x200, True, bytes(8), 0) is None
    with pytest.raises(DecodeError, match="3 bytes, expected 8"):
        decoder.decode(0x200, False, bytes(3), 0)
    longer = decoder.decode(0x200, False, bytes(range(12)), 0)
    exact = decoder.decode(0x200, False, bytes(range(8)), 0)
    assert longer == exact


def test_sample_carries_flow_timestamp_and_typed_values(decoder: CanDecoder) -> None:
    """A sample has the flow name, the timestamp and one typed value per channel."""
    data = bytes([0x10, 0x27, 0xF6, 0xFF, 150, 0b0001_1010, 0x05, 0xAA])
    sample = decoder.decode(0x100, False, data, 1_700_000_000_123_456_000)
    assert sample is not None
    assert sample.timestamp_ns == 1_700_000_000_123_456_000
    assert sample.values == (100.0, -1.0, 75.0, 2, True, True, 5, 0xAA)


def test_multiplexed_signals_absent_from_the_frame_are_none(decoder: CanDecoder) -> None:
    """Only the cells selected by CellMux have values; the others are None."""
    message = decoder.message(0x102, False)
    assert message is not None
    data = bytes([1, 0xE8, 0x03, 0xD0, 0x07, 0xB8, 0x0B, 0x0F])
    sample = decoder.decode(0x102, False, data, 0)
    assert sample is not None
    values = dict(zip(message.signal_names, sample.values, strict=True))
    assert values["CellMux"] == 1
    assert values["CellVoltage04"] == pytest.approx(1.0)
    assert values["CellVoltage06"] == pytest.approx(3.0)
    assert values["CellVoltage01"] is None
    assert values["CellBalancingMask"] == 0x0F
    assert "CellVoltage01" not in message.signals(data)


def test_undefined_multiplexer_value_raises_like_cantools(decoder: CanDecoder) -> None:
    """A multiplexer value no signal uses is a DecodeError, as in cantools."""
    with pytest.raises(DecodeError, match="CellMux = 9"):
        decoder.decode(0x102, False, bytes([9, 0, 0, 0, 0, 0, 0, 0]), 0)


def test_every_bench_message_matches_cantools_on_random_payloads(
    bench: Database, decoder: CanDecoder
) -> None:
    """Random payloads of every bench message decode exactly as cantools decodes them."""
    rnd = random.Random(20261127)
    checked = 0
    for message in bench.messages:
        for _ in range(200):
            data = rnd.randbytes(message.length)
            if message.is_multiplexed():
                data = bytes([rnd.randrange(4)]) + data[1:]
            _assert_matches_cantools(decoder, message, data)
            checked += 1
    assert checked == 200 * len(bench.messages)


def test_extended_multiplexing_matches_cantools() -> None:
    """Nested multiplexers (SG_MUL_VAL_) select the same signals as cantools."""
    db = load_database(MESSY)
    decoder = CanDecoder("x", [db])
    message = db.get_message_by_name("ExtMux")
    for top, inner in [(1, 10), (1, 11), (2, 0), (2, 77)]:
        data = bytes([top, inner, 0x34, 0x92, 0x11, 0, 0, 0])
        _assert_matches_cantools(decoder, message, data)
    compiled = decoder.message(message.frame_id, False)
    assert compiled is not None
    with pytest.raises(DecodeError, match="Inner = 12"):
        compiled.signals(bytes([1, 12, 0, 0, 0, 0, 0, 0]))
    assert compiled.signals(bytes([1, 11, 0x00, 0x80, 0, 0, 0, 0]))["Leaf11"] == -8192.0
    assert "Leaf10" not in compiled.signals(bytes([2, 10, 0, 0, 0, 0, 0, 0]))


def test_overlapping_signals_decode_each_from_its_own_bits() -> None:
    """Overlapping signals (which cantools cannot unpack) each read their own bits."""
    decoder = CanDecoder("x", [load_database(MESSY)])
    message = decoder.message(500, False)
    assert message is not None
    values = message.signals(bytes([50, 0x34, 0x12, 0b10, 0, 0, 0, 0]))
    assert values == {"OilTemp": 10, "Pressure": 0x1234 * 0.5, "PressureLowByte": 0x34, "Mode": 2}
    assert [w for w in decoder.warnings if "overlap" in w] == [
        (
            "signals 'Pressure' and 'PressureLowByte' of message 'Engine' overlap; each is decoded "
            "from its own bits (cantools cannot unpack such a message)"
        )
    ]


def test_big_endian_overlaps_are_found_by_their_bytes(tmp_path: Path) -> None:
    """Motorola signals sharing a byte are reported; neighbours are not."""
    path = tmp_path / "be.dbc"
    path.write_text(
        'VERSION ""\n\nNS_ :\n\nBS_:\n\nBU_: A\n\n'
        "BO_ 1 Be: 4 A\n"
        ' SG_ Wide : 7|16@0+ (1,0) [0|0] "" A\n'
        ' SG_ Inside : 15|8@0+ (1,0) [0|0] "" A\n'
        ' SG_ Next : 23|8@0+ (1,0) [0|0] "" A\n'
        ' SG_ Tail : 24|8@1+ (1,0) [0|0] "" A\n',
        encoding="utf-8",
    )
    decoder = CanDecoder("b", [load_database(path)])
    overlaps = [w for w in decoder.warnings if "overlap" in w]
    assert len(overlaps) == 1
    assert "'Wide' and 'Inside'" in overlaps[0]


# --- property: whatever cantools encodes, we decode equal -----------------------------------

_SCALES = [(1, 0), (1, -40), (2, 0), (0.1, 0), (0.001, 0), (0.5, -100), (0.25, 0.5), (-1, 0)]
_LENGTHS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64]


@st.composite
def _messages(draw: st.DrawFn) -> Message:
    """A message of random signals of one byte order, packed without overlap."""
    length = draw(st.sampled_from(_LENGTHS[1:]))
    big_endian = draw(st.booleans())
    total = 8 * length
    position = draw(st.integers(0, 7))
    signals = []
    while position < total and len(signals) < 12:
        is_float = draw(st.integers(0, 5)) == 0
        if is_float:
            size = draw(st.sampled_from([32, 64]))
        else:
            size = draw(st.one_of(st.sampled_from([8, 16, 32, 64]), st.integers(1, 64)))
        if position + size > total:
            break
        scale, offset = draw(st.sampled_from(_SCALES))
        choices = None
        if not is_float and size <= 8 and draw(st.booleans()):
            choices = {0: "Zero", 1: "One"}
        # a big-endian signal starts at its MSB, in sawtooth bit numbering
        start = 8 * (position // 8) + 7 - position % 8 if big_endian else position
        signals.append(
            Signal(
                name=f"S{len(signals)}",
                start=start,
                length=size,
                byte_order="big_endian" if big_endian else "little_endian",
                is_signed=not is_float and draw(st.booleans()),
                conversion=BaseConversion.factory(scale, offset, choices, is_float),
            )
        )
        position += size + draw(st.integers(0, 9))
        if draw(st.booleans()):  # byte-aligned fields take the decoder's struct path
            position = (position + 7) // 8 * 8
    extended = draw(st.booleans())
    frame_id = draw(st.integers(0, 0x1FFFFFFF if extended else 0x7FF))
    return Message(
        frame_id=frame_id,
        name="Random",
        length=length,
        signals=signals,
        is_extended_frame=extended,
        is_fd=length > 8,
        strict=False,
    )


def _raw_value(draw: st.DrawFn, signal: Signal) -> int | float:
    if signal.is_float:
        if signal.length == 32:
            value = draw(st.floats(width=32, allow_nan=False))
        else:
            value = draw(st.floats(allow_nan=False))
        return value
    if signal.is_signed:
        return draw(st.integers(-(1 << (signal.length - 1)), (1 << (signal.length - 1)) - 1))
    return draw(st.integers(0, (1 << signal.length) - 1))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_layouts_round_trip_through_cantools_encode(data: st.DataObject) -> None:
    """Random signals encoded by cantools (LE/BE, signed, float, FD lengths) decode back equal."""
    message = data.draw(_messages())
    raw = {s.name: _raw_value(data.draw, s) for s in message.signals}
    payload = message.encode(raw, scaling=False, strict=False)
    decoder = CanDecoder("p", [_database_of(message)])
    assert not [w for w in decoder.warnings if "overlap" in w]
    _assert_matches_cantools(decoder, message, payload)
    compiled = decoder.message(message.frame_id, message.is_extended_frame)
    assert compiled is not None
    scaled = compiled.signals(payload)
    for signal in message.signals:
        expected = signal.conversion.raw_to_scaled(raw[signal.name], decode_choices=False)
        if signal.is_float and signal.length == 32:
            expected = signal.conversion.raw_to_scaled(
                struct.unpack("f", struct.pack("f", raw[signal.name]))[0], decode_choices=False
            )
        assert _same(expected, scaled[signal.name]), (signal, raw[signal.name])


def _database_of(message: Message) -> Database:
    database = Database(messages=[message], strict=False)
    database.refresh()
    return database


@settings(max_examples=60, deadline=None)
@given(
    which=st.integers(0, 10_000),
    seed=st.integers(0, 2**32 - 1),
)
def test_bench_values_encoded_by_cantools_decode_back_equal(which: int, seed: int) -> None:
    """Random in-range values of a bench message, encoded by cantools, decode back equal."""
    db = _BENCH_DB
    message = db.messages[which % len(db.messages)]
    rnd = random.Random(seed)
    values: dict[str, int | float] = {}
    mux_value = rnd.randrange(4)
    for signal in message.signals:
        if signal.multiplexer_ids is not None and mux_value not in signal.multiplexer_ids:
            continue
        if signal.is_multiplexer:
            values[signal.name] = mux_value
        elif signal.is_float:
            values[signal.name] = struct.unpack("f", struct.pack("f", rnd.uniform(-500, 500)))[0]
        elif signal.is_signed:
            values[signal.name] = rnd.randint(
                -(1 << (signal.length - 1)), (1 << (signal.length - 1)) - 1
            )
        else:
            values[signal.name] = rnd.randint(0, (1 << signal.length) - 1)
    # Message.encode: Database.encode_message(0x100) would pick the standard id for GNSS_Position
    payload = message.encode(values, scaling=False, strict=False)
    _assert_matches_cantools(_BENCH_DECODER, message, payload)
    compiled = _BENCH_DECODER.message(message.frame_id, message.is_extended_frame)
    assert compiled is not None
    decoded = compiled.signals(payload)
    assert set(decoded) == set(values)
    for name, value in values.items():
        conversion = message.get_signal_by_name(name).conversion
        assert _same(conversion.raw_to_scaled(value, decode_choices=False), decoded[name])


_BENCH_DB = load_database(BENCH)
_BENCH_DECODER = CanDecoder("can0", [_BENCH_DB])


def test_decoded_sample_is_a_real_frozen_sample(decoder: CanDecoder) -> None:
    """The hot path's samples equal constructed Samples and stay immutable."""
    sample = decoder.decode(0x103, False, bytes(range(8)), 42)
    assert isinstance(sample, Sample)
    assert sample == Sample(sample.flow, 42, sample.values)
    assert hash(sample) == hash(Sample(sample.flow, 42, sample.values))
    with pytest.raises(dataclasses.FrozenInstanceError):
        sample.flow = "other"  # type: ignore[misc]


def test_lazy_compilation_gives_the_same_samples(bench: Database) -> None:
    """Decoding on first use, after compile_all, and from a bytearray all give equal samples."""
    lazy = CanDecoder("can0", [bench])
    eager = CanDecoder("can0", [bench])
    eager.compile_all()
    data = bytes(range(1, 65))
    for message in bench.messages:
        payload = data[: message.length]
        if message.is_multiplexed():
            payload = b"\x02" + payload[1:]
        first = lazy.decode(message.frame_id, message.is_extended_frame, payload, 5)
        again = lazy.decode(message.frame_id, message.is_extended_frame, payload, 5)
        compiled = eager.decode(message.frame_id, message.is_extended_frame, payload, 5)
        from_array = eager.decode(
            message.frame_id, message.is_extended_frame, bytearray(payload), 5
        )
        assert first == again == compiled == from_array
    source = lazy.messages[0].source
    assert source.startswith("def decode(data, timestamp_ns")
    assert "cantools" not in source


def test_a_signal_name_defined_twice_becomes_two_channels(tmp_path: Path) -> None:
    """A message defining one signal name twice keeps both, the second numbered, with warnings."""
    path = tmp_path / "dup.dbc"
    path.write_text(
        'VERSION ""\n\nNS_ :\n\nBS_:\n\nBU_: A\n\n'
        "BO_ 16 Dup: 4 A\n"
        ' SG_ Speed : 0|16@1+ (1,0) [0|0] "" A\n'
        ' SG_ Speed : 16|16@1+ (0.5,0) [0|0] "" A\n',
        encoding="utf-8",
    )
    warnings: list[Any] = []
    decoder = CanDecoder("b", [load_database(path, warnings=warnings)])
    assert [w.line for w in warnings] == [11]
    assert [c.name for c in decoder.flows[0].channels] == ["Speed", "Speed_2"]
    assert decoder.messages[0].signals(bytes([1, 0, 4, 0])) == {"Speed": 1, "Speed_2": 2.0}
    assert any("Speed_2" in w for w in decoder.warnings)
