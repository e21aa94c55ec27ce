"""Host and device timestamps of serial frames read in one chunk, on a real pty through the
SerialReader: exactly what docs/serial-frames.md says the agent does."""

from __future__ import annotations

import itertools
import os
import threading
import time
import tty
from collections.abc import Iterator

import pytest

from daq_agent.core.sample import Sample
from daq_agent.readers.base import ReaderState
from daq_agent.readers.serial import SerialReader, _char_time_ns
from daq_agent.serialdefs import SerialCodec, loads_definitions

pytestmark = pytest.mark.integration

IMU = """
format: binary
framing: {kind: cobs, max_length: 32}
checksum: {kind: crc16_ccitt_false}
frames:
  - name: imu
    fields:
      - {name: t_ms, type: uint16, unit: ms}
      - {name: accel_x, type: int16, scale: 0.001}
"""
COUNTED = IMU + "timestamp: {field: t_ms, unit: ms, rollover: 65536, epoch: host}\n"
FRAMES = 12


class Sink:
    def __init__(self) -> None:
        self.samples: list[Sample] = []
        self._cond = threading.Condition()

    def __call__(self, sample: Sample) -> None:
        with self._cond:
            self.samples.append(sample)
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.samples) >= count, timeout)


@pytest.fixture
def pty() -> Iterator[tuple[int, str]]:
    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        yield master, os.ttyname(slave)
    finally:
        os.close(master)
        os.close(slave)


def _burst(codec: SerialCodec) -> bytes:
    """Frames 5 ms apart by the device's counter (wrapping at 65536), written at once."""
    return b"".join(
        codec.encode("imu", {"t_ms": (65_500 + 5 * i) % 65_536, "accel_x": 0.001 * i})
        for i in range(FRAMES)
    )


def _read(
    path: str, defs_text: str, wire: bytes, master: int, **kwargs: object
) -> tuple[list[int], int, int, int]:
    """The timestamps of ``wire`` written at once to the pty, the time the reader was running,
    and the write's time window."""
    sink = Sink()
    reader = SerialReader(
        "imu", path, {"baudrate": 115200}, loads_definitions(defs_text), sink, **kwargs
    )  # type: ignore[arg-type]
    with reader:
        assert reader.wait_state(ReaderState.RUNNING, timeout=5)
        opened = time.time_ns()
        time.sleep(0.05)  # the reader waits in select()
        before = time.time_ns()
        os.write(master, wire)
        assert sink.wait_for(FRAMES)
        after = time.time_ns()
    return [s.timestamp_ns for s in sink.samples], opened, before, after


def test_a_pty_has_no_line_rate_frames_of_one_read_are_1ns_apart(pty: tuple[int, str]) -> None:
    """A pty delivers a burst at once: frames get the read time (1 ns apart within a read),
    never before the write."""
    master, path = pty
    codec = SerialCodec(loads_definitions(IMU))
    stamps, _, before, after = _read(path, IMU, _burst(codec), master)
    assert all(before - 5_000_000 <= t <= after for t in stamps), (before, stamps, after)
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert all(g >= 1 for g in gaps)
    assert gaps.count(1) >= FRAMES - 4  # one read, or a few: the rest share their read's time


def test_a_line_rate_spreads_the_frames_of_a_read_by_their_length(pty: tuple[int, str]) -> None:
    """With the line's character time (a local serial device; given here for the pty), each
    frame is dated by its first byte: its length x the character time before the next one,
    never before the port opened."""
    master, path = pty
    codec = SerialCodec(loads_definitions(IMU))
    wire = _burst(codec)
    char_ns = _char_time_ns({"baudrate": 115200})
    assert char_ns == 86_806  # 10 bits at 115200 baud
    stamps, opened, _, after = _read(path, IMU, wire, master, byte_time_ns=char_ns)
    frame_len = len(wire) // FRAMES
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert all(g >= 1 for g in gaps)
    assert gaps.count(frame_len * char_ns) >= FRAMES - 4, gaps
    assert all(opened - 5_000_000 <= t <= after for t in stamps)


def test_a_device_counter_gives_the_device_spacing(pty: tuple[int, str]) -> None:
    """With a wrapping device counter anchored at host time, samples written at once keep
    their 5 ms device spacing across the counter's wrap."""
    master, path = pty
    codec = SerialCodec(loads_definitions(COUNTED))
    stamps, _, before, after = _read(path, COUNTED, _burst(codec), master)
    assert [b - a for a, b in itertools.pairwise(stamps)] == [5_000_000] * (FRAMES - 1)
    assert before - 5_000_000 <= stamps[0] <= after


def test_no_frame_is_dated_before_the_port_opened(pty: tuple[int, str]) -> None:
    """A slow line rate (300 baud: the burst would have taken seconds) dates the frames back
    only to the open (the floor of the first read), never before it."""
    master, path = pty
    codec = SerialCodec(loads_definitions(IMU))
    slow = _char_time_ns({"baudrate": 300})
    stamps, opened, _, after = _read(path, IMU, _burst(codec), master, byte_time_ns=slow)
    assert all(opened - 5_000_000 <= t <= after for t in stamps), (opened, stamps)
    assert all(b > a for a, b in itertools.pairwise(stamps))
