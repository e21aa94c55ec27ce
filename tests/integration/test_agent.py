"""The agent end to end, in-process: virtual CAN bus → reader → ring → flusher → local server.

Every test runs the real local ingestion server (127.0.0.1, port 0) started by the agent, and
reads the SQLite store back.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import can
import pytest

from daq_agent.agent import Agent
from daq_agent.config import AgentConfig, LocalTarget, load_config
from daq_agent.core.clock import seconds_to_ns
from daq_agent.core.sample import Sample
from daq_agent.decode.dbc import load_database
from daq_agent.pipeline.flusher import FlusherSettings
from daq_agent.readers.base import ReaderState
from daq_agent.server.local import make_server
from daq_agent.server.store import Store
from daq_agent.sim.can import CanSimulator

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BENCH_DBC = REPO / "dbc" / "bench.dbc"


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait until ``predicate()`` holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def write_config(tmp_path: Path, body: str) -> AgentConfig:
    """Write an agent config into ``tmp_path`` and load it (state under tmp_path)."""
    path = tmp_path / "agent.yaml"
    path.write_text(f"state_dir: {tmp_path / 'state'}\n" + body)
    return load_config(path, env={})


def virtual_config(tmp_path: Path, channel: str, extra: str = "", dbc: Path = BENCH_DBC) -> str:
    """A config with one virtual bus named can0."""
    return (
        "asset: bench-test\n"
        "buses:\n"
        "  - name: can0\n"
        "    interface: virtual\n"
        f"    channel: {channel}\n"
        f"    databases: [{dbc}]\n" + extra
    )


def started(agent: Agent) -> Agent:
    """Start the agent and wait until its buses listen."""
    agent.start()
    for reader in agent.readers:
        assert reader.wait_state(ReaderState.RUNNING, timeout=10.0), reader.counters.last_error
    return agent


def bench_frames(count: int, base_s: float = 1_750_000_000.0) -> list[can.Message]:
    """``count`` frames of the bench database (classic, multiplexed, FD, 29-bit), 100 µs apart."""
    simulator = CanSimulator([load_database(BENCH_DBC)])
    frames = []
    for i, (_plan, msg) in enumerate(simulator.frames(count=count)):
        msg.timestamp = base_s + i * 1e-4
        frames.append(msg)
    return frames


def stored_samples(config: AgentConfig, run_id: str) -> list[Any]:
    """Every sample of the run, read back from the store."""
    assert isinstance(config.target, LocalTarget)
    with Store.open(config.target.db_path, readonly=True) as store:
        return list(store.iter_samples(run_id=run_id))


def test_every_frame_arrives_once_with_cantools_values(
    tmp_path: Path, channel: str, sender: can.BusABC
) -> None:
    """Each frame sent is stored exactly once, with the values cantools decodes, and accounted."""
    config = write_config(tmp_path, virtual_config(tmp_path, channel))
    frames = bench_frames(3000)
    assert any(f.is_fd for f in frames)
    assert any(f.is_extended_id for f in frames)
    unknown = [
        can.Message(arbitration_id=0x7AB, data=b"\x00" * 8, timestamp=1.0, is_extended_id=False)
        for _ in range(7)
    ]
    remote = [
        can.Message(arbitration_id=0x100, is_remote_frame=True, timestamp=1.0, dlc=8)
        for _ in range(3)
    ]
    agent = started(Agent(config))
    try:
        for msg in [*frames, *unknown, *remote]:
            sender.send(msg)
        total = len(frames) + len(unknown) + len(remote)
        wait_for(lambda: agent.status().received == total, 30, "every frame received")
    finally:
        final = agent.stop()
    assert (final.received, final.decoded, final.unknown, final.errors) == (total, 3000, 7, 3)
    assert final.flusher.delivered == 3000
    assert final.balanced
    database = load_database(BENCH_DBC)
    by_key: dict[tuple[str, int], dict[str, Any]] = {}
    for msg in frames:
        message = database.get_message_by_frame_id(
            msg.arbitration_id | (0x80000000 if msg.is_extended_id else 0)
        )
        key = (f"can0.{message.name}", seconds_to_ns(msg.timestamp, 1000))
        by_key[key] = cast(dict[str, Any], message.decode(bytes(msg.data), decode_choices=False))
    signed_enums = {
        (flow.name, c.name)
        for flow in agent.plan.flows
        for c in flow.channels
        if any(e.is_signed for e in c.enum_types)
    }
    stored = stored_samples(config, agent.run_id)
    assert len(stored) == 3000
    seen = set()
    for sample in stored:
        key = (sample.flow, sample.timestamp_ns)
        assert key in by_key, key
        assert key not in seen
        seen.add(key)
        expected = by_key[key]
        present = {k: v for k, v in sample.values.items() if v is not None}
        for name, value in present.items():  # a negative enum key travels as its uint32 form
            if (sample.flow, name) in signed_enums and isinstance(value, int) and value >= 1 << 31:
                present[name] = value - (1 << 32)
        assert set(present) == set(expected), sample.flow
        for name, value in expected.items():
            assert math.isclose(float(present[name]), float(value), rel_tol=1e-6, abs_tol=1e-6), (
                sample.flow,
                name,
                present[name],
                value,
            )


def big_dbc(path: Path, messages: int = 4000, signals: int = 1) -> Path:
    """A generated database whose flows do not fit one 4 MiB CreateIngestionConfig message.

    Long signal comments (channel descriptions) make it large while keeping it quick to parse.
    """
    lines = ['VERSION ""', "NS_ :", "BS_:", "BU_: ECU"]
    comments = []
    for i in range(messages):
        frame_id = 0x10000 + i
        lines.append(f"BO_ {frame_id | 0x80000000} Msg{i:04d}: 8 ECU")
        for j in range(signals):
            name = f"Msg{i:04d}_Signal{j}"
            lines.append(f' SG_ {name} : {j * 16}|16@1+ (0.5,0) [0|32767] "unit{j}" ECU')
            comments.append(
                f'CM_ SG_ {frame_id | 0x80000000} {name} "{"generated description " * 50}";'
            )
    path.write_text("\n".join(lines + comments) + "\n")
    return path


@pytest.mark.slow
def test_large_database_switches_to_lazy_flow_creation(
    tmp_path: Path, channel: str, sender: can.BusABC
) -> None:
    """A 4,000-message database makes the agent register flows lazily, and data still arrives."""
    dbc = big_dbc(tmp_path / "big.dbc")
    config = write_config(tmp_path, virtual_config(tmp_path, channel, dbc=dbc))
    agent = started(Agent(config))
    try:
        assert len(agent.plan.flows) == 4000
        frames = [
            can.Message(
                arbitration_id=0x10000 + i % 50,
                is_extended_id=True,
                data=bytes([i % 256, 0, 0, 0, 0, 0, 0, 0]),
                timestamp=1_750_000_000.0 + i * 1e-3,
            )
            for i in range(500)
        ]
        for msg in frames:
            sender.send(msg)
        wait_for(lambda: agent.status().received == 500, 30, "every frame received")
    finally:
        final = agent.stop()
    assert final.flusher.delivered == 500
    assert agent.lazy_flow_creation
    assert final.stream["lazy_flows"] == 50
    assert isinstance(config.target, LocalTarget)
    with Store.open(config.target.db_path, readonly=True) as store:
        counts = store.flow_counts(run_id=agent.run_id)
    assert counts == {f"can0.Msg{i:04d}": 10 for i in range(50)}


def test_block_policy_delivers_everything_through_a_tiny_ring(
    tmp_path: Path, channel: str, sender: can.BusABC
) -> None:
    """With the block policy a ring of 8 drops nothing: every frame is delivered."""
    extra = "ring: {capacity: 8, policy: block}\nflush: {max_batch: 4, max_age_ms: 1}\n"
    config = write_config(tmp_path, virtual_config(tmp_path, channel, extra))
    frames = bench_frames(1500)
    agent = started(Agent(config))
    try:
        for msg in frames:
            sender.send(msg)
        wait_for(lambda: agent.status().received == 1500, 30, "every frame received")
    finally:
        final = agent.stop()
    assert final.ring.dropped == 0
    assert final.ring.high_water <= 8
    assert final.flusher.delivered == 1500
    assert len(stored_samples(config, agent.run_id)) == 1500


def test_drop_oldest_overflow_is_counted_end_to_end(
    tmp_path: Path, channel: str, sender: can.BusABC
) -> None:
    """With the server gone, a small drop_oldest ring overflows; every sample stays accounted."""
    # Without the spool, a stalled sender backs up into the ring (with it, the disk takes it).
    extra = (
        "ring: {capacity: 20, policy: drop_oldest}\nflush: {max_batch: 10, max_age_ms: 1}\n"
        "spool: {enabled: false}\n"
    )
    config = write_config(tmp_path, virtual_config(tmp_path, channel, extra))
    settings = FlusherSettings(
        max_batch=10, max_age_s=0.001, retry_initial_s=0.5, drain_timeout_s=0.5
    )
    agent = started(Agent(config, flusher_settings=settings))
    frames = bench_frames(300)
    try:
        assert agent.server is not None
        agent.server.stop()
        for msg in frames:
            sender.send(msg)
        wait_for(lambda: agent.status().received == 300, 30, "every frame received")
        wait_for(lambda: agent.status().ring.dropped > 0, 10, "the ring to overflow")
    finally:
        final = agent.stop()
    ring, flusher = final.ring, final.flusher
    assert final.decoded == 300
    assert ring.put_count == 300
    assert ring.dropped > 0
    assert ring.put_count == ring.got + ring.dropped + ring.depth
    assert flusher.taken == ring.got
    assert flusher.delivered == 0
    assert flusher.abandoned == flusher.taken
    assert flusher.failures >= 1
    assert final.balanced


def test_stop_drains_what_was_read(tmp_path: Path, channel: str, sender: can.BusABC) -> None:
    """Stopping right after the frames arrive still delivers every one of them."""
    config = write_config(tmp_path, virtual_config(tmp_path, channel))
    settings = FlusherSettings(max_batch=500, checkpoint_seconds=60, idle_checkpoint_s=60)
    frames = bench_frames(2000)
    agent = started(Agent(config, flusher_settings=settings))
    try:
        for msg in frames:
            sender.send(msg)
        wait_for(lambda: agent.status().received == 2000, 30, "every frame received")
        assert agent.status().flusher.delivered == 0  # the window is still open
    finally:
        final = agent.stop()
    assert final.flusher.delivered == 2000
    assert final.flusher.checkpoints >= 1
    assert len(stored_samples(config, agent.run_id)) == 2000


def test_replay_ends_the_run_by_itself(tmp_path: Path) -> None:
    """A config of recorded logs only ends once the log is played and everything is delivered."""
    log_path = tmp_path / "drive.blf"
    frames = bench_frames(1200)
    with can.Logger(str(log_path)) as writer:
        for msg in frames:
            writer.on_message_received(msg)
    body = (
        "asset: bench-replay\n"
        "run: {name: 'replay-{asset}-%Y', tags: [replay], metadata: {lap: 3}}\n"
        "replay:\n"
        f"  - {{path: {log_path}, bus: can0, realtime: false, databases: [{BENCH_DBC}]}}\n"
    )
    config = write_config(tmp_path, body)
    agent = Agent(config)
    agent.start()
    try:
        assert agent.finite
        assert agent.wait(timeout=60), "the replay never ended"
    finally:
        final = agent.stop()
    assert final.sources[0].state == "ended"
    assert final.decoded == 1200
    assert final.flusher.delivered == 1200
    stored = stored_samples(config, agent.run_id)
    assert len(stored) == 1200
    assert isinstance(config.target, LocalTarget)
    with Store.open(config.target.db_path, readonly=True) as store:
        run = store.get_run(agent.run_id)
    assert run is not None
    assert run.name == agent.run_name == f"replay-bench-replay-{time.strftime('%Y')}"
    assert run.tags == ("replay",)
    assert run.is_stopped  # attached at start, stopped at the end
    assert {s.timestamp_ns for s in stored} == {seconds_to_ns(f.timestamp, 1000) for f in frames}


def test_same_dbc_on_two_buses_gives_distinct_flows(tmp_path: Path, channel: str) -> None:
    """Two buses with one database get flow names prefixed by their bus alias, one client key."""
    body = (
        "asset: two-buses\n"
        "buses:\n"
        f"  - {{name: front, interface: virtual, channel: {channel}a, dbc: {BENCH_DBC}}}\n"
        f"  - {{name: rear, interface: virtual, channel: {channel}b, dbc: {BENCH_DBC}}}\n"
    )
    config = write_config(tmp_path, body)
    agent = Agent(config)
    names = [f.name for f in agent.plan.flows]
    assert len(names) == len(set(names)) == 34
    assert {n.split(".")[0] for n in names} == {"front", "rear"}
    assert agent.plan.client_key.startswith("two-buses-")
    again = Agent(write_config(tmp_path, body))
    assert again.plan.client_key == agent.plan.client_key


def test_failed_window_is_resent_when_the_server_returns(
    tmp_path: Path, channel: str, sender: can.BusABC
) -> None:
    """Frames read while the server is down are delivered once a server is back on its port."""
    config = write_config(tmp_path, virtual_config(tmp_path, channel))
    settings = FlusherSettings(retry_initial_s=0.05, retry_max_s=0.2, checkpoint_seconds=0.2)
    agent = started(Agent(config, flusher_settings=settings))
    replacement = None
    try:
        server = agent.server
        assert server is not None
        port = server.port
        server.stop()
        for msg in bench_frames(400):
            sender.send(msg)
        wait_for(lambda: agent.status().flusher.failures >= 2, 30, "the flusher to retry")
        assert agent.status().flusher.delivered == 0
        assert isinstance(config.target, LocalTarget)
        replacement = make_server(config.target.db_path, port=port)
        replacement.start()
        wait_for(lambda: agent.status().flusher.delivered == 400, 30, "the re-sent window")
    finally:
        final = agent.stop()
        if replacement is not None:
            replacement.stop()
    assert final.flusher.retries >= 2
    assert final.flusher.abandoned == 0
    assert final.balanced
    assert len(stored_samples(config, agent.run_id)) == 400


def test_second_stop_request_abandons_the_drain(
    tmp_path: Path, channel: str, sender: can.BusABC
) -> None:
    """With the server gone, an abandoning stop request ends the drain and counts what is left."""
    # In memory only: with the spool, what is not delivered stays on disk for the next start.
    config = write_config(tmp_path, virtual_config(tmp_path, channel, "spool: {enabled: false}\n"))
    agent = started(Agent(config, flusher_settings=FlusherSettings(drain_timeout_s=60)))
    try:
        assert agent.server is not None
        agent.server.stop()
        for msg in bench_frames(100):
            sender.send(msg)
        wait_for(lambda: agent.status().flusher.failures >= 1, 30, "a failed stream")
        agent.request_stop(abandon=True)
        started_at = time.monotonic()
    finally:
        final = agent.stop()
    assert time.monotonic() - started_at < 10  # not the 60 s drain timeout
    assert final.decoded == 100
    assert final.flusher.delivered == 0
    assert final.flusher.abandoned == 100
    assert final.balanced


def test_samples_that_cannot_be_sent_are_dead_lettered(tmp_path: Path, channel: str) -> None:
    """A sample of an unknown flow or with the wrong value count is isolated and dead-lettered;
    the rest is delivered."""
    config = write_config(tmp_path, virtual_config(tmp_path, channel))
    agent = started(Agent(config))
    try:
        flow = agent.plan.flows[0]
        good = Sample(flow.name, 1_750_000_000_000_000_000, tuple(0 for _ in flow.channels))
        for sample in (good, Sample("can0.NoSuchMessage", 1, (1.0,)), Sample(flow.name, 2, ())):
            agent.ring.put(sample)
        wait_for(lambda: agent.status().flusher.taken == 3, 10, "the flusher to take them")
    finally:
        final = agent.stop()
    assert (final.flusher.delivered, final.flusher.dead_lettered) == (1, 2)
    assert final.flusher.balanced
    assert not final.balanced  # put straight into the ring: no reader decoded them


def test_editing_the_database_changes_the_client_key(tmp_path: Path, channel: str) -> None:
    """A new message in the DBC gives a new derived client key; a named key is kept as given."""
    dbc = tmp_path / "edited.dbc"
    dbc.write_text(BENCH_DBC.read_text())
    before = Agent(write_config(tmp_path, virtual_config(tmp_path, channel, dbc=dbc))).plan
    dbc.write_text(
        BENCH_DBC.read_text()
        + '\nBO_ 1792 Extra: 8 BMS\n SG_ ExtraSignal : 0|8@1+ (1,0) [0|255] "" Vector__XXX\n'
    )
    after = Agent(write_config(tmp_path, virtual_config(tmp_path, channel, dbc=dbc))).plan
    assert len(after.flows) == len(before.flows) + 1
    assert after.client_key != before.client_key
    assert after.client_key.startswith("bench-test-")
    named = virtual_config(tmp_path, channel, "ingestion_client_key: fixed-key\n", dbc=dbc)
    assert Agent(write_config(tmp_path, named)).plan.client_key == "fixed-key"
