"""A Sift target: the API key comes from the environment or a file, and never shows in errors."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import can
import pytest

from daq_agent.agent import Agent
from daq_agent.config import load_config
from daq_agent.core.errors import ConfigError
from daq_agent.readers.base import ReaderState
from daq_agent.server.local import LocalIngestServer, make_server
from daq_agent.server.store import Store

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BENCH_DBC = REPO / "dbc" / "bench.dbc"
KEY = "s3cret-" + uuid.uuid4().hex


@pytest.fixture
def keyed_server(tmp_path: Path) -> Iterator[LocalIngestServer]:
    """A local server that requires ``KEY`` (plays the part of Sift)."""
    server = make_server(tmp_path / "remote.sqlite", api_key=KEY)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def sift_config(tmp_path: Path, port: int, key_source: str) -> Path:
    """A config streaming to 127.0.0.1:port with the key from ``key_source``."""
    path = tmp_path / "agent.yaml"
    path.write_text(
        f"asset: remote\nstate_dir: {tmp_path / 'state'}\n"
        f"target:\n  sift: {{uri: '127.0.0.1:{port}', use_ssl: false, {key_source}}}\n"
        f"buses:\n  - {{name: can0, interface: virtual, channel: sift-{uuid.uuid4().hex},"
        f" dbc: {BENCH_DBC}}}\n"
    )
    return path


def test_key_from_environment_delivers(tmp_path: Path, keyed_server: LocalIngestServer) -> None:
    """With the key in the named variable the agent authenticates and its frames are stored."""
    config = load_config(sift_config(tmp_path, keyed_server.port, "api_key_env: BENCH_SIFT_KEY"))
    agent = Agent(config, env={"BENCH_SIFT_KEY": KEY})
    agent.start()
    try:
        reader = agent.readers[0]
        assert reader.wait_state(ReaderState.RUNNING, timeout=10)
        channel = config.buses[0].channel
        with can.Bus(interface="virtual", channel=channel) as bus:
            for i in range(50):
                bus.send(can.Message(arbitration_id=0x100, data=bytes([i] * 8)))
        deadline = time.monotonic() + 10
        while agent.status().received < 50:
            assert time.monotonic() < deadline, "the frames never arrived"
            time.sleep(0.01)
    finally:
        final = agent.stop()
    assert final.decoded == 50
    assert final.flusher.delivered == 50
    with Store.open(tmp_path / "remote.sqlite", readonly=True) as store:
        assert store.count_samples(run_id=agent.run_id) == 50


def test_wrong_key_is_retried_slowly_and_delivers_once_fixed(
    tmp_path: Path, keyed_server: LocalIngestServer, caplog: pytest.LogCaptureFixture
) -> None:
    """With a wrong key in its file the agent still starts and reads; the refusal is logged once
    at ERROR (never the key); once the file holds the right key, everything read is stored."""
    wrong = "wrong-" + uuid.uuid4().hex
    key_file = tmp_path / "key.txt"
    key_file.write_text(wrong + "\n")
    path = sift_config(tmp_path, keyed_server.port, "api_key_file: key.txt")
    path.write_text(
        path.read_text() + "flush: {auth_retry_s: 0.3, retry_initial_s: 0.05, retry_max_s: 0.2}\n"
    )
    config = load_config(path)
    agent = Agent(config)
    with caplog.at_level(logging.DEBUG):
        agent.start()
        try:
            reader = agent.readers[0]
            assert reader.wait_state(ReaderState.RUNNING, timeout=10)
            with can.Bus(interface="virtual", channel=config.buses[0].channel) as bus:
                for i in range(40):
                    bus.send(can.Message(arbitration_id=0x100, data=bytes([i] * 8)))
            deadline = time.monotonic() + 20
            while agent.status().flusher.auth_failures < 2:
                assert time.monotonic() < deadline, "the wrong key was never refused"
                time.sleep(0.02)
            assert agent.status().received == 40
            assert agent.status().flusher.delivered == 0
            key_file.write_text(KEY + "\n")
            while agent.status().flusher.delivered < 40:
                assert time.monotonic() < deadline + 20, "never delivered after the fix"
                time.sleep(0.02)
        finally:
            final = agent.stop()
    assert final.flusher.delivered == 40
    errors = [
        r for r in caplog.records if r.levelno >= logging.ERROR and "API key" in r.getMessage()
    ]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    everything = "\n".join(r.getMessage() for r in caplog.records) + "\n".join(final.summary())
    assert wrong not in everything
    assert KEY not in everything
    with Store.open(tmp_path / "remote.sqlite", readonly=True) as store:
        assert store.count_samples(run_id=agent.run_id) == 40


def test_missing_key_variable_is_a_config_error(tmp_path: Path) -> None:
    """An unset key variable is reported by name before anything is started."""
    config = load_config(sift_config(tmp_path, 9, "api_key_env: NO_SUCH_KEY_VARIABLE"))
    agent = Agent(config, env={})
    with pytest.raises(ConfigError, match="NO_SUCH_KEY_VARIABLE is not set"):
        agent.start()
    assert agent.stop().received == 0
