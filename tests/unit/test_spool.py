"""Spool: round trips, restarts, segments, quota, lock, recovery from damage, write failures."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from daq_agent.core.errors import SpoolError
from daq_agent.pipeline.spool import Spool, SpoolRecord, encode_record


def _payloads(seq_hint: int, n: int = 2) -> list[bytes]:
    return [f"req-{seq_hint}-{i}".encode() * (i + 1) for i in range(n)]


def _fill(spool: Spool, n: int, *, count: int = 10) -> list[int]:
    return [spool.append(_payloads(i), count, 1000 * i, 1000 * i + 999) for i in range(n)]


def _segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("seg-*.spool"))


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    """A fresh spool directory."""
    return tmp_path / "spool"


def test_append_read_ack_round_trip(spool_dir: Path) -> None:
    """Appended batches read back intact and in order; ack moves the counters."""
    with Spool(spool_dir) as spool:
        seqs = _fill(spool, 5)
        assert seqs == [1, 2, 3, 4, 5]
        records = spool.read(0)
        assert [r.seq for r in records] == seqs
        assert records[2] == SpoolRecord(3, 10, 2000, 2999, tuple(_payloads(2)))
        assert spool.pending_records == 5
        assert spool.pending_samples == 50
        spool.acknowledge(3)
        assert spool.acked_seq == 3
        assert spool.pending_records == 2
        assert spool.pending_samples == 20
        assert [r.seq for r in spool.read(3)] == [4, 5]
        assert spool.read(5) == []


def test_read_from_disk_matches_cache(spool_dir: Path) -> None:
    """With no cache every read comes from disk and returns the same records."""
    with Spool(spool_dir, cache_bytes=0) as spool, Spool(spool_dir / "b") as cached:
        for i in range(20):
            spool.append(_payloads(i, 3), i, i, i)
            cached.append(_payloads(i, 3), i, i, i)
        assert spool.read(7, max_records=5) == cached.read(7, max_records=5)
        assert [r.seq for r in spool.read(7, max_records=5)] == [8, 9, 10, 11, 12]


def test_read_bounds_records_and_bytes(spool_dir: Path) -> None:
    """read() honours max_records and max_bytes but always returns one record if any."""
    with Spool(spool_dir, cache_bytes=0) as spool:
        for i in range(10):
            spool.append([b"x" * 1000], 1, i, i)
        assert len(spool.read(0, max_records=3)) == 3
        assert len(spool.read(0, max_bytes=2500)) == 2
        assert len(spool.read(0, max_bytes=10)) == 1
        assert spool.read(0, max_records=0) == []


def test_reopen_returns_unacked_only(spool_dir: Path) -> None:
    """After close and reopen only the unacknowledged records are read back."""
    with Spool(spool_dir) as spool:
        _fill(spool, 8)
        spool.acknowledge(5)
    with Spool(spool_dir) as spool:
        assert spool.acked_seq == 5
        assert [r.seq for r in spool.read(spool.acked_seq)] == [6, 7, 8]
        assert spool.stats().recovered_records == 3
        assert spool.stats().cursor_state == "ok"
        assert spool.pending_samples == 30


def test_seq_continues_across_restarts(spool_dir: Path) -> None:
    """Sequence numbers keep increasing after a restart, even when every segment is gone."""
    with Spool(spool_dir) as spool:
        _fill(spool, 4)
    with Spool(spool_dir) as spool:
        assert spool.append([b"a"], 1, 0, 0) == 5
        spool.acknowledge(5)
        assert _segments(spool_dir) == []
    with Spool(spool_dir) as spool:
        assert spool.last_seq == 5
        assert spool.append([b"b"], 1, 0, 0) == 6


def test_segments_roll_and_are_deleted_after_ack(spool_dir: Path) -> None:
    """Segments roll at segment_bytes, are named by first seq, and go once fully acked."""
    record_size = len(encode_record(1, _payloads(0), 10, 0, 999))
    with Spool(spool_dir, segment_bytes=3 * record_size) as spool:
        _fill(spool, 10)
        names = [p.name for p in _segments(spool_dir)]
        assert names == [f"seg-{n:020d}.spool" for n in (1, 4, 7, 10)]
        spool.acknowledge(5)
        assert [p.name for p in _segments(spool_dir)] == names[1:]
        spool.acknowledge(10)
        assert _segments(spool_dir) == []
        assert spool.stats().bytes_on_disk == 0
        assert spool.append([b"c"], 1, 0, 0) == 11
        assert [p.name for p in _segments(spool_dir)] == [f"seg-{11:020d}.spool"]


def test_acknowledge_beyond_last_raises(spool_dir: Path) -> None:
    """Acknowledging a seq never appended is refused; a lower one is a no-op."""
    with Spool(spool_dir) as spool:
        _fill(spool, 2)
        with pytest.raises(SpoolError, match="cannot acknowledge seq 3"):
            spool.acknowledge(3)
        spool.acknowledge(2)
        spool.acknowledge(1)
        assert spool.acked_seq == 2


def test_quota_drops_oldest_segments_with_exact_counts(spool_dir: Path) -> None:
    """Over quota the oldest segments go; their unacked records and samples are counted."""
    record_size = len(encode_record(1, [b"x" * 100], 7, 0, 0))
    with Spool(
        spool_dir, segment_bytes=2 * record_size, quota_bytes=6 * record_size, cache_bytes=0
    ) as spool:
        for i in range(6):
            spool.append([b"x" * 100], 7, i, i)
        spool.acknowledge(1)
        assert spool.stats().dropped_records == 0
        spool.append([b"x" * 100], 7, 6, 6)  # drops seg 1-2: seq 2 was unacked
        stats = spool.stats()
        assert stats.dropped_records == 1
        assert stats.dropped_samples == 7
        assert stats.bytes_on_disk <= 6 * record_size
        for i in range(4):
            spool.append([b"x" * 100], 7, i, i)
        stats = spool.stats()
        assert stats.dropped_records == 5
        assert stats.dropped_samples == 35
        assert stats.bytes_on_disk <= 6 * record_size
        assert [r.seq for r in spool.read(0)] == [7, 8, 9, 10, 11]
        assert spool.pending_records == 5
        assert spool.pending_samples == 35
    with Spool(spool_dir) as spool:
        assert [r.seq for r in spool.read(spool.acked_seq)] == [7, 8, 9, 10, 11]
        assert spool.stats().corrupt_records == 0


def test_quota_smaller_than_a_segment_closes_the_active_one(spool_dir: Path) -> None:
    """When the segment being written alone is over quota it is closed, then dropped."""
    record_size = len(encode_record(1, [b"x" * 100], 1, 0, 0))
    with Spool(spool_dir, quota_bytes=3 * record_size) as spool:
        for i in range(7):
            spool.append([b"x" * 100], 1, i, i)
        stats = spool.stats()
        assert stats.dropped_records == 6
        assert stats.bytes_on_disk <= 3 * record_size
        assert [r.seq for r in spool.read(0)] == [7]


def test_lock_refuses_a_second_owner(spool_dir: Path) -> None:
    """A second Spool on the same directory fails, naming the directory and the pid."""
    pattern = f"{spool_dir}.*locked by pid {os.getpid()}"
    with Spool(spool_dir), pytest.raises(SpoolError, match=pattern):
        Spool(spool_dir)
    Spool(spool_dir).close()  # released on close


def test_lock_refuses_another_process(spool_dir: Path) -> None:
    """A spool held by another process is refused with that process's pid."""
    code = (
        "import sys, time; from daq_agent.pipeline.spool import Spool; "
        "s = Spool(sys.argv[1]); print('ready', flush=True); time.sleep(30)"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code, str(spool_dir)], stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
            with pytest.raises(SpoolError, match=f"locked by pid {proc.pid}"):
                Spool(spool_dir)
        finally:
            proc.kill()
    Spool(spool_dir).close()  # the kernel released the lock with the process


def test_torn_tail_at_every_offset(tmp_path: Path) -> None:
    """A last record cut at any byte is truncated; earlier ones survive; seq continues."""
    template = tmp_path / "template"
    with Spool(template) as spool:
        _fill(spool, 3)
    (segment,) = _segments(template)
    data = segment.read_bytes()
    last_size = len(encode_record(3, _payloads(2), 10, 2000, 2999))
    start = len(data) - last_size
    for cut in range(start, len(data)):
        directory = tmp_path / f"cut{cut}"
        directory.mkdir()
        (directory / segment.name).write_bytes(data[:cut])
        with Spool(directory) as spool:
            assert [r.seq for r in spool.read(0)] == [1, 2], cut
            stats = spool.stats()
            assert stats.torn_bytes == cut - start
            assert stats.corrupt_records == 0
            assert spool.append([b"n"], 1, 0, 0) == 3
        assert (directory / segment.name).stat().st_size == start


def test_flipped_bytes_in_a_middle_record_are_skipped_and_counted(tmp_path: Path) -> None:
    """A record with flipped bytes anywhere is skipped and counted once; the others survive."""
    template = tmp_path / "template"
    with Spool(template) as spool:
        _fill(spool, 5)
    (segment,) = _segments(template)
    data = segment.read_bytes()
    size = len(encode_record(3, _payloads(2), 10, 2000, 2999))
    offset = sum(len(encode_record(i + 1, _payloads(i), 10, 0, 0)) for i in range(2))
    for at in range(offset, offset + size, 3):
        directory = tmp_path / f"flip{at}"
        directory.mkdir()
        damaged = bytearray(data)
        damaged[at] ^= 0x5A
        (directory / segment.name).write_bytes(bytes(damaged))
        with Spool(directory) as spool:
            assert [r.seq for r in spool.read(0)] == [1, 2, 4, 5], at
            assert spool.stats().corrupt_records == 1
            assert spool.stats().torn_bytes == 0
            assert spool.append([b"n"], 1, 0, 0) == 6


def test_garbage_between_segments_counts_by_seq_gap(tmp_path: Path) -> None:
    """A damaged tail of an older segment is counted exactly from the next segment's seqs."""
    record_size = len(encode_record(1, _payloads(0), 10, 0, 999))
    directory = tmp_path / "spool"
    with Spool(directory, segment_bytes=3 * record_size) as spool:
        _fill(spool, 7)
    first = _segments(directory)[0]
    data = first.read_bytes()
    first.write_bytes(data[: record_size + 10] + b"\0" * (len(data) - record_size - 10))
    with Spool(directory) as spool:
        assert [r.seq for r in spool.read(0)] == [1, 4, 5, 6, 7]
        assert spool.stats().corrupt_records == 2


def test_corrupt_last_record_counts_as_one(tmp_path: Path) -> None:
    """A complete last record with a bad CRC is one corrupt record, truncated away."""
    directory = tmp_path / "spool"
    with Spool(directory) as spool:
        _fill(spool, 3)
    (segment,) = _segments(directory)
    damaged = bytearray(segment.read_bytes())
    damaged[-1] ^= 0xFF
    segment.write_bytes(bytes(damaged))
    with Spool(directory) as spool:
        assert [r.seq for r in spool.read(0)] == [1, 2]
        assert spool.stats().corrupt_records == 1


@pytest.mark.parametrize("content", [None, b"", b"garbage!", b"DQAK" + b"\x07" * 12])
def test_deleted_or_corrupt_cursor_replays_everything(
    spool_dir: Path, content: bytes | None
) -> None:
    """Without a valid cursor the spool starts and everything present is unacknowledged."""
    record_size = len(encode_record(1, _payloads(0), 10, 0, 999))
    with Spool(spool_dir, segment_bytes=3 * record_size) as spool:
        _fill(spool, 8)
        spool.acknowledge(4)  # deletes seg 1-3; seg 4-6 keeps acked seq 4
    cursor = spool_dir / "ack"
    if content is None:
        cursor.unlink()
    else:
        cursor.write_bytes(content)
    with Spool(spool_dir) as spool:
        stats = spool.stats()
        assert stats.cursor_state == ("missing" if content is None else "corrupt")
        assert stats.recovered_records == 5
        assert spool.acked_seq == 3
        assert [r.seq for r in spool.read(spool.acked_seq)] == [4, 5, 6, 7, 8]
        assert spool.append([b"n"], 1, 0, 0) == 9


def test_foreign_and_empty_files_do_not_stop_the_start(spool_dir: Path) -> None:
    """An empty segment, a stray file and a stale ack.tmp never prevent opening."""
    with Spool(spool_dir) as spool:
        _fill(spool, 2)
    (spool_dir / f"seg-{9:020d}.spool").write_bytes(b"")
    (spool_dir / "notes.txt").write_text("hello")
    (spool_dir / "ack.tmp").write_bytes(b"x")
    with Spool(spool_dir) as spool:
        assert [r.seq for r in spool.read(0)] == [1, 2]
        assert spool.append([b"n"], 1, 0, 0) == 10  # seq 9 was handed out before
    assert (spool_dir / "notes.txt").exists()
    assert not (spool_dir / "ack.tmp").exists()


class _FailingWrite:
    """os.write that fails with ``error`` once armed."""

    def __init__(self, error: int) -> None:
        self.error = error
        self.armed = False

    def __call__(self, fd: int, data: memoryview) -> int:
        if self.armed:
            raise OSError(self.error, os.strerror(self.error))
        return os.write(fd, data)


@pytest.mark.parametrize("error", [errno.EIO, errno.ENOSPC])
def test_write_failure_stops_the_spool(spool_dir: Path, error: int) -> None:
    """A failing write raises SpoolError and every later append fails too."""
    write = _FailingWrite(error)
    spool = Spool(spool_dir, write=write)
    try:
        _fill(spool, 3)
        write.armed = True
        with pytest.raises(SpoolError, match="write failed"):
            spool.append([b"x"], 1, 0, 0)
        write.armed = False
        with pytest.raises(SpoolError, match="no longer trusted"):
            spool.append([b"x"], 1, 0, 0)
        with pytest.raises(SpoolError, match="no longer trusted"):
            spool.acknowledge(1)
        assert spool.stats().failed is not None
        assert [r.seq for r in spool.read(0)] == [1, 2, 3]
    finally:
        spool.close()
    with Spool(spool_dir) as spool:
        assert [r.seq for r in spool.read(0)] == [1, 2, 3]


def test_fsync_failure_in_the_sync_thread_fails_later_appends(spool_dir: Path) -> None:
    """An fsync error in daq-spool-sync makes the next append raise SpoolError."""
    failing = threading.Event()

    def fsync(fd: int) -> None:
        if failing.is_set():
            raise OSError(errno.EIO, "Input/output error")
        os.fsync(fd)

    spool = Spool(spool_dir, fsync_interval=0.01, fsync=fsync)
    try:
        failing.set()
        spool.append([b"x"], 1, 0, 0)
        deadline = time.monotonic() + 5
        while spool.stats().failed is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "Input/output error" in (spool.stats().failed or "")
        with pytest.raises(SpoolError, match="no longer trusted"):
            spool.append([b"y"], 1, 0, 0)
        with pytest.raises(SpoolError):
            spool.sync()
    finally:
        spool.close()


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (skips when mounting is not permitted)."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.decode(errors='replace').strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_real_enospc_on_a_full_filesystem(tiny_fs: Path) -> None:
    """A really full filesystem raises SpoolError; what was written reopens intact."""
    spool = Spool(tiny_fs / "spool", fsync_interval=0)
    appended = 0

    def fill_up() -> None:
        nonlocal appended
        for i in range(10_000):
            spool.append([os.urandom(4000)], 1, i, i)
            appended += 1

    try:
        with pytest.raises(SpoolError, match="No space left"):
            fill_up()
        with pytest.raises(SpoolError):
            spool.append([b"x"], 1, 0, 0)
    finally:
        spool.close()
    assert appended > 10
    with Spool(tiny_fs / "spool") as spool:  # the partial record is truncated away
        assert [r.seq for r in spool.read(0, max_records=100_000)] == list(range(1, appended + 1))
        assert spool.stats().corrupt_records == 0


def test_quota_below_free_space_keeps_running_on_a_small_filesystem(tiny_fs: Path) -> None:
    """With a quota under the free space a tiny filesystem never fills: drops are counted."""
    with Spool(tiny_fs / "spool", segment_bytes=32_000, quota_bytes=128_000) as spool:
        for i in range(200):
            spool.append([b"p" * 4000], 3, i, i)
        stats = spool.stats()
        assert stats.failed is None
        assert stats.dropped_records > 0
        assert stats.dropped_records + stats.pending_records == 200
        assert stats.dropped_samples == 3 * stats.dropped_records


def test_group_commit_thread_syncs_within_the_interval(spool_dir: Path) -> None:
    """The daq-spool-sync thread fsyncs an append within a few intervals, then stops on close."""
    spool = Spool(spool_dir, fsync_interval=0.02)
    try:
        assert any(t.name == "daq-spool-sync" for t in threading.enumerate())
        spool.append([b"x" * 10], 1, 0, 0)
        path = _segments(spool_dir)[0]
        deadline = time.monotonic() + 5
        while spool.synced_sizes().get(path, 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert spool.synced_sizes()[path] == path.stat().st_size
        age = spool.stats().last_fsync_age
        assert age is not None
        assert age < 5
    finally:
        spool.close()
    assert not any(t.name == "daq-spool-sync" for t in threading.enumerate())


def test_fsync_interval_zero_syncs_every_append(spool_dir: Path) -> None:
    """With fsync_interval=0 each append is durable when it returns and no thread runs."""
    with Spool(spool_dir, fsync_interval=0) as spool:
        assert not any(t.name == "daq-spool-sync" for t in threading.enumerate())
        spool.append([b"abc"], 1, 0, 0)
        path = _segments(spool_dir)[0]
        assert spool.synced_sizes()[path] == path.stat().st_size


def test_close_is_idempotent_and_final(spool_dir: Path) -> None:
    """close() twice is fine; a closed spool refuses appends."""
    spool = Spool(spool_dir)
    spool.append([b"x"], 1, 0, 0)
    spool.close()
    spool.close()
    assert spool.closed
    with pytest.raises(SpoolError, match="closed"):
        spool.append([b"x"], 1, 0, 0)


def test_unclosed_spool_logs_a_warning(spool_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A spool garbage-collected without close() says so in the log."""
    spool = Spool(spool_dir, fsync_interval=0)
    spool.append([b"x"], 1, 0, 0)
    with caplog.at_level(logging.WARNING, logger="daq_agent.pipeline.spool"):
        del spool
    assert "was not properly closed" in caplog.text


def test_concurrent_append_and_read(spool_dir: Path) -> None:
    """A reader acknowledging while a writer appends sees every record once, in order."""
    total = 2000
    with Spool(spool_dir, segment_bytes=8192, cache_bytes=4096) as spool:

        def write() -> None:
            for i in range(total):
                spool.append([i.to_bytes(4, "little")], 1, i, i)

        writer = threading.Thread(target=write, name="test-writer")
        writer.start()
        seen: list[int] = []
        deadline = time.monotonic() + 30
        while len(seen) < total and time.monotonic() < deadline:
            batch = spool.read(seen[-1] if seen else 0, max_records=64)
            for record in batch:
                assert int.from_bytes(record.payloads[0], "little") == record.seq - 1
            seen.extend(r.seq for r in batch)
            if batch:
                spool.acknowledge(batch[-1].seq)
        writer.join()
        assert seen == list(range(1, total + 1))
        assert spool.pending_records == 0


def test_record_rotting_on_disk_after_open_is_skipped_by_read(spool_dir: Path) -> None:
    """A record damaged on disk after it was written is skipped by read() and counted."""
    with Spool(spool_dir, cache_bytes=0) as spool:
        _fill(spool, 3)
        (segment,) = _segments(spool_dir)
        damaged = bytearray(segment.read_bytes())
        damaged[len(encode_record(1, _payloads(0), 10, 0, 999)) + 50] ^= 0xFF
        segment.write_bytes(bytes(damaged))
        assert [r.seq for r in spool.read(0)] == [1, 3]
        assert spool.stats().corrupt_records == 1
        assert spool.pending_records == 2
        assert spool.pending_samples == 20
        assert [r.seq for r in spool.read(0)] == [1, 3]
        assert spool.stats().corrupt_records == 1  # counted once


def test_memory_stays_bounded_while_the_backlog_grows(spool_dir: Path) -> None:
    """Appending 40 MB with nothing acknowledged keeps the spool's memory to its cache."""
    payload = os.urandom(20_000)
    with Spool(spool_dir, segment_bytes=4 * 2**20, cache_bytes=2**20) as spool:
        tracemalloc.start()
        try:
            for i in range(2000):
                spool.append([payload], 1, i, i)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert spool.pending_bytes > 40_000_000
        assert peak < 3 * 2**20  # the 1 MiB cache, the index and one record being built
        assert len(spool.read(0, max_records=10**6, max_bytes=2**20)) <= 53


@pytest.mark.parametrize(
    "options",
    [{"segment_bytes": 0}, {"fsync_interval": -1.0}, {"quota_bytes": 0}],
)
def test_bad_parameters_are_refused(spool_dir: Path, options: dict[str, float]) -> None:
    """Out-of-range sizes and intervals raise SpoolError before anything is created."""
    with pytest.raises(SpoolError, match="must be"):
        Spool(spool_dir, **options)  # type: ignore[arg-type]
    assert not spool_dir.exists()


def test_an_unreadable_directory_is_a_spool_error(tmp_path: Path) -> None:
    """A path that cannot be a directory gives SpoolError, not a bare OSError."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SpoolError, match="cannot create"):
        Spool(blocker / "spool")


def test_recovered_segment_fully_acked_is_deleted_at_open(spool_dir: Path) -> None:
    """A segment whose deletion a crash prevented after the ack is removed at the next open."""
    with Spool(spool_dir) as spool:
        _fill(spool, 3)
    kept = _segments(spool_dir)[0].read_bytes()
    with Spool(spool_dir) as spool:
        spool.acknowledge(3)
    (spool_dir / f"seg-{1:020d}.spool").write_bytes(kept)  # as if the unlink was lost
    with Spool(spool_dir) as spool:
        assert _segments(spool_dir) == []
        assert spool.read(0) == []
        assert spool.append([b"n"], 1, 0, 0) == 4


def test_losses_are_reported_by_one_open_only(tmp_path: Path) -> None:
    """A corrupt record is counted by the open that finds it, not again by later opens."""
    directory = tmp_path / "spool"
    with Spool(directory) as spool:
        _fill(spool, 3)
    (segment,) = _segments(directory)
    damaged = bytearray(segment.read_bytes())
    damaged[len(encode_record(1, _payloads(0), 10, 0, 999)) + 50] ^= 0xFF
    segment.write_bytes(bytes(damaged))
    with Spool(directory) as spool:
        assert spool.stats().corrupt_records == 1
    with Spool(directory) as spool:
        assert spool.stats().corrupt_records == 0
        assert [r.seq for r in spool.read(0)] == [1, 3]
