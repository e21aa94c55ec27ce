"""The serial simulator: values inside the declared ranges, corruption that the decoder catches,
and ``daq-agent simulate serial`` on a pty read by a SerialReader."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from daq_agent.core.model import ChannelDataType
from daq_agent.core.sample import Value
from daq_agent.readers.base import ReaderState
from daq_agent.readers.serial import SerialReader
from daq_agent.serialdefs import FrameStream, SerialCodec, load_definitions
from daq_agent.sim.serial import SerialSimulator

pytestmark = pytest.mark.integration

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "serial"
IMU = CONFIGS / "imu_cobs.yaml"
GPS = CONFIGS / "gps_nmea.yaml"
UBX = CONFIGS / "ublox_nav_pvt.yaml"


@pytest.mark.parametrize("path", [IMU, GPS, UBX], ids=["imu", "gps", "ubx"])
def test_simulated_values_stay_in_declared_ranges(path: Path) -> None:
    """Every simulated frame decodes, and each declared channel stays within [min, max]."""
    defs = load_definitions(path)
    simulator = SerialSimulator(defs, rate=100, seed=3)
    stream = FrameStream(SerialCodec(defs, device=defs.name))
    frames = list(simulator.generate(600))
    samples = stream.feed(b"".join(f.data for f in frames), 0)
    assert len(samples) == 600, stream.counters()
    codec = stream.codec
    for sample in samples:
        compiled = next(c for c in codec.frames if c.flow == sample.flow)
        for channel, value in zip(compiled.channels, sample.values, strict=True):
            source = channel.bit or channel.field
            if value is None or channel.config.data_type is ChannelDataType.STRING:
                continue
            if source.minimum is not None:
                assert value >= source.minimum - 1e-6, (channel.name, value)  # type: ignore[operator]
            if source.maximum is not None:
                assert value <= source.maximum + 1e-6, (channel.name, value)  # type: ignore[operator]
    seqs = [s.values[0] for s in samples if s.flow == "imu.imu"]
    assert seqs == list(range(len(seqs)))  # the counter counts


def test_corruption_is_caught_by_the_decoder() -> None:
    """Bit flips and truncations never produce a sample; frames after garbage bursts still decode
    with exactly the values the simulator encoded."""
    defs = load_definitions(IMU)
    simulator = SerialSimulator(defs, rate=100, corrupt=0.3, seed=11, frames=["imu"])
    frames = list(simulator.generate(1000))
    kinds = {f.corruption for f in frames}
    assert kinds == {None, "bit_flip", "truncation", "garbage"}
    codec = SerialCodec(defs, device="imu")
    stream = FrameStream(codec)
    samples = stream.feed(b"".join(f.data for f in frames), 0)
    compiled = codec.frame("imu")

    def decoded(values: dict[str, Value]) -> tuple[Value, ...]:
        return FrameStream(codec).feed(codec.encode("imu", values), 0)[0].values

    expected = [(f.corruption, decoded(f.values)) for f in frames]
    got = [s.values for s in samples]
    # every sample is one of the frames sent, in order, never a damaged variant
    remaining = iter(expected)
    matched: list[str | None] = []
    for have in got:
        kind = next((k for k, want in remaining if want == have), "missing")
        assert kind != "missing", have
        matched.append(kind)
    # intact frames (and those after a garbage burst) all arrive but for the one frame a
    # truncation may merge with; a bit flip only survives when it hit a delimiter, not data
    intact = sum(f.corruption in (None, "garbage") for f in frames)
    truncations = sum(f.corruption == "truncation" for f in frames)
    assert sum(k in (None, "garbage") for k in matched) >= intact - truncations
    assert len(matched) <= len(frames)
    assert len(compiled.channels) == 15
    counters = stream.counters()
    assert counters["checksum_errors"] + counters["framing_errors"] >= sum(
        f.corruption in ("bit_flip", "truncation") for f in frames
    )


def test_simulate_serial_command_on_a_pty(tmp_path: Path) -> None:
    """`daq-agent simulate serial` prints a pty path; a SerialReader on it decodes the frames;
    SIGTERM ends the simulator with a summary."""
    link = tmp_path / "ttyGPS"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daq_agent.cli",
            "simulate",
            "serial",
            "--defs",
            str(GPS),
            "--rate",
            "200",
            "--duration",
            "60",
            "--link",
            str(link),
            "--seed",
            "5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        path = process.stdout.readline().strip()
        assert path.startswith("/dev/pts/"), path
        assert os.readlink(link) == path
        got = threading.Semaphore(0)
        reader = SerialReader("gps", str(link), {"baudrate": 9600}, GPS, lambda _s: got.release())
        with reader:
            assert reader.wait_state(ReaderState.RUNNING, timeout=10)
            for _ in range(30):
                assert got.acquire(timeout=10), reader.counters.snapshot()
        assert reader.counters.get("decoded") >= 30
        assert reader.counters.get("checksum_errors") == 0
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)
    assert process.returncode == 0, err
    assert "sent " in err
    assert not link.exists()


def test_frame_rates_shape_the_schedule() -> None:
    """Each frame type is sent at its declared rate; --rate scales the whole schedule."""
    defs = load_definitions(IMU)
    declared = SerialSimulator(defs, seed=1)
    assert declared.rate == pytest.approx(201.0)
    first_two_seconds = [f for f in declared.generate(600) if f.t < 2.0]
    counts = {name: sum(f.frame == name for f in first_two_seconds) for name in ("imu", "status")}
    assert counts == {"imu": 400, "status": 2}
    times = [f.t for f in first_two_seconds]
    assert times == sorted(times)
    scaled = SerialSimulator(defs, rate=20.1, seed=1)
    assert scaled.rates == pytest.approx((20.0, 0.1))
