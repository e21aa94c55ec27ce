"""Hot reload (SIGHUP): changed sources restart, the rest keeps running, nothing buffered is lost.

In-process agents on virtual buses with the real local server, and one ``daq-agent run`` process
on udp_multicast buses that is sent SIGHUP.
"""

from __future__ import annotations

import logging
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import can
import pytest

from daq_agent.agent import Agent
from daq_agent.commands.run import never_opened
from daq_agent.config import AgentConfig, LocalTarget, load_config
from daq_agent.pipeline.deadletter import read_dead_letters
from daq_agent.pipeline.flusher import FlusherSettings
from daq_agent.readers.base import ReaderState
from daq_agent.server.store import Store

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


def two_buses(state: Path, ch0: str, ch1: str, extra: str = "") -> str:
    """A config with two virtual buses, can0 on ``ch0`` and can1 on ``ch1``."""
    return (
        "asset: reload-test\n"
        f"state_dir: {state}\n"
        "buses:\n"
        f"  - {{name: can0, interface: virtual, channel: {ch0}, databases: [{BENCH_DBC}]}}\n"
        f"  - {{name: can1, interface: virtual, channel: {ch1}, databases: [{BENCH_DBC}]}}\n"
        + extra
    )


def write(path: Path, text: str) -> AgentConfig:
    """Write ``text`` to ``path`` and load it."""
    path.write_text(text)
    return load_config(path, env={})


def frame(i: int) -> can.Message:
    """A frame of the bench database (0x100, 8 bytes), numbered ``i``."""
    return can.Message(arbitration_id=0x100, data=bytes([i % 256] + [0] * 7), is_extended_id=False)


def channel() -> str:
    """A virtual channel no other test uses."""
    return f"reload-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def agent_and_buses(
    tmp_path: Path,
) -> Iterator[tuple[Agent, Path, list[str]]]:
    """A started agent on two fresh virtual channels (slow flusher: samples wait in the ring)."""
    channels = [channel(), channel()]
    path = tmp_path / "agent.yaml"
    config = write(path, two_buses(tmp_path / "state", *channels))
    agent = Agent(
        config,
        flusher_settings=FlusherSettings(max_batch=100_000, max_age_s=1.5),
    )
    agent.start()
    try:
        for reader in agent.readers:
            assert reader.wait_state(ReaderState.RUNNING, timeout=10.0), reader.counters.last_error
        yield agent, path, channels
    finally:
        agent.stop()


def send(channel_name: str, count: int, start: int = 0) -> None:
    """Send ``count`` bench frames on a virtual channel."""
    with can.Bus(interface="virtual", channel=channel_name) as bus:
        for i in range(start, start + count):
            bus.send(frame(i))


def test_changed_bus_restarts_other_untouched_nothing_lost(
    agent_and_buses: tuple[Agent, Path, list[str]], tmp_path: Path
) -> None:
    """A new channel for can0 restarts its reader only; what was read before is all delivered,
    frames on the new channel are decoded and delivered, counters stay balanced."""
    agent, path, (ch0, ch1) = agent_and_buses
    old0, old1 = agent.readers
    send(ch0, 200)
    send(ch1, 150)
    wait_for(lambda: agent.status().received == 350, 10, "350 frames read")
    # the slow flusher still holds them: the reload happens with samples buffered
    assert agent.status().flusher.delivered < 350
    new_ch0 = channel()
    result = agent.reload(load_config(_rewrite(path, two_buses(tmp_path / "state", new_ch0, ch1))))
    assert result.applied, result.refused
    assert (result.restarted, result.added, result.removed) == (("can0",), (), ())
    assert result.unchanged == ("can1",)
    new0, same1 = agent.readers
    assert new0 is not old0
    assert same1 is old1
    assert old0.state is ReaderState.STOPPED
    assert not old0.is_alive()
    assert new0.wait_state(ReaderState.RUNNING, timeout=10.0), new0.counters.last_error
    assert same1.state is ReaderState.RUNNING
    send(new_ch0, 120, start=1000)
    send(ch0, 30)  # the old channel is no longer read
    send(ch1, 50)
    wait_for(lambda: agent.status().received == 520, 10, "520 frames read")
    wait_for(lambda: agent.status().flusher.delivered == 520, 15, "520 samples delivered")
    status = agent.status()
    by_name = {s.name: s for s in status.sources}
    assert (by_name["can0"].decoded, by_name["can1"].decoded) == (320, 200)
    assert status.balanced
    assert status.lost == ""


def test_invalid_new_config_is_refused_old_keeps_running(
    agent_and_buses: tuple[Agent, Path, list[str]], caplog: pytest.LogCaptureFixture
) -> None:
    """Broken YAML, then a broken database: both refused with one ERROR naming the file/line;
    the same readers keep running and delivering."""
    agent, path, (ch0, ch1) = agent_and_buses
    before = list(agent.readers)
    path.write_text(path.read_text() + "buses: [\n  {name: oops\n")
    with caplog.at_level(logging.ERROR, logger="daq_agent.agent"):
        result = agent.reload_file(path, env={})
    assert not result.applied
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors
    assert "invalid YAML" in errors[0]
    assert re.search(re.escape(str(path)) + r":\d+: ", errors[0]), errors[0]  # file:line
    broken = path.parent / "broken.dbc"
    broken.write_text("BO_ this is not a database\n")
    text = path.read_text().split("buses: [\n")[0].replace(str(BENCH_DBC), str(broken), 1)
    path.write_text(text)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="daq_agent.agent"):
        result = agent.reload_file(path, env={})
    assert not result.applied
    assert any(str(broken) in r.getMessage() for r in caplog.records), caplog.text
    assert agent.readers == before
    assert all(r.state is ReaderState.RUNNING for r in agent.readers)
    send(ch0, 40)
    send(ch1, 60)
    wait_for(lambda: agent.status().flusher.delivered == 100, 15, "100 samples delivered")


def test_target_change_is_refused(
    agent_and_buses: tuple[Agent, Path, list[str]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A different target (even with a source change) refuses the whole reload: restart."""
    agent, path, (ch0, ch1) = agent_and_buses
    before = list(agent.readers)
    other = two_buses(
        tmp_path / "state",
        channel(),
        ch1,
        f"target: {{local: {{db: {tmp_path / 'other.sqlite'}}}}}\n",
    )
    with caplog.at_level(logging.WARNING, logger="daq_agent.agent"):
        result = agent.reload(load_config(_rewrite(path, other), env={}))
    assert not result.applied
    assert "target changed" in result.refused
    assert "restart" in result.refused
    assert any("reload refused: target changed" in r.getMessage() for r in caplog.records)
    assert agent.readers == before
    send(ch0, 25)
    wait_for(lambda: agent.status().flusher.delivered == 25, 15, "25 samples delivered")


def test_a_new_bus_adds_its_flows_live_removed_source_is_stopped(
    agent_and_buses: tuple[Agent, Path, list[str]], tmp_path: Path
) -> None:
    """A new bus brings new flows: they are registered with the running ingestion config and
    its frames are stored under them, with nothing restarted; removing can1 stops it and keeps
    its counters in the status."""
    agent, path, (ch0, ch1) = agent_and_buses
    send(ch1, 30)
    # delivered: the sink has set up its ingestion config, with the flows of can0 and can1
    wait_for(lambda: agent.status().flusher.delivered == 30, 15, "30 samples delivered")
    ch2 = channel()
    added = two_buses(tmp_path / "state", ch0, ch1) + (
        f"  - {{name: can2, interface: virtual, channel: {ch2}, databases: [{BENCH_DBC}]}}\n"
    )
    result = agent.reload(load_config(_rewrite(path, added), env={}))
    assert result.applied, result.refused
    assert (result.added, result.unchanged) == (("can2",), ("can0", "can1"))
    assert "can2.BMS_PackStatus" in result.new_flows
    assert all(name.startswith("can2.") for name in result.new_flows)
    assert agent.readers[2].wait_state(ReaderState.RUNNING, timeout=10.0)
    send(ch2, 40)
    wait_for(lambda: agent.status().flusher.delivered == 70, 15, "70 samples delivered")
    only0 = two_buses(tmp_path / "state", ch0, ch1).split("  - {name: can1")[0]
    can1 = agent.readers[1]
    result = agent.reload(load_config(_rewrite(path, only0), env={}))
    assert result.applied, result.refused
    assert (result.removed, result.unchanged, result.new_flows) == (("can1", "can2"), ("can0",), ())
    assert [r.name for r in agent.readers] == ["can0"]
    assert can1.state is ReaderState.STOPPED
    assert not can1.is_alive()
    status = agent.status()
    assert status.received == 70
    assert status.balanced
    config = agent.config
    assert isinstance(config.target, LocalTarget)
    with Store.open(config.target.db_path, readonly=True) as store:
        flows = Counter(sample[0] for sample in store.iter_samples())
    assert flows == {"can1.BMS_PackStatus": 30, "can2.BMS_PackStatus": 40}


def test_a_reload_reuses_the_decoders_of_unchanged_databases(
    agent_and_buses: tuple[Agent, Path, list[str]], tmp_path: Path
) -> None:
    """An unchanged database is not parsed and compiled again on SIGHUP (the same decoder
    object), so a reload costs no memory; one whose content changed is."""
    agent, path, (ch0, ch1) = agent_and_buses
    before = [source.decoder for source in agent.plan.sources]
    result = agent.reload(load_config(path, env={}))
    assert result.applied, result.refused
    assert all(a is b for a, b in zip(before, (s.decoder for s in agent.plan.sources), strict=True))
    copy = tmp_path / "copy.dbc"
    copy.write_text(BENCH_DBC.read_text() + "\n")  # other bytes, the same messages
    text = two_buses(tmp_path / "state", ch0, ch1).replace(
        f"channel: {ch1}, databases: [{BENCH_DBC}]", f"channel: {ch1}, databases: [{copy}]"
    )
    result = agent.reload(load_config(_rewrite(path, text), env={}))
    assert result.applied, result.refused
    assert result.restarted == ("can1",)
    after = [source.decoder for source in agent.plan.sources]
    assert after[0] is before[0]
    assert after[1] is not before[1]


def _with_extra_signal(tmp_path: Path) -> Path:
    """bench.dbc with a signal added to BMS_PackStatus (so its flow's channels differ)."""
    changed = tmp_path / "changed.dbc"
    changed.write_text(
        BENCH_DBC.read_text().replace(
            ' SG_ PackAliveCounter : 48|4@1+ (1,0) [0|15] "" VCU\n',
            ' SG_ PackAliveCounter : 48|4@1+ (1,0) [0|15] "" VCU\n'
            ' SG_ PackSpare : 52|4@1+ (1,0) [0|15] "" VCU\n',
        )
    )
    assert changed.read_text() != BENCH_DBC.read_text()
    return changed


def test_a_new_flow_the_api_has_with_other_channels_is_refused_not_mislabelled(
    tmp_path: Path,
) -> None:
    """With a fixed ingestion_client_key, a first agent added can2 live from a database where
    BMS_PackStatus has one more signal. A second agent that adds can2 from bench.dbc must not
    send its BMS_PackStatus samples against the API's other channels: they are dead-lettered
    naming the clash, and can2's other messages are delivered."""
    ch0, ch1, ch2 = channel(), channel(), channel()
    path = tmp_path / "agent.yaml"
    base = "ingestion_client_key: reload-clash\n" + two_buses(tmp_path / "state", ch0, ch1)

    def with_can2(dbc: Path) -> str:
        return base + (
            f"  - {{name: can2, interface: virtual, channel: {ch2}, databases: [{dbc}]}}\n"
        )

    settings = FlusherSettings(max_batch=100_000, max_age_s=0.2)
    first = Agent(write(path, base), flusher_settings=settings)
    first.start()
    try:
        for reader in first.readers:  # frames sent before a reader opens are never read
            assert reader.wait_state(ReaderState.RUNNING, timeout=10.0), reader.counters.last_error
        result = first.reload(load_config(_rewrite(path, with_can2(_with_extra_signal(tmp_path)))))
        assert result.applied, result.refused
        assert first.readers[2].wait_state(ReaderState.RUNNING, timeout=10.0)
        send(ch2, 3)
        wait_for(lambda: first.status().flusher.delivered == 3, 15, "3 samples delivered")
    finally:
        first.stop()
    second = Agent(write(path, base), flusher_settings=settings)
    second.start()
    try:
        for reader in second.readers:
            assert reader.wait_state(ReaderState.RUNNING, timeout=10.0), reader.counters.last_error
        send(ch0, 2)  # the sink sets up: the API's config already has can2's flows
        wait_for(lambda: second.status().flusher.delivered == 2, 15, "2 samples delivered")
        result = second.reload(load_config(_rewrite(path, with_can2(BENCH_DBC))))
        assert result.applied, result.refused
        assert "can2.BMS_PackStatus" in result.new_flows
        assert second.readers[2].wait_state(ReaderState.RUNNING, timeout=10.0)
        with can.Bus(interface="virtual", channel=ch2) as bus:
            for i in range(4):
                bus.send(frame(i))  # BMS_PackStatus
                bus.send(can.Message(arbitration_id=0x101, data=bytes(8), is_extended_id=False))
        wait_for(
            lambda: second.status().flusher.pending == 0 and second.status().received == 10,
            20,
            "the can2 samples handled",
        )
    finally:
        final = second.stop()
    assert (final.flusher.delivered, final.flusher.dead_lettered) == (6, 4)
    entries = list(read_dead_letters(second.config.dead_letter_path))
    assert len(entries) == 4
    for entry in entries:
        assert "flow 'can2.BMS_PackStatus' already exists in ingestion config" in entry.reason
        assert "reload-clash" in entry.reason
    assert final.stream["added_flows"] == len(result.new_flows) - 1


def test_a_flow_whose_signals_changed_is_refused(
    agent_and_buses: tuple[Agent, Path, list[str]], tmp_path: Path
) -> None:
    """A database whose message gained a signal changes that flow's channels, which the running
    ingestion config cannot take: the reload is refused naming the flow, and the old buses go on."""
    agent, path, (ch0, ch1) = agent_and_buses
    changed = _with_extra_signal(tmp_path)
    text = two_buses(tmp_path / "state", ch0, ch1).replace(
        f"channel: {ch0}, databases: [{BENCH_DBC}]", f"channel: {ch0}, databases: [{changed}]"
    )
    readers = list(agent.readers)
    result = agent.reload(load_config(_rewrite(path, text), env={}))
    assert not result.applied
    assert "flows changed their channels (can0.BMS_PackStatus" in result.refused
    assert "restart the agent" in result.refused
    assert agent.readers == readers
    send(ch0, 10)
    wait_for(lambda: agent.status().flusher.delivered == 10, 15, "10 samples delivered")


def _rewrite(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _multicast() -> tuple[str, int]:
    """A multicast group and port no concurrent test is likely to use."""
    rng = random.Random()
    group = f"239.{rng.randrange(1, 255)}.{rng.randrange(1, 255)}.{rng.randrange(1, 255)}"
    return group, rng.randrange(20000, 40000)


def test_sighup_reloads_a_running_process(tmp_path: Path) -> None:
    """``daq-agent run`` gets SIGHUP after its config moved can0 to another group: it keeps
    running, logs the reload, receives on the new group, and SIGTERM exits 0 with all delivered."""
    (g1, p1), (g2, p2) = _multicast(), _multicast()
    path = tmp_path / "agent.yaml"

    def config(group: str, port: int) -> str:
        return (
            "asset: sighup\n"
            f"state_dir: {tmp_path / 'state'}\n"
            "buses:\n"
            f"  - {{name: can0, interface: udp_multicast, channel: '{group}',"
            f" options: {{port: {port}}}, dbc: {BENCH_DBC}}}\n"
        )

    path.write_text(config(g1, p1))
    process = subprocess.Popen(
        [sys.executable, "-m", "daq_agent.cli", "run", str(path), "--log-interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []

    def pump() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.put(line)

    pumper = threading.Thread(target=pump, name="test-stderr-pump")
    pumper.start()

    def wait_line(pattern: str, ok: Callable[[re.Match[str]], bool] = lambda m: True) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                assert process.poll() is None, "".join(seen)
                continue
            seen.append(line)
            match = re.search(pattern, line)
            if match and ok(match):
                return
        pytest.fail(f"no log line matching {pattern!r}: {''.join(seen)}")

    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        assert banner.startswith("daq-agent: asset sighup"), banner
        with can.Bus(interface="udp_multicast", channel=g1, port=p1) as bus:
            for i in range(50):
                bus.send(frame(i))
        wait_line(r" rx (\d+) ", lambda m: int(m.group(1)) >= 50)
        path.write_text(config(g2, p2))
        process.send_signal(signal.SIGHUP)
        wait_line(r"reloaded: restarted can0")
        # logged once the new reader is open (joined the new group)
        with can.Bus(interface="udp_multicast", channel=g2, port=p2) as bus:
            for i in range(70):
                bus.send(frame(i))
        wait_line(r" rx (\d+) ", lambda m: int(m.group(1)) >= 120)
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        out = process.stdout.read()
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        pumper.join(timeout=10)
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()
    assert process.returncode == 0, "".join(seen) + "".join(lines.queue)
    assert "frames received 120, decoded 120" in out, out
    assert "delivered 120," in out, out


def test_a_reloaded_source_that_never_opens_is_flagged(
    agent_and_buses: tuple[Agent, Path, list[str]], tmp_path: Path
) -> None:
    """can0 moved to a channel that cannot open (SocketCAN's ``nope0``: no module here, no such
    interface elsewhere): its old opens do not count, so the run's exit check names it; its
    other counters carry over."""
    agent, path, (ch0, ch1) = agent_and_buses
    send(ch0, 40)
    wait_for(lambda: agent.status().received == 40, 10, "40 frames read")
    assert never_opened(agent.status()) == []
    broken = two_buses(tmp_path / "state", ch0, ch1).replace(
        f"interface: virtual, channel: {ch0}", "interface: socketcan, channel: nope0"
    )
    result = agent.reload(load_config(_rewrite(path, broken)))
    assert result.applied, result.refused
    assert result.restarted == ("can0",)
    new0 = agent.readers[0]
    wait_for(lambda: new0.counters.get("failures") >= 1, 10, "the new can0 failing to open")
    status = agent.status()
    assert [s.name for s in never_opened(status)] == ["can0"]
    by_name = {s.name: s for s in status.sources}
    assert by_name["can0"].received == 40  # carried over
    assert by_name["can1"].counters["opens"] == 1
