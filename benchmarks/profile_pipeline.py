"""Profile one in-process agent run (can_pipeline's agent side) with yappi: CPU per stage per frame.

The agent (spool on, Sift target at ``daq-agent serve`` in its own process) moves ``--frames``
frames of the database from memory to the server once, under yappi with the CPU clock, every
thread profiled (reader, flusher, sender, the sift_stream loop, the spool's sync thread). Each
function's own time (``tsub``, plus that of the C functions it called) is put in a stage by its
module and name,
and the stages are printed in µs of CPU per frame, with the thread that spent it. Profiling
slows Python functions down (roughly 1.5-2x), so the figures are relative; ``stages.py`` gives
them unprofiled.

yappi is not a dependency of the project: install it anywhere and put it on the path, e.g.
``pip install --target /tmp/bench-tools yappi`` and ``PYTHONPATH=$PWD:/tmp/bench-tools``.

Usage::

    .venv/bin/python benchmarks/profile_pipeline.py [--dbc vehicle] [--frames 60000] [--top 25]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchlib import Server, machine, make_frames, resolve_dbc
from can_pipeline import BASE_S, run_agent_round

# (stage, test on "module:function") in order: the first match wins
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("read (frames in memory)", ("can_pipeline", "readers/base.py", "readers/can.py:_read")),
    ("read: processor", ("readers/can.py", "core/clock.py", "seconds_to_ns")),
    ("decode", ("<daq_agent.decode", "can_decoder", "decode/")),
    ("ring", ("ring_buffer",)),
    ("pack", ("batch.py:pack_batch", "Packer.pack")),
    ("spool append", ("spool.py:append", "spool.py:_write_all", "encode_record", "posix.write")),
    ("spool sync", ("spool.py:sync", "_sync_loop", "posix.fsync")),
    ("spool read", ("spool.py:read", "_from_cache", "spool.py:_parse", "posix.pread")),
    ("unpack", ("batch.py", "msgpack")),
    (
        "request build",
        (
            "sift_stream.py:<listcomp>",
            "RequestBuilder",
            "Py.double",
            "Py.float",
            "Py.enum",
            "Py.int",
            "Py.uint",
            "Py.bool",
            "TimeValuePy",
            "IngestWithConfigDataStreamRequestPy",
        ),
    ),
    (
        "send_requests",
        (
            "sift_stream.py:send",
            "send_requests",
            "sift_stream.py:call",
            "asyncio",
            "concurrent/futures",
            "selectors",
        ),
    ),
    ("finish / window", ("sift_stream.py", "sinks/sift.py", "grpc")),
    ("flusher bookkeeping", ("flusher.py", "status.py")),
    ("threading / waits", ("threading.py", "time.sleep", "Condition", "Event", "lock")),
]


def stage_of(key: str) -> str:
    for stage, needles in STAGES:
        if any(needle in key for needle in needles):
            return stage
    return "other"


def _builtin(stat: Any) -> bool:
    return bool(stat.builtin) or stat.module in ("builtins", "")


def attributed(stats: Any) -> list[tuple[Any, str, float]]:
    """(function, stage, own seconds plus the own seconds of the C functions it called).

    A C function (``len``, a msgpack or sift_stream call) has no module of ours: its time goes to
    the stage of the Python function that called it.
    """
    out = []
    for stat in stats:
        if _builtin(stat):
            continue
        spent = stat.tsub + sum(child.tsub for child in stat.children if _builtin(child))
        out.append((stat, stage_of(f"{stat.module}:{stat.name}"), spent))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dbc", default="vehicle", help="bench, vehicle (generated) or a file")
    parser.add_argument("--frames", type=int, default=60_000)
    parser.add_argument("--top", type=int, default=25, help="functions to list")
    args = parser.parse_args(argv)
    try:
        import yappi
    except ImportError:
        raise SystemExit("yappi is not installed (see the docstring)") from None

    with tempfile.TemporaryDirectory(prefix="daq-bench-profile-") as tmp_name:
        tmp = Path(tmp_name)
        dbc = resolve_dbc(args.dbc, tmp)
        frames = make_frames(dbc, args.frames, BASE_S)
        with Server(tmp / "store.sqlite") as server:
            run_agent_round(server, tmp, dbc, frames[:2000], "warm", spool=True)
            yappi.set_clock_type("cpu")
            yappi.start(builtins=True, profile_threads=True)
            seconds = run_agent_round(server, tmp, dbc, frames, "profiled", spool=True)
            yappi.stop()
    n = len(frames)
    names = {t.id: t.name for t in yappi.get_thread_stats()}
    per_stage: dict[str, float] = defaultdict(float)
    per_thread: dict[tuple[str, str], float] = defaultdict(float)
    rows = []
    for thread in yappi.get_thread_stats():
        thread_name = names.get(thread.id, str(thread.id))
        for stat, stage_, spent in attributed(yappi.get_func_stats(filter={"ctx_id": thread.id})):
            # the main thread builds the agent (loads the DBC, compiles) and waits: not per frame
            stage = "set-up, waiting (main)" if thread_name == "_MainThread" else stage_
            per_stage[stage] += spent
            per_thread[(stage, thread_name)] += spent
            rows.append((spent, f"{stat.module}:{stat.name}", stat.ncall))
    total = sum(v for k, v in per_stage.items() if k != "set-up, waiting (main)")
    print(
        f"{dbc.name}: {n:,} frames in {seconds:.2f} s under yappi ({n / seconds:,.0f} frames/s "
        f"profiled); CPU {total:.2f} s in the agent's threads = {total / n * 1e6:.1f} µs/frame"
    )
    print(f"{'stage':<26} {'µs/frame':>9}  threads")
    for stage, spent in sorted(per_stage.items(), key=lambda kv: -kv[1]):
        threads = sorted(
            ((t, s) for (st, t), s in per_thread.items() if st == stage), key=lambda kv: -kv[1]
        )
        where = ", ".join(f"{t} {s / n * 1e6:.1f}" for t, s in threads[:3] if s / n * 1e6 >= 0.05)
        print(f"{stage:<26} {spent / n * 1e6:>9.2f}  {where}")
    print(f"\ntop {args.top} functions by own CPU time (µs/frame, calls, stage):")
    for tsub, key, ncall in sorted(rows, reverse=True)[: args.top]:
        print(f"  {tsub / n * 1e6:>7.2f}  {ncall:>9,}  {stage_of(key):<14.14} {key[-80:]}")
    print(machine(), f"threads {threading.active_count()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
