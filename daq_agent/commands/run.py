"""``daq-agent run CONFIG [--duration S]``: run the agent until stopped.

On a terminal a one-line live status (frames/s in, decoded, unknown, queued, delivered) is
refreshed about twice a second; otherwise the status is logged every ``--log-interval`` seconds.
SIGINT and SIGTERM stop the readers and drain what was read before exiting; a second signal
abandons the drain. When every source is a recorded log, the run ends by itself once they have
ended and everything is delivered. A summary is printed at the end.

SIGHUP (``systemctl reload``) reads the config file again and applies its source changes live
(:meth:`~daq_agent.agent.Agent.reload`): changed sources are restarted, removed ones stopped,
added ones started, new flows registered, nothing buffered is lost. An invalid file, or a change
of anything but the sources (target, asset, run, spool, ring, a flow whose channels changed), is
refused with a log line and the running config keeps running. Under systemd, RELOADING=1 is
sent before and READY=1 after.

SIGUSR1 writes every thread's stack to stderr (the journal, under systemd) and the run goes on:
for a run that seems stuck.

With the spool (the default), what could not be delivered before the exit stays on disk and is
replayed first at the next start; the summary says how much is left in it.

The API is not needed to start: sources open at once and everything read is spooled until the
API accepts it (a server that is down, a network that is not up yet, a key that is refused are
retried in the background, and logged once per change of state).

Exit codes: 0 when everything read was delivered or is safe in the spool; 1 when a source never
opened during the run (named, with its error), when the sender died, when anything was lost (the
ring dropped samples of a live source, samples were abandoned because the API never acknowledged
them and there is no spool, the spool quota dropped some, records were corrupt, or the API refused
samples for good: they are in the dead-letter file), or when the spool failed (a write or fsync
error: the service manager restarts the agent, which recovers what was synced) or is owned by
another agent; 2 for an invalid config (also a source that can never open as configured, e.g. an
unknown python-can interface).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from daq_agent.agent import Agent
from daq_agent.config import load_config
from daq_agent.core.errors import DaqError, SpoolError
from daq_agent.core.memory import Trimmer, limit_arenas
from daq_agent.core.signals import dump_stacks_on, handle_signals
from daq_agent.metrics import MetricsServer, write_summary_json
from daq_agent.pipeline.status import AgentStatus, SourceStats
from daq_agent.readers.base import ReaderState
from daq_agent.status_json import status_route
from daq_agent.systemd import Notifier, Watchdog

__all__ = ["ReloadFlag", "add_subparser", "drive_agent", "exit_code", "stop_signals"]

log = logging.getLogger("daq_agent.run")

EXIT_OK = 0
EXIT_INCOMPLETE = 1
EXIT_CONFIG = 2


def add_subparser(subparsers: Any) -> None:
    """Register ``run``."""
    parser = subparsers.add_parser(
        "run",
        help="run the agent (until stopped, --duration, or the end of every replayed log)",
        description="Read, decode and deliver frames as configured.",
    )
    parser.add_argument("config", type=Path, metavar="CONFIG", help="agent config (YAML)")
    parser.add_argument(
        "--duration", type=float, default=None, metavar="S", help="stop after S seconds"
    )
    parser.add_argument(
        "--log-interval",
        type=float,
        default=10.0,
        metavar="S",
        help="status log period when not on a terminal (10)",
    )
    parser.add_argument(
        "--no-live", action="store_true", help="no live status line even on a terminal"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve /metrics (Prometheus), /healthz and /readyz on PORT (0: any free port)",
    )
    parser.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="the address of --metrics-port (127.0.0.1)",
    )
    parser.add_argument(
        "--summary-json",
        type=Path,
        default=None,
        metavar="FILE",
        help="write the final counters (the summary's numbers) as JSON to FILE",
    )
    parser.set_defaults(func=_do_run)


def never_opened(status: AgentStatus) -> list[SourceStats]:
    """The sources that never opened (since they were last started: a reload that restarted a
    source starts its ``opens`` at 0, so a changed source that never opens is caught too)."""
    return [s for s in status.sources if not s.counters.get("opens")]


class ReloadFlag:
    """Set on SIGHUP (by the signal watcher thread), taken by the run loop."""

    __slots__ = ("_lock", "_requested")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requested = False

    def request(self) -> None:
        """Ask for a reload (several before the next :meth:`take` are one)."""
        with self._lock:
            self._requested = True

    def take(self) -> bool:
        """True (once) if a reload was requested since the last call."""
        with self._lock:
            requested, self._requested = self._requested, False
        return requested


@contextlib.contextmanager
def stop_signals(agent: Agent, reload: ReloadFlag | None = None) -> Iterator[None]:
    """While active, SIGINT/SIGTERM request a drained stop; a second one abandons the drain.
    With ``reload``, SIGHUP sets it (the run loop reloads on the main thread).

    The requests are made on a watcher thread, never inside the handler (see
    :mod:`daq_agent.core.signals`)."""
    count = 0

    def stop(sig: signal.Signals) -> None:
        nonlocal count
        count += 1
        if count > 1:
            log.warning("%s again: abandoning the drain", sig.name)
        agent.request_stop(abandon=count > 1)

    def hangup(_sig: signal.Signals) -> None:
        assert reload is not None
        reload.request()  # the reload itself runs in the run loop, on the main thread

    callbacks: dict[signal.Signals, Callable[[signal.Signals], None]] = {
        signal.SIGINT: stop,
        signal.SIGTERM: stop,
    }
    if reload is not None:
        callbacks[signal.SIGHUP] = hangup
    with handle_signals(callbacks):
        yield


def drive_agent(
    agent: Agent,
    *,
    duration: float | None,
    out: TextIO,
    live: bool,
    log_interval: float = 10.0,
    refresh: float = 0.5,
    before_stop: Callable[[], None] | None = None,
    reload_flag: ReloadFlag | None = None,
    reload: Callable[[], object] | None = None,
) -> AgentStatus:
    """Wait until the agent should stop (duration, signal, finite sources ended), showing status.

    The agent must be started; ``before_stop`` (if given) runs once the wait is over, then the
    agent is stopped (drained) before returning. When ``reload_flag`` is set (SIGHUP),
    ``reload`` runs here, on this thread, within a wait step (at most a second later).

    Returns:
        The final status.
    """
    deadline = None if duration is None else time.monotonic() + duration
    trimmer = Trimmer()  # hands freed native memory back (see daq_agent.core.memory)
    previous: AgentStatus | None = None
    last_log = time.monotonic()
    width = 0
    try:
        while True:
            step = refresh if live else min(refresh * 2, 1.0)
            if deadline is not None:
                step = min(step, max(0.0, deadline - time.monotonic()))
            if agent.wait(step):
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            if reload is not None and reload_flag is not None and reload_flag.take():
                reload()
            trimmer.tick()
            status = agent.status()
            if live:
                text = status.line(previous)
                out.write("\r" + text.ljust(width))
                out.flush()
                width = len(text)
                previous = status
            elif time.monotonic() - last_log >= log_interval:
                log.info("%s", status.line(previous))
                previous = status
                last_log = time.monotonic()
    finally:
        if live and width:
            out.write("\r" + " " * width + "\r")
            out.flush()
        try:
            if before_stop is not None:
                before_stop()
        finally:
            final = agent.stop()
    return final


def _do_run(args: argparse.Namespace) -> int:
    with dump_stacks_on(signal.SIGUSR1):  # stacks of a run that seems stuck
        return _run_agent(args)


def _run_agent(args: argparse.Namespace) -> int:
    limit_arenas()  # before the agent's threads start (see daq_agent.core.memory)
    config = load_config(args.config)
    agent = Agent(config)
    for warning in agent.plan.warnings:
        log.warning("%s", warning)
    live = not args.no_live and sys.stdout.isatty()
    reload_flag = ReloadFlag()
    with stop_signals(agent, reload_flag):
        try:
            agent.start()
        except SpoolError as exc:
            print(f"daq-agent run: cannot use the spool: {exc}", file=sys.stderr)
            return EXIT_INCOMPLETE
        metrics = None
        if args.metrics_port is not None:
            metrics = MetricsServer(
                agent.status,
                ready=lambda: agent.readiness() or True,
                alive=lambda: agent.health() or True,
                host=args.metrics_host,
                port=args.metrics_port,
                json_routes=status_route(agent.status, agent.latest),
            )
            try:
                metrics.start()
            except DaqError as exc:
                agent.stop(drain=False)
                print(f"daq-agent run: {exc}", file=sys.stderr)
                return EXIT_CONFIG
        try:
            code = _acquire(args, agent, live, reload_flag)
        finally:
            if metrics is not None:
                metrics.stop()
        return code


def _acquire(
    args: argparse.Namespace, agent: Agent, live: bool, reload_flag: ReloadFlag | None = None
) -> int:
    """Wait for the sources, run until stopped, report; the exit code."""
    config = agent.config
    for reader in agent.readers:  # so that "started" means the buses are listening
        states = (ReaderState.RUNNING, ReaderState.ENDED, ReaderState.FAILED)
        if not reader.wait_state(*states, timeout=5.0):
            log.warning("source %s is not open yet: %s", reader.name, reader.counters.last_error)
    failed = agent.failed_sources()
    if failed:
        agent.stop(drain=False)
        for reader in failed:
            print(
                f"daq-agent run: {reader.kind} {reader.name}: {reader.counters.last_error}",
                file=sys.stderr,
            )
        return EXIT_CONFIG
    print(
        f"daq-agent: asset {config.asset}, {len(agent.readers)} "
        f"source{'' if len(agent.readers) == 1 else 's'}, "
        f"{len(agent.plan.flows)} flows"
        f", run {agent.run_name or '(none)'} -> {agent.target_uri}",
        flush=True,
    )
    # under systemd (Type=notify): ready once the sources are open or retrying and the
    # sender runs; the watchdog is fed only while the agent is healthy; stopping at the drain
    notifier = Notifier()
    notifier.ready()
    watchdog = Watchdog(notifier, agent.health, lambda: agent.status().line())
    watchdog.start()

    def before_stop() -> None:
        watchdog.stop()
        notifier.stopping()

    def reload() -> None:
        log.info("SIGHUP: reloading %s", args.config)
        notifier.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            agent.reload_file(args.config)
        except DaqError as exc:  # a reload never ends the run: the old config keeps running
            log.error("reload failed, the old config keeps running: %s", exc)
        finally:
            notifier.ready()

    try:
        final = drive_agent(
            agent,
            duration=args.duration,
            out=sys.stdout,
            live=live,
            log_interval=args.log_interval,
            before_stop=before_stop,
            reload_flag=reload_flag,
            reload=reload,
        )
    finally:
        watchdog.stop()
        notifier.close()
    for line in final.summary():
        print(line, flush=True)
    if args.summary_json is not None:
        write_summary_json(args.summary_json, final)  # DaqError names the file
    return exit_code(agent, final)


def exit_code(agent: Agent, final: AgentStatus, err: TextIO | None = None) -> int:
    """The exit code of a run that ended with ``final``; each reason for a non-zero one is
    written to ``err`` (default stderr): a spool that failed, a sender that died, samples lost,
    or a source (not optional) that never opened."""
    err = sys.stderr if err is None else err
    spool_error = agent.spool_error
    if spool_error is not None:
        print(
            f"daq-agent run: the spool failed, exiting so the agent is restarted: {spool_error}",
            file=err,
        )
        return EXIT_INCOMPLETE
    sender_error = agent.flusher.error if agent.flusher is not None else None
    if sender_error is not None:  # what was read is safe in the spool; the service restarts
        print(f"daq-agent run: the sender died: {sender_error}", file=err)
        return EXIT_INCOMPLETE
    lost = final.lost
    if lost:
        print(f"daq-agent run: samples were lost: {lost}", file=err)
    never = never_opened(final)
    optional = agent.config.optional_sources  # as reloaded
    for source in [s for s in never if s.name in optional]:
        log.warning("optional %s %s never opened during the run", source.kind, source.name)
    never = [s for s in never if s.name not in optional]
    for source in never:
        print(
            f"daq-agent run: {source.kind} {source.name} never opened during the run: "
            f"{source.last_error or source.state}",
            file=err,
        )
    return EXIT_OK if not lost and not never and final.balanced else EXIT_INCOMPLETE
