"""NMEA framing under faults, with pynmea2 as an independent oracle.

A stream of valid sentences (built and checksummed by pynmea2, talkers GP/GN/GL) is interleaved
with every kind of fault a real line shows: LF-only and CR-only endings, sentences with no line
end, bursts of garbage, truncated sentences, wrong checksums, sentences without a checksum, a
corrupted character, and runs far past ``max_length``. Decoded with the shipped
``configs/serial/gps_nmea.yaml`` (through the API in random chunkings, and through
``daq-agent decode --json``), every intact sentence must come out, in order, with the values
pynmea2 parses from it, and nothing damaged may be accepted.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pynmea2
import pytest

from daq_agent.core.model import ChannelDataType
from daq_agent.core.sample import Value
from daq_agent.serialdefs import FrameStream, SerialCodec, load_definitions

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
GPS = ROOT / "configs" / "serial" / "gps_nmea.yaml"
DAQ_AGENT = Path(sys.executable).with_name("daq-agent")
TALKERS = ("GP", "GN", "GL")
FAULTS = (
    "lf",
    "cr",
    "no_line_end",
    "garbage",
    "truncated",
    "bad_checksum",
    "no_checksum",
    "corrupt_char",
    "overlong",
    "unknown",
)


@dataclass
class Capture:
    data: bytes
    intact: list[str]
    """The intact sentences of known types, in stream order."""
    faults: Counter[str]


def _coord(rng: random.Random, degrees_width: int, limit: int) -> str:
    return f"{rng.randrange(limit):0{degrees_width}d}{rng.uniform(0, 59.9999):07.4f}"


def _time(rng: random.Random) -> str:
    hours, minutes, seconds = rng.randrange(24), rng.randrange(60), rng.randrange(60)
    return f"{hours:02d}{minutes:02d}{seconds:02d}.{rng.randrange(100):02d}"


def _date(rng: random.Random) -> str:
    year = rng.choice([*range(69), *range(80, 100)])
    return f"{rng.randint(1, 28):02d}{rng.randint(1, 12):02d}{year:02d}"


def _maybe(rng: random.Random, text: str) -> str:
    return text if rng.random() > 0.1 else ""


def _sentence(rng: random.Random, kind: str) -> str:
    talker = rng.choice(TALKERS)
    if kind == "GGA":
        fields = (
            _time(rng),
            _coord(rng, 2, 90),
            rng.choice("NS"),
            _coord(rng, 3, 180),
            rng.choice("EW"),
            str(rng.choice([0, 1, 2, 4, 5, 6])),
            f"{rng.randrange(4, 15):02d}",
            f"{rng.uniform(0.5, 3):.1f}",
            f"{rng.uniform(-50, 3000):.1f}",
            "M",
            f"{rng.uniform(-40, 60):.1f}",
            "M",
            _maybe(rng, f"{rng.uniform(0, 9):.1f}") if rng.random() < 0.3 else "",
            _maybe(rng, f"{rng.randrange(1024):04d}") if rng.random() < 0.3 else "",
        )
        return str(pynmea2.GGA(talker, "GGA", fields))
    if kind == "RMC":
        fields = (
            _time(rng),
            rng.choice("AV"),
            _coord(rng, 2, 90),
            rng.choice("NS"),
            _coord(rng, 3, 180),
            rng.choice("EW"),
            f"{rng.uniform(0, 60):.2f}",
            _maybe(rng, f"{rng.uniform(0, 359.9):.1f}"),
            # years 69-79: pynmea2 (strptime) reads 19xx, we read 20xx (no GPS before 1980)
            _date(rng),
            _maybe(rng, f"{rng.uniform(0, 5):.1f}"),
            rng.choice("EW"),
            rng.choice("ADEN"),
        )
        return str(pynmea2.RMC(talker, "RMC", fields))
    if kind == "VTG":
        fields = (
            f"{rng.uniform(0, 359.9):.1f}",
            "T",
            _maybe(rng, f"{rng.uniform(0, 359.9):.1f}"),
            "M",
            f"{rng.uniform(0, 60):.2f}",
            "N",
            f"{rng.uniform(0, 111):.2f}",
            "K",
            rng.choice("ADEN"),
        )
        return str(pynmea2.VTG(talker, "VTG", fields))
    fields = (
        "A",
        "3",
        "04",
        "05",
        "",
        "09",
        "12",
        "",
        "",
        "24",
        "",
        "",
        "",
        "",
        "2.5",
        "1.3",
        "2.1",
    )
    return str(pynmea2.GSA(talker, "GSA", fields))


def _garbage(rng: random.Random, size: int) -> bytes:
    return bytes(rng.randrange(256) for _ in range(size))


def make_capture(seed: int, count: int) -> Capture:
    """``count`` slots, each a good sentence, most with a fault before or around it."""
    rng = random.Random(seed)
    out = bytearray()
    intact: list[str] = []
    faults: Counter[str] = Counter()
    for _ in range(count):
        good = _sentence(rng, rng.choice(["GGA", "RMC", "VTG"]))
        other = _sentence(rng, rng.choice(["GGA", "RMC", "VTG"]))
        fault = rng.choice(FAULTS) if rng.random() < 0.6 else None
        ending = "\r\n"
        if fault is not None:
            faults[fault] += 1
        if fault == "lf":
            ending = "\n"
        elif fault == "cr":
            ending = "\r"
        elif fault == "no_line_end":
            ending = ""
        elif fault == "garbage":
            out += _garbage(rng, rng.randint(1, 40))
        elif fault == "truncated":
            out += other[: rng.randrange(1, len(other) - 3)].encode()  # cut before its checksum
        elif fault == "bad_checksum":
            body, _, given = other.partition("*")
            wrong = (int(given, 16) + rng.randrange(1, 256)) % 256
            out += f"{body}*{wrong:02X}\r\n".encode()
        elif fault == "no_checksum":
            out += other.partition("*")[0].encode() + b"\r\n"
        elif fault == "corrupt_char":
            body, _, given = other.partition("*")
            i = rng.randrange(7, len(body))
            replacement = rng.choice([c for c in "0123456789ABC" if c != body[i]])
            out += f"{body[:i]}{replacement}{body[i + 1 :]}*{given}\r\n".encode()
        elif fault == "overlong":
            if rng.random() < 0.5:  # a sentence that never ends
                out += f"$GPGGA,{'1' * rng.randint(150, 400)}".encode()
            else:  # a line of printable noise far past max_length
                out += bytes(
                    rng.choice(b"abcdef0123456789,.") for _ in range(rng.randint(150, 400))
                )
        elif fault == "unknown":
            out += _sentence(rng, "GSA").encode() + b"\r\n"
        out += (good + ending).encode()
        intact.append(good)
    out += b"\r\n"
    return Capture(bytes(out), intact, faults)


def _seconds(value: object) -> float:
    assert value is not None
    return value.hour * 3600 + value.minute * 60 + value.second + value.microsecond / 1e6  # type: ignore[attr-defined]


def _number(text: object) -> float | None:
    return None if text in ("", None) else float(text)  # type: ignore[arg-type]


def _signed(text: object, direction: str) -> float | None:
    number = _number(text)
    return -number if number is not None and direction == "W" else number


def oracle(sentence: str) -> tuple[str, dict[str, object]]:
    """The frame type and field values pynmea2 reads from a sentence."""
    msg = pynmea2.parse(sentence, check=True)
    kind = msg.sentence_type
    if kind == "GGA":
        return "gga", {
            "utc_time": _seconds(msg.timestamp),
            "latitude": msg.latitude,
            "longitude": msg.longitude,
            "fix_quality": int(msg.gps_qual),
            "satellites": int(msg.num_sats),
            "hdop": float(msg.horizontal_dil),
            "altitude": float(msg.altitude),
            "geoid_separation": float(msg.geo_sep),
            "dgps_age": _number(msg.age_gps_data),
            "dgps_station": int(msg.ref_station_id) if msg.ref_station_id else None,
            "talker": msg.talker,
        }
    if kind == "RMC":
        return "rmc", {
            "utc_time": _seconds(msg.timestamp),
            "status": msg.status,
            "latitude": msg.latitude,
            "longitude": msg.longitude,
            "speed": _number(msg.spd_over_grnd),
            "course": _number(msg.true_course),
            "date": msg.datestamp.isoformat(),
            "magnetic_variation": _signed(msg.mag_variation, msg.mag_var_dir),
            "mode": msg.mode_indicator,
            "talker": msg.talker,
        }
    assert kind == "VTG", sentence
    return "vtg", {
        "course_true": _number(msg.true_track),
        "course_magnetic": _number(msg.mag_track),
        "speed_knots": _number(msg.spd_over_grnd_kts),
        "speed_kmh": _number(msg.spd_over_grnd_kmph),
        "mode": msg.faa_mode,
        "talker": msg.talker,
    }


def assert_matches(codec: SerialCodec, frame: str, values: dict[str, Value], sentence: str) -> None:
    """Our decoded values equal pynmea2's (letters of enum fields through the value table)."""
    kind, expected = oracle(sentence)
    assert frame == kind, sentence
    channels = {c.name: c for c in codec.frame(kind).channels}
    for name, want in expected.items():
        got = values[name]
        channel = channels[name]
        if channel.config.data_type is ChannelDataType.ENUM and isinstance(want, str):
            table = [str(raw) for raw, _ in channel.field.values]
            want = table.index(want)
        if isinstance(want, float):
            assert got == pytest.approx(want, abs=1e-9), (name, sentence)
        else:
            assert got == want, (name, got, want, sentence)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_intact_sentence_decodes_and_nothing_damaged_is_accepted(seed: int) -> None:
    """Through the decoder API, in random chunkings: all intact sentences, oracle values, exact
    fault counts for the faults that have their own counter."""
    capture = make_capture(seed, 400)
    assert all(capture.faults[f] > 0 for f in FAULTS), capture.faults
    codec = SerialCodec(load_definitions(GPS), device="gps")
    rng = random.Random(seed)
    stream = FrameStream(codec)
    samples = []
    pos = 0
    while pos < len(capture.data):
        step = rng.choice([1, 7, 64, 300, 4096])
        samples.extend(stream.feed(capture.data[pos : pos + step], 0))
        pos += step
    names = {c.flow: c for c in codec.frames}
    assert len(samples) == len(capture.intact), stream.counters()
    for sample, sentence in zip(samples, capture.intact, strict=True):
        compiled = names[sample.flow]
        values = dict(zip([c.name for c in compiled.channels], sample.values, strict=True))
        assert_matches(codec, compiled.name, values, sentence)
    counters = stream.counters()
    assert counters["unknown_types"] == capture.faults["unknown"]
    assert counters["missing_checksums"] == capture.faults["no_checksum"]
    assert (
        counters["checksum_errors"]
        == capture.faults["bad_checksum"] + capture.faults["corrupt_char"]
    )
    # truncated sentences and overlong runs are framing faults; garbage may or may not be
    # (a burst of blanks and line ends is not)
    assert counters["framing_errors"] >= capture.faults["truncated"] + capture.faults["overlong"]
    assert stream.framer.buffered <= codec.defs.framing.max_length


def test_decode_command_on_a_faulty_capture(tmp_path: Path) -> None:
    """``daq-agent decode --defs gps_nmea.yaml --json``: the same verdict from the command, and
    its faults are shown as text."""
    capture = make_capture(11, 300)
    path = tmp_path / "gps.nmea"
    path.write_bytes(capture.data)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [str(DAQ_AGENT), "decode", "--defs", str(GPS), "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    decoded = [r for r in records if "error" not in r]
    errors = Counter(r["error"] for r in records if "error" in r)
    codec = SerialCodec(load_definitions(GPS), device="gps")
    assert len(decoded) == len(capture.intact)
    for record, sentence in zip(decoded, capture.intact, strict=True):
        assert_matches(codec, record["frame"], record["fields"], sentence)
    assert errors["no_checksum"] == capture.faults["no_checksum"]
    assert errors["unknown_type"] == capture.faults["unknown"]
    assert errors["checksum"] == capture.faults["bad_checksum"] + capture.faults["corrupt_char"]
    texts = [r.get("text", "") for r in records if r.get("error") == "checksum"]
    assert all(t.startswith("$") and "*" in t for t in texts), texts
    reasons = Counter(r["reason"] for r in records if r.get("error") == "framing")
    assert reasons["truncated"] >= capture.faults["truncated"]
    # the text output shows sentences as text
    text = subprocess.run(
        [str(DAQ_AGENT), "decode", "--defs", str(GPS), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    ).stdout
    assert "! no checksum: $" in text
    assert "! checksum (*" in text
    assert "! framing (truncated): $" in text
