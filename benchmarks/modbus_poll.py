"""Benchmark: Modbus registers read per second over TCP on loopback, our poller against a plain
pymodbus client loop reading the same blocks, in the same run.

The device is pymodbus's own server (``daq-agent simulate modbus``) in its own process, so the
server does not share the GIL with the side being measured. Two register maps:

- ``meter``: the shipped ``configs/devices/pm_meter.yaml`` (6 requests per poll of both groups:
  11 registers of floats, then small blocks of state, a coil and a discrete input);
- ``wide``: 250 float32 points over 500 holding registers, 4 requests of at most 125.

Each side runs for ``--seconds`` per round, in interleaved rounds (the order alternates, this
machine's speed drifts); medians and their ratio are reported:

- ``poller``: a :class:`~daq_agent.readers.modbus.ModbusReader` polling unthrottled (its own
  thread, the real poll loop: requests, late-reply hook, decode of every point into a Sample,
  counters), registers counted from its ``values_read`` counter;
- ``plain``: one ``ModbusTcpClient`` calling ``read_holding_registers``/… for the same blocks in
  a loop, nothing decoded.

Also reported: the client process's CPU time per register read (``time.process_time``; the
server is another process), the poller's own cost, which the machine's load does not blur the
way it blurs wall-clock rates (the client spends most of a round trip waiting in ``select`` for
the server).

Usage::

    .venv/bin/python benchmarks/modbus_poll.py [--seconds 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import REPO, Rounds, machine
from pymodbus.client import ModbusTcpClient

from daq_agent.core.sample import Sample
from daq_agent.decode.registers import Block, Function, RegisterCodec, load_register_map
from daq_agent.readers.modbus import ModbusReader

METER = REPO / "configs" / "devices" / "pm_meter.yaml"


def wide_map(path: Path) -> Path:
    lines = ["version: 1", "name: wide", "groups:", "  - name: all", "    points:"]
    lines += [
        f"      - {{name: f{i}, address: {2 * i}, type: float32, min: 0, max: 100}}"
        for i in range(250)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def start_server(map_path: Path) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "daq_agent.cli", "simulate", "modbus"]
    command += ["--map", str(map_path), "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    url = process.stdout.readline().strip()
    if not url.startswith("tcp://"):
        process.kill()
        raise SystemExit(f"the simulator did not start: {url!r}")
    return process, url


def run_poller(url: str, map_path: Path, seconds: float) -> tuple[float, float]:
    """Registers/s and client CPU us per register of a ModbusReader polling unthrottled."""
    count = [0]

    def sink(_sample: Sample) -> None:
        count[0] += 1

    # every group unthrottled (the meter's state group has rate_hz: 1), so that the poller reads
    # the very blocks the plain loop reads, in the same proportion
    loaded = load_register_map(map_path)
    rmap = dataclasses.replace(
        loaded, groups=tuple(dataclasses.replace(g, rate_hz=None) for g in loaded.groups)
    )
    reader = ModbusReader("bench", url, rmap, sink, rate_hz=1e6, timeout_s=2.0)
    reader.start()
    try:
        deadline = time.monotonic() + 10
        while not count[0]:
            if time.monotonic() > deadline:
                raise SystemExit(f"the poller got nothing: {reader.counters.last_error}")
            time.sleep(0.001)
        start_values = reader.counters.get("values_read")
        start, cpu = time.perf_counter(), time.process_time()
        time.sleep(seconds)
        values = reader.counters.get("values_read") - start_values
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        reader.stop()
    if reader.counters.get("timeouts") or reader.counters.get("exceptions"):
        raise SystemExit(f"faults during the run: {reader.counters.snapshot()}")
    return values / elapsed, cpu / values * 1e6


def run_plain(url: str, blocks: list[Block], seconds: float) -> tuple[float, float]:
    host, port = url.removeprefix("tcp://").rsplit(":", 1)
    client = ModbusTcpClient(host, port=int(port), timeout=2.0, retries=0)
    if not client.connect():
        raise SystemExit("the plain client cannot connect")
    calls = {
        Function.HOLDING: client.read_holding_registers,
        Function.INPUT: client.read_input_registers,
        Function.COIL: client.read_coils,
        Function.DISCRETE: client.read_discrete_inputs,
    }
    plan = [(calls[b.function], b.address, b.count) for b in blocks]
    values = 0
    try:
        start, cpu = time.perf_counter(), time.process_time()
        end = start + seconds
        while time.perf_counter() < end:
            for call, address, count in plan:
                reply = call(address, count=count, device_id=1)
                if reply.isError():
                    raise SystemExit(f"exception reply: {reply}")
                values += count
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        client.close()  # type: ignore[no-untyped-call]
    return values / elapsed, cpu / values * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per side per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        maps = {"meter": METER, "wide": wide_map(Path(tmp) / "wide.yaml")}
        for label, map_path in maps.items():
            codec = RegisterCodec(load_register_map(map_path), "bench")
            blocks = [b for g in codec.groups for b in g.blocks]
            per_poll = sum(b.count for b in blocks)
            process, url = start_server(map_path)
            try:
                rounds = Rounds(["poller", "plain"])
                cpu = Rounds(["poller", "plain"])
                for index in range(args.rounds):
                    for side in rounds.order(index):
                        if side == "poller":
                            rate, us = run_poller(url, map_path, args.seconds)
                        else:
                            rate, us = run_plain(url, blocks, args.seconds)
                        rounds.add(side, rate)
                        cpu.add(side, us)
            finally:
                process.terminate()
                process.wait(timeout=10)
            print(
                f"{label}: {len(blocks)} requests, {per_poll} registers/bits per poll; "
                f"registers/s median (min-max over {args.rounds} rounds): "
                f"poller {rounds.median('poller'):,.0f} ({rounds.spread('poller')}), "
                f"plain pymodbus {rounds.median('plain'):,.0f} ({rounds.spread('plain')}); "
                f"ratio poller/plain {rounds.ratio('poller', 'plain'):.2f}; "
                f"client CPU per register: poller {cpu.median('poller'):.1f} us, "
                f"plain {cpu.median('plain'):.1f} us (ratio {cpu.ratio('poller', 'plain'):.2f})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
