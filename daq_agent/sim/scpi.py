"""A line-query instrument simulated on a pseudo-terminal, answering the queries of a query file.

:class:`ScpiSimulator` opens a pty (``os.openpty``, raw mode, like a USB-serial instrument), and
a thread named ``daq-sim-scpi`` reads the queries written to its device side
(:attr:`ScpiSimulator.path`). Each query of the query file
(:mod:`daq_agent.readers.scpi`) is answered with its reply frame, encoded by the serial frame
language's own codec with values that follow waveforms inside the fields' ``min``/``max``
(:class:`daq_agent.sim.serial.SerialSimulator`'s). An unknown query gets ``-113,"Undefined
header"`` (SCPI's error text), which does not decode.

For tests it can answer one query late (:meth:`~ScpiSimulator.set_delay`) or not at all
(:meth:`~ScpiSimulator.set_silent`); :attr:`~ScpiSimulator.queries` counts the queries received.

``daq-agent simulate scpi --queries FILE`` runs one until stopped and prints the pty's path.
"""

from __future__ import annotations

import argparse
import heapq
import os
import select
import sys
import threading
import time
import tty
from collections import Counter
from pathlib import Path
from typing import Final

from daq_agent.core.signals import stop_on_signals
from daq_agent.readers.scpi import QueryFile, load_query_file
from daq_agent.sim.serial import SerialSimulator, pty_link

__all__ = ["ScpiSimulator", "run"]

_UNKNOWN_REPLY: Final = b'-113,"Undefined header"'


class ScpiSimulator:
    """Answers the queries of a query file on a pty.

    Args:
        queries: the query file (or its path).
        seed: the waveforms' random seed.
    """

    def __init__(self, queries: QueryFile | str | Path, *, seed: int = 0) -> None:
        if not isinstance(queries, QueryFile):
            queries = load_query_file(queries)
        self.file = queries
        self._answers = {}
        for query in queries.queries:
            sim = SerialSimulator(query.defs, seed=seed)
            self._answers[query.text.encode(query.defs.text_encoding)] = sim
        self._pinned: dict[str, dict[str, float | int | str]] = {}
        self._delays: dict[str, float] = {}
        self._silent: set[str] = set()
        self._lock = threading.Lock()
        self.queries: Counter[str] = Counter()
        """Queries received, by text."""
        self._master = -1
        self._slave = -1
        self.path = ""
        """The device side of the pty (open it with pyserial)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.monotonic()

    def set_delay(self, query: str, seconds: float) -> None:
        """Answer ``query`` ``seconds`` late (0: on time)."""
        with self._lock:
            self._delays[query] = seconds

    def set_silent(self, query: str, silent: bool = True) -> None:
        """Never answer ``query`` (or answer again)."""
        with self._lock:
            (self._silent.add if silent else self._silent.discard)(query)

    def set_values(self, query: str, values: dict[str, float | int | str] | None) -> None:
        """Answer ``query`` with these channel values (None: the waveforms again)."""
        with self._lock:
            if values is None:
                self._pinned.pop(query, None)
            else:
                self._pinned[query] = dict(values)

    def start(self) -> None:
        """Open the pty and start answering."""
        if self._thread is not None:
            return
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        self.path = os.ttyname(self._slave)
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="daq-sim-scpi", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop answering, join the thread and close the pty (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for fd in (self._master, self._slave):
            if fd >= 0:
                os.close(fd)
        self._master = self._slave = -1

    def __enter__(self) -> ScpiSimulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _answer(self, line: bytes, index: int) -> tuple[float, bytes] | None:
        """(delay, bytes to write) for one query line, or None for no answer."""
        text = line.decode("ascii", "replace")
        with self._lock:
            self.queries[text] += 1
            if text in self._silent:
                return None
            delay = self._delays.get(text, 0.0)
            pinned = self._pinned.get(text)
        sim = self._answers.get(line)
        if sim is None:
            return delay, _UNKNOWN_REPLY + self.file.terminator
        compiled = sim.frames[0]
        values = sim.values(compiled, time.monotonic() - self._started, index)
        if pinned:
            values.update(pinned)
        return delay, sim.codec.encode(compiled.name, values)

    def _run(self) -> None:
        buffer = b""
        pending: list[tuple[float, int, bytes]] = []
        count = 0
        end = self.file.write_terminator.strip() or self.file.write_terminator
        while not self._stop.is_set():
            wait = 0.05
            if pending:
                wait = max(0.0, min(wait, pending[0][0] - time.monotonic()))
            try:
                ready, _, _ = select.select([self._master], [], [], wait)
                if ready:
                    buffer += os.read(self._master, 4096)
            except OSError:
                return  # the pty was closed
            while end in buffer:
                line, _, buffer = buffer.partition(end)
                line = line.strip()
                if not line:
                    continue
                count += 1
                answer = self._answer(line, count)
                if answer is not None:
                    heapq.heappush(pending, (time.monotonic() + answer[0], count, answer[1]))
            now = time.monotonic()
            while pending and pending[0][0] <= now:
                _, _, data = heapq.heappop(pending)
                try:
                    os.write(self._master, data)
                except OSError:
                    return


def run(args: argparse.Namespace) -> int:
    """Answer until SIGINT/SIGTERM or ``--duration``; prints the pty's path first."""
    sim = ScpiSimulator(args.queries, seed=args.seed)
    stop = threading.Event()
    with stop_on_signals(stop):
        try:
            sim.start()
            with pty_link(args.link, sim.path):
                print(sim.path, flush=True)
                stop.wait(args.duration)
        finally:
            sim.stop()
    print(f"answered {sum(sim.queries.values())} queries", file=sys.stderr)
    return 0
