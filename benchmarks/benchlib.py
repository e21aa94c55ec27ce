"""Helpers shared by the benchmarks: the server process, the store, /proc readings, rounds.

Everything here reads real things: ``daq-agent serve`` in its own process, its SQLite store (read
only, beside the running server), and the kernel's figures for a process (``/proc/<pid>/stat``,
``/proc/<pid>/status``, ``/proc/net/udp``).
"""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH_DBC = REPO / "dbc" / "bench.dbc"
CLK_TCK = os.sysconf("SC_CLK_TCK")

__all__ = [
    "BENCH_DBC",
    "REPO",
    "Rounds",
    "Server",
    "cpu_seconds",
    "free_port",
    "machine",
    "make_frames",
    "resolve_dbc",
    "rss_mb",
    "socket_inodes",
    "stored_samples",
    "udp_drops",
    "wait_for",
    "write_candump",
]


# -- the server -------------------------------------------------------------------------------


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """``daq-agent serve`` in its own process (its log drained in a thread).

    Args:
        db: the SQLite store.
        port: the port (0: any free one, read from its log).
        api_key: the key it requires (sift_stream needs a non-empty one).
    """

    db: Path
    port: int = 0
    api_key: str = "bench-key"
    process: subprocess.Popen[str] | None = field(default=None, init=False)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def uri(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Server:
        command = [sys.executable, "-m", "daq_agent.cli", "serve", "--db", str(self.db)]
        command += ["--port", str(self.port), "--api-key", self.api_key]
        self.process = process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        assert process.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            match = re.search(r"listening on [\w.\[\]:]*:(\d+)", line)
            if match:
                self.port = int(match.group(1))
                threading.Thread(
                    target=_drain, args=(process.stderr,), name="bench-server-log", daemon=True
                ).start()
                return self
            if not line and process.poll() is not None:
                break
        process.kill()
        raise SystemExit(f"the local server did not start (exit {process.poll()})")

    def kill(self) -> None:
        """SIGKILL (an outage), and reap it."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        """SIGTERM, and wait."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _drain(stream: Any) -> None:
    for _ in stream:
        pass


def stored_samples(db: Path, run_name: str | None = None) -> int:
    """Samples in the store (of the runs named ``run_name``), read only beside the server."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        if run_name is None:
            row = conn.execute("SELECT count(*) FROM samples").fetchone()
        else:
            row = conn.execute(
                "SELECT count(*) FROM samples WHERE run IN (SELECT id FROM runs WHERE name = ?)",
                (run_name,),
            ).fetchone()
    return int(row[0])


# -- frames ------------------------------------------------------------------------------------


def resolve_dbc(name: str, tmp: Path) -> Path:
    """``bench`` (dbc/bench.dbc), ``vehicle`` (generated into ``tmp``, fixed seed) or a path."""
    if name == "bench":
        return BENCH_DBC
    if name == "vehicle":
        from vehicle_dbc import write_vehicle_dbc

        return write_vehicle_dbc(tmp / "vehicle.dbc")
    return Path(name)


def make_frames(dbc: Path, count: int, base_s: float, seed: int = 1) -> list[Any]:
    """``count`` frames of ``dbc`` from the agent's simulator, in schedule order, stamped from
    ``base_s`` (so a flow's timestamps are unique)."""
    from daq_agent.decode.dbc import load_database
    from daq_agent.sim.can import CanSimulator

    simulator = CanSimulator([load_database(dbc)], seed=seed)
    frames = []
    for _plan, msg in simulator.frames(count=count):
        msg.timestamp = base_s + msg.timestamp
        frames.append(msg)
    return frames


def write_candump(frames: Sequence[Any], path: Path, channel: str = "can0") -> None:
    """Frames as a candump ``-l`` log (``(ts) can0 ID#DATA``, CAN FD ``ID##<flags>DATA``)."""
    with path.open("w") as out:
        for msg in frames:
            ident = msg.arbitration_id
            text = f"{ident:08X}" if msg.is_extended_id else f"{ident:03X}"
            data = bytes(msg.data).hex().upper()
            sep = f"##{1 if msg.bitrate_switch else 0}" if msg.is_fd else "#"
            out.write(f"({msg.timestamp:.6f}) {channel} {text}{sep}{data}\n")


# -- /proc -------------------------------------------------------------------------------------


def cpu_seconds(pid: int | str = "self") -> float:
    """utime + stime of a process (every thread), seconds, from ``/proc/<pid>/stat``."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def rss_mb(pid: int | str = "self") -> float:
    """Resident set size, MB, from ``/proc/<pid>/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def socket_inodes(pid: int | str = "self") -> set[int]:
    """The inodes of the sockets a process has open (``/proc/<pid>/fd`` → ``socket:[N]``)."""
    out = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for entry in fd_dir.iterdir():
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def udp_drops(pid: int | str = "self") -> dict[int, tuple[int, int]]:
    """The UDP sockets of a process: inode → (local port, kernel drop counter).

    From ``/proc/net/udp`` and ``/proc/net/udp6`` (the last column, ``drops``: datagrams the
    kernel discarded because the socket's receive queue was full), matched by inode.
    """
    inodes = socket_inodes(pid)
    out: dict[int, tuple[int, int]] = {}
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            inode = int(cols[9])
            if inode in inodes:
                port = int(cols[1].rsplit(":", 1)[1], 16)
                out[inode] = (port, int(cols[-1]))
    return out


# -- rounds ------------------------------------------------------------------------------------


class Rounds:
    """Interleaved rounds of named sides: the order alternates each round (the machine's speed
    drifts), and the medians and their ratio come from the same run."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.values: dict[str, list[float]] = {name: [] for name in names}

    def order(self, index: int) -> Iterator[str]:
        yield from (self.names if index % 2 == 0 else reversed(self.names))

    def add(self, name: str, value: float) -> None:
        self.values[name].append(value)

    def median(self, name: str) -> float:
        return statistics.median(self.values[name])

    def ratio(self, a: str, b: str) -> float:
        return self.median(a) / self.median(b)

    def spread(self, name: str) -> str:
        values = self.values[name]
        return f"{min(values):,.0f}-{max(values):,.0f}"


def wait_for(condition: Callable[[], bool], timeout: float, what: str, step: float = 0.01) -> None:
    """Poll ``condition`` until true; SystemExit naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


def machine() -> str:
    """The CPU count and load average, for the record."""
    load = os.getloadavg()
    return f"{os.cpu_count()} cpus, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
