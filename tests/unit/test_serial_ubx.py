"""u-blox UBX NAV-PVT with the shipped ``configs/serial/ublox_nav_pvt.yaml``: frames built here
from the interface description (struct layout and Fletcher-8 written independently of the codec)
decode to the values put in, with the receiver's UTC time as the timestamp; damaged frames and
other UBX messages are counted, never decoded."""

from __future__ import annotations

import datetime as dt
import random
import struct
from pathlib import Path

import pytest

from daq_agent.serialdefs import FrameStream, SerialCodec, load_definitions
from daq_agent.sim.serial import SerialSimulator

DEFS = Path(__file__).resolve().parents[2] / "configs" / "serial" / "ublox_nav_pvt.yaml"
PAYLOAD = struct.Struct("<IHBBBBBBIiBBBBiiiiIIiiiiiIIHH4sihH")
"""NAV-PVT's 92-byte payload, field by field as the u-blox interface description lists it."""


def fletcher8(data: bytes) -> bytes:
    """CK_A, CK_B over ``data`` (the UBX checksum: class, id, length and payload)."""
    ck_a = ck_b = 0
    for byte in data:
        ck_a = (ck_a + byte) % 256
        ck_b = (ck_b + ck_a) % 256
    return bytes([ck_a, ck_b])


def ubx(msg_class: int, msg_id: int, payload: bytes) -> bytes:
    body = bytes([msg_class, msg_id]) + struct.pack("<H", len(payload)) + payload
    return b"\xb5\x62" + body + fletcher8(body)


def random_pvt(rng: random.Random) -> dict[str, int | bytes]:
    """Raw NAV-PVT field values (the interface description's names)."""
    return {
        "iTOW": rng.randrange(604_800_000),
        "year": rng.randint(2020, 2035),
        "month": rng.randint(1, 12),
        "day": rng.randint(1, 28),
        "hour": rng.randrange(24),
        "min": rng.randrange(60),
        "sec": rng.randrange(60),
        "valid": rng.randrange(16),
        "tAcc": rng.randrange(1 << 32),
        "nano": rng.randint(-1_000_000, 1_000_000),
        "fixType": rng.randrange(6),
        "flags": rng.randrange(256),
        "flags2": rng.randrange(256),
        "numSV": rng.randrange(40),
        "lon": rng.randint(-1_800_000_000, 1_800_000_000),
        "lat": rng.randint(-900_000_000, 900_000_000),
        "height": rng.randint(-(1 << 31), (1 << 31) - 1),
        "hMSL": rng.randint(-(1 << 31), (1 << 31) - 1),
        "hAcc": rng.randrange(1 << 32),
        "vAcc": rng.randrange(1 << 32),
        "velN": rng.randint(-(1 << 31), (1 << 31) - 1),
        "velE": rng.randint(-(1 << 31), (1 << 31) - 1),
        "velD": rng.randint(-(1 << 31), (1 << 31) - 1),
        "gSpeed": rng.randint(-(1 << 31), (1 << 31) - 1),
        "headMot": rng.randint(0, 36_000_000),
        "sAcc": rng.randrange(1 << 32),
        "headAcc": rng.randrange(1 << 32),
        "pDOP": rng.randrange(1 << 16),
        "flags3": rng.randrange(1 << 16),
        "reserved0": bytes(rng.randrange(256) for _ in range(4)),
        "headVeh": rng.randint(0, 36_000_000),
        "magDec": rng.randint(-(1 << 15), (1 << 15) - 1),
        "magAcc": rng.randrange(1 << 16),
    }


def nav_pvt(raw: dict[str, int | bytes]) -> bytes:
    return ubx(0x01, 0x07, PAYLOAD.pack(*raw.values()))


def expected(raw: dict[str, int | bytes]) -> dict[str, object]:
    """What the channels must hold, from the interface description's units."""
    r: dict[str, int] = {k: v for k, v in raw.items() if isinstance(v, int)}
    return {
        "itow": r["iTOW"],
        "year": r["year"],
        "second": r["sec"],
        "valid_date": bool(r["valid"] & 1),
        "valid_time": bool(r["valid"] & 2),
        "fully_resolved": bool(r["valid"] & 4),
        "t_acc": r["tAcc"],
        "nano": r["nano"],
        "fix_type": r["fixType"],
        "gnss_fix_ok": bool(r["flags"] & 1),
        "psm_state": (r["flags"] >> 2) & 7,
        "carr_soln": r["flags"] >> 6,
        "confirmed_time": bool(r["flags2"] & 0x80),
        "num_sv": r["numSV"],
        "longitude": r["lon"] * 1e-7,
        "latitude": r["lat"] * 1e-7,
        "height": r["height"] * 1e-3,
        "height_msl": r["hMSL"] * 1e-3,
        "h_acc": r["hAcc"] * 1e-3,
        "vel_d": r["velD"] * 1e-3,
        "ground_speed": r["gSpeed"] * 1e-3,
        "heading_motion": r["headMot"] * 1e-5,
        "heading_acc": r["headAcc"] * 1e-5,
        "p_dop": r["pDOP"] * 0.01,
        "invalid_llh": bool(r["flags3"] & 1),
        "last_correction_age": (r["flags3"] >> 1) & 15,
        "reserved0": raw["reserved0"],
        "heading_vehicle": r["headVeh"] * 1e-5,
        "mag_dec": r["magDec"] * 0.01,
        "mag_acc": r["magAcc"] * 0.01,
    }


def test_nav_pvt_frames_decode_with_their_utc_time() -> None:
    assert PAYLOAD.size == 92
    codec = SerialCodec(load_definitions(DEFS), device="gnss")
    (compiled,) = codec.frames
    names = [c.name for c in compiled.channels]
    rng = random.Random(5)
    raws = [random_pvt(rng) for _ in range(40)]
    wire = bytearray()
    bad = 0
    for raw in raws:
        frame = nav_pvt(raw)
        kind = rng.randrange(5)
        if kind == 0:  # garbage, possibly with a stray sync byte
            wire += bytes(rng.randrange(256) for _ in range(rng.randint(1, 30)))
        elif kind == 1:  # a truncated frame
            wire += frame[: rng.randrange(6, len(frame) - 1)]
        elif kind == 2:  # a corrupted copy: the checksum fails
            damaged = bytearray(frame)
            damaged[rng.randrange(6, 98)] ^= 1 << rng.randrange(8)
            wire += damaged
            bad += 1
        elif kind == 3:  # another UBX message (NAV-STATUS, 16-byte payload)
            wire += ubx(0x01, 0x03, bytes(16))
        wire += frame
    stream = FrameStream(codec)
    samples = [s for i in range(0, len(wire), 37) for s in stream.feed(bytes(wire[i : i + 37]), 0)]
    assert len(samples) == len(raws), stream.counters()
    for sample, raw in zip(samples, raws, strict=True):
        assert sample.flow == "gnss.nav_pvt"
        values = dict(zip(names, sample.values, strict=True))
        for name, want in expected(raw).items():
            if isinstance(want, float):
                assert values[name] == pytest.approx(want, rel=1e-12, abs=1e-12), name
            else:
                assert values[name] == want, name
        moment = dt.datetime(
            int(raw["year"]),  # type: ignore[arg-type]
            int(raw["month"]),  # type: ignore[arg-type]
            int(raw["day"]),  # type: ignore[arg-type]
            int(raw["hour"]),  # type: ignore[arg-type]
            int(raw["min"]),  # type: ignore[arg-type]
            int(raw["sec"]),  # type: ignore[arg-type]
            tzinfo=dt.UTC,
        )
        assert sample.timestamp_ns == int(moment.timestamp()) * 1_000_000_000 + int(raw["nano"])  # type: ignore[arg-type]
    counters = stream.counters()
    assert counters["checksum_errors"] >= bad
    assert counters["unknown_types"] >= 1
    assert stream.unknown_ids.get(0x0103, 0) >= 1


def test_simulated_nav_pvt_frames_carry_a_valid_fletcher_checksum() -> None:
    """The simulator writes NAV-PVT frames that the independent checksum and layout accept."""
    simulator = SerialSimulator(load_definitions(DEFS), seed=3)
    frames = [f.data for f in simulator.generate(20)]
    for data in frames:
        assert data[:6] == b"\xb5\x62\x01\x07\x5c\x00"
        assert len(data) == 100
        assert fletcher8(data[2:98]) == data[98:]
        fields = PAYLOAD.unpack(data[6:98])
        assert 4 <= fields[13] <= 30  # numSV inside the declared range
    samples = FrameStream(SerialCodec(simulator.defs)).feed(b"".join(frames), 1)
    assert len(samples) == len(frames)
