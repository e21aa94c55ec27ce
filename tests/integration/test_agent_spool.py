"""The agent with its durable spool (the default), in-process against the real local server."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import can
import pytest

from daq_agent._proto.sift.ingest.v1 import ingest_pb2
from daq_agent.agent import Agent
from daq_agent.commands.run import exit_code
from daq_agent.config import AgentConfig, LocalTarget, load_config
from daq_agent.core.errors import SpoolError
from daq_agent.core.model import TelemetryConfig
from daq_agent.core.sample import Sample
from daq_agent.pipeline.batch import unpack_payloads
from daq_agent.pipeline.deadletter import read_dead_letters
from daq_agent.pipeline.spool import Spool, SpoolRecord
from daq_agent.readers.base import ReaderState
from daq_agent.server.local import LocalIngestServer
from daq_agent.server.store import Store
from daq_agent.sinks.sift import SiftSink

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BENCH_DBC = REPO / "dbc" / "bench.dbc"
BASE_S = 1_750_000_000.0


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait until ``predicate()`` holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def make_config(tmp_path: Path, channel: str, extra: str = "") -> AgentConfig:
    """One virtual bus (bench.dbc), the embedded local server on a fixed port, a fixed run."""
    path = tmp_path / "agent.yaml"
    path.write_text(
        f"state_dir: {tmp_path / 'state'}\n"
        "asset: spool-test\n"
        "run: {name: spool-run}\n"
        "buses:\n"
        f"  - {{name: can0, interface: virtual, channel: {channel}, databases: [{BENCH_DBC}]}}\n"
        "flush: {max_batch: 100, checkpoint_seconds: 0.2, retry_initial_s: 0.05, "
        "retry_max_s: 0.2, drain_timeout_s: 0.5}\n" + extra
    )
    return load_config(path, env={})


def frames(count: int, first: int = 0) -> list[can.Message]:
    """``count`` frames of bench.dbc's first message with distinct timestamps."""
    return [
        can.Message(
            arbitration_id=0x100,
            data=bytes(8),
            is_extended_id=False,
            timestamp=BASE_S + (first + i) * 1e-3,
        )
        for i in range(count)
    ]


def started(agent: Agent) -> Agent:
    """Start the agent and wait until its buses listen."""
    agent.start()
    for reader in agent.readers:
        assert reader.wait_state(ReaderState.RUNNING, timeout=10.0), reader.counters.last_error
    return agent


def stored(config: AgentConfig) -> int:
    """Samples stored in the local server's file."""
    assert isinstance(config.target, LocalTarget)
    with Store.open(config.target.db_path, readonly=True) as store:
        return store.count_samples()


def test_spool_is_on_by_default_under_the_state_dir(tmp_path: Path, channel: str) -> None:
    """Without a spool section the agent spools to <state_dir>/spool, fsyncing every 100 ms."""
    config = make_config(tmp_path, channel)
    spool = config.spool_config
    assert spool.enabled
    assert spool.directory == tmp_path / "state" / "spool"
    assert spool.fsync_interval_ms == 100
    assert spool.quota_bytes is None
    off = make_config(tmp_path, channel, "spool: {enabled: false}\n")
    assert not off.spool_config.enabled


def test_backlog_of_a_stopped_agent_is_replayed_first_at_start(
    tmp_path: Path, channel: str, sender: can.BusABC
) -> None:
    """Frames spooled while the server was away are replayed by the next agent on its own,
    before anything else, and stored once."""
    config = make_config(tmp_path, channel, "target: {local: {port: 0}}\n")
    agent = started(Agent(config))
    try:
        assert agent.server is not None
        agent.server.stop()
        for msg in frames(300):
            sender.send(msg)
        wait_for(lambda: agent.status().flusher.taken == 300, 20, "every sample spooled")
    finally:
        first = agent.stop()
    assert first.flusher.pending == 300
    assert first.flusher.abandoned == 0
    assert first.flusher.balanced
    again = started(Agent(config))
    try:
        assert again.status().flusher.recovered == 300
        wait_for(lambda: again.status().flusher.delivered == 300, 20, "the backlog delivered")
        assert again.status().flusher.taken == 0  # replayed by itself, before any new frame
        for msg in frames(50, first=300):
            sender.send(msg)
        wait_for(lambda: again.status().flusher.delivered == 350, 20, "the new frames")
    finally:
        final = again.stop()
    assert final.balanced
    assert final.flusher.balanced
    assert final.spool is not None
    assert final.spool.pending_records == 0
    assert stored(config) == 350


def test_a_resent_window_is_stored_once(local_server: LocalIngestServer) -> None:
    """The same window sent twice (a re-send after a lost answer) is one set of samples in the
    store."""
    flow_config = Agent(make_config(local_server.db_path.parent, "unused")).plan.flows[0]
    sink = SiftSink(
        uri=f"127.0.0.1:{local_server.port}",
        use_tls=False,
        api_key=lambda: "any",  # the server has no key: any is accepted
        telemetry=TelemetryConfig("dedup", "dedup-key", flows=[flow_config]),
    )
    zeros = tuple(0 for _ in flow_config.channels)
    rows = [(flow_config.name, 1_000_000 + i, zeros) for i in range(200)]
    try:
        for _ in range(2):
            window = sink.open()
            window.send(rows, None)
            window.commit(10.0)
    finally:
        sink.close()
    with Store.open(local_server.db_path, readonly=True) as store:
        assert store.count_samples(flow=flow_config.name) == 200


def test_a_request_the_server_refuses_is_dead_lettered(tmp_path: Path, channel: str) -> None:
    """A spooled batch (of the earlier version: serialized requests) holding one request the
    server refuses (an unknown run) is bisected: the refused sample goes to the dead-letter file,
    the others are delivered."""
    config = make_config(tmp_path, channel)
    agent = started(Agent(config))
    try:
        flow = agent.plan.flows[0]
    finally:
        agent.stop()
    zeros = tuple(0 for _ in flow.channels)
    samples = [Sample(flow.name, 2_000_000 + i, zeros) for i in range(7)]

    def request(sample: Sample, run_id: str) -> bytes:
        message = ingest_pb2.IngestWithConfigDataStreamRequest(
            ingestion_config_id="from-0.1", flow=sample.flow, run_id=run_id
        )
        message.timestamp.FromNanoseconds(sample.timestamp_ns)
        for channel_config in flow.channels:
            message.channel_values.add(**{channel_config.data_type.value_field: 0})
        return message.SerializeToString()

    payloads = [request(s, "no-such-run" if i == 3 else "") for i, s in enumerate(samples)]
    with Spool(config.spool_config.directory) as spool:
        spool.append(payloads, 7, samples[0].timestamp_ns, samples[-1].timestamp_ns)
    again = started(Agent(config))
    try:
        wait_for(lambda: again.status().flusher.pending == 0, 30, "the batch to be handled")
    finally:
        final = again.stop()
    f = final.flusher
    assert (f.recovered, f.delivered, f.dead_lettered) == (7, 6, 1)
    assert f.balanced
    entries = list(read_dead_letters(config.dead_letter_path))
    assert len(entries) == 1
    (unpacked,) = unpack_payloads([entries[0].payload])
    assert unpacked.rows == [(flow.name, samples[3].timestamp_ns, zeros)]
    assert unpacked.run is not None
    assert unpacked.run.run_id == "no-such-run"
    # the server's own message, or, when the refusal ended the stream before the window's
    # finish (sift_stream keeps only the status then), the status it ended with
    reason = entries[0].reason
    assert "no-such-run" in reason or "ended the stream with INVALID_ARGUMENT" in reason, reason
    assert stored(config) == 6


def test_an_fsync_failure_stops_the_agent_with_a_spool_error(
    tmp_path: Path, channel: str, sender: can.BusABC
) -> None:
    """When the spool's fsync fails (EIO), the flusher stops, the agent's wait returns and the
    agent reports the SpoolError (``run`` then exits 1)."""
    config = make_config(tmp_path, channel)

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    spool = Spool(tmp_path / "broken-spool", fsync_interval=0, fsync=failing_fsync)
    try:
        agent = started(Agent(config, window=spool))
        try:
            for msg in frames(10):
                sender.send(msg)
            assert agent.wait(timeout=20), "the agent did not notice the spool failure"
            assert isinstance(agent.spool_error, SpoolError)
        finally:
            final = agent.stop()
        assert final.flusher.delivered == 0
        assert final.flusher.balanced
    finally:
        spool._abandon()
    assert os.path.isdir(tmp_path / "broken-spool")


class _BuggySpool(Spool):
    """A real spool whose read raises what nothing expects (a bug on the sender's path) once it
    holds records."""

    def read(
        self, after_seq: int, *, max_records: int = 1000, max_bytes: int = 8 * 2**20
    ) -> list[SpoolRecord]:
        records = super().read(after_seq, max_records=max_records, max_bytes=max_bytes)
        if records:
            raise RuntimeError("a bug on the sender's path")
        return records


def test_a_sender_that_dies_fails_health_and_the_run_exits_1(
    tmp_path: Path, channel: str, sender: can.BusABC
) -> None:
    """The sender thread ending on an unexpected error stops the agent's wait, fails its health
    check (the watchdog stops), and ``run``'s exit code is 1 naming the error; what was read is
    still in the spool for the next start."""
    config = make_config(tmp_path, channel)
    spool = _BuggySpool(tmp_path / "buggy-spool")
    agent = started(Agent(config, window=spool))
    try:
        for msg in frames(10):
            sender.send(msg)
        assert agent.wait(timeout=20), "the agent did not notice the sender's death"
        health = agent.health()
        assert health is not None
        assert "the sender (flusher) is not running: " in health
        assert "a bug on the sender's path" in health
    finally:
        final = agent.stop()
        spool.close()  # a window given to the agent stays the caller's
    err = io.StringIO()
    assert exit_code(agent, final, err) == 1
    assert "daq-agent run: the sender died: " in err.getvalue()
    assert "a bug on the sender's path" in err.getvalue()
    assert final.flusher.delivered == 0
    with Spool(tmp_path / "buggy-spool") as again:  # safe for the next start
        assert again.pending_samples == 10


def test_a_second_agent_on_the_same_spool_exits_1(tmp_path: Path, channel: str) -> None:
    """Only one agent owns a spool: ``daq-agent run`` on a spool in use exits 1 naming the lock."""
    config = make_config(tmp_path, channel)
    agent = started(Agent(config))
    try:
        assert config.source is not None
        result = subprocess.run(
            [str(Path(sys.executable).parent / "daq-agent"), "run", str(config.source)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        agent.stop()
    assert result.returncode == 1
    assert "cannot use the spool" in result.stderr
    assert "locked" in result.stderr
