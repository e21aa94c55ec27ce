"""Shared pieces of the monitor tests: a small DBC with enums (one signed), its frames, a
sender thread, and a tmux session of a fixed size on a socket of its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import can
import pytest

DBC = """VERSION ""

NS_ :

BS_:

BU_: ECU

BO_ 256 Pack: 8 ECU
 SG_ PackVoltage : 0|16@1+ (0.01,0) [0|655.35] "V" ECU
 SG_ ContactorState : 16|3@1+ (1,0) [0|4] "" ECU
 SG_ Gear : 24|8@1- (1,0) [-1|3] "" ECU

BO_ 512 Temps: 8 ECU
 SG_ CoolantTemp : 0|8@1+ (1,-40) [-40|215] "degC" ECU

VAL_ 256 ContactorState 2 "Closed" 1 "Precharge" 0 "Open" ;
VAL_ 256 Gear -1 "Reverse" 0 "Neutral" 1 "Drive" ;
"""

PACK = can.Message(
    arbitration_id=0x100,
    data=(3517).to_bytes(2, "little") + bytes([2, 0xFF, 0, 0, 0, 0]),  # 35.17 V, Closed, -1
    is_extended_id=False,
)
TEMPS = can.Message(
    arbitration_id=0x200, data=bytes([40 + 87, 0, 0, 0, 0, 0, 0, 0]), is_extended_id=False
)  # 87 degC
EXPECTED = ("PackVoltage", "35.17", "V", "ContactorState", "Closed", "Reverse", "CoolantTemp")

TMUX = shutil.which("tmux")
needs_tmux = pytest.mark.skipif(TMUX is None, reason="tmux is not installed")


def write_dbc(directory: Path) -> Path:
    """The test DBC in ``directory``."""
    path = directory / "monitor.dbc"
    path.write_text(DBC)
    return path


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class Sender:
    """Sends PACK and TEMPS on a bus every ``period`` seconds on a named thread, until stopped."""

    def __init__(self, bus_kwargs: dict[str, Any], period: float = 0.05) -> None:
        self._bus = can.Bus(**bus_kwargs)
        self._period = period
        self._stop = threading.Event()
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name="test-monitor-sender")

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            for message in (PACK, TEMPS):
                self._bus.send(message)
                self.sent += 1

    def __enter__(self) -> Sender:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self._bus.shutdown()


class TmuxSession:
    """One detached tmux session of a fixed size on its own server (``tmux -L``)."""

    def __init__(self, width: int = 170, height: int = 45) -> None:
        assert TMUX is not None
        self.socket = f"daq-monitor-{uuid.uuid4().hex[:10]}"
        self.width = width
        self.height = height
        self.started = False

    def tmux(self, *args: str) -> str:
        assert TMUX is not None
        result = subprocess.run(
            [TMUX, "-L", self.socket, "-f", "/dev/null", *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return result.stdout

    def start(self, command: str) -> None:
        """Run ``command`` (a shell line) in a new session."""
        # the size, also for programs that believe COLUMNS and LINES (shutil, so Textual) when
        # the server's environment carries stale ones
        env = ["-e", f"PYTHONPATH={os.environ.get('PYTHONPATH', '')}"]
        env += ["-e", f"COLUMNS={self.width}", "-e", f"LINES={self.height}"]
        self.tmux(
            "new-session",
            "-d",
            "-s",
            "mon",
            "-x",
            str(self.width),
            "-y",
            str(self.height),
            *env,
            command,
        )
        self.started = True
        self.tmux("set-option", "-t", "mon", "remain-on-exit", "on")

    def capture(self) -> str:
        """The visible pane as text."""
        return self.tmux("capture-pane", "-p", "-t", "mon")

    def send(self, *keys: str, literal: bool = False) -> None:
        """Type ``keys`` (tmux key names, or text with ``literal``)."""
        self.tmux("send-keys", "-t", "mon", *(["-l"] if literal else []), *keys)

    def wait_for(self, predicate: Callable[[str], bool], timeout: float, what: str) -> str:
        """Capture until ``predicate(pane)`` holds; fail with the last pane after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            pane = self.capture()
            if predicate(pane):
                return pane
            if time.monotonic() >= deadline:
                pytest.fail(f"timed out after {timeout} s waiting for {what}; pane:\n{pane}")
            time.sleep(0.1)

    def kill(self) -> None:
        """Kill the server (and the session's processes)."""
        if self.started:
            try:
                self.tmux("kill-server")
            except subprocess.CalledProcessError:
                pass  # already gone


def rows_with(pane: str, *words: str) -> list[str]:
    """The lines of ``pane`` holding every one of ``words``."""
    return [line for line in pane.splitlines() if all(w in line for w in words)]


def shows_expected(pane: str) -> bool:
    """True when the pane shows the test's values, units and labels on their rows."""
    return (
        bool(rows_with(pane, "PackVoltage", "35.17", " V "))
        and bool(rows_with(pane, "ContactorState", " 2 ", "Closed"))
        and bool(rows_with(pane, "Gear", "-1", "Reverse"))
        and bool(rows_with(pane, "CoolantTemp", "87", "degC"))
        and "4294967295" not in pane
    )
