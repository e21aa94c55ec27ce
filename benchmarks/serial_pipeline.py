"""Benchmark: decoded serial frames/s, binary (COBS + CRC-16, 12 fields) and NMEA, from memory and
from a pty.

The frames are generated once by the serial simulator from the shipped definitions
(``configs/serial/imu_cobs.yaml``: the ``imu`` frame, a type byte + 11 fields → 15 channels, 28
bytes on the wire; ``configs/serial/gps_nmea.yaml``: GGA/RMC/VTG sentences). Four paths, measured
in interleaved rounds because this machine's speed drifts, each reported as the median:

- ``memory``: the byte stream fed to a :class:`~daq_agent.serialdefs.FrameStream` in 4 KiB chunks
  (framing, checksum, discriminator, decode, :class:`Sample` per frame), on one core;
- ``pty``: the stream written to a pty master by a writer thread while a
  :class:`~daq_agent.readers.serial.SerialReader` reads the slave through pyserial (its own
  thread, the real read loop, a counting sink), timed from the first write to the last sample.

Target (issue 4): at least 20 x 2.9k = 58k frames/s on one core for the binary path (921600 baud
carries at most ~2.9k 32-byte frames/s).

Usage::

    .venv/bin/python benchmarks/serial_pipeline.py [--frames 50000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import tty
from collections.abc import Callable
from pathlib import Path

from daq_agent.readers.base import ReaderState
from daq_agent.readers.serial import SerialReader
from daq_agent.serialdefs import FrameStream, SerialCodec, SerialDefinitions, load_definitions
from daq_agent.sim.serial import SerialSimulator

ROOT = Path(__file__).resolve().parents[1]
TARGET = 58_000
CHUNK = 4096


def capture(defs: SerialDefinitions, frames: int, only: list[str] | None) -> bytes:
    """The wire bytes of ``frames`` simulated frames."""
    simulator = SerialSimulator(defs, rate=1000.0, seed=42, frames=only)
    return b"".join(f.data for f in simulator.generate(frames))


def from_memory(defs: SerialDefinitions, data: bytes, expected: int) -> float:
    """Frames/s through FrameStream fed from memory."""
    stream = FrameStream(SerialCodec(defs, device="bench"))
    feed = stream.feed
    decoded = 0
    start = time.perf_counter()
    for i in range(0, len(data), CHUNK):
        decoded += len(feed(data[i : i + CHUNK], 0))
    elapsed = time.perf_counter() - start
    if decoded != expected:
        raise SystemExit(f"memory: decoded {decoded} of {expected} frames: {stream.counters()}")
    return decoded / elapsed


def from_pty(defs: SerialDefinitions, data: bytes, expected: int) -> float:
    """Frames/s through a SerialReader reading a pty fed by a writer thread."""
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    done = threading.Event()
    count = 0

    def sink(_sample: object) -> None:
        nonlocal count
        count += 1
        if count == expected:
            done.set()

    def write() -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(master, view[:65536]) :]

    reader = SerialReader("bench", path, {"baudrate": 921600}, defs, sink, poll_interval=0.05)
    writer = threading.Thread(target=write, name="bench-pty-writer")
    try:
        with reader:
            if not reader.wait_state(ReaderState.RUNNING, timeout=10):
                raise SystemExit("pty: the reader did not start")
            start = time.perf_counter()
            writer.start()
            finished = done.wait(timeout=120)
            elapsed = time.perf_counter() - start
            writer.join(timeout=10)
        if not finished:
            snapshot = reader.counters.snapshot()
            raise SystemExit(f"pty: {count} of {expected} frames arrived: {snapshot}")
    finally:
        os.close(master)
        os.close(slave)
    return expected / elapsed


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=50_000, help="frames per path and round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    args = parser.parse_args(argv)
    imu = load_definitions(ROOT / "configs" / "serial" / "imu_cobs.yaml")
    gps = load_definitions(ROOT / "configs" / "serial" / "gps_nmea.yaml")
    streams = {
        "binary": (imu, capture(imu, args.frames, ["imu"])),
        "nmea": (gps, capture(gps, args.frames, None)),
    }
    runs: dict[str, Callable[[SerialDefinitions, bytes, int], float]] = {
        "memory": from_memory,
        "pty": from_pty,
    }
    results: dict[tuple[str, str], list[float]] = {}
    for round_no in range(1, args.rounds + 1):
        for path_name, run in runs.items():
            for kind, (defs, data) in streams.items():
                rate = run(defs, data, args.frames)
                results.setdefault((kind, path_name), []).append(rate)
                print(
                    f"round {round_no}: {kind:6} {path_name:6} {rate:>10,.0f} frames/s",
                    file=sys.stderr,
                )
    binary_bytes = len(streams["binary"][1]) / args.frames
    nmea_bytes = len(streams["nmea"][1]) / args.frames
    print(
        f"serial pipeline: {args.frames} frames x {args.rounds} rounds, medians "
        f"(binary {binary_bytes:.0f} B/frame, nmea {nmea_bytes:.0f} B/frame)"
    )
    for (kind, path_name), rates in sorted(results.items()):
        median = statistics.median(rates)
        print(
            f"  {kind:6} {path_name:6} {median:>10,.0f} frames/s  "
            f"({1e6 / median:.2f} us/frame; min {min(rates):,.0f}, max {max(rates):,.0f})"
        )
    binary = statistics.median(results[("binary", "memory")])
    verdict = "meets" if binary >= TARGET else "MISSES"
    print(
        f"  binary from memory {verdict} the target of {TARGET:,} frames/s ({binary / TARGET:.1f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
