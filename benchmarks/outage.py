"""Benchmark: the agent through a server outage at a steady rate: RSS stays flat, then the drain.

The agent (in this process, the spool on, the default) reads the bench database's frames at a
steady ``--rate`` (10k frames/s) and delivers to ``daq-agent serve`` in its own process. After a
warm-up, the server is killed (SIGKILL) for ``--outage`` seconds (60): the backlog goes to the
spool on disk, and this process's RSS is sampled every second (the figure: its spread, target
±20 MB). Then the server is restarted on the same port, and the drain is timed: from the restart
until the spool's backlog is delivered while frames keep arriving. Drain rate = samples delivered
during the drain / its duration (target >= 3x the ingest rate).

Usage::

    .venv/bin/python benchmarks/outage.py [--rate 10000] [--outage 60] [--warmup 5]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from can_pipeline import MemoryReader, agent_config, make_frames

from daq_agent.agent import Agent


def rss_mb() -> float:
    """This process's resident set size, MB (from /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(db: Path, port: int) -> subprocess.Popen[bytes]:
    """``daq-agent serve`` on ``port``, once it accepts connections."""
    process = subprocess.Popen(
        [sys.executable, "-m", "daq_agent.cli", "serve", "--db", str(db), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit("the server did not start")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=10_000.0, help="frames/s in")
    parser.add_argument("--outage", type=float, default=60.0, help="seconds without a server")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--drain-limit", type=float, default=300.0, help="give up after (s)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="daq-bench-outage-") as tmp_name:
        tmp = Path(tmp_name)
        db = tmp / "store.sqlite"
        port = free_port()
        server = serve(db, port)
        frames = make_frames(20_000, time.time())
        go = threading.Event()
        config = agent_config(port, tmp, checkpoint_s=1.0)
        agent = Agent(
            config,
            env={"BENCH_KEY": "bench"},
            reader_factory=lambda source, sink: MemoryReader(source, sink, frames, go, args.rate),
        )
        agent.start()
        flusher = agent.flusher
        assert flusher is not None
        try:
            go.set()
            time.sleep(args.warmup)
            before = rss_mb()
            server.kill()
            server.wait()
            killed = time.monotonic()
            samples = []
            while time.monotonic() - killed < args.outage:
                time.sleep(1.0)
                samples.append(rss_mb())
            status = agent.status()
            backlog = status.flusher.pending
            spool_mb = status.spool.bytes_on_disk / 1e6 if status.spool else 0.0
            server = serve(db, port)
            restarted = time.monotonic()
            delivered_at = flusher.delivered
            received_at = agent.status().received
            while flusher.pending > args.rate:  # less than a second of input left
                if time.monotonic() - restarted > args.drain_limit:
                    raise SystemExit(f"not drained after {args.drain_limit} s")
                time.sleep(0.05)
            drained = time.monotonic() - restarted
            drain_rate = (flusher.delivered - delivered_at) / drained
            ingest = (agent.status().received - received_at) / drained
        finally:
            final = agent.stop()
            server.terminate()
            server.wait(30)
    spread = max(samples) - min(samples)
    print(
        f"outage {args.outage:.0f} s at {args.rate:,.0f} frames/s: backlog {backlog:,} samples "
        f"({spool_mb:.1f} MB spooled); RSS {before:.1f} MB before, {min(samples):.1f}-"
        f"{max(samples):.1f} MB during (spread {spread:.1f} MB, target <= 20)"
    )
    print(
        f"drain: {drained:.1f} s, {drain_rate:,.0f} samples/s delivered while {ingest:,.0f} "
        f"frames/s kept arriving: {drain_rate / max(ingest, 1.0):.1f}x the ingest rate "
        f"(target >= 3x); balanced {final.balanced}, abandoned {final.flusher.abandoned}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
