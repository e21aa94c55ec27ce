"""``daq-agent monitor`` in a real terminal: a detached tmux session of a fixed size, traffic
driven on a bus, in a log or through a running agent, the pane captured until the values show;
the filter typed, q pressed, and the exit status read."""

from __future__ import annotations

import random
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import can
import pytest
from monitor_support import (
    PACK,
    TEMPS,
    Sender,
    TmuxSession,
    needs_tmux,
    rows_with,
    shows_expected,
    wait_until,
    write_dbc,
)

pytestmark = [pytest.mark.integration, needs_tmux]


@pytest.fixture
def tmux() -> Iterator[TmuxSession]:
    session = TmuxSession()
    try:
        yield session
    finally:
        session.kill()


def monitor_command(exit_file: Path, *args: str) -> str:
    """The shell line running the monitor and writing its exit status to ``exit_file``."""
    line = shlex.join([sys.executable, "-m", "daq_agent.cli", "monitor", *args])
    return f"{line}; echo $? > {shlex.quote(str(exit_file))}"


def udp_bus() -> dict[str, object]:
    """A udp_multicast bus of the test's own (group and port)."""
    rng = random.Random()
    return {
        "interface": "udp_multicast",
        "channel": f"239.74.{rng.randrange(1, 250)}.{rng.randrange(1, 250)}",
        "port": rng.randrange(20000, 40000),
    }


def quit_and_check(tmux: TmuxSession, exit_file: Path) -> None:
    """Press q; the monitor ends with status 0."""
    tmux.send("q")
    wait_until(exit_file.exists, 15, "the monitor to exit after q")
    wait_until(lambda: exit_file.read_text().strip() != "", 5, "the exit status")
    assert exit_file.read_text().strip() == "0", tmux.capture()


def test_monitor_reads_a_bus_filters_and_quits(tmp_path: Path, tmux: TmuxSession) -> None:
    """On a live bus the monitor shows each signal's value, unit and enum label (a signed table's
    -1 as -1 Reverse) with a rate; / and text hide the other rows; p pauses; q exits 0."""
    dbc = write_dbc(tmp_path)
    bus = udp_bus()
    exit_file = tmp_path / "exit"
    with Sender(bus):
        tmux.start(
            monitor_command(
                exit_file,
                "--interface",
                "udp_multicast",
                "--channel",
                str(bus["channel"]),
                "--bus-option",
                f"port={bus['port']}",
                "--dbc",
                str(dbc),
                "--refresh",
                "0.2",
            )
        )
        pane = tmux.wait_for(shows_expected, 30, "the decoded values")
        assert rows_with(pane, "can0 (udp", "running") or rows_with(pane, "can0 (can)", "running")
        assert rows_with(pane, "pipeline", "direct")
        # the rate settles near 20 frames/s per flow (one of each every 50 ms)
        tmux.wait_for(
            lambda p: any(
                re.search(r"\b(1\d|2\d)\.\d\d\b", line)
                for line in rows_with(p, "PackVoltage", "35.17")
            ),
            15,
            "a rate of 10-29/s on the PackVoltage row",
        )
        tmux.send("/")
        # the keys go to the filter once it has the focus (the title says so)
        tmux.wait_for(lambda p: "filter: _ (Enter: done)" in p, 10, "the filter to be focused")
        tmux.send("Coolant", literal=True)
        pane = tmux.wait_for(
            lambda p: "CoolantTemp" in p and "PackVoltage" not in p,
            10,
            "the filter to hide every row but CoolantTemp",
        )
        assert "Gear" not in pane
        assert "1/4 signals" in pane
        tmux.send("Enter")
        tmux.wait_for(
            lambda p: "filter: Coolant" in p and "(Enter: done)" not in p,
            10,
            "the table to have the focus again",
        )
        tmux.send("p")
        tmux.wait_for(lambda p: "PAUSED" in p, 10, "PAUSED in the title")
        quit_and_check(tmux, exit_file)


def test_monitor_plays_a_log(tmp_path: Path, tmux: TmuxSession) -> None:
    """A BLF log played as fast as possible: the last values stay on screen and the source shows
    as ended, every frame counted."""
    dbc = write_dbc(tmp_path)
    log = tmp_path / "run.blf"
    with can.BLFWriter(log) as writer:
        for i in range(50):
            for message in (PACK, TEMPS):
                frame = can.Message(
                    arbitration_id=message.arbitration_id,
                    data=message.data,
                    is_extended_id=False,
                    timestamp=1_700_000_000.0 + i * 0.01,
                    channel=0,
                )
                writer.on_message_received(frame)
    exit_file = tmp_path / "exit"
    tmux.start(monitor_command(exit_file, "--log", str(log), "--dbc", str(dbc), "--fast"))
    pane = tmux.wait_for(
        lambda p: shows_expected(p) and bool(rows_with(p, "ended", "received 100")),
        30,
        "the log's values and its source ended with 100 frames",
    )
    assert rows_with(pane, "decoded 100", "unknown 0", "errors 0")
    quit_and_check(tmux, exit_file)


def test_monitor_attaches_to_a_running_agent(tmp_path: Path, tmux: TmuxSession) -> None:
    """``run --metrics-port 0`` logs its port; ``monitor --agent URL`` shows the agent's latest
    values (from /status.json) and the health of its source, ring, spool and stream; when the
    agent ends, its last values stay and the title says it cannot be reached."""
    dbc = write_dbc(tmp_path)
    bus = udp_bus()
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"asset: mon\nstate_dir: {tmp_path / 'state'}\nbuses:\n"
        f"  - name: can0\n    interface: udp_multicast\n    channel: {bus['channel']}\n"
        f"    options: {{port: {bus['port']}}}\n    databases: [{dbc}]\n"
    )
    log_file = tmp_path / "agent.log"
    with log_file.open("w") as err:
        agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "daq_agent.cli",
                "run",
                "--no-live",
                str(config),
                "--metrics-port",
                "0",
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        found: list[str] = []

        def port_logged() -> bool:
            assert agent.poll() is None, log_file.read_text()
            found[:] = re.findall(
                r"metrics on (http://127\.0\.0\.1:\d+)/metrics", log_file.read_text()
            )
            return bool(found)

        wait_until(port_logged, 60, "the agent to log its metrics address")
        exit_file = tmp_path / "exit"
        with Sender(bus):
            tmux.start(monitor_command(exit_file, "--agent", found[0], "--refresh", "0.2"))
            pane = tmux.wait_for(
                lambda p: (
                    shows_expected(p)
                    and bool(rows_with(p, "ring", "ok", "depth"))
                    and bool(rows_with(p, "stream", "delivered"))
                ),
                40,
                "the agent's values and its ring and stream health",
            )
            assert rows_with(pane, "can0 (can)", "running")
            assert rows_with(pane, "spool", "segments")
            assert f"agent {found[0]}" in pane
        # the agent ends: the monitor keeps its last values and says it cannot reach it
        agent.send_signal(signal.SIGTERM)
        agent.wait(60)
        tmux.wait_for(
            lambda p: "cannot reach the agent" in p and shows_expected(p),
            15,
            "the monitor to say the agent is gone, its last values kept",
        )
        quit_and_check(tmux, exit_file)
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(60)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(10)
    assert agent.returncode == 0, log_file.read_text()
