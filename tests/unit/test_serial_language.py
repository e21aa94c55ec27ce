"""The frame language's newer pieces against known bytes: 24-bit integers, word order (Modbus
word-swapped floats), timestamps from date and time fields and from a wrapping device counter."""

from __future__ import annotations

import datetime as dt
import itertools
import struct

import pytest

from daq_agent.core.errors import ConfigError
from daq_agent.serialdefs import FrameStream, SerialCodec, json_schema, loads_definitions

WORDS = """
format: binary
framing: {kind: fixed, length: 19}
frames:
  - name: meter
    fields:
      - {name: plain, type: float32, byte_order: big}
      - {name: swapped, type: float32, byte_order: big, word_order: little}
      - {name: energy, type: uint64, byte_order: big, word_order: little}
      - {name: t24, type: int24, byte_order: big, scale: 0.1}
"""


def test_word_order_and_int24_match_known_bytes() -> None:
    """230.5 V as a Modbus float in ABCD and in CDAB order, a 64-bit counter low word first,
    and a signed 24-bit value."""
    abcd = struct.pack(">f", 230.5)  # 43 66 80 00
    cdab = abcd[2:] + abcd[:2]  # 80 00 43 66: the word-swapped layout many meters use
    energy = 0x0001_0002_0003_0004
    words = struct.pack(">4H", 0x0004, 0x0003, 0x0002, 0x0001)  # low word first
    t24 = (-1234).to_bytes(3, "big", signed=True)
    frame = abcd + cdab + words + t24
    codec = SerialCodec(loads_definitions(WORDS))
    (sample,) = FrameStream(codec).feed(frame, 1)
    assert sample.values[0] == 230.5
    assert sample.values[1] == 230.5
    assert sample.values[2] == energy
    assert sample.values[3] == pytest.approx(-123.4)
    # and the encoder writes the same bytes
    assert (
        codec.encode("meter", {"plain": 230.5, "swapped": 230.5, "energy": energy, "t24": -123.4})
        == frame
    )


def test_word_order_only_for_wide_types() -> None:
    with pytest.raises(ConfigError, match=r"word_order: only for 32- and 64-bit types"):
        loads_definitions(
            "format: binary\nframing: {kind: cobs}\n"
            "frames: [{name: a, fields: [{name: x, type: int16, word_order: little}]}]\n"
        )


NMEA_TIME = """
format: nmea
timestamp: {date: date, time: utc_time}
frames:
  - name: rmc
    id: RMC
    fields:
      - {name: utc_time, type: time}
      - {name: status, type: string}
      - {name: date, type: date, index: 9}
  - name: gga
    id: GGA
    fields:
      - {name: utc_time, type: time}
"""


def test_rmc_date_and_time_make_the_timestamp() -> None:
    codec = SerialCodec(loads_definitions(NMEA_TIME), device="gps")
    rmc = codec.encode("rmc", {"utc_time": 45296.25, "status": "A", "date": "2026-12-01"})
    gga = codec.encode("gga", {"utc_time": 45296.25})
    first, second = FrameStream(codec).feed(rmc + gga, 7)
    moment = dt.datetime(2026, 12, 1, 12, 34, 56, 250_000, tzinfo=dt.UTC)
    assert first.timestamp_ns == int(moment.timestamp() * 1000) * 1_000_000
    assert second.timestamp_ns == 7  # GGA has no date: host time


COUNTER = """
format: binary
framing: {kind: cobs}
timestamp: {field: t_ms, unit: ms, rollover: 65536, epoch: host}
frames:
  - name: imu
    fields:
      - {name: t_ms, type: uint16}
      - {name: x, type: int8}
"""


def test_device_counter_with_rollover_anchored_to_host_time() -> None:
    """A 16-bit ms counter: samples 5 ms apart by device time keep that spacing across the
    wrap, read in one chunk, anchored at the first frame's host time."""
    codec = SerialCodec(loads_definitions(COUNTER))
    counts = [65_520, 65_525, 65_530, 65_535, 4, 9]  # wraps after 65535
    wire = b"".join(codec.encode("imu", {"t_ms": c, "x": 1}) for c in counts)
    host = 1_700_000_000_000_000_000
    stream = FrameStream(codec)
    stamps = [s.timestamp_ns for s in stream.feed(wire, host)]
    assert stamps[0] == host
    assert [b - a for a, b in itertools.pairwise(stamps)] == [5_000_000] * 5
    # a reopened port starts a new anchor
    stream.reset()
    (again,) = stream.feed(codec.encode("imu", {"t_ms": 100, "x": 1}), host + 10**9)
    assert again.timestamp_ns == host + 10**9


def test_timestamp_parts_need_a_date_and_a_time() -> None:
    with pytest.raises(ConfigError, match="needs a date"):
        loads_definitions(NMEA_TIME.replace("{date: date, time: utc_time}", "{time: utc_time}"))


TABLES = """
format: nmea
frames:
  - name: rmc
    id: RMC
    fields:
      - {name: utc_time, type: time}
      - {name: status, type: string, values: {A: valid, V: void}}
      - name: variation
        type: float
        index: 10
        sign: {field: direction, negative: W, positive: E}
      - {name: direction, type: skip}
      - {name: talker, type: talker}
"""


def test_talker_sign_and_unmatched_enum_text() -> None:
    """The talker is a channel; the variation takes its sign from E/W; a status letter outside
    the value table leaves the channel empty and is counted (the reader's unmatched_values)."""
    codec = SerialCodec(loads_definitions(TABLES), device="gps")
    names = [c.name for c in codec.frame("rmc").channels]
    assert names == ["utc_time", "status", "variation", "talker"]
    west = codec.encode("rmc", {"utc_time": 1.0, "status": 0, "variation": -3.5, "talker": "GN"})
    assert west.startswith(b"$GNRMC,")
    assert b",3.5,W*" in west
    east = b"$GLRMC,000001.000,A,,,,,,,,3.5,E*"
    body = east[1:-1]
    east += f"{_xor(body):02X}\r\n".encode()
    unknown = b"$GPRMC,000001.000,X,,,,,,,,1.0,W*"
    unknown += f"{_xor(unknown[1:-1]):02X}\r\n".encode()
    stream = FrameStream(codec)
    samples = stream.feed(west + east + unknown, 1)
    assert [s.values for s in samples] == [
        (1.0, 0, -3.5, "GN"),
        (1.0, 0, 3.5, "GL"),
        (1.0, None, -1.0, "GP"),
    ]
    assert stream.counters()["unmatched_values"] == 1
    assert codec.unmatched_values == 1


def _xor(data: bytes) -> int:
    out = 0
    for byte in data:
        out ^= byte
    return out


def test_sign_needs_another_one_column_field() -> None:
    with pytest.raises(ConfigError, match=r"sign.field: no other one-column field named 'nope'"):
        loads_definitions(TABLES.replace("field: direction", "field: nope"))


GSV = """
format: nmea
frames:
  - name: gsv
    id: GSV
    fields:
      - {name: messages, type: uint8}
      - {name: message, type: uint8}
      - {name: in_view, type: uint8}
      - name: sat
        type: group
        repeat: 4
        fields:
          - {name: prn, type: uint16}
          - {name: elevation, type: int8, unit: deg}
          - {name: azimuth, type: uint16, unit: deg}
          - {name: snr, type: uint8, unit: dB}
"""


def test_gsv_satellites_as_a_repeated_group() -> None:
    """GSV's up to four satellites per sentence become sat1_prn … sat4_snr, checked against
    pynmea2; a last sentence with fewer satellites leaves the rest empty."""
    pynmea2 = pytest.importorskip("pynmea2")
    codec = SerialCodec(loads_definitions(GSV), device="gps")
    names = [c.name for c in codec.frame("gsv").channels]
    assert names[:5] == ["messages", "message", "in_view", "sat1_prn", "sat1_elevation"]
    assert len(names) == 3 + 4 * 4
    full = pynmea2.GSV(
        "GP",
        "GSV",
        (
            "2",
            "1",
            "07",
            "05",
            "40",
            "083",
            "46",
            "02",
            "17",
            "308",
            "41",
            "12",
            "07",
            "344",
            "39",
            "14",
            "22",
            "228",
            "45",
        ),
    )
    last = pynmea2.GSV(
        "GL",
        "GSV",
        ("2", "2", "07", "65", "60", "301", "", "66", "12", "100", "33", "70", "5", "", ""),
    )
    samples = FrameStream(codec).feed(f"{full}\r\n{last}\r\n".encode(), 1)
    assert len(samples) == 2
    for sample, msg in zip(samples, (full, last), strict=True):
        values = dict(zip(names, sample.values, strict=True))
        for i in range(1, 5):
            want = [
                getattr(msg, f"{k}_{i}", "")
                for k in ("sv_prn_num", "elevation_deg", "azimuth", "snr")
            ]
            got = [values[f"sat{i}_{k}"] for k in ("prn", "elevation", "azimuth", "snr")]
            assert got == [int(w) if w not in ("", None) else None for w in want], (i, msg)
    assert samples[1].values[-4:] == (None, None, None, None)


SAT = """
format: binary
framing:
  kind: sync_length
  sync: "B5 62"
  max_length: 512
  length_field: {at: 4, type: uint16, adjust: 8}
checksum: {kind: fletcher8, span: {start: 2}}
discriminator: {at: 2, type: uint16, byte_order: big}
frames:
  - name: sat
    id: 0x0135
    fields:
      - {name: itow, at: 6, type: uint32}
      - {name: num_svs, at: 11, type: uint8}
      - name: sv
        type: group
        at: 14
        repeat: 3
        count: num_svs
        fields:
          - {name: gnss, type: uint8}
          - {name: id, type: uint8}
          - {name: cno, type: uint8, unit: dBHz}
          - {name: elev, type: int8}
          - {name: azim, type: int16}
          - {name: pr_res, type: int16, scale: 0.1}
          - {name: flags, type: uint32}
"""


def test_binary_group_with_a_count_field_in_variable_length_frames() -> None:
    """UBX NAV-SAT-like: numSvs 12-byte blocks; a frame with 2 leaves the 3rd instance empty,
    and a count lower than the blocks present empties the extra ones too."""
    codec = SerialCodec(loads_definitions(SAT), device="g")
    names = [c.name for c in codec.frame("sat").channels]

    def frame(count: int, blocks: int) -> bytes:
        payload = struct.pack("<IBBH", 1000, 1, count, 0) + b"".join(
            struct.pack("<BBBbhhI", 0, 10 + k, 40 + k, 30, 180, -12, 7) for k in range(blocks)
        )
        body = b"\x01\x35" + struct.pack("<H", len(payload)) + payload
        ck_a = ck_b = 0
        for byte in body:
            ck_a = (ck_a + byte) & 0xFF
            ck_b = (ck_b + ck_a) & 0xFF
        return b"\xb5\x62" + body + bytes([ck_a, ck_b])

    two, counted_one = FrameStream(codec).feed(frame(2, 2) + frame(1, 3), 1)
    got = dict(zip(names, two.values, strict=True))
    assert (got["sv1_id"], got["sv2_id"], got["sv3_id"]) == (10, 11, None)
    assert got["sv2_pr_res"] == pytest.approx(-1.2)
    got = dict(zip(names, counted_one.values, strict=True))
    assert (got["sv1_cno"], got["sv2_cno"], got["sv3_cno"]) == (40, None, None)


@pytest.mark.parametrize("text", [WORDS, NMEA_TIME, COUNTER, TABLES, GSV, SAT])
def test_the_json_schema_accepts_the_new_language(text: str) -> None:
    """Each definition above is valid for the exported JSON Schema too (and a typo is not)."""
    jsonschema = pytest.importorskip("jsonschema")
    yaml = pytest.importorskip("yaml")
    validator = jsonschema.Draft202012Validator(json_schema())
    document = yaml.safe_load(text)
    assert list(validator.iter_errors(document)) == []
    document["frames"][0]["fields"][-1]["sing"] = 1
    assert list(validator.iter_errors(document)) != []
