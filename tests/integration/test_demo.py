"""``daq-agent demo`` as a process: simulator subprocess on udp_multicast, agent, store."""

from __future__ import annotations

import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_stores_every_decoded_frame(tmp_path: Path) -> None:
    """The demo runs simulators and agent across processes; every decoded frame is stored."""
    rng = random.Random()
    group = f"239.{rng.randrange(1, 255)}.{rng.randrange(1, 255)}.{rng.randrange(1, 255)}"
    port = rng.randrange(20000, 40000)  # udp_multicast binds the port for every group
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "daq_agent.cli",
            "-q",
            "demo",
            "--duration",
            "3",
            "--rate",
            "2000",
            "--state-dir",
            str(tmp_path / "state"),
            "--channel",
            group,
            "--port",
            str(port),
            "--no-live",
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "OK: every decoded frame was stored" in out
    figures = {
        match.group(1): int(match.group(2))
        for match in re.finditer(
            r"^(frames received|decoded|delivered|stored) +(\d+)$", out, re.MULTILINE
        )
    }
    assert figures["frames received"] > 1000
    assert figures["decoded"] == figures["delivered"] == figures["stored"]
    assert "can0.INV_PhaseCurrentsFD" in out  # the CAN FD message made it through
    assert "can0.GNSS_Position" in out  # and a 29-bit one
    assert re.search(r"^  imu\.imu +\d+$", out, re.MULTILINE)  # the serial IMU beside the bus
    assert "serial imu [stopped]" in out
    # the polled devices beside them, each on its simulator: the meter's groups, the PSU's replies
    assert re.search(r"^  meter\.power +[1-9]\d*$", out, re.MULTILINE), out
    assert re.search(r"^  psu\.output +[1-9]\d*$", out, re.MULTILINE), out
    assert (tmp_path / "state" / "local.sqlite").is_file()
    # its last lines say how to look at what it stored; those commands work as printed
    steps = out[out.index("Look at what was stored:") :].splitlines()[1:]
    runs = next(line for line in steps if " runs --db " in line)
    channels = next(line for line in steps if " channels --db " in line)
    for line in (runs, channels):
        shown = subprocess.run(
            shlex.split(line), capture_output=True, text=True, timeout=60, check=False
        )
        assert shown.returncode == 0, (line, shown.stderr)
        assert "bench-demo" in shown.stdout or "PackVoltage" in shown.stdout, shown.stdout
