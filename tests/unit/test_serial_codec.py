"""Serial codec: Hypothesis round trips for every framing and checksum, and resynchronisation
after garbage."""

from __future__ import annotations

import functools
import math
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daq_agent.core.model import ChannelDataType
from daq_agent.core.sample import Value
from daq_agent.serialdefs import (
    ChannelSpec,
    ChecksumKind,
    CompiledFrame,
    FrameChecksum,
    FrameFault,
    FrameStream,
    SerialCodec,
    loads_definitions,
)

FRAMINGS = ("cobs", "slip", "sync_length", "fixed")
CHECKSUMS = tuple(k.value for k in ChecksumKind)
FIXED_LENGTH = 96
U32 = 0xFFFFFFFF

_FIELDS = """
      - {name: i8, type: int8}
      - {name: u8, type: uint8}
      - {name: i16, type: int16, byte_order: big}
      - {name: u16, type: uint16}
      - {name: i32, type: int32}
      - {name: u32, type: uint32, byte_order: big}
      - {name: i64, type: int64}
      - {name: u64, type: uint64, byte_order: big}
      - {name: f32, type: float32}
      - {name: f64, type: float64, byte_order: big}
      - {name: flag, type: bool}
      - {name: label, type: string, size: 6}
      - {name: blob, type: bytes, size: 3}
      - {name: scaled, type: int16, scale: 0.01, offset: -5, unit: V}
      - {name: counts, type: uint16, scale: 4, offset: 100}
      - {name: mode, type: uint8, values: {0: idle, 1: run, 2: fault}}
      - {name: signed_enum, type: int8, values: {-1: negative, 0: zero, 1: positive}}
      - {name: i24, type: int24, scale: 0.5}
      - {name: u24, type: uint24, byte_order: big}
      - {name: swapped_f32, type: float32, byte_order: big, word_order: little}
      - {name: swapped_i64, type: int64, byte_order: little, word_order: big}
      - name: packed
        type: uint16
        byte_order: big
        bits:
          - {name: b0, start: 0}
          - {name: nibble, start: 1, length: 4, values: {0: a, 1: b, 15: p}}
          - {name: high, start: 5, length: 11, scale: 2, offset: 1}
"""


CRC_PARAMETERS = ", poly: 0x1864CFB, init: 0xB704CE"
"""The custom crc of the round trips: CRC-24/OPENPGP (a 3-byte checksum)."""


def binary_yaml(framing: str, checksum: str) -> str:
    """A binary definition with two frame types and every field kind."""
    if framing in ("cobs", "slip"):
        framing_yaml = f"framing: {{kind: {framing}, max_length: 128}}"
        span = ""
        length = ""
    elif framing == "sync_length":
        framing_yaml = (
            "framing: {kind: sync_length, sync: 'B5 62', max_length: 128,"
            " length_field: {at: 2, type: uint16, byte_order: little, adjust: 3}}"
        )
        span = ", span: {start: 2}"
        length = ""
    else:
        framing_yaml = f"framing: {{kind: fixed, sync: 'A5 5A', length: {FIXED_LENGTH}}}"
        span = ", span: {start: 2}"
        length = f"\n    length: {FIXED_LENGTH}"
    disc_at = {"cobs": 0, "slip": 0, "sync_length": 4, "fixed": 2}[framing]
    return f"""
format: binary
name: dev
{framing_yaml}
checksum: {{kind: {checksum}{span}{CRC_PARAMETERS if checksum == "crc" else ""}}}
discriminator: {{at: {disc_at}, type: uint8}}
frames:
  - name: everything
    id: 7{length}
    fields:{_FIELDS}
  - name: small
    id: 0xC0{length}
    fields:
      - {{name: value, type: float32, byte_order: big}}
"""


@functools.cache
def binary_codec(framing: str, checksum: str, device: str = "serial") -> SerialCodec:
    """The compiled codec of :func:`binary_yaml` (cached: compiling is not what is tested)."""
    return SerialCodec(loads_definitions(binary_yaml(framing, checksum)), device=device)


def _raw_strategy(channel: ChannelSpec) -> st.SearchStrategy[Any]:
    item = channel.field
    if channel.bit is not None:
        return st.integers(0, (1 << channel.bit.length) - 1)
    kind = item.type
    if kind == "float32":
        return st.floats(width=32, allow_nan=False, allow_infinity=False)
    if kind == "float64":
        return st.floats(allow_nan=False, allow_infinity=False)
    if kind == "bool":
        return st.booleans()
    if kind == "string":
        return st.text(string.ascii_letters + string.digits + " .-", max_size=item.size)
    if kind == "bytes":
        return st.binary(min_size=item.size, max_size=item.size)
    bits = item.width * 8
    if kind.startswith("u"):
        return st.integers(0, (1 << bits) - 1)
    return st.integers(-(1 << (bits - 1)), (1 << (bits - 1)) - 1)


def _physical(channel: ChannelSpec, raw: Any) -> Value:
    """What the decoder must return for ``raw`` (the definition's arithmetic)."""
    data_type = channel.config.data_type
    source = channel.bit if channel.bit is not None else channel.field
    scale, offset = source.scale, source.offset
    if data_type is ChannelDataType.ENUM:
        return int(raw) & U32
    if data_type is ChannelDataType.BOOL:
        return bool(raw)
    if scale == 1.0 and offset == 0.0:
        return raw  # type: ignore[no-any-return]
    if data_type is ChannelDataType.DOUBLE:
        return raw * scale + offset  # type: ignore[no-any-return]
    return raw * int(scale) + int(offset)  # type: ignore[no-any-return]


@st.composite
def frame_values(draw: st.DrawFn, compiled: CompiledFrame) -> dict[str, Value]:
    """Physical values for every channel of a frame type, from random raw values."""
    return {c.name: _physical(c, draw(_raw_strategy(c))) for c in compiled.channels}


def _assert_values_equal(
    compiled: CompiledFrame, got: tuple[Value, ...], want: dict[str, Value]
) -> None:
    for channel, value in zip(compiled.channels, got, strict=True):
        expected = want[channel.name]
        if isinstance(expected, float) and not math.isfinite(expected):
            assert value == expected, channel.name
        assert value == expected, (channel.name, value, expected)
        assert type(value) is type(expected), channel.name


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("checksum", CHECKSUMS)
def test_binary_round_trip(framing: str, checksum: str) -> None:
    """Random field values survive encode → frame → checksum → decode for every framing/checksum."""
    codec = SerialCodec(loads_definitions(binary_yaml(framing, checksum)), device="d")

    @settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(["everything", "small"]))
        compiled = codec.frame(name)
        values = data.draw(frame_values(compiled))
        wire = codec.encode(name, values)
        stream = FrameStream(codec)
        samples = stream.feed(wire, 123)
        assert stream.counters()["frames"] == 1, stream.counters()
        (sample,) = samples
        assert sample.flow == f"d.{name}"
        assert sample.timestamp_ns == 123
        _assert_values_equal(compiled, sample.values, values)

    check()


def test_bit_flip_is_a_checksum_failure() -> None:
    """Flipping any one bit of a CRC-16 protected COBS frame never yields a sample."""
    codec = SerialCodec(loads_definitions(binary_yaml("cobs", "crc16_ccitt_false")))
    wire = codec.encode("small", {"value": 1.5})
    payload = codec.encode_frame(codec.frame("small"), {"value": 1.5})
    checksum = FrameChecksum(codec.defs.checksum)  # type: ignore[arg-type]
    assert checksum.verify(payload)
    for bit in range(len(payload) * 8):
        damaged = bytearray(payload)
        damaged[bit // 8] ^= 1 << (bit % 8)
        assert codec.decode(bytes(damaged)) is FrameFault.CHECKSUM
    assert FrameStream(codec).feed(wire, 0)


TEXT_DEFS = {
    "csv": """
format: csv
discriminator: {column: 0}
frames:
  - name: env
    id: ENV
    fields:
      - {name: temperature, type: float, unit: degC}
      - {name: humidity, type: float32}
      - {name: count, type: int}
      - {name: code, type: uint16, scale: 10}
      - {name: ok, type: bool}
      - {name: state, type: string, values: {IDLE: idle, RUN: running}}
      - {name: note, type: string}
      - name: flags
        type: uint8
        bits: [{name: f0, start: 0}, {name: f13, start: 1, length: 3}]
  - name: other
    id: OTH
    fields: [{name: x, type: int32}]
""",
    "key_value": """
format: key_value
discriminator: {key: type}
frames:
  - name: env
    id: env
    fields:
      - {name: temperature, type: float, key: T}
      - {name: humidity, type: float32, key: H}
      - {name: count, type: int}
      - {name: code, type: uint16, scale: 10}
      - {name: ok, type: bool}
      - {name: state, type: string, values: {IDLE: idle, RUN: running}}
      - {name: note, type: string}
      - name: flags
        type: uint8
        bits: [{name: f0, start: 0}, {name: f13, start: 1, length: 3}]
  - name: other
    id: oth
    fields: [{name: x, type: int32}]
""",
    "regex": r"""
format: regex
framing: {kind: line, terminator: ";"}
frames:
  - name: env
    pattern: >-
      ENV T=(?P<temperature>\S+) H=(?P<humidity>\S+) C=(?P<count>-?\d+) D=(?P<code>\d+)
      K=(?P<ok>[01]) S=(?P<state>\w*) N=(?P<note>\w*) F=(?P<flags>\d+)
    render: >-
      ENV T={temperature} H={humidity} C={count} D={code}
      K={ok} S={state} N={note} F={flags}
    fields:
      - {name: temperature, type: float}
      - {name: humidity, type: float32}
      - {name: count, type: int}
      - {name: code, type: uint16, scale: 10}
      - {name: ok, type: bool}
      - {name: state, type: string, values: {IDLE: idle, RUN: running}}
      - {name: note, type: string}
      - name: flags
        type: uint8
        bits: [{name: f0, start: 0}, {name: f13, start: 1, length: 3}]
  - name: other
    pattern: 'OTH (?P<x>-?\d+)'
    render: 'OTH {x}'
    fields: [{name: x, type: int32}]
""",
}


def _text_values(draw: st.DrawFn) -> dict[str, Value]:
    note_alphabet = string.ascii_letters + string.digits
    return {
        "temperature": draw(st.floats(allow_nan=False, allow_infinity=False)),
        "humidity": draw(st.floats(allow_nan=False, allow_infinity=False, width=32)),
        "count": draw(st.integers(-(1 << 63), (1 << 63) - 1)),
        "code": draw(st.integers(0, 65535)) * 10,
        "ok": draw(st.booleans()),
        "state": draw(st.sampled_from([0, 1])),
        "note": draw(st.text(note_alphabet, min_size=1, max_size=12)),
        "f0": draw(st.booleans()),
        "f13": draw(st.integers(0, 7)),
    }


@pytest.mark.parametrize("fmt", sorted(TEXT_DEFS))
def test_text_round_trip(fmt: str) -> None:
    """Random values survive encode → line → decode for csv, key=value and regex frames."""
    codec = SerialCodec(loads_definitions(TEXT_DEFS[fmt]), device="t")

    @settings(max_examples=40, deadline=None)
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        values = data.draw(st.composite(lambda draw: _text_values(draw))())
        other = {"x": data.draw(st.integers(-(1 << 31), (1 << 31) - 1))}
        wire = codec.encode("env", values) + codec.encode("other", other)
        stream = FrameStream(codec)
        samples = stream.feed(wire, 5)
        assert [s.flow for s in samples] == ["t.env", "t.other"], stream.counters()
        _assert_values_equal(codec.frame("env"), samples[0].values, values)
        assert samples[1].values == (other["x"],)

    check()


GPS = """
format: nmea
frames:
  - name: gga
    id: GGA
    fields:
      - {name: utc_time, type: time}
      - {name: latitude, type: lat}
      - {name: longitude, type: lon}
      - {name: quality, type: uint8, values: {0: invalid, 1: gps}}
      - {name: satellites, type: uint8}
      - {name: hdop, type: float}
      - {name: altitude, type: float}
      - {name: altitude_unit, type: skip}
  - name: rmc
    id: GPRMC
    fields:
      - {name: utc_time, type: time}
      - {name: status, type: string, values: {A: valid, V: void}}
      - {name: date, type: date, index: 9}
"""


@functools.cache
def _gps_codec() -> SerialCodec:
    return SerialCodec(loads_definitions(GPS), device="gps")


@settings(max_examples=60, deadline=None)
@given(
    t=st.floats(0, 86_399.999),
    lat=st.floats(-89.999, 89.999),
    lon=st.floats(-179.999, 179.999),
    quality=st.sampled_from([0, 1]),
    satellites=st.integers(0, 99),
    hdop=st.floats(0, 99, allow_nan=False),
    altitude=st.one_of(st.none(), st.floats(-1000, 9000)),
    date=st.dates(),
)
def test_nmea_round_trip(
    t: float,
    lat: float,
    lon: float,
    quality: int,
    satellites: int,
    hdop: float,
    altitude: float | None,
    date: Any,
) -> None:
    """Random GGA/RMC values survive NMEA encoding (checksum included) within NMEA precision."""
    codec = _gps_codec()
    values: dict[str, Value] = {
        "utc_time": t,
        "latitude": lat,
        "longitude": lon,
        "quality": quality,
        "satellites": satellites,
        "hdop": hdop,
        "altitude": altitude,
    }
    iso = f"{1980 + date.year % 100:04d}-{date.month:02d}-{date.day:02d}"
    iso = iso if int(iso[:4]) < 2080 else f"{int(iso[:4]) - 100}{iso[4:]}"
    wire = codec.encode("gga", values) + codec.encode(
        "rmc", {"utc_time": t, "status": 1, "date": iso}
    )
    assert wire.startswith(b"$GPGGA,")
    assert b"*" in wire
    stream = FrameStream(codec)
    gga, rmc = stream.feed(wire, 1)
    got = dict(zip([c.name for c in codec.frame("gga").channels], gga.values, strict=True))
    assert got["utc_time"] == pytest.approx(t, abs=1e-3)
    assert got["latitude"] == pytest.approx(lat, abs=1e-8)
    assert got["longitude"] == pytest.approx(lon, abs=1e-8)
    assert got["quality"] == quality
    assert got["satellites"] == satellites
    assert got["hdop"] == hdop
    assert got["altitude"] == altitude
    assert rmc.values[1:] == (1, iso)


def test_nmea_checksum_and_unknown_sentences_are_counted() -> None:
    """A wrong NMEA checksum and an undeclared sentence are counted, never decoded."""
    codec = SerialCodec(loads_definitions(GPS), device="gps")
    good = b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n"
    bad = good.replace(b"*47", b"*48")
    unknown = b"$GPGSA,A,3,04,05,,09,12,,,24,,,,,2.5,1.3,2.1*39\r\n"
    stream = FrameStream(codec)
    samples = stream.feed(bad + unknown + b"noise" + good, 0)
    assert len(samples) == 1
    assert samples[0].values[1] == pytest.approx(48.1173)
    assert samples[0].values[2] == pytest.approx(11.516666666)
    counters = stream.counters()
    assert counters["checksum_errors"] == 1
    assert counters["unknown_types"] == 1
    assert stream.unknown_ids == {"GPGSA": 1}


# -- garbage ------------------------------------------------------------------------------------


def _garbage(framing: str) -> st.SearchStrategy[bytes]:
    if framing == "sync_length":
        return st.binary(max_size=40).map(lambda b: b.replace(b"\xb5", b""))
    if framing == "fixed":
        return st.binary(max_size=40).map(lambda b: b.replace(b"\xa5", b""))
    return st.binary(max_size=40)


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("checksum", ["crc16_xmodem", "crc32", "crc8", "xor8"])
def test_garbage_between_frames(framing: str, checksum: str) -> None:
    """Garbage (and, with CRC-16/32, truncated frames) between valid frames never crashes, never
    yields a frame whose checksum is wrong, and every valid frame is recovered in order."""
    codec = SerialCodec(loads_definitions(binary_yaml(framing, checksum)), device="g")
    verify = FrameChecksum(codec.defs.checksum).verify  # type: ignore[arg-type]
    strong = ChecksumKind(checksum).size >= 2

    @settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        stream_bytes = bytearray()
        expected: list[tuple[str, tuple[Value, ...]]] = []
        for _ in range(data.draw(st.integers(1, 5))):
            stream_bytes += data.draw(_garbage(framing))
            name = data.draw(st.sampled_from(["everything", "small"]))
            compiled = codec.frame(name)
            values = data.draw(frame_values(compiled))
            wire = codec.encode(name, values)
            if strong and data.draw(st.booleans()):
                stream_bytes += wire[: data.draw(st.integers(1, len(wire) - 1))]  # a truncation
            stream_bytes += wire
            expected.append((f"g.{name}", tuple(values[c.name] for c in compiled.channels)))
        framer = codec.make_framer()
        decoded: list[tuple[str, tuple[Value, ...]]] = []
        data_bytes = bytes(stream_bytes)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(data_bytes)), max_size=6)))
        for start, end in zip([0, *cuts], [*cuts, len(data_bytes)], strict=True):
            for frame, _ in framer.feed(data_bytes[start:end], 0):
                result = codec.decode(frame)
                if isinstance(result, FrameFault):
                    continue
                assert verify(frame), frame.hex()
                decoded.append((result[0].flow, result[1]))
        remaining = iter(decoded)
        for item in expected:
            assert any(_same(item, got) for got in remaining), (item, decoded)

    check()


def _same(a: tuple[str, tuple[Value, ...]], b: tuple[str, tuple[Value, ...]]) -> bool:
    return a[0] == b[0] and all(
        x == y
        or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))
        for x, y in zip(a[1], b[1], strict=True)
    )


@settings(max_examples=50, deadline=None)
@given(garbage=st.lists(st.binary(max_size=30), min_size=1, max_size=5), cut=st.integers(1, 40))
def test_nmea_recovers_after_line_noise(garbage: list[bytes], cut: int) -> None:
    """Random bytes before NMEA sentences (even without a line end) never lose a sentence."""
    codec = _gps_codec()
    sentence = codec.encode("rmc", {"utc_time": 3600.0, "status": 0, "date": "2024-02-29"})
    data = b"".join(g + sentence for g in garbage)
    stream = FrameStream(codec)
    samples = [s for i in range(0, len(data), cut) for s in stream.feed(data[i : i + cut], 0)]
    assert [s.values for s in samples] == [(3600.0, 0, "2024-02-29")] * len(garbage)


@settings(max_examples=50, deadline=None)
@given(noise=st.binary(max_size=400), cut=st.integers(1, 64))
def test_pure_noise_never_crashes_and_buffers_stay_bounded(noise: bytes, cut: int) -> None:
    """Any bytes, in any chunking, are absorbed; the partial frame never exceeds the bound."""
    for framing in FRAMINGS:
        codec = binary_codec(framing, "crc16_modbus")
        stream = FrameStream(codec)
        for i in range(0, len(noise), cut):
            stream.feed(noise[i : i + cut], 0)
            assert stream.framer.buffered <= 2 * 128 + 2
        counters = stream.counters()
        assert counters["bytes"] == len(noise)


def test_oversized_line_is_dropped_and_counted() -> None:
    """A line longer than max_length is discarded as one framing error; the next line decodes."""
    codec = SerialCodec(
        loads_definitions(
            "format: csv\nframing: {kind: line, max_length: 16}\nframes:\n"
            "  - {name: a, fields: [{name: x, type: int}]}\n"
        )
    )
    stream = FrameStream(codec)
    assert stream.feed(b"9" * 10, 0) == []
    assert stream.feed(b"9" * 30, 0) == []
    assert stream.framer.buffered == 0
    samples = stream.feed(b"999\n42\n", 0)
    assert [s.values for s in samples] == [(42,)]
    assert stream.counters()["framing_errors"] == 1
    assert stream.counters()["dropped_bytes"] == 43


def test_frame_times_come_from_the_first_byte() -> None:
    """A frame split over two reads is dated by the read that brought its first byte; with
    byte_ns, frames inside a chunk are dated back from the read time."""
    codec = SerialCodec(loads_definitions(binary_yaml("cobs", "crc8")))
    wire = codec.encode("small", {"value": 2.0})
    stream = FrameStream(codec)
    assert stream.feed(wire[:5], 1_000) == []
    (sample,) = stream.feed(wire[5:], 9_000)
    assert sample.timestamp_ns == 1_000
    timed = FrameStream(codec, byte_ns=100)
    first, second = timed.feed(wire + wire, 50_000)
    n = len(wire)
    # each frame's first byte follows its leading 0x00 delimiter
    assert first.timestamp_ns == 50_000 - (2 * n - 1 - 1) * 100
    assert second.timestamp_ns == 50_000 - (n - 1 - 1) * 100
    # a chunk holding more bytes than the line carried since the last read: never before it
    (late,) = timed.feed(wire, 50_500)
    assert late.timestamp_ns == 50_000


def test_device_timestamp_field() -> None:
    """A timestamp field with unit and epoch replaces the host time."""
    codec = SerialCodec(
        loads_definitions(
            "format: binary\nframing: {kind: cobs}\n"
            "timestamp: {field: t, unit: ms, epoch: '2020-01-01T00:00:00Z'}\n"
            "frames:\n  - name: a\n    fields: [{name: t, type: uint32}, {name: v, type: int8}]\n"
        )
    )
    (sample,) = FrameStream(codec).feed(codec.encode("a", {"t": 1500, "v": -3}), 7)
    assert sample.timestamp_ns == 1_577_836_800_000_000_000 + 1_500_000_000
    assert sample.values == (1500, -3)


def test_unknown_binary_type_is_counted_per_id() -> None:
    """A frame whose discriminator matches no frame type is counted under its id."""
    codec = SerialCodec(loads_definitions(binary_yaml("cobs", "sum8")))
    payload = bytearray(codec.encode_frame(codec.frame("small"), {"value": 0.0}))
    payload[0] = 0x33
    FrameChecksum(codec.defs.checksum).apply(payload)  # type: ignore[arg-type]
    stream = FrameStream(codec)
    framed = codec.make_framer().encode(bytes(payload))
    assert stream.feed(framed * 3, 0) == []
    assert stream.counters()["unknown_types"] == 3
    assert stream.unknown_ids == {0x33: 3}


def test_channel_types_follow_the_definition() -> None:
    """Channel types: scaled → double, ints → smallest fitting, 1 bit → bool, tables → enum."""
    codec = SerialCodec(loads_definitions(binary_yaml("cobs", "crc32")), device="x")
    flow = codec.flows[0]
    types = {c.name: c.data_type for c in flow.channels}
    assert types["i8"] is ChannelDataType.INT_32
    assert types["u8"] is ChannelDataType.UINT_32
    assert types["i64"] is ChannelDataType.INT_64
    assert types["u64"] is ChannelDataType.UINT_64
    assert types["f32"] is ChannelDataType.FLOAT
    assert types["f64"] is ChannelDataType.DOUBLE
    assert types["scaled"] is ChannelDataType.DOUBLE
    assert types["counts"] is ChannelDataType.UINT_32
    assert types["mode"] is ChannelDataType.ENUM
    assert types["b0"] is ChannelDataType.BOOL
    assert types["nibble"] is ChannelDataType.ENUM
    assert types["label"] is ChannelDataType.STRING
    assert types["blob"] is ChannelDataType.BYTES
    enum = next(c for c in flow.channels if c.name == "signed_enum")
    assert [(e.name, e.key, e.is_signed) for e in enum.enum_types] == [
        ("negative", U32, True),
        ("zero", 0, False),
        ("positive", 1, False),
    ]
    assert "packed" not in types
    assert [f.name for f in codec.flows] == ["x.everything", "x.small"]


@settings(max_examples=40, deadline=None)
@given(
    garbage=st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")), max_size=4),
    cut=st.integers(1, 50),
)
def test_csv_garbage_lines_never_lose_the_next_line(garbage: list[bytes], cut: int) -> None:
    """Garbage lines between CSV lines are counted (decode error or unknown type), never
    decoded as data, and every valid line is recovered."""
    codec = SerialCodec(loads_definitions(TEXT_DEFS["csv"]), device="c")
    good = codec.encode("other", {"x": -42})
    data = b"".join(g + b"\n" + good for g in garbage) + good
    stream = FrameStream(codec)
    samples = [s for i in range(0, len(data), cut) for s in stream.feed(data[i : i + cut], 0)]
    valid = [s for s in samples if s.values == (-42,)]
    assert len(valid) == len(garbage) + 1
    assert all(s.flow in ("c.other", "c.env") for s in samples)


@settings(max_examples=40, deadline=None)
@given(noise=st.binary(min_size=1, max_size=20), value=st.integers(0, 2**32 - 1))
def test_fixed_frames_without_sync_are_found_by_their_checksum(noise: bytes, value: int) -> None:
    """Fixed-length frames without sync bytes resynchronise by sliding until the CRC-32 matches."""
    codec = SerialCodec(
        loads_definitions(
            "format: binary\nframing: {kind: fixed, length: 9}\nchecksum: {kind: crc32}\n"
            "frames:\n  - {name: a, fields: [{name: v, type: uint32}, {name: k, type: uint8}]}\n"
        )
    )
    frames = [codec.encode("a", {"v": (value + i) % 2**32, "k": i}) for i in range(4)]
    stream = FrameStream(codec)
    samples = stream.feed(noise + b"".join(frames), 0)
    assert [s.values for s in samples][-4:] == [((value + i) % 2**32, i) for i in range(4)]
    assert stream.counters()["frames"] == len(samples)


def test_slip_escapes_survive() -> None:
    """SLIP escapes END and ESC bytes inside a frame; a bad escape is a framing error."""
    codec = SerialCodec(
        loads_definitions(
            "format: binary\nframing: {kind: slip}\nchecksum: {kind: xor8}\n"
            "frames:\n  - {name: a, fields: [{name: raw, type: bytes, size: 4}]}\n"
        )
    )
    payload = b"\xc0\xdb\xdc\xdd"
    wire = codec.encode("a", {"raw": payload})
    assert wire.count(b"\xc0") == 2  # only the delimiters
    stream = FrameStream(codec)
    assert [s.values for s in stream.feed(wire + b"\xc0\x01\xdb\x02\xc0" + wire, 0)] == [
        (payload,),
        (payload,),
    ]
    assert stream.counters()["framing_errors"] == 1


def test_key_value_separators() -> None:
    """key=value frames honour custom pair and key separators; a missing key is empty."""
    codec = SerialCodec(
        loads_definitions(
            "format: key_value\npair_separator: ';'\nkv_separator: ':'\n"
            "frames:\n  - name: a\n    fields:\n      - {name: t, type: float}\n"
            "      - {name: n, key: count, type: int}\n      - {name: s, type: string}\n"
        )
    )
    (sample,) = FrameStream(codec).feed(b"t: 1.5; count:7\n", 0)
    assert sample.values == (1.5, 7, None)
    stream = FrameStream(codec)
    assert stream.feed(b"t:abc;count:1\nnot a pair\n", 0) == []
    assert stream.counters()["decode_errors"] == 2


@pytest.mark.parametrize("framing", FRAMINGS)
def test_chunking_never_changes_the_frames(framing: str) -> None:
    """However the port splits the stream into reads, the framer cuts the same frames."""
    codec = binary_codec(framing, "crc16_ccitt_false")

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        pieces = []
        for _ in range(data.draw(st.integers(1, 4))):
            pieces.append(data.draw(st.binary(max_size=20)))
            name = data.draw(st.sampled_from(["everything", "small"]))
            pieces.append(codec.encode(name, data.draw(frame_values(codec.frame(name)))))
        stream = b"".join(pieces)
        whole = [f for f, _ in codec.make_framer().feed(stream, 0)]
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
        framer = codec.make_framer()
        chunked = [
            f
            for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True)
            for f, _ in framer.feed(stream[start:end], 0)
        ]
        assert chunked == whole

    check()
