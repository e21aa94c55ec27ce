"""The local server in a supervised child process: start, restart on the same port, stop, and no
orphan when the agent is killed (real processes on 127.0.0.1)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from server_calls import BASE_NS, call, create_config, double_flow, doubles, stream

from daq_agent import methods
from daq_agent._proto.sift.ingestion_configs.v2 import ingestion_configs_pb2 as ic
from daq_agent._proto.sift.ping.v1 import ping_pb2
from daq_agent.core.backoff import RetryPolicy
from daq_agent.core.errors import DaqError
from daq_agent.server.process import LocalServerProcess
from daq_agent.server.services import PING_RESPONSE
from daq_agent.server.store import Store

pytestmark = pytest.mark.integration

FAST = RetryPolicy(initial_s=0.05, max_s=0.2)
PROCESS_LOG = "daq_agent.server.process"


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait until ``predicate()`` holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def ping(uri: str, metadata: list[tuple[str, str]] | None = None) -> str:
    """One Ping on a fresh grpcio channel; the server's answer."""
    with grpc.insecure_channel(uri) as channel:
        response = call(
            channel, methods.PING, ping_pb2.PingRequest(), ping_pb2.PingResponse, metadata
        )
    return response.response


def gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie waiting for a foreign parent counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("Z", "X")


def refused(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_restarts_on_the_same_port_and_keeps_the_data(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """kill -9 of the child: the supervisor logs it once, restarts it on the same port, the
    stored data is still there; stop() ends the child and the thread."""
    caplog.set_level(logging.INFO, logger=PROCESS_LOG)
    db = tmp_path / "state" / "local.sqlite"
    server = LocalServerProcess(db, restart_policy=FAST)
    server.start(timeout=30)
    try:
        assert server.alive
        first_pid, port = server.pid, server.port
        assert first_pid is not None
        assert port > 0
        assert server.uri == f"127.0.0.1:{port}"
        assert ping(server.uri) == PING_RESPONSE
        with grpc.insecure_channel(server.uri) as channel:
            config = create_config(channel, "persist", [double_flow("f")])
            cid = config.ingestion_config_id
            stream(channel, [doubles(cid, "f", BASE_NS + i, i, -i) for i in range(50)])

            # The connection is open when the child dies: the new one rebinds the port anyway.
            os.kill(first_pid, signal.SIGKILL)
            wait_for(lambda: server.restarts == 1 and server.alive, 15, "the restart")
            assert server.pid not in (None, first_pid)
            assert server.port == port
            # The client keeps its URI: the same channel reconnects.
            again = channel.unary_unary(
                methods.PING,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=ping_pb2.PingResponse.FromString,
            )(ping_pb2.PingRequest(), timeout=15, wait_for_ready=True)
            assert again.response == PING_RESPONSE
            got = call(
                channel,
                methods.GET_INGESTION_CONFIG,
                ic.GetIngestionConfigRequest(ingestion_config_id=cid),
                ic.GetIngestionConfigResponse,
            ).ingestion_config
        assert got == config
        store = Store.open(db, readonly=True)
        try:
            assert store.count_samples(flow="f") == 50
        finally:
            store.close()
        deaths = [r for r in caplog.records if "exited with signal SIGKILL" in r.getMessage()]
        assert len(deaths) == 1
        assert deaths[0].levelno == logging.WARNING
        assert "listening on" in deaths[0].getMessage()  # the tail of the dead child's log
        assert (db.parent / "local-server.log.1").is_file()  # the dead child's log is kept
        second_pid = server.pid
    finally:
        server.stop(timeout=10)
    assert not server.alive
    assert server.pid is None
    assert second_pid is not None
    assert gone(second_pid)
    assert refused(port)
    assert not any(t.name == "daq-server-supervisor" for t in threading.enumerate())
    server.stop()  # idempotent


def test_api_key_goes_in_the_environment_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child requires the given key, never an inherited one, and the key is in neither its
    command line nor its log."""
    monkeypatch.setenv("DAQ_AGENT_API_KEY", "inherited-key")
    with LocalServerProcess(tmp_path / "open.sqlite") as server:
        assert ping(server.uri) == PING_RESPONSE  # the inherited key is not passed on
    with LocalServerProcess(tmp_path / "keyed.sqlite", api_key="s3cret-k3y") as server:
        with pytest.raises(grpc.RpcError) as info:
            ping(server.uri)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert ping(server.uri, [("authorization", "Bearer s3cret-k3y")]) == PING_RESPONSE
        cmdline = Path(f"/proc/{server.pid}/cmdline")
        if cmdline.exists():
            assert b"s3cret-k3y" not in cmdline.read_bytes()
        assert "s3cret-k3y" not in repr(server)
    assert "s3cret-k3y" not in server.log_path.read_text()


def test_a_child_that_fails_at_start_is_a_clear_error(tmp_path: Path) -> None:
    """A db that is not a database: start() raises at once, naming the reason and the log."""
    db = tmp_path / "garbage.sqlite"
    db.write_text("not a database\n")
    server = LocalServerProcess(db)
    began = time.monotonic()
    with pytest.raises(DaqError) as info:
        server.start(timeout=30)
    assert time.monotonic() - began < 15
    message = str(info.value)
    assert "exited with code 2" in message
    assert "file is not a database" in message
    assert str(server.log_path) in message
    assert not server.alive
    server.stop()
    with pytest.raises(RuntimeError):
        server.start()


def test_a_silent_child_times_out(tmp_path: Path) -> None:
    """A child that never reports its port: start() gives up after its timeout and kills it."""
    fake_python = tmp_path / "silent-python"
    fake_python.write_text("#!/bin/sh\necho 'starting slowly'\nexec sleep 60\n")
    fake_python.chmod(0o755)
    server = LocalServerProcess(tmp_path / "db.sqlite", python=str(fake_python))
    began = time.monotonic()
    with pytest.raises(DaqError) as info:
        server.start(timeout=1.0)
    assert time.monotonic() - began < 8
    assert "did not report a listening port within 1.0 s" in str(info.value)
    assert "starting slowly" in str(info.value)


def test_first_start_on_a_busy_port_fails_after_its_timeout(tmp_path: Path) -> None:
    """A fixed port that stays in use: start() says so after its timeout, without a child."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        server = LocalServerProcess(tmp_path / "db.sqlite", port=port)
        with pytest.raises(DaqError, match=f"127.0.0.1:{port} is in use"):
            server.start(timeout=0.5)
    assert not server.log_path.exists()  # no child was started


def test_restart_waits_for_a_busy_port_then_stop_interrupts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """While another socket holds the port, restarts fail (logged once) and are retried: the child
    comes back once the port is free; stop() during the retries returns at once."""
    caplog.set_level(logging.DEBUG, logger=PROCESS_LOG)
    server = LocalServerProcess(tmp_path / "db.sqlite", restart_policy=FAST)
    server.start()
    try:
        port = server.port

        def kill_and_take_port() -> socket.socket:
            pid = server.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not server.alive, 10, "the death to be noticed")
            taken = socket.socket()
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            taken.bind(("127.0.0.1", port))
            taken.listen(1)
            return taken

        def failures() -> list[logging.LogRecord]:
            # "in use": seen by the supervisor's probe, or by the child (if it won the race)
            return [r for r in caplog.records if "in use" in r.getMessage()]

        with kill_and_take_port():
            wait_for(lambda: len(failures()) >= 3, 10, "three failed restarts")
            assert [r.levelno for r in failures()][:2] == [logging.WARNING, logging.DEBUG]
            assert server.restarts == 0
        wait_for(lambda: server.restarts == 1 and server.alive, 10, "the restart")
        assert server.port == port
        assert ping(server.uri) == PING_RESPONSE

        with kill_and_take_port():
            caplog.clear()
            wait_for(lambda: len(failures()) >= 1, 10, "a failed restart")
            began = time.monotonic()
            server.stop(timeout=5)
            assert time.monotonic() - began < 2
        assert server.restarts == 1
        assert not server.alive
    finally:
        server.stop()


PARENT = """
import sys, time
from daq_agent.server.process import LocalServerProcess
server = LocalServerProcess(sys.argv[1])
server.start(timeout=30)
print(server.pid, server.port, flush=True)
time.sleep(120)
"""


def test_the_child_exits_when_its_parent_is_killed(tmp_path: Path) -> None:
    """kill -9 of the agent: its server child notices, stops by itself and frees the port."""
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    db = tmp_path / "orphan.sqlite"
    parent = subprocess.Popen(
        [sys.executable, str(script), str(db)], stdout=subprocess.PIPE, text=True
    )
    child_pid = 0
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line, "the parent exited before starting its server"
        child_pid, port = (int(word) for word in line.split())
        assert ping(f"127.0.0.1:{port}") == PING_RESPONSE
        parent.kill()
        parent.wait(timeout=10)
        wait_for(lambda: gone(child_pid), 10, "the orphaned server to exit")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=10)
        if parent.stdout is not None:
            parent.stdout.close()
        if child_pid and not gone(child_pid):
            os.kill(child_pid, signal.SIGKILL)  # the mechanism failed: leave no orphan behind
    assert refused(port)
    assert "is gone: stopping" in (tmp_path / "orphan-server.log").read_text()
    store = Store.open(db)  # the file is not held by a writer any more
    store.close()
