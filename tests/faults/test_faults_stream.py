"""The path to the server misbehaves under a stream: GOAWAY mid-stream, a path that stalls.

The agent runs in-process (its counters are observed directly) and plays a recorded counter log
at its recorded pace; the data goes through a proxy in front of a ``daq-agent serve`` subprocess,
and the oracle then reads the store.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
from faultkit import (
    CuttingProxy,
    GoawayProxy,
    ServeProcess,
    agent_config,
    judge,
    replay_source,
    scaled,
    wait_for,
    write_counter_log,
)

from daq_agent.agent import Agent
from daq_agent.config import load_config
from daq_agent.server.store import Store

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

RATE = 500.0


def _agent(tmp_path: Path, port: int, key_file: Path, frames: int, flush: str) -> Agent:
    log_path = tmp_path / "counter.asc"
    write_counter_log(log_path, frames, RATE)
    config = agent_config(
        tmp_path / "agent.yaml",
        state_dir=tmp_path / "state",
        server_port=port,
        key_file=key_file,
        source=replay_source(log_path),
        flush=flush,
    )
    return Agent(load_config(config))


def test_goaway_mid_stream_loses_nothing_and_keeps_running(
    tmp_path: Path, server: ServeProcess, key_file: Path
) -> None:
    """A grpcio server in front of the server sends GOAWAY on every connection 0.3 s after it
    opened (grpc.max_connection_age_ms; grace 1 s: every 0.6 s window goes on past its GOAWAY)
    and is restarted gracefully at random moments (GOAWAY, then what is still streaming 50 ms
    later is cancelled) for 6 s x DAQ_FAULTS_SCALE: missing 0, duplicates 0, the agent keeps
    delivering."""
    duration = scaled(6.0)
    frames = int(RATE * duration)
    rng = random.Random(8)
    stop = threading.Event()
    with GoawayProxy(server.port, max_age_ms=300, grace_ms=1000) as proxy:

        def roll() -> None:
            while not stop.wait(rng.uniform(1.0, 2.0)):
                proxy.restart(0.05)

        roller = threading.Thread(target=roll, name="faults-roller", daemon=True)
        agent = _agent(
            tmp_path,
            proxy.port,
            key_file,
            frames,
            "checkpoint_seconds: 0.6, retry_initial_s: 0.05, retry_max_s: 0.3",
        )
        agent.start()
        roller.start()
        try:
            wait_for(agent.sources_done, duration + 30, "the replay to end")
            stop.set()
            roller.join(5)
            assert agent.flusher is not None
            assert agent.flusher.is_alive()
            wait_for(lambda: agent.status().flusher.pending == 0, 20, "the rest delivered")
        finally:
            stop.set()
            roller.join(5)
            final = agent.stop()
        past_goaway = proxy.streams_past_goaway()
        broken = proxy.broken_streams()
    f = final.flusher
    verdict = judge(server.db, range(frames))
    print(
        f"windows {f.checkpoints} committed, {f.failures} failed; proxy restarts "
        f"{proxy.restarts}, streams past a GOAWAY {past_goaway}, broken {broken}"
    )
    assert (len(verdict.missing), verdict.duplicates) == (0, 0), verdict.missing
    assert verdict.stored == frames
    assert final.balanced
    assert f.pending == 0
    assert past_goaway >= 3  # streams outlived their connection's GOAWAY
    assert broken >= 2  # and some were cut by a restart's grace running out
    assert f.failures >= 2


def test_stalled_path_is_detected_and_the_agent_reconnects(
    tmp_path: Path, server: ServeProcess, key_file: Path
) -> None:
    """A proxy stops forwarding mid-stream: every open connection, and every one made while the
    path is dead, stays open and moves nothing, ever. The agent gives the window up within the
    checkpoint timeout (3 s, after a 0.5 s window), and once the path works again it reconnects
    (new connections) and delivers everything: missing 0, duplicates 0; then it stops within
    the timeout, and the run is marked stopped."""
    timeout = 3.0
    frames = int(RATE * scaled(6.0))
    with CuttingProxy(server.port, cut=False) as proxy:
        agent = _agent(
            tmp_path,
            proxy.port,
            key_file,
            frames,
            f"checkpoint_seconds: 0.5, checkpoint_timeout_s: {timeout}, retry_initial_s: 0.05, "
            "retry_max_s: 0.3",
        )
        agent.start()
        try:
            wait_for(lambda: agent.status().flusher.delivered > 0, 20, "first deliveries")
            delivered = agent.status().flusher.delivered
            wait_for(lambda: agent.status().flusher.delivered > delivered, 5, "a commit")
            time.sleep(0.2)  # into the next window: its stream is open, mid-window
            delivered = agent.status().flusher.delivered
            proxy.stall()
            stalled = time.monotonic()
            # given up within a window plus the timeout (plus scheduling)
            wait_for(
                lambda: agent.status().flusher.checkpoint_timeouts >= 1,
                0.5 + timeout + 1.5,
                "the stall to be detected",
            )
            detected = time.monotonic() - stalled
            time.sleep(max(0.0, scaled(2.0) - detected))  # the path stays dead a while longer
            assert agent.status().flusher.delivered - delivered <= RATE * 0.5 + 100
            before = proxy.connections
            proxy.unstall()
            wait_for(agent.sources_done, frames / RATE + 30, "the replay to end")
            wait_for(lambda: agent.status().flusher.pending == 0, 30, "the rest delivered")
        finally:
            stopping = time.monotonic()
            final = agent.stop()
            stop_took = time.monotonic() - stopping
        after = proxy.connections - before
        dead = proxy.stalled_connections
    f = final.flusher
    verdict = judge(server.db, range(frames))
    print(
        f"stall detected after {detected:.2f} s; {dead} connections black-holed, {after} made "
        f"after the path came back; windows {f.checkpoints} committed, {f.failures} failed"
    )
    assert (len(verdict.missing), verdict.duplicates) == (0, 0), verdict.missing
    assert verdict.stored == frames
    assert final.balanced
    assert after >= 1  # it reconnected: the old connections are black holes for good
    # AGENT BUG 2 (see the faults report): the run is stopped at shutdown over a grpcio channel
    # whose connection went into the black hole; with no deadline but 120 s, stop() hung.
    assert stop_took < timeout + 5.0, stop_took
    with Store.open(server.db, readonly=True) as store:
        runs = store.list_runs({"name": "faults"})
    assert [run.is_stopped for run in runs] == [True]
