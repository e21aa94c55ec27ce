"""Spool model test: append / sync / read / ack / crash at any byte / reopen keep the invariants.

A crash is simulated as a power loss: the spool's files are closed without a final fsync (the
sync thread never runs on its own here: its interval is an hour, or 0 so that every append is
synced), then every segment is cut to a random length no shorter than what the spool reports as
fsynced, and a segment never synced may vanish altogether (its directory entry was not synced).
"""

from __future__ import annotations

import shutil
import struct
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from daq_agent.pipeline.spool import Spool, SpoolRecord

_HEAD = struct.Struct("<4sIQ")  # magic, body length, seq: the start of every record header
_OVERHEAD = 44  # header (40) + crc (4)

payload_lists = st.lists(st.binary(max_size=40), max_size=3)


def _boundaries(path: Path) -> list[tuple[int, int]]:
    """(seq, end offset) of each record in an undamaged segment file."""
    data = path.read_bytes()
    out: list[tuple[int, int]] = []
    pos = 0
    while pos + _OVERHEAD <= len(data):
        _, body_len, seq = _HEAD.unpack_from(data, pos)
        end = pos + _OVERHEAD + body_len
        if end > len(data):
            break
        out.append((seq, end))
        pos = end
    return out


def _first_seq(path: Path) -> int:
    return int(path.name[4:-6])


class SpoolMachine(RuleBasedStateMachine):
    """The spool against a model: every record ever appended, the ack cursor and what is on disk."""

    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="spool-model-"))
        self.spool: Spool | None = None
        self.records: dict[int, SpoolRecord] = {}  # the last record appended with each seq
        self.pending: list[int] = []  # seqs > acked that should be on disk, in order
        self.acked = 0
        self.counted = 0  # last_seq at the latest open: losses up to it were already reported
        self.highest_seq = 0
        self.dropped = 0
        self.options: dict[str, object] = {}

    @initialize(
        segment_bytes=st.sampled_from([150, 400, 2000]),
        quota=st.sampled_from([None, None, 1200]),
        fsync_interval=st.sampled_from([0.0, 3600.0, 3600.0]),
    )
    def open_spool(self, segment_bytes: int, quota: int | None, fsync_interval: float) -> None:
        """Open a fresh spool."""
        self.options = {
            "segment_bytes": segment_bytes,
            "quota_bytes": quota,
            "fsync_interval": fsync_interval,
            "cache_bytes": 300,
        }
        self.spool = Spool(self.directory, **self.options)  # type: ignore[arg-type]

    @property
    def live(self) -> Spool:
        assert self.spool is not None
        return self.spool

    def _on_disk(self) -> list[int]:
        return [r.seq for r in self.live.read(self.acked, max_records=10**6, max_bytes=2**40)]

    # -- rules --------------------------------------------------------------------------------

    @rule(payloads=payload_lists, count=st.integers(0, 500), oldest=st.integers(0, 2**40))
    def append(self, payloads: list[bytes], count: int, oldest: int) -> None:
        """Append a batch: a fresh, higher seq; only the oldest records may be quota-dropped."""
        before = self.live.stats().dropped_records
        seq = self.live.append(payloads, count, oldest, oldest + 7)
        assert seq > self.acked
        assert seq > max(self.pending, default=0)
        self.records[seq] = SpoolRecord(seq, count, oldest, oldest + 7, tuple(payloads))
        self.highest_seq = max(self.highest_seq, seq)
        expected = [*self.pending, seq]
        on_disk = self._on_disk()
        # quota drops take the oldest: what is left is a suffix of what was pending
        assert on_disk == expected[len(expected) - len(on_disk) :]
        dropped = len(expected) - len(on_disk)
        assert self.live.stats().dropped_records - before == dropped
        self.pending = on_disk

    @rule()
    def sync(self) -> None:
        """After sync() every byte of every segment is reported synced."""
        self.live.sync()
        synced = self.live.synced_sizes()
        for path in self.directory.glob("seg-*.spool"):
            assert synced[path] == path.stat().st_size

    @rule(max_records=st.integers(1, 5), max_bytes=st.integers(1, 400))
    def read(self, max_records: int, max_bytes: int) -> None:
        """A bounded read returns the oldest pending records, intact and in order."""
        got = self.live.read(self.acked, max_records=max_records, max_bytes=max_bytes)
        assert [r.seq for r in got] == self.pending[: len(got)]
        assert len(got) == min(len(got), max_records)
        if self.pending:
            assert got
        for record in got:
            assert record == self.records[record.seq]

    @precondition(lambda self: self.live.last_seq > self.acked)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        """Acknowledge up to a seq; the cursor moves and only fully acked segments go."""
        seq = data.draw(st.integers(self.acked + 1, self.live.last_seq), label="ack")
        self.live.acknowledge(seq)
        self.acked = seq
        self.pending = [s for s in self.pending if s > seq]
        assert self.live.acked_seq == seq
        for path in self.directory.glob("seg-*.spool"):
            # a segment still on disk holds at least one unacknowledged record
            assert any(s > seq for s, _ in _boundaries(path)), path.name

    @rule()
    def reopen(self) -> None:
        """A clean close and reopen keeps exactly the pending records."""
        self.live.close()
        self.spool = Spool(self.directory, **self.options)  # type: ignore[arg-type]
        stats = self.live.stats()
        assert stats.torn_bytes == 0
        assert stats.corrupt_records == 0
        assert stats.recovered_records == len(self.pending)
        assert stats.cursor_state == "ok"
        self.counted = stats.last_seq

    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        """Power loss: cut each segment at or past its synced size; synced records survive."""
        spool = self.live
        synced = spool.synced_sizes()
        files = sorted(self.directory.glob("seg-*.spool"))
        layout = {path: _boundaries(path) for path in files}
        spool._abandon()
        self.spool = None
        surviving: list[int] = []
        durable: list[int] = []
        present: list[Path] = []
        for path in files:
            floor = synced.get(path, 0)
            size = path.stat().st_size
            if floor == 0 and data.draw(st.booleans(), label=f"lose {path.name}"):
                path.unlink()
                continue
            ends = [end for _, end in layout[path] if floor <= end <= size]
            cut = data.draw(
                st.integers(floor, size) | st.sampled_from([floor, size, *ends]),
                label=f"cut {path.name}",
            )
            with path.open("r+b") as fh:
                fh.truncate(cut)
            present.append(path)
            surviving += [s for s, end in layout[path] if end <= cut]
            durable += [s for s, end in layout[path] if end <= floor]

        self.spool = Spool(self.directory, **self.options)  # type: ignore[arg-type]
        stats = self.live.stats()
        # the cursor is durable as soon as acknowledge() (or the first open) returned
        assert stats.cursor_state == "ok"
        assert stats.acked_seq == self.acked
        on_disk = self._on_disk()
        expected = [s for s in surviving if s > self.acked]
        assert on_disk == expected
        # everything fsynced before the crash and not acknowledged is recovered
        assert {s for s in durable if s > self.acked} <= set(on_disk)
        # lost records followed by a surviving one are counted exactly by their seqs
        # (and only by the first open that finds them)
        if present and surviving:
            low = max(self.acked, self.counted, _first_seq(present[0]) - 1)
            gaps = set(range(low + 1, max(surviving))) - set(surviving)
            assert stats.corrupt_records == len(gaps)
        else:
            assert stats.corrupt_records == 0
        assert stats.last_seq >= max([self.acked, self.counted, *surviving])
        self.counted = stats.last_seq
        assert stats.recovered_records == len(on_disk)
        self.pending = on_disk
        for seq in on_disk:
            assert self.live.read(seq - 1, max_records=1)[0] == self.records[seq]

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def counters_match_the_model(self) -> None:
        """pending_* and acked_seq agree with the model; acked never passes what was written."""
        if self.spool is None:
            return
        spool = self.spool
        assert spool.acked_seq == self.acked
        assert spool.acked_seq <= spool.last_seq
        assert spool.pending_records == len(self.pending)
        assert spool.pending_samples == sum(self.records[s].count for s in self.pending)
        assert all(a < b for a, b in zip(self.pending, self.pending[1:], strict=False))

    def teardown(self) -> None:
        if self.spool is not None:
            self.spool.close()
        shutil.rmtree(self.directory, ignore_errors=True)


SpoolMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSpoolModel = SpoolMachine.TestCase
