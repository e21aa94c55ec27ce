"""Spool throughput: append with group-commit fsync, then drain (read from disk + acknowledge).

A batch is what the flusher appends: ``--batch`` serialized requests (one per sample) of
``--payload-bytes`` each. The append phase runs for ``--seconds`` with the ``daq-spool-sync``
thread fsyncing every ``--fsync-interval`` seconds; the drain phase reopens the spool (as after an
outage or a restart: nothing is in the recent-records cache) and reads everything back in windows
of ``--window`` records, acknowledging each (cursor fsync + segment deletion).

The figures: records/s, samples/s and MB/s for each phase, the cost per sample in microseconds,
and what that cost is at 50k samples/s as a share of one core.

Usage::

    .venv/bin/python benchmarks/spool.py [--dir DIR] [--seconds 5] [--batch 2000]
        [--payload-bytes 60] [--fsync-interval 0.1] [--window 100]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from daq_agent.pipeline.spool import Spool


def _append_phase(
    directory: Path, seconds: float, batch: int, payload_bytes: int, fsync_interval: float
) -> tuple[int, int, float, int]:
    """Append for ``seconds``; (records, bytes, elapsed, fsyncs)."""
    payloads = [os.urandom(payload_bytes) for _ in range(batch)]
    records = 0
    with Spool(directory, fsync_interval=fsync_interval) as spool:
        start = time.perf_counter()
        deadline = start + seconds
        ts = 1_700_000_000_000_000_000
        while time.perf_counter() < deadline:
            for _ in range(10):
                spool.append(payloads, batch, ts, ts + 1_000_000)
                ts += 1_000_000
            records += 10
        spool.sync()
        elapsed = time.perf_counter() - start
        stats = spool.stats()
    return records, stats.bytes_on_disk, elapsed, stats.fsyncs


def _drain_phase(directory: Path, window: int) -> tuple[int, int, float]:
    """Reopen, read everything back and acknowledge window by window; (records, bytes, s)."""
    start = time.perf_counter()
    with Spool(directory) as spool:
        total_bytes = spool.pending_bytes
        after = spool.acked_seq
        records = 0
        while True:
            got = spool.read(after, max_records=window)
            if not got:
                break
            records += len(got)
            after = got[-1].seq
            spool.acknowledge(after)
        assert spool.pending_records == 0
    return records, total_bytes, time.perf_counter() - start


def main() -> None:
    """Run both phases and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="spool directory's parent")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=2000, help="requests (samples) per record")
    parser.add_argument("--payload-bytes", type=int, default=60)
    parser.add_argument("--fsync-interval", type=float, default=0.1)
    parser.add_argument("--window", type=int, default=100, help="records per acknowledged read")
    args = parser.parse_args()

    parent = Path(tempfile.mkdtemp(prefix="spool-bench-", dir=args.dir))
    directory = parent / "spool"
    try:
        records, size, elapsed, fsyncs = _append_phase(
            directory, args.seconds, args.batch, args.payload_bytes, args.fsync_interval
        )
        samples = records * args.batch
        us_per_sample = elapsed / samples * 1e6
        print(
            f"append  ({args.batch} x {args.payload_bytes} B per record, fsync every "
            f"{args.fsync_interval} s, {fsyncs} fsyncs): {records / elapsed:,.0f} records/s, "
            f"{samples / elapsed:,.0f} samples/s, {size / elapsed / 1e6:,.1f} MB/s "
            f"({us_per_sample:.3f} us/sample; at 50k samples/s: "
            f"{50_000 * us_per_sample / 1e4:.1f}% of one core)"
        )
        drained, drained_bytes, drain_elapsed = _drain_phase(directory, args.window)
        print(
            f"drain   (reopen + read {args.window}-record windows from disk + acknowledge): "
            f"{drained / drain_elapsed:,.0f} records/s, "
            f"{drained * args.batch / drain_elapsed:,.0f} samples/s, "
            f"{drained_bytes / drain_elapsed / 1e6:,.1f} MB/s"
        )
    finally:
        shutil.rmtree(parent, ignore_errors=True)


if __name__ == "__main__":
    main()
