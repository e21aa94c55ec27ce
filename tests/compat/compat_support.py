"""Helpers of the Sift-client compatibility tests.

Data a client sent is read back with ``daq-agent export`` (the CLI, as a subprocess) and compared
value by value with what the test says it sent.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

Cell = tuple[int, str, str]
"""(timestamp ns, flow, channel) of one exported value."""


def cli_env() -> dict[str, str]:
    """The environment for a ``daq-agent`` subprocess that runs this checkout's code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def export(
    db: Path, *, run: str | None = None, flows: Iterable[str] | None = None
) -> dict[Cell, str]:
    """``daq-agent export --db DB [--run NAME]`` as a subprocess, parsed: {cell: CSV value}.

    Args:
        db: the server's SQLite file.
        run: only samples of runs with this name.
        flows: keep only these flows (Sift's clients also stream their own metrics).
    """
    command = [sys.executable, "-m", "daq_agent.cli", "export", "--db", str(db)]
    if run is not None:
        command += ["--run", run]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=60, env=cli_env(), check=False
    )
    assert done.returncode == 0, done.stderr
    keep = None if flows is None else set(flows)
    cells: dict[Cell, str] = {}
    for row in csv.DictReader(io.StringIO(done.stdout)):
        if keep is not None and row["flow"] not in keep:
            continue
        cell = (int(row["timestamp_ns"]), row["flow"], row["channel"])
        assert cell not in cells, f"exported twice: {cell}"
        cells[cell] = row["value"]
    return cells
