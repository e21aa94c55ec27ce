"""ReplayReader on logs written by python-can's own loggers: values, timestamps, pacing, end."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import can
import cantools
import pytest
from can_support import CantoolsDecoder, wait_for

from daq_agent.core.backoff import RetryPolicy
from daq_agent.core.sample import Sample
from daq_agent.pipeline.ring_buffer import RingBuffer
from daq_agent.pipeline.status import AgentStatus, FlusherStats, RingStats, SourceStats
from daq_agent.readers import ReaderState, ReplayReader, describe, get_reader_class

pytestmark = pytest.mark.integration

DBC = """VERSION ""
NS_ :
BS_:
BU_: ECU

BO_ 256 Engine: 8 ECU
 SG_ Speed : 0|16@1+ (0.1,0) [0|6553.5] "km/h" ECU
 SG_ Temp : 16|8@1- (1,-40) [-40|87] "degC" ECU

BO_ 2566848513 ExtStatus: 8 ECU
 SG_ Counter : 0|32@1+ (1,0) [0|0] "" ECU

BO_ 768 FdData: 64 ECU
 SG_ Big : 0|32@1+ (1,0) [0|100000] "" ECU
"""

T0 = 1_700_000_000.123456


@pytest.fixture
def db() -> Any:
    """The test database."""
    return cantools.database.load_string(DBC, database_format="dbc")


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves a reader thread running."""
    yield
    leaked = [t.name for t in threading.enumerate() if t.name.startswith("daq-reader[")]
    assert not leaked, f"leaked reader threads: {leaked}"


def write_log(path: Path, frames: Sequence[can.Message]) -> Path:
    """Write ``frames`` with python-can's logger for the file's suffix."""
    with can.Logger(path) as logger:
        for frame in frames:
            logger.on_message_received(frame)
    return path


def good_frames(db: Any, n: int, start: float = T0, step: float = 0.01) -> list[can.Message]:
    """``n`` decodable frames cycling through the database's messages."""
    messages = list(db.messages)
    out = []
    for i in range(n):
        message = messages[i % len(messages)]
        values = {s.name: (i * 7 + k) % 100 for k, s in enumerate(message.signals)}
        out.append(
            can.Message(
                timestamp=start + i * step,
                arbitration_id=message.frame_id,
                is_extended_id=message.is_extended_frame,
                is_fd=message.is_fd or message.length > 8,
                data=message.encode(values, scaling=False),
                channel="can0",
            )
        )
    return out


def replay(path: Path, db: Any, **kwargs: Any) -> tuple[ReplayReader, list[Sample]]:
    """Replay ``path`` to its end; the reader (stopped) and the samples it emitted."""
    ring: RingBuffer[Sample] = RingBuffer(100_000, "block")
    reader = ReplayReader("replay0", path, CantoolsDecoder(db), ring.put, **kwargs)
    with reader:
        assert reader.wait_ended(timeout=30), reader.counters.last_error
    return reader, ring.get_batch(100_000, timeout=0)


@pytest.mark.parametrize("suffix", [".log", ".blf", ".csv", ".asc"])
def test_fast_replay_decodes_every_frame_and_ends(db: Any, tmp_path: Path, suffix: str) -> None:
    """Every recorded frame is decoded once with cantools' values; the reader ends at EOF."""
    frames = good_frames(db, 300)
    faults = [
        can.Message(timestamp=T0 + 5, arbitration_id=0x7FF, is_extended_id=False, data=b"\0" * 8),
        can.Message(timestamp=T0 + 5.1, arbitration_id=0x100, is_extended_id=False, data=b"\0\0\0"),
        can.Message(
            timestamp=T0 + 5.2,
            arbitration_id=0x100,
            is_extended_id=False,
            is_remote_frame=True,
            dlc=8,
        ),
    ]
    path = write_log(tmp_path / f"rec{suffix}", [*frames, *faults])
    reader, samples = replay(path, db, realtime=False)
    assert reader.ended
    assert reader.state is ReaderState.ENDED
    assert reader.position == len(frames) + len(faults)
    assert len(samples) == len(frames), reader.counters.snapshot()
    for sample, frame in zip(samples, frames, strict=True):
        message = next(
            m
            for m in db.messages
            if m.frame_id == frame.arbitration_id and m.is_extended_frame == frame.is_extended_id
        )
        expected = message.decode(bytes(frame.data), decode_choices=False)
        assert sample.flow == message.name
        assert sample.values == tuple(expected[s.name] for s in message.signals)
    snap = reader.counters.snapshot()
    assert snap["received"] == len(frames) + len(faults)
    assert snap["decoded"] == len(frames)
    assert snap["unknown_ids"] == {"7FF": 1}
    assert snap["decode_error_ids"] == {"100": 1}
    assert snap["remote_frames"] == 1
    stamps = [s.timestamp_ns for s in samples]
    if suffix == ".asc":
        # ASC stores times relative to a header date with millisecond resolution
        assert abs(stamps[0] - round(T0 * 1e6) * 1000) < 2_000_000
        assert [b - a for a, b in itertools.pairwise(stamps)] == [10_000_000] * 299
    else:
        assert stamps == [round(f.timestamp * 1e6) * 1000 for f in frames]


def test_realtime_replay_keeps_the_recorded_pace(db: Any, tmp_path: Path) -> None:
    """At recorded pace, frames 100 ms apart are emitted about 100 ms apart."""
    path = write_log(tmp_path / "paced.log", good_frames(db, 6, step=0.1))
    emitted: list[float] = []
    reader = ReplayReader(
        "paced", path, CantoolsDecoder(db), lambda _s: emitted.append(time.monotonic())
    )
    with reader:
        assert reader.wait_ended(timeout=10)
    assert len(emitted) == 6
    # no frame before its recorded offset from the first (a late one, on a loaded machine, may
    # leave a shorter gap before the next, which is due on the recorded clock, not after it)
    offsets = [t - emitted[0] for t in emitted]
    for i, offset in enumerate(offsets):
        assert offset >= 0.1 * i - 0.02, offsets
    assert offsets[-1] >= 0.45


def test_fast_replay_ignores_recorded_pace(db: Any, tmp_path: Path) -> None:
    """As fast as possible, a log spanning 100 s recorded plays in well under its duration."""
    path = write_log(tmp_path / "long.log", good_frames(db, 101, step=1.0))
    started = time.monotonic()
    reader, samples = replay(path, db, realtime=False)
    assert time.monotonic() - started < 10
    assert len(samples) == 101
    assert reader.ended


def test_long_idle_gaps_are_skipped(db: Any, tmp_path: Path) -> None:
    """At recorded pace, a gap longer than max_gap is skipped instead of waited for."""
    frames = good_frames(db, 2, step=1000.0)
    path = write_log(tmp_path / "gap.log", frames)
    started = time.monotonic()
    _reader, samples = replay(path, db, realtime=True, max_gap=0.05)
    assert time.monotonic() - started < 10
    assert [s.timestamp_ns for s in samples] == [round(f.timestamp * 1e6) * 1000 for f in frames]


def test_relative_log_timestamps_are_rebased_to_now(db: Any, tmp_path: Path) -> None:
    """A log whose timestamps start at 0 is stamped from the replay start, offsets kept."""
    path = write_log(tmp_path / "rel.log", good_frames(db, 5, start=0.0, step=0.25))
    before = time.time_ns()
    _reader, samples = replay(path, db, realtime=False)
    stamps = [s.timestamp_ns for s in samples]
    assert abs(stamps[0] - before) < 5_000_000_000
    assert [b - a for a, b in itertools.pairwise(stamps)] == [250_000_000] * 4
    _reader, recorded = replay(path, db, realtime=False, time_base="recorded")
    assert recorded[0].timestamp_ns == 0


def test_channel_filter(db: Any, tmp_path: Path) -> None:
    """With a channel, frames recorded on other channels are skipped and counted apart."""
    frames = good_frames(db, 10)
    for i, frame in enumerate(frames):
        frame.channel = "can1" if i % 2 else "can0"
    path = write_log(tmp_path / "two.log", frames)
    reader, samples = replay(path, db, realtime=False, channel="can1")
    assert len(samples) == 5
    assert reader.counters.get("received") == 5
    assert reader.counters.get("other_channel") == 5


def test_stop_interrupts_a_paced_wait(db: Any, tmp_path: Path) -> None:
    """stop() ends a replay waiting for a frame 30 s away promptly, without 'ended'."""
    path = write_log(tmp_path / "slow.log", good_frames(db, 2, step=30.0))
    emitted = threading.Event()
    reader = ReplayReader("slow", path, CantoolsDecoder(db), lambda _s: emitted.set())
    reader.start()
    assert emitted.wait(10)
    started = time.monotonic()
    assert reader.stop(timeout=5)
    assert time.monotonic() - started < 2
    assert reader.state is ReaderState.STOPPED
    assert not reader.ended
    assert reader.position == 1


@pytest.mark.parametrize(("name", "reason"), [("missing.log", "no such"), ("x.nope", "cannot")])
def test_unreadable_log_fails_without_retry(
    db: Any, tmp_path: Path, name: str, reason: str
) -> None:
    """A missing file or an unknown format fails once (no retry loop) with a clear error."""
    path = tmp_path / name
    if name.endswith(".nope"):
        path.write_text("junk\n")
    cls: Any = get_reader_class("replay")
    reader = cls("bad", path, CantoolsDecoder(db), lambda _s: None)
    with reader:
        assert reader.wait_state(ReaderState.FAILED, timeout=5)
    assert reader.counters.get("failures") == 1
    assert reason in reader.counters.last_error


def test_corrupt_log_line_fails_after_one_retry_keeping_what_came_before(
    db: Any, tmp_path: Path
) -> None:
    """A corrupt line is retried once from the same frame, then the reader fails (no loop)."""
    good = db.get_message_by_name("Engine").encode({"Speed": 1.0, "Temp": 2}).hex().upper()
    path = tmp_path / "bad.log"
    path.write_text(
        f"(1700000000.000000) can0 100#{good}\n"
        f"(1700000000.100000) can0 100#{good}\n"
        "(1700000000.2) can0 zzz#garbage\n"
        f"(1700000000.300000) can0 100#{good}\n"
    )
    errors: list[BaseException] = []
    ring: RingBuffer[Sample] = RingBuffer(10)
    reader = ReplayReader(
        "bad",
        path,
        CantoolsDecoder(db),
        ring.put,
        realtime=False,
        on_error=lambda _r, exc: errors.append(exc),
        retry=RetryPolicy(initial_s=0.01, max_s=0.02),
    )
    with reader:
        assert reader.wait_state(ReaderState.FAILED, timeout=10)
    assert len(ring.get_batch(10, timeout=0)) == 2  # the frames before the bad line, once each
    assert reader.counters.get("log_errors") == 2
    assert reader.counters.get("opens") == 2
    assert "corrupt log" in reader.counters.last_error
    assert [type(e).__name__ for e in errors] == ["ReaderError", "ConfigError"]


def test_replay_into_a_small_ring_drained_slowly_loses_nothing(db: Any, tmp_path: Path) -> None:
    """A replay into a 64-slot drop_oldest ring, drained slowly, waits for room: all N, no drop."""
    n = 3000
    path = write_log(tmp_path / "rec.log", good_frames(db, n))
    _, reference = replay(path, db, realtime=False)
    assert len(reference) == n
    ring: RingBuffer[Sample] = RingBuffer(64, "drop_oldest")
    reader = ReplayReader("replay0", path, CantoolsDecoder(db), ring, realtime=False)
    assert not reader.live
    assert describe(reader)["live"] is False
    received: list[Sample] = []
    ended = threading.Event()

    def consume() -> None:
        while True:
            batch = ring.get_batch(16, timeout=0.05)
            received.extend(batch)
            if not batch and ended.is_set():
                return
            time.sleep(0.0005)  # a consumer slower than the replay: the ring fills up

    consumer = threading.Thread(target=consume, name="test-slow-consumer", daemon=True)
    with reader:
        consumer.start()
        try:
            assert reader.wait_ended(timeout=60), reader.counters.snapshot()
        finally:
            ended.set()
            consumer.join(30)
    assert not consumer.is_alive()
    stats = ring.stats()
    assert stats.dropped == 0, stats
    assert stats.high_water == 64  # it was full: the reader had to wait
    assert received == reference  # every frame once, in order
    assert reader.counters.get("unsent") == 0
    assert stats.put_count == reader.counters.get("decoded") == n


def _blocked_replay(db: Any, tmp_path: Path, ring: RingBuffer[Sample]) -> ReplayReader:
    """A started fast replay of 6000 frames (more than one read), blocked on ``ring`` (full,
    nobody draining it)."""
    path = write_log(tmp_path / "rec.log", good_frames(db, 6000))
    reader = ReplayReader("replay0", path, CantoolsDecoder(db), ring, realtime=False)
    reader.start()
    assert wait_for(lambda: ring.depth == ring.capacity)
    assert reader.state is ReaderState.RUNNING
    return reader


def test_stopping_a_replay_blocked_on_a_full_ring_is_prompt(db: Any, tmp_path: Path) -> None:
    """stop() ends a replay waiting on a full ring within a poll interval; nothing is dropped and
    the samples it held are counted as unsent."""
    ring: RingBuffer[Sample] = RingBuffer(8)
    reader = _blocked_replay(db, tmp_path, ring)
    try:
        started = time.monotonic()
        assert reader.stop(timeout=5)
        assert time.monotonic() - started < 1.0
    finally:
        reader.stop()
    assert reader.state is ReaderState.STOPPED
    assert not reader.ended
    stats = ring.stats()
    assert stats.dropped == 0
    assert stats.depth == 8
    unsent = reader.counters.get("unsent")
    assert unsent > 0
    assert reader.counters.get("decoded") == stats.put_count + unsent
    assert reader.position < 6000  # it stopped in the middle of the log


def test_closing_the_ring_under_a_blocked_replay_stops_it(db: Any, tmp_path: Path) -> None:
    """A replay waiting on a full ring stops by itself when the ring closes (it cannot deliver)."""
    ring: RingBuffer[Sample] = RingBuffer(8)
    reader = _blocked_replay(db, tmp_path, ring)
    try:
        ring.close()
        assert reader.wait_state(ReaderState.STOPPED, timeout=2)
        assert wait_for(lambda: not reader.is_alive(), timeout=2)
    finally:
        reader.stop()
    stats = ring.stats()
    assert (stats.dropped, stats.dropped_closed) == (0, 0)
    assert reader.counters.get("unsent") > 0
    assert reader.counters.get("decoded") == stats.put_count + reader.counters.get("unsent")
    assert reader.position < 6000  # it stopped in the middle of the log


def test_status_of_a_stopped_replay_balances_and_a_drop_is_reported(
    db: Any, tmp_path: Path
) -> None:
    """The agent's accounting counts a stopped replay's unsent samples (still balanced, nothing
    dropped); a ring overflow from a live source makes the summary say what was lost."""
    ring: RingBuffer[Sample] = RingBuffer(8)
    reader = _blocked_replay(db, tmp_path, ring)
    reader.stop()
    taken = ring.get_batch(100, timeout=0)
    c = reader.counters
    source = SourceStats(
        reader.name,
        reader.kind,
        reader.state.value,
        received=c.get("received"),
        decoded=c.get("decoded"),
        unknown=c.get("unknown"),
        errors=c.get("decode_errors"),
        counters=c.snapshot(),
        live=reader.live,
    )
    rs = ring.stats()
    flusher = FlusherStats(taken=len(taken), delivered=len(taken))

    def agent_status(*sources: SourceStats, ring: RingStats) -> AgentStatus:
        return AgentStatus(1.0, 1.0, sources, ring, flusher, run_name="r", target="local:x")

    ring_stats = RingStats(rs.capacity, rs.depth, rs.high_water, rs.put_count, rs.got, rs.dropped)
    status = agent_status(source, ring=ring_stats)
    assert source.unsent == status.unsent > 0
    assert status.balanced
    assert status.dropped == 0
    summary = status.summary()
    assert f"unsent {source.unsent} (stopped while waiting for room)" in summary[2]
    assert "lost: nothing" in summary
    assert status.as_dict()["sources"][0]["live"] is False

    # a live bus that overflowed the same ring by 5 samples
    bus = SourceStats("can0", "can", "running", 5, 5, 0, 0, live=True)
    overflowed = RingStats(rs.capacity, rs.depth, rs.high_water, rs.put_count + 5, rs.got, 5)
    status = agent_status(source, bus, ring=overflowed)
    assert status.balanced
    assert status.dropped == 5
    assert "lost: 5 dropped by the ring (live sources: can0)" in status.summary()
    assert "dropped 5" in status.line()
