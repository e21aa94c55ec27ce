"""``daq-agent replay LOG... --config C [--run NAME]``: backfill recorded logs into a named run.

Each log (a raw-frame journal, or any log python-can reads: BLF, ASC, candump ``.log``, TRC…) is
re-decoded with the databases the config has now, through the agent's own pipeline (replay
reader → decoder → ring → flusher → sink) into the config's target (the local server by
default), as fast as the target takes it, under one run (``--run``; default
``backfill-<hash of the logs>``). Samples keep the log's recorded timestamps, whatever they are.

A log's frames belong to a bus of the config: ``--bus``, else the bus whose name starts the file
name (a journal is ``<bus>-<UTC start>Z.<format>``), else the config's only bus. Flows and the
ingestion config are the same as the live agent's for that config.

Idempotent: a second backfill of the same logs into the same run stores nothing new.

* The run is found again by its client key (derived from the asset and the run name), so a
  second backfill never makes a second run, in the local store or in Sift.
* The local store keys samples by (flow, run, timestamp) and ignores a repeated key, so even a
  re-sent log (``--force``) stores each sample once.
* Sift's API does not promise to drop a repeated point. So each log fully backfilled (every
  frame read, every sample acknowledged, nothing lost) is recorded by the SHA-256 of its content
  in ``<state_dir>/backfill/<run client key>.json``, and a later backfill into the same run skips
  it with a message (``--force`` sends it again). A backfill that was interrupted or lost
  anything records nothing: run it again (against Sift, the part sent before the interruption is
  then sent twice).

No spool is used: the logs themselves are the durable copy. Progress (frames/s, per file the
share read) goes to stderr about once a second (``--no-progress`` silences it).

Exit codes: 0 when every log was backfilled (or skipped), 1 when something was not delivered,
2 for an invalid config or log.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from daq_agent.agent import Agent, SourcePlan, plan_agent, run_client_key
from daq_agent.commands.run import stop_signals
from daq_agent.config import AgentConfig, ReplayConfig, RunConfig, SpoolConfig, load_config
from daq_agent.core.errors import ConfigError
from daq_agent.readers.base import ReaderABC, Sink
from daq_agent.readers.replay import ReplayReader

__all__ = ["BackfillRecord", "add_subparser", "backfill", "file_digest"]

EXIT_OK = 0
EXIT_INCOMPLETE = 1
EXIT_CONFIG = 2


def add_subparser(subparsers: Any) -> None:
    """Register ``replay``."""
    parser = subparsers.add_parser(
        "replay",
        help="re-decode recorded logs into a named run (an idempotent backfill)",
        description="Re-decode recorded CAN logs with the config's databases into a named run.",
    )
    parser.add_argument("logs", nargs="+", type=Path, metavar="LOG", help="recorded logs")
    parser.add_argument("--config", type=Path, required=True, help="agent config (YAML)")
    parser.add_argument("--run", default=None, metavar="NAME", help="the run (default: derived)")
    parser.add_argument("--bus", default=None, help="the bus every log belongs to")
    parser.add_argument(
        "--force", action="store_true", help="send logs already backfilled into this run again"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress lines")
    parser.set_defaults(func=_do_replay)


def file_digest(path: Path) -> str:
    """The SHA-256 of a file's content, hex."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class BackfillRecord:
    """Which logs (by content hash) were fully backfilled into one run: a small JSON file.

    Args:
        path: the file (``<state_dir>/backfill/<run client key>.json``).
        run: the run name (kept in the file for people).
    """

    def __init__(self, path: Path, run: str) -> None:
        self.path = path
        self.run = run
        self.files: dict[str, dict[str, Any]] = {}
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the backfill record {path}: {exc}") from exc
        files = document.get("files") if isinstance(document, dict) else None
        if isinstance(files, dict):
            self.files = {str(k): v for k, v in files.items() if isinstance(v, dict)}

    def done(self, digest: str) -> dict[str, Any] | None:
        """What was recorded for a log with this content hash (None: not backfilled)."""
        return self.files.get(digest)

    def add(self, digest: str, path: Path, frames: int) -> None:
        """Record a log as fully backfilled."""
        self.files[digest] = {
            "path": str(path),
            "frames": frames,
            "completed": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    def save(self) -> None:
        """Write the record atomically (a temporary file renamed over it)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"run": self.run, "files": self.files}, indent=2, sort_keys=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".backfill-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text + "\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _bus_of(path: Path, config: AgentConfig, bus: str | None) -> str:
    names = [b.name for b in config.buses] + [r.bus for r in config.replay]
    if bus is not None:
        if bus not in names:
            raise ConfigError(f"--bus {bus}: no such bus in the config (buses: {names})")
        return bus
    by_prefix = [n for n in names if path.name.startswith(f"{n}-") or path.stem == n]
    if by_prefix:
        return max(by_prefix, key=len)
    unique = sorted(set(names))
    if len(unique) == 1:
        return unique[0]
    raise ConfigError(
        f"{path}: which bus is it? The file name starts with none of {unique}; give --bus"
    )


def _databases(config: AgentConfig, bus: str) -> tuple[Path, ...]:
    for b in config.buses:
        if b.name == bus:
            return b.databases
    for r in config.replay:
        if r.bus == bus:
            return r.databases
    raise ConfigError(f"bus {bus}: no databases in the config")


def backfill(
    logs: Sequence[Path],
    config: AgentConfig,
    *,
    run: str | None = None,
    bus: str | None = None,
    force: bool = False,
    progress: TextIO | None = None,
    out: TextIO | None = None,
    env: dict[str, str] | None = None,
) -> int:
    """Backfill ``logs`` into the run ``run`` of ``config``'s target; the exit code.

    Messages go to ``out`` (default: the current ``sys.stdout``), progress lines to
    ``progress`` (None: none).

    Raises:
        ConfigError: a log is missing or belongs to no bus, or the config has no database for it.
    """
    if out is None:
        out = sys.stdout
    entries: list[tuple[Path, str, str]] = []  # path, bus, digest
    for log_path in logs:
        path = log_path.resolve()
        if not path.is_file():
            raise ConfigError(f"no such log file: {log_path}")
        entries.append((path, _bus_of(path, config, bus), file_digest(path)))
    if run is None:
        joined = "\0".join(sorted(d for _, _, d in entries))
        run = f"backfill-{hashlib.sha256(joined.encode()).hexdigest()[:12]}"
    if not run.strip() or "{" in run:
        raise ConfigError(f"invalid run name {run!r}")
    key = run_client_key(config.asset, run)
    record = BackfillRecord(config.state_dir / "backfill" / f"{key}.json", run)
    todo: list[tuple[Path, str, str]] = []
    for path, bus_name, digest in entries:
        done = record.done(digest)
        if done is not None and not force:
            print(
                f"skipped {path}: already backfilled into run {run} on {done.get('completed')} "
                f"({done.get('frames')} frames; sha256 {digest[:12]}; --force sends it again)",
                file=out,
            )
            continue
        if any(d == digest for _, _, d in todo):
            print(f"skipped {path}: the same content as another log given", file=out)
            continue
        todo.append((path, bus_name, digest))
    if not todo:
        print(f"nothing to backfill into run {run}", file=out)
        return EXIT_OK

    replays = []
    for i, (path, bus_name, _) in enumerate(todo):
        stem = re.sub(r"[^A-Za-z0-9_.\-]", "_", path.stem) or "log"
        replays.append(
            ReplayConfig(
                name=f"backfill{i}-{stem}",
                path=path,
                bus=bus_name,
                realtime=False,
                databases=_databases(config, bus_name),
            )
        )
    description = f"backfill of {len(todo)} log(s) with daq-agent replay"
    backfill_config = dataclasses.replace(
        config,
        buses=(),
        serial=(),
        replay=tuple(replays),
        run=RunConfig(
            name=run.replace("%", "%%"),
            description=config.run.description if config.run else description,
            tags=config.run.tags if config.run else (),
            metadata=dict(config.run.metadata) if config.run else {},
        ),
        spool=SpoolConfig(directory=config.state_dir / "backfill-spool", enabled=False),
    )
    # the same flows and ingestion config as the live agent of this config
    full = plan_agent(config)
    plan = dataclasses.replace(
        plan_agent(backfill_config),
        flows=full.flows,
        client_key=full.client_key,
        fingerprint=full.fingerprint,
    )

    def reader(source: SourcePlan, sink: Sink) -> ReaderABC:
        assert source.decoder is not None
        return ReplayReader(
            source.name,
            source.options["path"],
            source.decoder,
            sink,
            realtime=False,
            time_base="recorded",  # the same timestamps every time: the store keys on them
        )

    agent = Agent(backfill_config, plan=plan, env=env, reader_factory=reader)
    print(
        f"backfilling {len(todo)} log(s) into run {run} of asset {config.asset} -> "
        f"{agent.target_uri}",
        file=out,
        flush=True,
    )
    started = time.monotonic()
    with stop_signals(agent):
        agent.start()
        try:
            _wait(agent, started, progress)
        finally:
            final = agent.stop()
    elapsed = time.monotonic() - started
    readers = [r for r in agent.readers if isinstance(r, ReplayReader)]
    frames = sum(r.position for r in readers)
    for line in final.summary():
        print(line, file=out)
    complete = (
        final.balanced
        and not final.lost
        and final.flusher.pending == 0
        and final.flusher.rejected == 0
        and (agent.flusher is None or agent.flusher.error is None)
    )
    recorded = 0
    for (path, _, digest), r in zip(todo, readers, strict=True):
        if complete and r.ended:
            record.add(digest, path, r.position)
            recorded += 1
        else:
            print(
                f"NOT complete: {path} ({r.state.value}, {r.position} frames read"
                f"{': ' + r.counters.last_error if r.counters.last_error else ''}); "
                "run the backfill again",
                file=out,
            )
    if recorded:
        record.save()
    rate = frames / elapsed if elapsed > 0 else 0.0
    print(
        f"backfill: {frames} frames in {elapsed:.1f} s ({rate:,.0f} frames/s), "
        f"{final.flusher.delivered} samples delivered into run {run}; "
        f"{recorded} of {len(todo)} log(s) recorded as done in {record.path}",
        file=out,
        flush=True,
    )
    return EXIT_OK if recorded == len(todo) else EXIT_INCOMPLETE


def _wait(agent: Agent, started: float, progress: TextIO | None) -> None:
    last_frames = 0
    last_time = started
    while not agent.wait(1.0):
        if progress is None:
            continue
        readers = [r for r in agent.readers if isinstance(r, ReplayReader)]
        now = time.monotonic()
        frames = sum(r.position for r in readers)
        rate = (frames - last_frames) / max(now - last_time, 1e-9)
        last_frames, last_time = frames, now
        parts = []
        for r in readers:
            share = r.fraction_read
            parts.append(f"{r.path.name} {'?' if share is None else f'{share:.0%}'}")
        print(
            f"backfill: {frames:,} frames, {rate:,.0f} frames/s; " + ", ".join(parts),
            file=progress,
            flush=True,
        )


def _do_replay(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    return backfill(
        args.logs,
        config,
        run=args.run,
        bus=args.bus,
        force=args.force,
        progress=None if args.no_progress else sys.stderr,
    )
