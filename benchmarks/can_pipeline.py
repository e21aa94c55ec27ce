"""Benchmark: CAN frames/s stored, the agent's pipeline against the conventional path.

The same pre-generated frames (the bench database: classic, multiplexed, CAN FD and 29-bit
messages) go through two paths, in interleaved rounds, into the same local ingestion server
(``daq-agent serve`` in its own process, SQLite store); a side's figure counts only what the server
stored (counted back from the store):

- ``daq-agent``: reader (the CAN reader's frame processor over the frames in memory) → compiled
  decoder → ring buffer → flusher (batches encoded straight to wire bytes) → checkpointed stream →
  server. The agent is the real :class:`~daq_agent.agent.Agent`, configured with a Sift
  target pointing at the server.
- ``conventional``: cantools decoding per frame (``Message.decode``, which
  ``Database.decode_message`` calls after its id lookup; that lookup confuses the 29-bit id 0x100
  with the standard one, so the message is looked up by (id, extended) instead) + ``sift_py``'s
  ``IngestionService.buffered_ingestion`` (the real ``sift-stack-py`` package). Its protobuf
  ``sift.*`` modules clash with ours, so it runs in its own virtual environment
  (``--sift-venv``, created on first use) as a subprocess.

The agent side runs twice per round, with its durable spool (the default: every batch appended
and group-committed to disk before it is sent) and without (``spool: {enabled: false}``, the
window in memory); the spool's cost is the ratio of the two medians (target: at most 20%).

Then, in a fresh process, the agent at a steady 10k frames/s: p50/p99 latency from the frame's
timestamp to the server's acknowledgement of the stream that carried it (= committed), and the peak
RSS of that process (agent and server are separate processes there too; ``--embedded`` runs the
server inside the agent process as the default config does).

Usage::

    .venv/bin/python benchmarks/can_pipeline.py [--frames 60000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import can

from daq_agent.agent import Agent, SourcePlan
from daq_agent.config import AgentConfig, parse_config
from daq_agent.core.clock import host_clock
from daq_agent.decode.dbc import load_database
from daq_agent.readers.base import ReaderABC, Sink
from daq_agent.readers.can import CanReader, MessageProcessor
from daq_agent.sim.can import CanSimulator

REPO = Path(__file__).resolve().parents[1]
BENCH_DBC = REPO / "dbc" / "bench.dbc"
DEFAULT_SIFT_VENV = Path(tempfile.gettempdir()) / "daq-agent-sift-venv"
_RECORD = struct.Struct("<dIBB64s")  # timestamp, id, flags (1 extended, 2 fd), length, data


# -- frames ---------------------------------------------------------------------------------


def make_frames(count: int, base_s: float) -> list[can.Message]:
    """``count`` frames of the bench database, 10 µs apart from ``base_s``."""
    simulator = CanSimulator([load_database(BENCH_DBC)])
    frames = []
    for i, (_plan, msg) in enumerate(simulator.frames(count=count)):
        msg.timestamp = base_s + i * 1e-5
        frames.append(msg)
    return frames


def write_frames(frames: Sequence[can.Message], path: Path) -> None:
    """Write frames as fixed-size records for the conventional side."""
    with path.open("wb") as out:
        for msg in frames:
            flags = (1 if msg.is_extended_id else 0) | (2 if msg.is_fd else 0)
            data = bytes(msg.data)
            out.write(_RECORD.pack(msg.timestamp, msg.arbitration_id, flags, len(data), data))


# -- the agent side -------------------------------------------------------------------------


class MemoryReader(ReaderABC):
    """A reader over frames held in memory, through the CAN reader's frame processor.

    Without ``rate`` it plays every frame once as fast as it can, after ``go`` is set; with
    ``rate`` it cycles through them at ``rate`` frames/s, each stamped with the host time at
    emission, until stopped.
    """

    kind: ClassVar[str] = "memory"
    COUNTERS: ClassVar[tuple[str, ...]] = CanReader.COUNTERS
    KEYED_COUNTERS: ClassVar[tuple[str, ...]] = CanReader.KEYED_COUNTERS

    def __init__(
        self,
        source: SourcePlan,
        sink: Sink,
        frames: Sequence[can.Message],
        go: threading.Event,
        rate: float | None = None,
    ) -> None:
        super().__init__(source.name, sink, poll_interval=0.05)
        self.finite = rate is None
        self._frames = frames
        self._go = go
        self._rate = rate
        assert source.decoder is not None
        self._processor = MessageProcessor(self, source.decoder, host_clock(), 1000)
        self._next = 0
        self._t0 = 0.0

    def _open(self) -> None:
        self._next = 0

    def _read(self, timeout: float) -> bool:
        if not self._go.wait(timeout):
            return True
        process = self._processor.process
        frames = self._frames
        if self._rate is None:
            end = min(len(frames), self._next + 4096)
            for i in range(self._next, end):
                process(frames[i])
            self._next = end
            return end < len(frames)
        if not self._t0:
            self._t0 = time.monotonic()
        due = int((time.monotonic() - self._t0) * self._rate)
        now_s = time.time()
        while self._next < due:
            msg = frames[self._next % len(frames)]
            msg.timestamp = now_s
            process(msg)
            self._next += 1
        self._stop.wait(0.001)
        return True

    def _close(self) -> None:
        pass


def agent_config(
    port: int | None, tmp: Path, *, checkpoint_s: float = 1.0, spool: bool = True
) -> AgentConfig:
    """The benchmark's agent config: one bus of the bench database, target the server."""
    document: dict[str, Any] = {
        "asset": "bench-pipeline",
        "state_dir": str(tmp / "agent-state"),
        "buses": [{"name": "can0", "interface": "virtual", "databases": [str(BENCH_DBC)]}],
        "ring": {"capacity": 262_144, "policy": "block"},
        "flush": {
            "max_batch": 4000,
            "max_age_ms": 20,
            "checkpoint_seconds": checkpoint_s,
            "checkpoint_records": 1_000_000,
        },
        "run": {"name": "agent-%H%M%S-{asset}"},
        "spool": {"enabled": spool},
    }
    if port is not None:
        document["target"] = {
            "sift": {"uri": f"127.0.0.1:{port}", "api_key_env": "BENCH_KEY", "use_ssl": False}
        }
    return parse_config(document, base_dir=tmp, env={})


def run_agent_round(
    port: int, tmp: Path, frames: Sequence[can.Message], index: int, *, spool: bool = True
) -> tuple[float, int]:
    """One round of the agent side; returns (seconds, samples stored)."""
    go = threading.Event()
    config = agent_config(port, tmp, spool=spool)
    run = config.run
    assert run is not None
    config = _with_run_name(config, _agent_run_name(index, spool))
    agent = Agent(
        config,
        env={"BENCH_KEY": "bench"},
        reader_factory=lambda source, sink: MemoryReader(source, sink, frames, go),
    )
    agent.start()
    flusher = agent.flusher
    assert flusher is not None
    try:
        started = time.perf_counter()
        go.set()
        while flusher.delivered < len(frames):
            if not flusher.is_alive():
                raise SystemExit(f"flusher died: {flusher.error}")
            if flusher.pending and agent.ring.depth == 0 and agent.readers[0].ended:
                flusher.request_checkpoint()
            time.sleep(0.001)
        elapsed = time.perf_counter() - started
    finally:
        status = agent.stop()
    assert status.balanced, status.summary()
    return elapsed, status.flusher.delivered


def _agent_run_name(index: int, spool: bool) -> str:
    return f"agent-round-{index}-{'spool' if spool else 'memory'}-{os.getpid()}"


def _with_run_name(config: AgentConfig, name: str) -> AgentConfig:
    import dataclasses

    assert config.run is not None
    return dataclasses.replace(config, run=dataclasses.replace(config.run, name=name))


# -- the conventional side ------------------------------------------------------------------

CONVENTIONAL = textwrap.dedent(
    '''
    """cantools decode_message + sift_py buffered_ingestion (runs in the sift-stack-py venv)."""
    import json, struct, sys, time, warnings
    from datetime import datetime, timezone
    warnings.simplefilter("ignore")
    import cantools
    from sift_py.grpc.transport import use_sift_channel
    from sift_py.ingestion.channel import ChannelConfig, ChannelDataType, double_value, empty_value
    from sift_py.ingestion.config.telemetry import FlowConfig, TelemetryConfig
    from sift_py.ingestion.service import IngestionService

    dbc, frames_path, port, run_name, key = sys.argv[1:6]
    record = struct.Struct("<dIBB64s")
    raw = open(frames_path, "rb").read()
    frames = [record.unpack_from(raw, i) for i in range(0, len(raw), record.size)]
    db = cantools.database.load_file(dbc, strict=False)
    flows = [
        FlowConfig(
            name="conv." + m.name,
            channels=[ChannelConfig(name=s.name, data_type=ChannelDataType.DOUBLE)
                      for s in m.signals],
        )
        for m in db.messages
    ]
    # keyed by (id, extended): cantools' own frame-id table confuses 29-bit id 0x100 with 0x100
    names = {
        (m.frame_id, bool(m.is_extended_frame)): (m, "conv." + m.name, [s.name for s in m.signals])
        for m in db.messages
    }
    config = TelemetryConfig(asset_name="bench-conventional", ingestion_client_key=key, flows=flows)
    with use_sift_channel({"uri": f"127.0.0.1:{port}", "apikey": "bench", "use_ssl": False}) as ch:
        service = IngestionService(ch, config)
        service.attach_run(ch, run_name)
        started = time.perf_counter()
        with service.buffered_ingestion() as buffered:
            for ts, frame_id, flags, length, data in frames:
                message, flow, signals = names[(frame_id, bool(flags & 1))]
                decoded = message.decode(data[:length], decode_choices=False)
                buffered.ingest_flows({
                    "flow_name": flow,
                    "timestamp": datetime.fromtimestamp(ts, tz=timezone.utc),
                    "channel_values": [
                        double_value(float(decoded[s])) if s in decoded else empty_value()
                        for s in signals
                    ],
                })
        elapsed = time.perf_counter() - started
    print(json.dumps({"elapsed": elapsed, "frames": len(frames)}))
    '''
)


def ensure_sift_venv(venv: Path) -> Path:
    """The python of a venv with sift-stack-py and cantools (created on first use)."""
    python = venv / "bin" / "python"
    probe = [str(python), "-W", "ignore", "-c", "import sift_py, cantools"]
    if python.exists() and subprocess.run(probe, capture_output=True, check=False).returncode == 0:
        return python
    print(f"creating {venv} with sift-stack-py (once)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "sift-stack-py", "cantools"], check=True
    )
    return python


def run_conventional_round(
    python: Path, port: int, frames_path: Path, db: Path, index: int
) -> tuple[float, int]:
    """One round of the conventional side; returns (seconds, samples stored for its run)."""
    run_name = f"conventional-round-{index}-{os.getpid()}"
    script = frames_path.parent / "conventional.py"
    script.write_text(CONVENTIONAL)
    result = subprocess.run(
        [
            str(python),
            str(script),
            str(BENCH_DBC),
            str(frames_path),
            str(port),
            run_name,
            "bench-conventional",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"conventional side failed:\n{result.stderr[-3000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return float(report["elapsed"]), stored_for_run(db, run_name)


# -- server and store -----------------------------------------------------------------------


def start_server(db: Path) -> tuple[subprocess.Popen[str], int]:
    """``daq-agent serve`` on a free port, in its own process."""
    process = subprocess.Popen(
        [sys.executable, "-m", "daq_agent.cli", "serve", "--db", str(db), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        match = re.search(r"listening on [\w.\[\]:]*:(\d+)", line)
        if match:
            threading.Thread(
                target=_drain, args=(process.stderr,), name="bench-server-log", daemon=True
            ).start()
            return process, int(match.group(1))
        if not line and process.poll() is not None:
            break
    process.kill()
    raise SystemExit("the local server did not start")


def _drain(stream: Any) -> None:
    for _ in stream:
        pass


def stored_for_run(db: Path, run_name: str) -> int:
    """Samples of the runs named ``run_name`` in the server's store."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM samples WHERE run IN (SELECT id FROM runs WHERE name = ?)",
            (run_name,),
        ).fetchone()
    return int(row[0])


def stored_for_agent_run(db: Path, index: int, spool: bool = True) -> int:
    """Samples of the agent's run of round ``index``."""
    return stored_for_run(db, _agent_run_name(index, spool))


# -- latency and RSS at a steady rate (child process) ---------------------------------------


def latency_child(
    port: int | None, rate: float, seconds: float, warmup: float, checkpoint_s: float
) -> dict[str, Any]:
    """Run the agent at ``rate`` frames/s for ``seconds``; latency and peak RSS."""
    with tempfile.TemporaryDirectory(prefix="daq-bench-lat-") as tmp_name:
        tmp = Path(tmp_name)
        frames = make_frames(20_000, time.time())
        go = threading.Event()
        config = agent_config(port, tmp, checkpoint_s=checkpoint_s)
        agent = Agent(
            config,
            env={"BENCH_KEY": "bench"},
            reader_factory=lambda source, sink: MemoryReader(source, sink, frames, go, rate),
        )
        agent.start()
        flusher = agent.flusher
        assert flusher is not None
        try:
            go.set()
            time.sleep(warmup)
            flusher.reset_latency()
            start_cpu = time.process_time()
            time.sleep(seconds)
            cpu = (time.process_time() - start_cpu) / seconds
            live = agent.status()
        finally:
            status = agent.stop()
        rate_in = live.received / live.uptime_s if live.uptime_s else 0.0
        return {
            "rate_in": round(rate_in),
            "delivered": status.flusher.delivered,
            "latency_p50_ms": live.flusher.latency_p50_ms,
            "latency_p99_ms": live.flusher.latency_p99_ms,
            "checkpoint_s": config.flush.checkpoint_seconds,
            "cpu_fraction": round(cpu, 2),
            "rss_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "balanced": status.balanced,
        }


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=60_000, help="frames per side and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sift-venv", type=Path, default=DEFAULT_SIFT_VENV)
    parser.add_argument("--rate", type=float, default=10_000.0, help="steady rate (latency)")
    parser.add_argument("--seconds", type=float, default=5.0, help="steady phase length")
    parser.add_argument("--embedded", action="store_true", help="latency: server in-process")
    parser.add_argument(
        "--checkpoint", type=float, default=0.1, help="latency: seconds between checkpoints"
    )
    parser.add_argument("--skip-conventional", action="store_true")
    parser.add_argument("--latency-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.latency_child is not None:
        port = None if args.latency_child == 0 else args.latency_child
        report = latency_child(port, args.rate, args.seconds, 1.0, args.checkpoint)
        print(json.dumps(report))
        return 0

    python = None if args.skip_conventional else ensure_sift_venv(args.sift_venv)
    with tempfile.TemporaryDirectory(prefix="daq-bench-can-") as tmp_name:
        tmp = Path(tmp_name)
        db = tmp / "bench.sqlite"
        frames = make_frames(args.frames, 1_750_000_000.0)
        frames_path = tmp / "frames.bin"
        write_frames(frames, frames_path)
        server, port = start_server(db)
        ours: list[float] = []
        memory: list[float] = []
        theirs: list[float] = []
        try:
            for index in range(args.rounds):
                for spool in (True, False):
                    seconds, delivered = run_agent_round(port, tmp, frames, index, spool=spool)
                    stored = stored_for_agent_run(db, index, spool)
                    if stored != len(frames) or delivered != len(frames):
                        raise SystemExit(
                            f"agent round {index}: {delivered} delivered, {stored} stored"
                        )
                    (ours if spool else memory).append(stored / seconds)
                line = (
                    f"round {index}: daq-agent {ours[-1]:>9,.0f} frames/s stored (spool), "
                    f"{memory[-1]:>9,.0f} (no spool)"
                )
                if python is not None:
                    seconds, stored = run_conventional_round(python, port, frames_path, db, index)
                    if stored != len(frames):
                        raise SystemExit(f"conventional round {index}: {stored} stored")
                    theirs.append(stored / seconds)
                    line += f"   conventional {theirs[-1]:>9,.0f} frames/s stored"
                print(line, flush=True)
            latency_port = 0 if args.embedded else port
            child = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--latency-child",
                    str(latency_port),
                    "--rate",
                    str(args.rate),
                    "--seconds",
                    str(args.seconds),
                    "--checkpoint",
                    str(args.checkpoint),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if child.returncode != 0:
                raise SystemExit(f"latency phase failed:\n{child.stderr[-3000:]}")
            latency = json.loads(child.stdout.strip().splitlines()[-1])
        finally:
            server.terminate()
            server.wait(timeout=30)
    mix = {
        "fd": sum(f.is_fd for f in frames),
        "extended": sum(f.is_extended_id for f in frames),
        "total": len(frames),
    }
    print(f"frames: {mix['total']} per round ({mix['fd']} CAN FD, {mix['extended']} 29-bit)")
    print(f"daq-agent    median {statistics.median(ours):>9,.0f} frames/s stored (spool on)")
    print(f"no spool     median {statistics.median(memory):>9,.0f} frames/s stored")
    cost = 1 - statistics.median(ours) / statistics.median(memory)
    print(f"spool cost   {cost:.1%} of the throughput (target <= 20%)")
    if theirs:
        print(f"conventional median {statistics.median(theirs):>9,.0f} frames/s stored")
        print(f"ratio        {statistics.median(ours) / statistics.median(theirs):.1f}x")
    where = "server in-process" if args.embedded else "server in its own process"
    print(
        f"steady {args.rate:,.0f} frames/s for {args.seconds:.0f} s ({where}, checkpoint every "
        f"{latency['checkpoint_s']} s): in {latency['rate_in']:,} frames/s, latency p50 "
        f"{latency['latency_p50_ms']:.1f} ms p99 {latency['latency_p99_ms']:.1f} ms, "
        f"agent CPU {latency['cpu_fraction']:.0%}, peak RSS {latency['rss_peak_mb']} MB, "
        f"balanced {latency['balanced']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
