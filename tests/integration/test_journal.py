"""The raw-frame journal on real buses, ports and files, and the idempotent backfill.

* a journal recorded by the real CAN reader on a virtual bus, in each format, read back with
  ``can.LogReader`` and compared frame by frame with what was sent;
* a journal recorded during an agent run (local server, SQLite), then backfilled twice into a
  named run with ``daq-agent replay``: each sample stored once;
* rotation by size and by age, retention by count and by age, on real files;
* a full disk (a 64 KiB tmpfs) and an unwritable directory: counted, the reader goes on;
* the bounded queue: what does not fit is dropped and counted, never waited for;
* a serial journal of a pty, read back chunk by chunk.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import can
import pytest

from daq_agent.agent import Agent
from daq_agent.cli import main as cli_main
from daq_agent.config import LocalTarget, load_config
from daq_agent.decode.can_decoder import CanDecoder
from daq_agent.decode.dbc import load_database
from daq_agent.readers.base import ReaderState
from daq_agent.readers.can import CanReader
from daq_agent.readers.journal import (
    BLF_COMPRESSION,
    CanJournal,
    JournalSettings,
    SerialJournal,
    journal_files,
    read_serial_journal,
)
from daq_agent.readers.serial import SerialReader
from daq_agent.server.store import Store
from daq_agent.sim.can import CanSimulator

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BENCH_DBC = REPO / "dbc" / "bench.dbc"
GPS = REPO / "configs" / "serial" / "gps_nmea.yaml"
BASE_S = 1_750_000_000.0


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait until ``predicate()`` holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def traffic(count: int) -> list[can.Message]:
    """Bench-database frames (classic, FD, 29-bit) 100 µs apart, then unknown, remote and error
    frames."""
    simulator = CanSimulator([load_database(BENCH_DBC)])
    frames = []
    for i, (_plan, msg) in enumerate(simulator.frames(count=count)):
        msg.timestamp = BASE_S + i * 1e-4
        frames.append(msg)
    t = BASE_S + count * 1e-4
    frames += [
        can.Message(timestamp=t + 0.001, arbitration_id=0x7AB, data=b"\x01" * 8),
        can.Message(timestamp=t + 0.002, arbitration_id=0x100, is_remote_frame=True, dlc=8),
        can.Message(
            timestamp=t + 0.003,
            arbitration_id=0x18FF0001,
            is_extended_id=True,
            is_remote_frame=True,
            dlc=2,
        ),
        can.Message(
            timestamp=t + 0.004,
            arbitration_id=0x20000004,
            is_error_frame=True,
            is_extended_id=True,
            data=bytes(8),
        ),
    ]
    return frames


def compare(sent: list[can.Message], got: list[can.Message], fmt: str) -> None:
    """Frame by frame, as far as the format keeps it."""
    assert len(got) == len(sent), (len(got), len(sent))
    tolerance = 2e-6  # blf: ns; asc and log: µs
    for i, (a, b) in enumerate(zip(sent, got, strict=True)):
        where = f"frame {i} ({fmt})"
        assert abs(a.timestamp - b.timestamp) <= tolerance, (where, a.timestamp, b.timestamp)
        assert b.is_error_frame == a.is_error_frame, where
        if a.is_error_frame:
            continue  # asc and log keep no error class; blf keeps its own flags in the id
        assert b.arbitration_id == a.arbitration_id, where
        assert b.is_extended_id == a.is_extended_id, where
        assert b.is_remote_frame == a.is_remote_frame, where
        assert b.is_fd == a.is_fd, where
        if a.is_remote_frame:
            if fmt != "log":  # candump -L has no length for a remote frame
                assert b.dlc == a.dlc, where
        else:
            assert bytes(b.data) == bytes(a.data), where


@pytest.mark.parametrize("fmt", ["blf", "asc", "log"])
def test_can_reader_journal_read_back_frame_by_frame(
    tmp_path: Path, channel: str, sender: can.BusABC, fmt: str
) -> None:
    """Every frame the reader receives is in the journal, as sent, in order; nothing blocks."""
    decoder = CanDecoder("can0", [load_database(BENCH_DBC)])
    journal = CanJournal("can0", JournalSettings(directory=tmp_path / "j", format=fmt))
    samples: list[Any] = []
    reader = CanReader(
        "can0",
        {"interface": "virtual", "channel": channel},
        decoder,
        samples.append,
        journal=journal,
    )
    sent = traffic(400)
    reader.start()
    try:
        assert reader.wait_state(ReaderState.RUNNING, timeout=10)
        for msg in sent:
            sender.send(msg)
        wait_for(lambda: reader.counters.get("received") == len(sent), 20, "every frame")
    finally:
        reader.stop()
    counters = reader.counters
    assert counters.get("journal_written") == len(sent)
    assert counters.get("journal_dropped") == counters.get("journal_lost") == 0
    assert counters.get("journal_errors") == 0
    assert len(samples) == counters.get("decoded") == 400  # decoding unaffected
    files = journal_files(tmp_path / "j", "can0", fmt)
    assert len(files) == 1
    assert counters.get("journal_files") == 1
    kwargs = {"relative_timestamp": False} if fmt == "asc" else {}
    compare(sent, list(can.LogReader(files[0], **kwargs)), fmt)


def _count(db: Path, run: str) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM samples WHERE run IN (SELECT id FROM runs WHERE name = ?)",
            (run,),
        ).fetchone()
    return int(row[0])


def _rows(db: Path, run: str) -> list[tuple[str, int, dict[str, Any]]]:
    with Store.open(db, readonly=True) as store:
        return sorted((s.flow, s.timestamp_ns, s.values) for s in store.iter_samples(run_name=run))


def test_journal_during_agent_run_then_backfill_twice(
    tmp_path: Path, channel: str, sender: can.BusABC, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run's journal holds every frame sent; backfilled twice into a named run (and once more
    with --force), each sample is stored once, equal to what the live run stored."""
    config_path = tmp_path / "agent.yaml"
    config_path.write_text(
        f"asset: journal-test\nstate_dir: {tmp_path / 'state'}\nrun: {{name: live}}\n"
        "buses:\n"
        f"  - {{name: can0, interface: virtual, channel: {channel}, databases: [{BENCH_DBC}],\n"
        "     journal: {dir: journal, format: blf}}\n"
    )
    config = load_config(config_path, env={})
    assert isinstance(config.target, LocalTarget)
    db = config.target.db_path
    sent = traffic(1500)
    agent = Agent(config)
    agent.start()
    try:
        assert agent.readers[0].wait_state(ReaderState.RUNNING, timeout=10)
        for msg in sent:
            sender.send(msg)
        wait_for(lambda: agent.status().received == len(sent), 30, "every frame received")
    finally:
        final = agent.stop()
    assert final.balanced
    assert final.flusher.delivered == 1500
    counters = final.sources[0].counters
    assert "    journal: written 1504, dropped (queue full) 0, lost (write errors) 0" in (
        "\n".join(final.summary())
    )
    assert counters["journal_written"] == len(sent)
    assert counters["journal_dropped"] == 0
    files = journal_files(tmp_path / "journal", "can0", "blf")
    assert len(files) == 1
    compare(sent, list(can.LogReader(files[0])), "blf")
    live_rows = _rows(db, "live")
    assert len(live_rows) == 1500

    argv = ["replay", str(files[0]), "--config", str(config_path), "--run", "bf", "--no-progress"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "1504 frames" in out, out
    assert "1500 samples delivered" in out, out
    assert _count(db, "bf") == 1500
    # the same samples as the live run: flows, timestamps and values
    assert _rows(db, "bf") == live_rows

    assert cli_main(argv) == 0  # the second time: skipped by its content hash
    out = capsys.readouterr().out
    assert "already backfilled into run bf" in out, out
    assert _count(db, "bf") == 1500

    assert cli_main([*argv, "--force"]) == 0  # sent again: the store keeps each sample once
    out = capsys.readouterr().out
    assert "1500 samples delivered" in out, out
    assert _count(db, "bf") == 1500
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        assert conn.execute("SELECT count(*) FROM runs WHERE name = 'bf'").fetchone()[0] == 1


class Clock:
    """A wall clock the test moves forward (rotation by age without waiting)."""

    def __init__(self) -> None:
        self.now = BASE_S

    def __call__(self) -> float:
        return self.now


def frames(n: int, start: float = BASE_S) -> list[can.Message]:
    """``n`` classic frames."""
    return [
        can.Message(
            timestamp=start + i * 1e-3, arbitration_id=0x100 + i % 7, data=bytes([i % 256]) * 8
        )
        for i in range(n)
    ]


def _written(journal: CanJournal, n: int) -> Callable[[], bool]:
    return lambda: journal.counters.values["journal_written"] >= n


def test_rotation_by_size_and_retention_by_count(tmp_path: Path) -> None:
    """Files roll at the size limit; only the newest ``keep_files`` remain, frames in order."""
    settings = JournalSettings(directory=tmp_path, format="log", rotate_bytes=4000, keep_files=3)
    journal = CanJournal("can0", settings)
    journal.start()
    sent = frames(600)
    try:
        for i in range(0, 600, 50):  # one burst of the reader each
            journal.submit(sent[i : i + 50])
            wait_for(_written(journal, i + 50), 10, "the burst written")
    finally:
        journal.close()
    values = journal.counters.values
    assert values["journal_written"] == 600
    assert values["journal_errors"] == 0
    assert values["journal_files"] > 3  # rolled several times
    files = journal_files(tmp_path, "can0", "log")
    assert len(files) == 3
    got = [m for f in files for m in can.LogReader(f)]
    kept = sent[len(sent) - len(got) :]
    assert [(m.arbitration_id, bytes(m.data)) for m in got] == [
        (m.arbitration_id, bytes(m.data)) for m in kept
    ]
    for path in files[:-1]:
        assert path.stat().st_size >= 4000  # rolled only once full
        assert path.stat().st_size < 4000 + 50 * 40  # ... at the first burst after


def test_rotation_by_age_and_retention_by_age(tmp_path: Path) -> None:
    """A file older than ``rotate_s`` rolls at the next write; files last written longer ago
    than ``keep_days`` are deleted (an earlier run's included), other journals' files kept."""
    old = tmp_path / "can0-20200101T000000.000000Z.blf"
    old.write_bytes(b"old")
    os.utime(old, (time.time() - 3 * 86400, time.time() - 3 * 86400))
    other = tmp_path / "can1-20200101T000000.000000Z.blf"
    other.write_bytes(b"other bus")
    os.utime(other, (time.time() - 3 * 86400, time.time() - 3 * 86400))
    clock = Clock()
    clock.now = time.time()
    settings = JournalSettings(
        directory=tmp_path, format="blf", rotate_bytes=None, rotate_s=60.0, keep_s=2 * 86400.0
    )
    journal = CanJournal("can0", settings, clock=clock)
    journal.start()
    try:
        journal.submit(frames(10))
        wait_for(_written(journal, 10), 10, "the first burst")
        assert not old.exists()  # older than two days: deleted when the first file opened
        clock.now += 30
        journal.submit(frames(10, BASE_S + 30))
        wait_for(_written(journal, 20), 10, "the second burst")
        assert journal.counters.values["journal_files"] == 1  # 30 s old: not yet
        clock.now += 31
        journal.submit(frames(10, BASE_S + 61))
        wait_for(_written(journal, 30), 10, "the third burst")
        assert journal.counters.values["journal_files"] == 2  # 61 s old: rolled
    finally:
        journal.close()
    files = journal_files(tmp_path, "can0", "blf")
    assert len(files) == 2
    assert [len(list(can.LogReader(f))) for f in files] == [20, 10]
    assert other.exists()  # another bus's journal is not this one's to delete


def test_queue_bound_drops_and_counts_never_blocks(tmp_path: Path) -> None:
    """What does not fit in the queue is dropped and counted at once; the rest is written."""
    journal = CanJournal("can0", JournalSettings(directory=tmp_path, queue_items=100))
    started = time.perf_counter()
    journal.submit(frames(60))
    journal.submit(frames(60))  # 40 fit
    journal.submit(frames(5))  # none fit
    assert time.perf_counter() - started < 0.05
    values = journal.counters.values
    assert values["journal_dropped"] == 25
    assert journal.queued == 100
    journal.start()
    wait_for(_written(journal, 100), 10, "the queue written")
    journal.submit(frames(100))  # room again
    journal.close()
    assert values["journal_written"] == 200
    assert values["journal_dropped"] == 25
    journal.submit(frames(3))  # after close: dropped, counted
    assert values["journal_dropped"] == 28
    assert sum(len(list(can.LogReader(f))) for f in journal_files(tmp_path, "can0", "blf")) == 200


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (a disk that fills up), unmounted afterwards."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.faults
def test_full_disk_is_counted_and_the_reader_goes_on(
    tiny_disk: Path, channel: str, sender: can.BusABC
) -> None:
    """The disk fills up: write errors are counted, the frames then lost counted, and the
    reader keeps decoding every frame."""
    decoder = CanDecoder("can0", [load_database(BENCH_DBC)])
    journal = CanJournal(
        "can0", JournalSettings(directory=tiny_disk, format="log", flush_interval_s=0.01)
    )
    samples: list[Any] = []
    reader = CanReader(
        "can0",
        {"interface": "virtual", "channel": channel},
        decoder,
        samples.append,
        journal=journal,
    )
    sent = traffic(3000)  # ~200 KB of candump text: more than the disk holds
    reader.start()
    try:
        assert reader.wait_state(ReaderState.RUNNING, timeout=10)
        for i, msg in enumerate(sent):
            sender.send(msg)
            if i % 200 == 0:
                time.sleep(0.02)  # let the journal write (and fail) as it goes
        wait_for(lambda: reader.counters.get("received") == len(sent), 20, "every frame")
        assert reader.state is ReaderState.RUNNING
    finally:
        reader.stop()
    c = reader.counters
    seen = (c.snapshot(), journal.last_error)
    assert len(samples) == c.get("decoded") == 3000, seen
    assert c.get("journal_errors") >= 1, seen
    assert c.get("journal_lost") > 0, seen
    total = c.get("journal_written") + c.get("journal_lost") + c.get("journal_dropped")
    assert total == len(sent), seen
    assert "No space left on device" in journal.last_error, seen


def test_unwritable_directory_is_counted_and_retried(tmp_path: Path) -> None:
    """A journal directory that cannot be created: an error counted, frames lost counted, the
    next attempt after the back-off (not at every burst)."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    journal = CanJournal("can0", JournalSettings(directory=blocker / "journal"))
    journal.start()
    try:
        journal.submit(frames(10))
        journal.submit(frames(10))
        wait_for(lambda: journal.counters.values["journal_lost"] == 20, 10, "frames lost")
    finally:
        journal.close()
    assert journal.counters.values["journal_errors"] == 1  # the second burst: backing off
    assert "Not a directory" in journal.last_error


def test_serial_journal_of_a_pty(tmp_path: Path) -> None:
    """Every byte read from a pty is in the serial journal, in read chunks with read times."""
    master, slave = os.openpty()
    import tty

    tty.setraw(slave)
    journal = SerialJournal("gps", JournalSettings(directory=tmp_path, format="hex"))
    samples: list[Any] = []
    reader = SerialReader(
        "gps", os.ttyname(slave), {"baudrate": 9600}, GPS, samples.append, journal=journal
    )
    sentence = b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n"
    before = time.time_ns()
    reader.start()
    try:
        assert reader.wait_state(ReaderState.RUNNING, timeout=10)
        for _ in range(5):
            os.write(master, sentence)
            time.sleep(0.02)
        wait_for(lambda: reader.counters.get("bytes") == 5 * len(sentence), 10, "every byte")
    finally:
        reader.stop()
        os.close(master)
        os.close(slave)
    after = time.time_ns()
    files = journal_files(tmp_path, "gps", "hex")
    assert len(files) == 1
    chunks = read_serial_journal(files[0])
    assert b"".join(data for _, data in chunks) == sentence * 5
    assert reader.counters.get("journal_written") == len(chunks) >= 1
    stamps = [t for t, _ in chunks]
    assert stamps == sorted(stamps)
    assert before <= stamps[0]
    assert stamps[-1] <= after
    assert len(samples) == 5


@pytest.mark.parametrize("fmt", ["blf", "asc"])
def test_channel_number_beyond_the_format_is_written_as_channel_1(tmp_path: Path, fmt: str) -> None:
    """python-can's BLF and ASC writers take the channel number from the digits ending the
    channel name (a virtual bus ``test-1234567`` gives 1234567, beyond BLF's 16 bits): a journal
    writes its bus as channel 1."""
    journal = CanJournal("can0", JournalSettings(directory=tmp_path, format=fmt))
    sent = frames(5)
    for msg in sent:
        msg.channel = "test-1234567"
    journal.submit(sent)
    journal.close()
    assert journal.counters.values["journal_written"] == 5
    assert journal.counters.values["journal_lost"] == 0
    (path,) = journal_files(tmp_path, "can0", fmt)
    kwargs = {"relative_timestamp": False} if fmt == "asc" else {}
    got = list(can.LogReader(path, **kwargs))
    assert [bytes(m.data) for m in got] == [bytes(m.data) for m in sent]
    assert {m.channel for m in got} == {0}  # python-can reads channel 1 back as 0


def test_blf_batch_path_writes_python_cans_bytes(tmp_path: Path) -> None:
    """The journal's batch path for BLF writes exactly the file python-can's BLFWriter writes for
    the same frames (classic, 29-bit, remote, FD, error; over several containers)."""
    sent = traffic(6000)  # > 128 KiB of objects: several containers
    for msg in sent:
        msg.channel = "vcan0"  # as a bus gives them: cleared by the journal
    journal = CanJournal("can0", JournalSettings(directory=tmp_path / "j", format="blf"))
    for i in range(0, len(sent), 1024):
        journal.submit(sent[i : i + 1024])
    journal.close()
    assert {msg.channel for msg in sent} == {None}
    (path,) = journal_files(tmp_path / "j", "can0", "blf")
    reference = tmp_path / "reference.blf"
    with can.BLFWriter(reference, compression_level=BLF_COMPRESSION) as writer:
        for msg in sent:
            writer.on_message_received(msg)
    assert path.read_bytes() == reference.read_bytes()
    compare(sent, list(can.LogReader(path)), "blf")
