"""Benchmark: the agent's CPU at a steady frame rate on a ``udp_multicast`` bus, and its latency.

Three processes, as on a bench PC: ``daq-agent run`` (one ``udp_multicast`` bus of the database,
the spool on, the default local target, so its server runs in a fourth process it starts), and a
generator sending ``--rate`` frames/s (10k) on that bus from its own process: this script with
``--generate``, which sends frames made beforehand by the agent's simulator (``daq-agent
simulate can`` encodes every frame with cantools as it goes and cannot keep 10k frames/s on a busy
machine; ``--simulator`` uses it anyway).
After ``--warmup`` seconds the agent's CPU (utime + stime of every thread, from
``/proc/<pid>/stat``) is read over ``--seconds``; the server's likewise. Then the generator ends
and the agent is stopped with SIGINT (it drains and prints its summary): the latency p50/p99
(frame timestamp to the server's commit of its window, over the whole run) and the counts come
from that summary; what the server stored is counted back from its SQLite store. The kernel's
drop counter of the agent's UDP socket (``/proc/net/udp``) is read before the stop.

Usage::

    .venv/bin/python benchmarks/steady.py [--rate 10000] [--seconds 20] [--dbc vehicle]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from benchlib import (
    cpu_seconds,
    machine,
    make_frames,
    resolve_dbc,
    rss_mb,
    stored_samples,
    udp_drops,
)

from daq_agent.core.signals import stop_on_signals

GROUP = "239.74.163.17"


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (from ``/proc/<pid>/task/*/children``)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def generate(dbc: Path, rate: float, duration: float, port: int, group: str = GROUP) -> None:
    """Send frames of ``dbc`` at ``rate`` frames/s for ``duration`` s (or until SIGTERM), paced
    every millisecond; print a JSON summary like ``daq-agent simulate can --json``."""
    import can

    stop = threading.Event()
    with stop_on_signals(stop):
        frames = make_frames(dbc, max(1000, min(int(rate * 10), 200_000)), 0.0)
        for msg in frames:
            msg.timestamp = 0.0  # the receiving socket stamps it
        bus = can.Bus(interface="udp_multicast", channel=group, port=port)
        sent = errors = 0
        started = time.monotonic()
        try:
            while not stop.is_set():
                elapsed = time.monotonic() - started
                if elapsed >= duration:
                    break
                due = int(elapsed * rate)
                while sent + errors < due:
                    try:
                        bus.send(frames[(sent + errors) % len(frames)])
                        sent += 1
                    except (can.CanError, OSError):
                        errors += 1
                stop.wait(0.001)
        finally:
            bus.shutdown()
    elapsed = time.monotonic() - started
    print(json.dumps({"frames": sent, "errors": errors, "elapsed_s": round(elapsed, 3)}))


def generator_command(
    dbc: Path, rate: float, duration: float, port: int, group: str, simulator: bool
) -> list[str]:
    """The command of a generator process."""
    if simulator:
        command = [sys.executable, "-m", "daq_agent.cli", "simulate", "can", "--dbc", str(dbc)]
        command += ["--interface", "udp_multicast", "--channel", group]
        command += ["--bus-option", f"port={port}", "--rate", str(rate), "--json"]
        return [*command, "--duration", str(duration)]
    command = [sys.executable, __file__, "--generate", "--dbc", str(dbc), "--rate", str(rate)]
    return [*command, "--port", str(port), "--group", group, "--seconds", str(duration)]


def agent_document(tmp: Path, dbc: Path, port: int, checkpoint_s: float | None) -> dict[str, Any]:
    document: dict[str, Any] = {
        "asset": "bench-steady",
        "state_dir": str(tmp / "state"),
        "target": {"local": {"db": str(tmp / "store.sqlite")}},
        "run": {"name": "steady"},
        "buses": [
            {
                "name": "can0",
                "interface": "udp_multicast",
                "channel": GROUP,
                "options": {"port": port},
                "databases": [str(dbc)],
            }
        ],
    }
    if checkpoint_s is not None:
        document["flush"] = {"checkpoint_seconds": checkpoint_s}
    return document


class Output:
    """A process's output, collected by a thread (and a line to wait for)."""

    def __init__(self, stream: Any, name: str) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, args=(stream,), name=name, daemon=True)
        self._thread.start()

    def _run(self, stream: Any) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any(re.search(pattern, line) for line in self.lines):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def join(self, timeout: float = 10.0) -> None:
        self._thread.join(timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=10_000.0, help="frames/s sent")
    parser.add_argument("--seconds", type=float, default=20.0, help="the measured steady period")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--dbc", default="vehicle", help="bench, vehicle (generated) or a file")
    parser.add_argument("--port", type=int, default=43_217, help="udp_multicast port")
    parser.add_argument(
        "--checkpoint", type=float, default=None, help="checkpoint_seconds (default: the config's)"
    )
    parser.add_argument("--simulator", action="store_true", help="generate with daq-agent simulate")
    parser.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--group", default=GROUP, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.generate:
        generate(Path(args.dbc), args.rate, args.seconds, args.port, args.group)
        return 0
    python = sys.executable
    with tempfile.TemporaryDirectory(prefix="daq-bench-steady-") as tmp_name:
        tmp = Path(tmp_name)
        dbc = resolve_dbc(args.dbc, tmp)
        config = tmp / "agent.yaml"
        config.write_text(yaml.safe_dump(agent_document(tmp, dbc, args.port, args.checkpoint)))
        agent = subprocess.Popen(
            [python, "-m", "daq_agent.cli", "run", str(config), "--no-live"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        out = Output(agent.stdout, "bench-agent-out")
        err = Output(agent.stderr, "bench-agent-err")
        generator: subprocess.Popen[str] | None = None
        try:
            if not out.wait_for(r"^daq-agent: asset", 60):
                raise SystemExit("the agent did not start:\n" + "\n".join(err.lines[-20:]))
            duration = args.warmup + args.seconds + 1.0
            generator = subprocess.Popen(
                generator_command(dbc, args.rate, duration, args.port, GROUP, args.simulator),
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            time.sleep(args.warmup)
            server = children(agent.pid)
            t0 = time.monotonic()
            cpu0 = cpu_seconds(agent.pid), sum(cpu_seconds(p) for p in server)
            gen0 = cpu_seconds(generator.pid)
            time.sleep(args.seconds)
            t1 = time.monotonic()
            cpu1 = cpu_seconds(agent.pid), sum(cpu_seconds(p) for p in server)
            gen1 = cpu_seconds(generator.pid)
            rss = rss_mb(agent.pid)
            gen_out, _ = generator.communicate(timeout=duration + 30)
            drops = udp_drops(agent.pid)
            agent.send_signal(signal.SIGINT)
            agent.wait(timeout=120)
        finally:
            for proc in (generator, agent):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
        out.join()
        err.join()
        stored = stored_samples(tmp / "store.sqlite", "steady")
    sent = json.loads(gen_out.strip().splitlines()[-1])
    summary = "\n".join(out.lines)
    latency = re.search(r"latency p50 ([\d.]+) ms p99 ([\d.]+) ms", summary)
    received = re.search(r"frames received (\d+)", summary)
    elapsed = t1 - t0
    agent_cpu = (cpu1[0] - cpu0[0]) / elapsed
    print(
        f"steady {args.rate:,.0f} frames/s of {dbc.name} on udp_multicast, measured over "
        f"{elapsed:.1f} s after a {args.warmup:.0f} s warm-up (agent pid {agent.pid})"
    )
    print(
        f"  generator: sent {sent['frames']:,} frames in {sent['elapsed_s']:.1f} s "
        f"({sent['frames'] / sent['elapsed_s']:,.0f}/s, errors {sent['errors']}; its CPU "
        f"{(gen1 - gen0) / elapsed:.0%})"
    )
    print(
        f"  agent CPU {agent_cpu:.1%} of one core (utime+stime, every thread; target <= 15%), "
        f"{agent_cpu / args.rate * 1e6:.1f} µs per frame; RSS {rss:.0f} MB"
    )
    print(f"  its local server (pids {server}): CPU {(cpu1[1] - cpu0[1]) / elapsed:.1%}")
    if latency:
        print(
            f"  latency (agent summary, whole run) p50 {latency.group(1)} ms, "
            f"p99 {latency.group(2)} ms"
        )
    print(
        f"  agent received {int(received.group(1)) if received else -1:,}, stored "
        f"{stored:,}; exit {agent.returncode}; udp socket drops "
        f"{sum(d for _, d in drops.values())} ({drops})"
    )
    for line in out.lines[-8:]:
        print(f"    {line}")
    print(f"  {machine()}, pid {os.getpid()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
