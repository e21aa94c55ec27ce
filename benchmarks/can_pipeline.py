"""Benchmark: CAN frames/s stored, the agent end to end against the conventional pipeline.

Part 1, on each database (``--dbc bench,vehicle``: ``dbc/bench.dbc`` and a generated database
shaped like a real vehicle's, see ``vehicle_dbc.py``), the same pre-generated frames go through
each side, in interleaved rounds (this machine's speed drifts), into the same local server
(``daq-agent serve`` in its own process, SQLite); a side's figure counts only what the server
stored for its run (counted back from the store):

- ``agent``: the real :class:`~daq_agent.agent.Agent` with its spool on (the default), a Sift
  target pointing at the server: reader (the CAN reader's frame processor over the frames in
  memory) → compiled decoder → ring → flusher (msgpack batches appended to the spool) → sender
  (read back, unpacked, requests built) → sift_stream windows → server. Timed from the first
  frame to the last one committed, the sink's set-up (config, flows, run) included;
- ``no spool``: the same with ``spool: {enabled: false}`` (``--no-spool-side`` to skip);
- ``journal`` (with ``--journal blf|asc|log``): ``agent`` with the bus's raw-frame journal on
  (each burst handed to the journal's thread, which writes it with python-can's writer into a
  file under the temporary directory); the journal's cost is 1 - journal/agent of the medians;
- ``conventional``: cantools (``Message.decode`` per frame) + ``sift_py``'s
  ``IngestionService.buffered_ingestion`` (the real ``sift-stack-py``: its ``sift.*`` protobuf
  modules clash with ours, so it runs in its own virtual environment, ``--sift-venv``, created on
  first use with pip) as a subprocess. Timed after its config and run are set up.

Part 2, ``daq-agent run`` of a replayed log, whole processes: a candump log of ``--replay-frames``
frames (300,000) of the vehicle database, generated with the agent's simulator, played by a
``replay`` source (``realtime: false``) into the default local target (the agent starts its
server in its own process). Timed from the process's start to its exit; every frame must be
stored (counted back from the SQLite store). The conventional counterpart (python-can's
``LogReader`` + cantools + sift_py, against ``daq-agent serve``) runs interleaved with it
(``--replay-rounds``; ``--skip-conventional`` skips it too).

Usage::

    .venv/bin/python benchmarks/can_pipeline.py [--dbc bench,vehicle] [--frames 60000]
        [--rounds 3] [--replay-frames 300000] [--replay-rounds 1] [--skip-replay]
        [--journal blf]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
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
import yaml
from benchlib import (
    Rounds,
    Server,
    cpu_seconds,
    machine,
    make_frames,
    resolve_dbc,
    stored_samples,
    write_candump,
)

from daq_agent.agent import Agent, SourcePlan
from daq_agent.config import AgentConfig, parse_config
from daq_agent.core.clock import host_clock
from daq_agent.readers.base import ReaderABC, Sink
from daq_agent.readers.can import CanReader, MessageProcessor
from daq_agent.readers.journal import CanJournal

DEFAULT_SIFT_VENV = Path(tempfile.gettempdir()) / "daq-agent-sift-venv"
BASE_S = 1_750_000_000.0


# -- the agent side -------------------------------------------------------------------------


class MemoryReader(ReaderABC):
    """A reader over frames held in memory, through the CAN reader's frame processor.

    Without ``rate`` it plays every frame once as fast as it can, after ``go`` is set; with
    ``rate`` it cycles through them at ``rate`` frames/s, each stamped with the host time at
    emission, until stopped. With the source's ``journal`` settings, each burst goes to a
    :class:`CanJournal` as the CAN reader hands it over.
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
        self.journal = None
        if source.journal is not None:
            self.journal = CanJournal(source.name, source.journal)
            self.journal.attach(self.counters)

    def start(self) -> None:
        if self.journal is not None:
            self.journal.start()
        super().start()

    def stop(self, timeout: float | None = 5.0) -> bool:
        stopped = super().stop(timeout)
        if self.journal is not None:
            self.journal.close()
        return stopped

    def _open(self) -> None:
        self._next = 0

    def _read(self, timeout: float) -> bool:
        if not self._go.wait(timeout):
            return True
        process = self._processor.process
        frames = self._frames
        if self._rate is None:
            end = min(len(frames), self._next + 1024)  # the CAN reader's burst
            for i in range(self._next, end):
                process(frames[i])
            if self.journal is not None:
                self.journal.submit(frames[self._next : end])
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
    server: Server | None,
    tmp: Path,
    dbc: Path,
    *,
    spool: bool = True,
    run_name: str = "bench",
    journal: str | None = None,
) -> AgentConfig:
    """One bus of ``dbc``, a Sift target at ``server`` (key in ``BENCH_KEY``), or local;
    with ``journal`` (a format), the bus's journal under ``tmp/journal``."""
    bus: dict[str, Any] = {"name": "can0", "interface": "virtual", "databases": [str(dbc)]}
    if journal is not None:
        bus["journal"] = {"dir": str(tmp / "journal"), "format": journal}
    document: dict[str, Any] = {
        "asset": f"bench-{dbc.stem}",
        "state_dir": str(tmp / "agent-state"),
        "buses": [bus],
        "ring": {"capacity": 262_144, "policy": "block"},
        "flush": {
            "max_batch": 4000,
            "max_age_ms": 20,
            "checkpoint_seconds": 1.0,
            "checkpoint_records": 1_000_000,
        },
        "run": {"name": run_name},
        "spool": {"enabled": spool},
    }
    if server is not None:
        document["target"] = {
            "sift": {"uri": server.uri, "api_key_env": "BENCH_KEY", "use_ssl": False}
        }
    return parse_config(document, base_dir=tmp, env={})


def run_agent_round(
    server: Server,
    tmp: Path,
    dbc: Path,
    frames: Sequence[can.Message],
    run_name: str,
    spool: bool,
    journal: str | None = None,
    cpu: list[float] | None = None,
    journal_cpu: list[float] | None = None,
) -> float:
    """One round of the agent; returns the seconds from the first frame to the last commit
    (with a journal: until the journal has written every frame too); appends to ``cpu`` the
    process's CPU seconds over that time (every thread: reader, flusher, journal, sift_stream),
    and to ``journal_cpu`` the journal thread's own."""
    go = threading.Event()
    config = agent_config(server, tmp, dbc, spool=spool, run_name=run_name, journal=journal)
    agent = Agent(
        config,
        env={"BENCH_KEY": server.api_key},
        reader_factory=lambda source, sink: MemoryReader(source, sink, frames, go),
    )
    agent.start()
    flusher = agent.flusher
    assert flusher is not None
    try:
        started = time.perf_counter()
        cpu_started = cpu_seconds()
        go.set()
        while flusher.delivered < len(frames):
            if not flusher.is_alive():
                raise SystemExit(f"flusher died: {flusher.error}")
            if flusher.pending and agent.ring.depth == 0 and agent.readers[0].ended:
                flusher.request_checkpoint()
            time.sleep(0.001)
        counters = agent.readers[0].counters
        while journal is not None and counters.get("journal_written") + counters.get(
            "journal_dropped"
        ) < len(frames):
            time.sleep(0.001)
        elapsed = time.perf_counter() - started
        if cpu is not None:
            cpu.append(cpu_seconds() - cpu_started)
        reader = agent.readers[0]
        tid = (
            reader.journal.native_thread_id
            if isinstance(reader, MemoryReader) and (reader.journal is not None)
            else None
        )
        if journal_cpu is not None and tid is not None:
            journal_cpu.append(cpu_seconds(f"self/task/{tid}"))
    finally:
        status = agent.stop()
    if not status.balanced or status.flusher.delivered != len(frames):
        raise SystemExit("agent round: " + "; ".join(status.summary()))
    if journal is not None:
        written = status.sources[0].counters
        if written["journal_written"] != len(frames):
            raise SystemExit(f"journal round: {written}")
        shutil.rmtree(tmp / "journal", ignore_errors=True)
    return elapsed


# -- the conventional side ------------------------------------------------------------------

CONVENTIONAL = textwrap.dedent(
    '''
    """cantools decode + sift_py buffered_ingestion (runs in the sift-stack-py venv)."""
    import json, struct, sys, time, warnings
    from datetime import datetime, timezone
    warnings.simplefilter("ignore")
    import cantools
    from sift_py.grpc.transport import use_sift_channel
    from sift_py.ingestion.channel import ChannelConfig, ChannelDataType, double_value, empty_value
    from sift_py.ingestion.config.telemetry import FlowConfig, TelemetryConfig
    from sift_py.ingestion.service import IngestionService

    dbc, frames_path, uri, key, run_name, client_key = sys.argv[1:7]
    if frames_path.endswith(".log"):  # a candump log: python-can reads it, as a replay would
        import can
        frames = None
    else:
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
    config = TelemetryConfig(asset_name="bench-conventional", ingestion_client_key=client_key,
                             flows=flows)
    count = 0
    with use_sift_channel({"uri": uri, "apikey": key, "use_ssl": False}) as ch:
        service = IngestionService(ch, config)
        service.attach_run(ch, run_name)
        started = time.perf_counter()
        if frames is None:
            frames = ((m.timestamp, m.arbitration_id, 1 if m.is_extended_id else 0, len(m.data),
                       bytes(m.data)) for m in can.LogReader(frames_path))
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
                count += 1
        elapsed = time.perf_counter() - started
    print(json.dumps({"elapsed": elapsed, "frames": count}))
    '''
)
_RECORD_FORMAT = "<dIBB64s"  # timestamp, id, flags (1 extended, 2 fd), length, data


def write_frames(frames: Sequence[can.Message], path: Path) -> None:
    """Frames as fixed-size records for the conventional side."""
    import struct

    record = struct.Struct(_RECORD_FORMAT)
    with path.open("wb") as out:
        for msg in frames:
            flags = (1 if msg.is_extended_id else 0) | (2 if msg.is_fd else 0)
            data = bytes(msg.data)
            out.write(record.pack(msg.timestamp, msg.arbitration_id, flags, len(data), data))


def ensure_sift_venv(venv: Path) -> Path:
    """The python of a venv with sift-stack-py and cantools (created on first use)."""
    python = venv / "bin" / "python"
    probe = [str(python), "-W", "ignore", "-c", "import sift_py, cantools, can"]
    if python.exists() and subprocess.run(probe, capture_output=True, check=False).returncode == 0:
        return python
    print(f"creating {venv} with sift-stack-py (once)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "sift-stack-py", "cantools", "python-can"],
        check=True,
    )
    return python


def run_conventional(
    python: Path, server: Server, dbc: Path, frames_path: Path, run_name: str
) -> tuple[float, float]:
    """One run of the conventional side; returns (seconds it timed, whole process seconds)."""
    script = frames_path.parent / "conventional.py"
    script.write_text(CONVENTIONAL)
    command = [str(python), str(script), str(dbc), str(frames_path), server.uri]
    command += [server.api_key, run_name, f"bench-conventional-{dbc.stem}"]
    started = time.perf_counter()
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=False,
    )
    whole = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"conventional side failed:\n{result.stderr[-3000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return float(report["elapsed"]), whole


# -- part 1 ---------------------------------------------------------------------------------


def in_memory(
    args: argparse.Namespace, python: Path | None, tmp: Path, dbc: Path
) -> dict[str, Any]:
    frames = make_frames(dbc, args.frames, BASE_S)
    frames_path = tmp / f"frames-{dbc.stem}.bin"
    write_frames(frames, frames_path)
    names = ["agent"] + ([] if args.no_spool_side else ["no spool"])
    names += [] if args.journal is None else ["journal"]
    names += [] if python is None else ["conventional"]
    rounds = Rounds(names)
    cpu_rounds = Rounds(names)
    journal_thread = Rounds(["journal"])
    db = tmp / f"store-{dbc.stem}.sqlite"
    print(
        f"{dbc.name}: {args.frames:,} frames per side and round "
        f"({sum(f.is_fd for f in frames):,} CAN FD, {sum(f.is_extended_id for f in frames):,} "
        "29-bit)",
        flush=True,
    )
    with Server(db) as server:
        # warm-up, not counted: each side's ingestion config and flows are created once
        warm = frames[: min(len(frames), 2000)]
        warm_path = tmp / f"warm-{dbc.stem}.bin"
        write_frames(warm, warm_path)
        for name in names:
            if name == "conventional":
                assert python is not None
                run_conventional(python, server, dbc, warm_path, f"warm-{name}")
            else:
                run_agent_round(
                    server,
                    tmp,
                    dbc,
                    warm,
                    f"warm-{name}",
                    spool=name != "no spool",
                    journal=args.journal if name == "journal" else None,
                )
        for index in range(args.rounds):
            line = [f"  round {index + 1}:"]
            for name in rounds.order(index):
                run_name = f"{name}-{index}-{os.getpid()}"
                if name == "conventional":
                    assert python is not None
                    seconds, _ = run_conventional(python, server, dbc, frames_path, run_name)
                else:
                    cpu: list[float] = []
                    thread_cpu: list[float] = []
                    seconds = run_agent_round(
                        server,
                        tmp,
                        dbc,
                        frames,
                        run_name,
                        spool=name != "no spool",
                        journal=args.journal if name == "journal" else None,
                        cpu=cpu,
                        journal_cpu=thread_cpu,
                    )
                    cpu_rounds.add(name, cpu[0] / len(frames) * 1e6)
                    if thread_cpu:
                        journal_thread.add("journal", thread_cpu[0] / len(frames) * 1e6)
                stored = stored_samples(db, run_name)
                if stored != len(frames):
                    raise SystemExit(f"{name} round {index}: {stored} of {len(frames)} stored")
                rounds.add(name, stored / seconds)
                line.append(f"{name} {stored / seconds:>8,.0f}")
            print("  ".join(line) + " frames/s stored", flush=True)
    return {"dbc": dbc.name, "rounds": rounds, "cpu": cpu_rounds, "thread": journal_thread}


# -- part 2 ---------------------------------------------------------------------------------


def replay_config(tmp: Path, dbc: Path, log: Path, name: str) -> Path:
    path = tmp / f"{name}.yaml"
    document = {
        "asset": "bench-replay",
        "state_dir": str(tmp / f"{name}-state"),
        "target": {"local": {"db": str(tmp / f"{name}.sqlite")}},
        "run": {"name": name},
        "replay": [{"path": str(log), "bus": "can0", "realtime": False, "databases": [str(dbc)]}],
    }
    path.write_text(yaml.safe_dump(document))
    return path


def run_replay(tmp: Path, dbc: Path, log: Path, name: str) -> dict[str, Any]:
    config = replay_config(tmp, dbc, log, name)
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "daq_agent.cli", "run", str(config), "--no-live"],
        capture_output=True,
        text=True,
        check=False,
    )
    whole = time.perf_counter() - started
    summary = result.stdout.strip().splitlines()
    db = tmp / f"{name}.sqlite"
    stored = stored_samples(db, name) if db.exists() else 0
    ring = next((line for line in summary if line.startswith("ring:")), "")
    dropped = re.search(r"dropped (\d+)", ring)
    return {
        "exit": result.returncode,
        "seconds": whole,
        "stored": stored,
        "ring": ring,
        "dropped": int(dropped.group(1)) if dropped else -1,
        "summary": summary,
        "stderr": result.stderr[-2000:],
    }


def replay(args: argparse.Namespace, python: Path | None, tmp: Path) -> None:
    dbc = resolve_dbc("vehicle", tmp)
    frames = make_frames(dbc, args.replay_frames, BASE_S)
    log = tmp / "vehicle.log"
    write_candump(frames, log)
    n = len(frames)
    del frames
    print(
        f"daq-agent run of a replayed candump log: {n:,} frames of {dbc.name}, realtime: false, "
        "local target (its server in its own process); whole processes",
        flush=True,
    )
    rounds = Rounds(["agent"] + ([] if python is None else ["conventional"]))
    for index in range(args.replay_rounds):
        for name in rounds.order(index):
            run_name = f"replay-{name}-{index}"
            if name == "agent":
                out = run_replay(tmp, dbc, log, run_name)
                rate = out["stored"] / out["seconds"]
                print(
                    f"  agent: exit {out['exit']}, {out['stored']:,} of {n:,} frames stored in "
                    f"{out['seconds']:.1f} s = {rate:,.0f} frames/s end to end; {out['ring']}",
                    flush=True,
                )
                if out["stored"] != n:
                    print("  NOT every frame stored; the agent's summary:", flush=True)
                    for line in out["summary"][-12:]:
                        print(f"    {line}")
                    if out["exit"]:
                        print(textwrap.indent(out["stderr"], "    "))
                rounds.add(name, rate)
            else:
                assert python is not None
                db = tmp / "replay-conventional.sqlite"
                with Server(db) as server:
                    timed, whole = run_conventional(python, server, dbc, log, run_name)
                    stored = stored_samples(db, run_name)
                print(
                    f"  conventional: {stored:,} of {n:,} stored in {whole:.1f} s (process), "
                    f"{timed:.1f} s after set-up = {stored / whole:,.0f} frames/s end to end",
                    flush=True,
                )
                rounds.add(name, stored / whole)
    if python is not None:
        print(f"  ratio (medians, whole processes): {rounds.ratio('agent', 'conventional'):.1f}x")


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dbc", default="bench,vehicle", help="comma-separated: bench, vehicle")
    parser.add_argument("--frames", type=int, default=60_000, help="frames per side and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sift-venv", type=Path, default=DEFAULT_SIFT_VENV)
    parser.add_argument("--skip-conventional", action="store_true")
    parser.add_argument("--no-spool-side", action="store_true", help="skip the spool-off side")
    parser.add_argument(
        "--journal",
        choices=("blf", "asc", "log"),
        default=None,
        help="add a side with the bus's raw-frame journal on, in this format",
    )
    parser.add_argument("--replay-frames", type=int, default=300_000)
    parser.add_argument("--replay-rounds", type=int, default=1)
    parser.add_argument("--skip-replay", action="store_true")
    parser.add_argument("--skip-memory", action="store_true", help="only the replay part")
    args = parser.parse_args(argv)

    python = None if args.skip_conventional else ensure_sift_venv(args.sift_venv)
    results = []
    with tempfile.TemporaryDirectory(prefix="daq-bench-can-") as tmp_name:
        tmp = Path(tmp_name)
        if not args.skip_memory:
            for name in args.dbc.split(","):
                results.append(in_memory(args, python, tmp, resolve_dbc(name, tmp)))
        if not args.skip_replay:
            replay(args, python, tmp)
    for result in results:
        rounds: Rounds = result["rounds"]
        print(f"{result['dbc']}: medians of {args.rounds} rounds, frames/s stored")
        for name in rounds.names:
            print(f"  {name:<13} {rounds.median(name):>9,.0f}  (rounds {rounds.spread(name)})")
        if "no spool" in rounds.names:
            cost = 1 - rounds.ratio("agent", "no spool")
            print(f"  spool cost    {cost:.1%} of the throughput")
        if "journal" in rounds.names:
            cost = 1 - rounds.ratio("journal", "agent")
            verdict = "within" if cost <= 0.15 else "OVER"
            print(
                f"  journal cost  {cost:.1%} of the throughput ({args.journal}; journal/agent "
                f"{rounds.ratio('journal', 'agent'):.3f}; {verdict} the 15 % target)"
            )
            cpu_rounds: Rounds = result["cpu"]
            agent_cpu, journal_cpu = cpu_rounds.median("agent"), cpu_rounds.median("journal")
            print(
                f"  CPU per frame agent {agent_cpu:.1f} µs, with the journal {journal_cpu:.1f} µs "
                f"(+{journal_cpu - agent_cpu:.1f} µs, {journal_cpu / agent_cpu - 1:+.1%}; "
                "medians, every thread of the process)"
            )
            thread: Rounds = result["thread"]
            print(
                f"  the journal thread alone: {thread.median('journal'):.1f} µs CPU per frame "
                f"(median; rounds {min(thread.values['journal']):.1f}-"
                f"{max(thread.values['journal']):.1f})"
            )
        if "conventional" in rounds.names:
            print(f"  ratio         {rounds.ratio('agent', 'conventional'):.1f}x (target >= 20x)")
        verdict = "meets" if rounds.median("agent") >= 100_000 else "misses"
        print(f"  agent {verdict} the 100,000 frames/s target")
    print(machine())
    return 0


if __name__ == "__main__":
    sys.exit(main())
