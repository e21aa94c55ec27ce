"""systemd integration: sd_notify over a real datagram socket standing in for systemd, the
health-gated watchdog, and the shipped unit checked by ``systemd-analyze``."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daq_agent.systemd import Notifier, Watchdog, notify_address, watchdog_interval

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "configs" / "daq-agent.service"
WATCHDOG_USEC = 200_000  # 0.2 s: the watchdog thread pets every 0.1 s
INTERVAL_S = WATCHDOG_USEC / 1_000_000


class NotifySocket:
    """The test's stand-in for systemd: an AF_UNIX datagram socket that collects messages."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)

    def env(self, **extra: str) -> dict[str, str]:
        """An environment naming this socket (plus ``extra``)."""
        return {"NOTIFY_SOCKET": self.path, **extra}

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 5.0) -> str | None:
        """The first datagram (decoded) matching ``predicate`` within ``timeout``, else None."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                message = self.sock.recv(4096).decode()
            except TimeoutError:
                return None
            if predicate(message):
                return message
        return None

    def drain(self) -> list[str]:
        """Everything already queued."""
        self.sock.setblocking(False)
        messages = []
        try:
            while True:
                messages.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)
        return messages


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    """A bound notify socket under a short /tmp path (sun_path holds 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="sdn", dir="/tmp") as directory:
        sock = NotifySocket(os.path.join(directory, "notify"))
        try:
            yield sock
        finally:
            sock.sock.close()


def is_pet(message: str) -> bool:
    return "WATCHDOG=1" in message.splitlines()


def test_notifier_sends_ready_status_stopping_watchdog(notify_socket: NotifySocket) -> None:
    """Each Notifier call arrives as its own datagram; a multi-line status becomes one line."""
    with Notifier(notify_socket.env()) as notifier:
        assert notifier.enabled
        assert notifier.ready()
        assert notify_socket.wait_for(lambda m: True) == "READY=1"
        assert notifier.status("rx 10 fr/s\nspool 0")
        assert notify_socket.wait_for(lambda m: True) == "STATUS=rx 10 fr/s spool 0"
        assert notifier.watchdog()
        assert notify_socket.wait_for(lambda m: True) == "WATCHDOG=1"
        assert notifier.stopping()
        assert notify_socket.wait_for(lambda m: True) == "STOPPING=1"


def test_abstract_socket_name() -> None:
    """A NOTIFY_SOCKET starting with '@' names an abstract socket."""
    name = f"daq-agent-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(b"\0" + name.encode())
        server.settimeout(5.0)
        with Notifier({"NOTIFY_SOCKET": "@" + name}) as notifier:
            assert notifier.ready()
            assert server.recv(4096) == b"READY=1"


def test_without_notify_socket_everything_is_a_no_op() -> None:
    """No NOTIFY_SOCKET: the calls return False and the watchdog starts no thread."""
    notifier = Notifier({"WATCHDOG_USEC": str(WATCHDOG_USEC)})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.status("x")
    assert not notifier.watchdog()
    assert not notifier.stopping()
    before = threading.active_count()
    with Watchdog(notifier, lambda: None, lambda: "s", env={}) as watchdog:
        assert threading.active_count() == before
        assert watchdog.pets == 0


def test_a_vanished_systemd_is_logged_once_and_never_raises(
    notify_socket: NotifySocket, caplog: pytest.LogCaptureFixture
) -> None:
    """A send to a socket that is gone returns False and is logged once, not per call."""
    notifier = Notifier(notify_socket.env())
    notify_socket.sock.close()
    os.unlink(notify_socket.path)
    with caplog.at_level(logging.WARNING, logger="daq_agent.systemd"):
        assert not notifier.ready()
        assert not notifier.watchdog()
    notifier.close()
    assert len([r for r in caplog.records if "notification failed" in r.message]) == 1


def test_watchdog_interval_from_the_environment() -> None:
    """WATCHDOG_USEC gives the interval; WATCHDOG_PID for another process turns it off."""
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 30
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({}) is None
    assert notify_address({"NOTIFY_SOCKET": "vsock:2:1"}) is None


def test_watchdog_pets_only_while_healthy(
    notify_socket: NotifySocket, caplog: pytest.LogCaptureFixture
) -> None:
    """WATCHDOG=1 arrives while health() passes, stops while it fails, resumes on recovery;
    the failure (with its reason) and the recovery are each logged once; STATUS= arrives too."""
    reason: list[str | None] = [None]
    env = notify_socket.env(WATCHDOG_USEC=str(WATCHDOG_USEC))
    with (
        caplog.at_level(logging.WARNING, logger="daq_agent.systemd"),
        Notifier(env) as notifier,
        Watchdog(
            notifier, lambda: reason[0], lambda: "rx 42 fr/s", env=env, status_interval_s=0.2
        ) as watchdog,
    ):
        assert watchdog.interval_s == INTERVAL_S
        assert notify_socket.wait_for(is_pet) is not None
        assert notify_socket.wait_for(lambda m: m == "STATUS=rx 42 fr/s") is not None

        reason[0] = "reader can0 died"
        deadline = time.monotonic() + 5.0
        while watchdog.healthy and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not watchdog.healthy
        notify_socket.drain()  # pets sent before the failure was seen
        pets = watchdog.pets
        # Nothing within three watchdog intervals, while STATUS= keeps arriving.
        assert notify_socket.wait_for(is_pet, timeout=3 * INTERVAL_S) is None
        assert watchdog.pets == pets
        assert notify_socket.wait_for(lambda m: m.startswith("STATUS=")) is not None

        reason[0] = None
        assert notify_socket.wait_for(is_pet) is not None
        notifier.stopping()
        assert notify_socket.wait_for(lambda m: m == "STOPPING=1") is not None
    assert not any(t.name == "daq-watchdog" for t in threading.enumerate())
    messages = [r.message for r in caplog.records]
    assert messages.count("unhealthy, not notifying the systemd watchdog: reader can0 died") == 1
    assert sum("healthy again" in m for m in messages) == 1


def test_a_raising_health_check_is_unhealthy(
    notify_socket: NotifySocket, caplog: pytest.LogCaptureFixture
) -> None:
    """health() raising counts as failing (logged with the exception); the thread lives on."""

    def health() -> str | None:
        raise RuntimeError("spool gone")

    env = notify_socket.env(WATCHDOG_USEC=str(WATCHDOG_USEC))
    with (
        caplog.at_level(logging.WARNING, logger="daq_agent.systemd"),
        Notifier(env) as notifier,
        Watchdog(notifier, health, lambda: "up", env=env, status_interval_s=0.1) as watchdog,
    ):
        assert notify_socket.wait_for(is_pet, timeout=3 * INTERVAL_S) is None
        assert notify_socket.wait_for(lambda m: m == "STATUS=up") is not None
        assert watchdog.pets == 0
    assert any("health check raised RuntimeError: spool gone" in r.message for r in caplog.records)


def test_watchdog_for_another_pid_sends_status_only(notify_socket: NotifySocket) -> None:
    """WATCHDOG_PID naming another process: STATUS= still goes out, WATCHDOG=1 never."""
    env = notify_socket.env(WATCHDOG_USEC=str(WATCHDOG_USEC), WATCHDOG_PID="1")
    with (
        Notifier(env) as notifier,
        Watchdog(notifier, lambda: None, lambda: "up", env=env, status_interval_s=0.1),
    ):
        assert notify_socket.wait_for(lambda m: m == "STATUS=up") is not None
        assert notify_socket.wait_for(is_pet, timeout=3 * INTERVAL_S) is None


# The shipped unit, checked by systemd's own tools.

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed"
)


def unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointed at an executable that exists (verify checks it)."""
    binary = tmp_path / "daq-agent"
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    text = UNIT.read_text()
    assert "ExecStart=/opt/daq-agent/bin/daq-agent " in text
    copy = tmp_path / "daq-agent.service"
    copy.write_text(text.replace("ExecStart=/opt/daq-agent/bin/daq-agent ", f"ExecStart={binary} "))
    return copy


@needs_systemd_analyze
def test_unit_verifies(tmp_path: Path) -> None:
    """``systemd-analyze verify`` accepts the unit (no warnings about it)."""
    assert SYSTEMD_ANALYZE is not None
    unit = unit_copy(tmp_path)
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    complaints = [line for line in result.stderr.splitlines() if "daq-agent.service" in line]
    assert result.returncode == 0, result.stderr
    assert complaints == [], result.stderr


@needs_systemd_analyze
def test_unit_exposure_is_at_most_3(tmp_path: Path) -> None:
    """``systemd-analyze security --offline=true`` rates the unit's exposure at 3.0 or better,
    while it keeps what the agent needs: AF_CAN, serial devices, an unprivileged user."""
    assert SYSTEMD_ANALYZE is not None
    unit = unit_copy(tmp_path)
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for daq-agent\.service: (\d+\.\d+)", result.stdout)
    assert match is not None, result.stdout + result.stderr
    assert float(match.group(1)) <= 3.0, result.stdout
    text = UNIT.read_text()
    for needed in (
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30",
        "DynamicUser=yes",
        "SupplementaryGroups=dialout",
        "AF_CAN",
        "DeviceAllow=char-ttyUSB rw",
        "DeviceAllow=char-ttyACM rw",
        "RestartPreventExitStatus=2",
        "LoadCredential=sift-api-key:/etc/daq-agent/sift.key",
    ):
        assert needed in text, needed
    assert f"unit {match.group(1)} OK" in text, "the figure in the unit's comment is stale"


def test_daq_agent_run_notifies_systemd(notify_socket: NotifySocket, tmp_path: Path) -> None:
    """``daq-agent run`` under a stand-in systemd: READY=1 once its source is open, STATUS= with
    the counters, WATCHDOG=1 while healthy, STOPPING=1 at SIGTERM, then exit 0."""
    import signal
    import sys

    dbc = Path(__file__).resolve().parents[2] / "dbc" / "bench.dbc"
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"asset: sd\nstate_dir: {tmp_path / 'state'}\nbuses:\n"
        f"  - {{name: can0, interface: virtual, channel: sd-{os.getpid()}, databases: [{dbc}]}}\n"
    )
    env = {**os.environ, **notify_socket.env(WATCHDOG_USEC="400000")}
    env.pop("JOURNAL_STREAM", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "daq_agent.cli", "-q", "run", "--no-live", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert notify_socket.wait_for(lambda m: "READY=1" in m.splitlines(), 30) is not None
        assert notify_socket.wait_for(lambda m: m.startswith("STATUS="), 10) is not None
        assert notify_socket.wait_for(is_pet, 5) is not None
        process.send_signal(signal.SIGTERM)
        stopping = notify_socket.wait_for(lambda m: "STOPPING=1" in m.splitlines(), 30)
        if stopping is None:  # show where it is stuck: SIGUSR1 dumps every thread's stack
            process.send_signal(signal.SIGUSR1)
            time.sleep(1.0)
            process.kill()
            _, stderr = process.communicate()
            pytest.fail(f"no STOPPING=1 within 30 s of SIGTERM; the agent's stderr:\n{stderr}")
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
