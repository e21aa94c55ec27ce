"""The agent starts without the API: the server is down, or refuses the agent's key.

Either way the sources open at once and everything they read is spooled, then delivered once the
server accepts it. The sources are a live udp_multicast bus fed by the counter generator: a frame
the agent did not read while the API was unusable is gone for good, so a late start would show.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import pytest
from faultkit import (
    AgentProcess,
    ServeProcess,
    UdpGenerator,
    agent_config,
    count_stored,
    free_port,
    scaled,
    stored_seqs,
    udp_source,
    wait_for,
)

from daq_agent.agent import Agent
from daq_agent.config import load_config
from daq_agent.readers.base import ReaderState

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

RATE = 400.0
SETTLE_S = 0.25
"""Margin after the start before the bus is surely receiving."""
_STATUS = re.compile(r"\brx ([\d.]+k?)\s.*\bdelivered ([\d.]+k?)(?:\s|$)")


def _count(text: str) -> int:
    """A count of the status line (``987``, ``12.3k``), to its precision."""
    return int(float(text[:-1]) * 1000) if text.endswith("k") else int(text)


def _flush() -> str:
    return "checkpoint_seconds: 0.5, retry_initial_s: 0.05, retry_max_s: 0.5, auth_retry_s: 1.0"


def test_starts_while_the_server_is_down_and_delivers_once_it_is_up(
    tmp_path: Path, key_file: Path
) -> None:
    """``daq-agent run`` starts while nothing listens on the API's port (issue: 20 s; here
    3 s x DAQ_FAULTS_SCALE): it does not exit, its bus is open and counting frames at once
    (its status lines: rx grows, delivered 0, no source down), and once the server is up every
    frame sent after the start is stored, once; exit 0, accounting balanced."""
    down_for = scaled(3.0)
    server = ServeProcess(tmp_path / "store.sqlite", free_port(), tmp_path / "serve.log")
    port = free_port()
    config = agent_config(
        tmp_path / "agent.yaml",
        state_dir=tmp_path / "state",
        server_port=server.port,
        key_file=key_file,
        source=udp_source(port),
        flush=_flush(),
    )
    generator = UdpGenerator(port, RATE)
    agent = AgentProcess(config, tmp_path, "agent-down")
    try:
        generator.start()
        started = time.monotonic()
        agent.start()  # the banner: it did not exit (it used to, with 1, within 0.5 s)

        def status() -> tuple[int, int]:
            found = _STATUS.findall(agent.stderr())
            return (_count(found[-1][0]), _count(found[-1][1])) if found else (0, 0)

        wait_for(lambda: status()[0] >= RATE, down_for + 5, "status lines with frames read")
        time.sleep(max(0.0, down_for - (time.monotonic() - started)))
        lines = [line for line in agent.stderr().splitlines() if _STATUS.search(line)]
        assert agent.proc is not None
        assert agent.proc.poll() is None, agent.stderr()  # still running
        assert lines, agent.stderr()
        assert all("down:" not in line for line in lines), lines  # the bus was never down
        received, delivered = status()
        assert received >= RATE * (down_for - 2.0), lines
        assert delivered == 0
        assert not server.db.exists()  # nothing could have been stored: no server yet
        assert "cannot deliver" in agent.stderr()
        server.start()
        wait_for(lambda: count_stored(server.db) >= received, 30, "the backlog delivered")
        time.sleep(scaled(0.5))  # live traffic after the backlog
        generator.stop()
        stopped_at = time.time()
        agent.terminate()
        assert agent.wait(30) == 0, agent.stderr()
    finally:
        generator.stop()
        agent.ensure_dead()
        server.stop()
    tally = stored_seqs(server.db)
    expected = generator.sent_between(agent.ready_at + SETTLE_S, stopped_at - 0.05)
    assert len(expected) >= RATE * down_for
    assert expected - tally.keys() == set()
    assert sum(n - 1 for n in tally.values() if n > 1) == 0
    assert "accounting: balanced" in agent.stdout()
    assert "delivering again" in agent.stderr()
    print(f"down {down_for:.1f} s: {received} frames read meanwhile, {len(tally)} stored")


OLD_KEY = "old-key-2c7e91"
NEW_KEY = "new-key-d4a05b"


def test_starts_with_a_wrong_key_and_delivers_once_it_is_fixed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The agent starts with a key the server refuses (api_key_file): its bus is RUNNING and
    counting at once, one ERROR (without the key) says the key is refused, nothing is delivered;
    2 s x DAQ_FAULTS_SCALE later the key file is rewritten, and every frame read is delivered,
    once."""
    wrong_for = scaled(2.0)
    key_file = tmp_path / "api.key"
    key_file.write_text(OLD_KEY + "\n")
    caplog.set_level(logging.INFO)
    port = free_port()
    generator = UdpGenerator(port, RATE)
    server = ServeProcess(tmp_path / "store.sqlite", free_port(), tmp_path / "serve.log", NEW_KEY)
    server.start()
    try:
        config = agent_config(
            tmp_path / "agent.yaml",
            state_dir=tmp_path / "state",
            server_port=server.port,
            key_file=key_file,
            source=udp_source(port),
            flush=_flush(),
        )
        agent = Agent(load_config(config))
        generator.start()
        agent.start()
        try:
            ready = time.time()
            reader = agent.readers[0]
            assert reader.wait_state(ReaderState.RUNNING, timeout=5.0), reader.counters.last_error
            wait_for(lambda: agent.status().flusher.auth_failures >= 1, 10, "the key refused")
            time.sleep(wrong_for)
            status = agent.status()
            assert reader.state is ReaderState.RUNNING
            assert status.received >= RATE * (wrong_for - 0.5)
            assert status.flusher.delivered == 0
            assert status.flusher.pending > 0
            key_file.write_text(NEW_KEY + "\n")
            wait_for(lambda: agent.status().flusher.delivered > 0, 10, "the fixed key accepted")
            time.sleep(scaled(0.5))
            generator.stop()
            stopped_at = time.time()
            wait_for(lambda: agent.status().flusher.pending == 0, 20, "everything delivered")
        finally:
            generator.stop()
            final = agent.stop()
    finally:
        server.stop()
    assert final.balanced
    assert final.flusher.pending == 0
    tally = stored_seqs(server.db)
    expected = generator.sent_between(ready + SETTLE_S, stopped_at - 0.05)
    assert len(expected) >= RATE * wrong_for
    assert expected - tally.keys() == set()
    assert sum(n - 1 for n in tally.values() if n > 1) == 0
    errors = [
        r for r in caplog.records if r.levelno >= logging.ERROR and "API key" in r.getMessage()
    ]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert OLD_KEY not in text
    assert NEW_KEY not in text
