"""The API refuses the agent's key for a while (the server's key was rotated), then it is fixed."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from faultkit import (
    agent_config,
    judge,
    replay_source,
    scaled,
    serving,
    wait_for,
    write_counter_log,
)

from daq_agent.agent import Agent
from daq_agent.config import load_config

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

RATE = 500.0
OLD_KEY = "old-key-5b1f0c"
NEW_KEY = "new-key-93de7a"


def test_wrong_key_then_fixed_retries_slowly_and_delivers_everything(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server restarts with a new key; for 3 s x DAQ_FAULTS_SCALE the agent's key is wrong:
    it retries about once a second (auth_retry_s: 1, no tight loop), logs one ERROR for the
    streak without the key, keeps the data, and delivers all of it once its key file is
    rewritten."""
    wrong_for = scaled(3.0)
    frames = int(RATE * (wrong_for + 4.0))
    key_file = tmp_path / "api.key"
    key_file.write_text(OLD_KEY)
    log_path = tmp_path / "counter.asc"
    write_counter_log(log_path, frames, RATE)
    caplog.set_level(logging.INFO)
    with serving(tmp_path / "store.sqlite", tmp_path, api_key=OLD_KEY) as server:
        config = agent_config(
            tmp_path / "agent.yaml",
            state_dir=tmp_path / "state",
            server_port=server.port,
            key_file=key_file,
            source=replay_source(log_path),
            flush="checkpoint_seconds: 0.3, retry_initial_s: 0.05, retry_max_s: 0.3, "
            "auth_retry_s: 1.0",
        )
        agent = Agent(load_config(config))
        agent.start()
        try:
            wait_for(lambda: agent.status().flusher.delivered > 0, 20, "first deliveries")
            server.kill()
            server.start(api_key=NEW_KEY)
            wait_for(lambda: agent.status().flusher.auth_failures >= 1, 10, "a refused key")
            first = agent.status().flusher.auth_failures
            time.sleep(wrong_for)  # the key stays wrong for this long
            attempts = agent.status().flusher.auth_failures - first
            assert agent.status().flusher.pending > 0
            key_file.write_text(NEW_KEY)
            assert agent.wait(frames / RATE + 30), "the replay did not end"
            # the stop drains only into the durable spool: wait for the delivery itself (the
            # auth retry waits up to 1 s, and a starved replay can end first)
            wait_for(lambda: agent.status().flusher.pending == 0, 30, "the backlog delivered")
        finally:
            final = agent.stop()
        db = server.db
    # auth retries wait 0.5-1.0 s each: at most one attempt per half second
    assert attempts <= wrong_for / 0.5 + 1, attempts
    assert final.flusher.pending == 0
    verdict = judge(db, range(frames))
    assert (len(verdict.missing), verdict.duplicates) == (0, 0)
    errors = [
        r for r in caplog.records if r.levelno >= logging.ERROR and "API key" in r.getMessage()
    ]
    assert len(errors) == 1
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert OLD_KEY not in text
    assert NEW_KEY not in text
    assert "API key changed" in text
