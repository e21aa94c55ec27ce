"""The soak benchmark's short version (``benchmarks/soak.py``): a minute of steady traffic with
server restarts and SIGHUPs; nothing lost or duplicated, descriptors and threads flat.

The 60-minute figures (RSS growth per hour among them) come from running the benchmark by hand;
a minute is too short to judge memory growth, so only the exit code and the flat counts are
checked here."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_a_one_minute_soak_loses_nothing(tmp_path: Path) -> None:
    samples = tmp_path / "samples.csv"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "soak.py"),
            "--minutes",
            "1",
            "--rate",
            "2000",
            "--restart-every",
            "20",
            "--hup-every",
            "25",
            "--sample-every",
            "2",
            "--samples-csv",
            str(samples),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    restarts = re.search(r"server restarted (\d+) times, (\d+) SIGHUPs; agent exit 0", out)
    assert restarts is not None, out
    assert int(restarts.group(1)) >= 2, out
    assert int(restarts.group(2)) >= 2, out
    stored = re.search(
        r"stored ([\d,]+); lost ([\d,]+) \(dropped by the kernel before the agent read them: "
        r"([\d,]+) from the bus socket's queue, ([\d,]+) from the input backlog; by the agent 0"
        r"(, at most [\d,]+)?\), duplicated 0, unexpected 0",
        out,
    )
    assert stored is not None, out
    assert int(stored.group(1).replace(",", "")) >= 60 * 2000 * 0.9, out
    with samples.open() as f:
        rows = [row for row in csv.DictReader(f) if float(row["seconds"]) >= 12]
    assert len(rows) >= 10
    fds = [int(r["fds"]) for r in rows]
    threads = [int(r["threads"]) for r in rows]
    # a restart or reload may hold a connection or a reader thread briefly, never a growing set
    assert max(fds) - min(fds) <= 6, fds
    assert max(threads) - min(threads) <= 4, threads
