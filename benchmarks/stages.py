"""Where the microseconds per frame go: every stage of the agent's path, timed on its own.

The same frames (generated from a database with the agent's simulator) go through each stage in
turn, on one thread, with the agent's own code and settings, so each figure is that stage's cost
per frame with nothing else competing for the GIL. Each stage runs ``--repeat`` times; the best
(other processes on the machine only ever add) and the median are printed:

============== =================================================================================
read           ``udp``: python-can ``udp_multicast`` ``recv`` (datagrams queued by a second bus);
               ``log``: ``can.LogReader`` over a candump log (the replay source);
               ``processor``: the CAN reader's ``MessageProcessor.process`` minus the decode
decode         ``CanDecoder.decode`` (lookup, unpack, scale, typed values in flow order)
ring           ``put_many`` of each read's samples (bursts of 1024) + ``get_batch`` (4000)
pack           ``pack_batch``: a batch of samples → one msgpack payload (the flusher)
latest tap     ``LatestValues.observe`` of each batch (the flusher, for ``/status.json``):
               ``kept`` the last sample per flow (always), ``counted`` also counted (while read)
spool append   ``Spool.append`` with its group-commit fsync thread (every 0.1 s)
spool read     ``Spool.read`` of what follows the sent sequence: ``warm`` from the recent-records
               cache (the steady state), ``cold`` from disk after a reopen (a backlog drain)
unpack         ``unpack_payloads`` (the sender)
request build  ``RequestBuilder.build``: ``IngestWithConfigDataStreamRequestPy`` objects
send_requests  ``Window.send``: the call into sift_stream (on its asyncio loop thread), wall time
finish         ``Window.finish``: the server's status, wall time (waits for the server's commit)
============== =================================================================================

Besides the wall time of ``send`` and ``finish``, the process's CPU over them (every thread: the
Rust runtime's serialization and HTTP/2 run off the GIL) is printed per frame, and what the server
stored is counted back. The sum of the Python stages is what one frame costs under the GIL: its
inverse is the most frames/s the agent's threads can move together on one core.

Usage::

    .venv/bin/python benchmarks/stages.py [--dbc bench|vehicle|FILE] [--frames 60000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import can
from benchlib import (
    Server,
    cpu_seconds,
    machine,
    make_frames,
    resolve_dbc,
    stored_samples,
    write_candump,
)

from daq_agent.core.clock import host_clock
from daq_agent.core.model import TelemetryConfig
from daq_agent.core.sample import Sample
from daq_agent.decode.can_decoder import CanDecoder
from daq_agent.decode.dbc import load_database
from daq_agent.ingestion import IngestionService, use_sift_channel
from daq_agent.ingestion.sift_stream import RequestBuilder, StreamLoop, StreamSettings, Window
from daq_agent.pipeline.batch import RunRef, pack_batch, unpack_payloads
from daq_agent.pipeline.latest import LatestValues
from daq_agent.pipeline.ring_buffer import RingBuffer
from daq_agent.pipeline.spool import Spool
from daq_agent.readers.base import ReaderABC
from daq_agent.readers.can import CanReader, MessageProcessor

BATCH = 4000  # the benchmarks' flush.max_batch
BURST = 1024  # frames per read burst (the CAN reader's _MAX_BURST)


class _Processor(ReaderABC):
    """A reader that is never started: only its counters and batching sink are used."""

    kind: ClassVar[str] = "stage"
    COUNTERS: ClassVar[tuple[str, ...]] = CanReader.COUNTERS
    KEYED_COUNTERS: ClassVar[tuple[str, ...]] = CanReader.KEYED_COUNTERS

    def _open(self) -> None:
        pass

    def _read(self, timeout: float) -> bool:
        return False

    def _close(self) -> None:
        pass


class _Collect:
    """A batching sink that keeps what it is given."""

    def __init__(self) -> None:
        self.items: list[Sample] = []

    def put_many(self, items: Sequence[Sample]) -> int:
        self.items.extend(items)
        return len(items)


def per_frame(seconds: float, frames: int) -> float:
    return seconds / frames * 1e6


class Stages:
    """Runs each stage ``repeat`` times; keeps the median µs per frame."""

    def __init__(self, repeat: int) -> None:
        self.repeat = repeat
        self.results: dict[str, list[float]] = {}
        self.notes: dict[str, str] = {}

    def time(self, name: str, frames: int, run: Callable[[], float | None]) -> None:
        """``run`` returns its own elapsed seconds, or None to be timed whole."""
        for _ in range(self.repeat):
            started = time.perf_counter()
            own = run()
            elapsed = own if own is not None else time.perf_counter() - started
            self.results.setdefault(name, []).append(per_frame(elapsed, frames))

    def add(self, name: str, value: float, note: str = "") -> None:
        self.results.setdefault(name, []).append(value)
        if note:
            self.notes[name] = note

    def median(self, name: str) -> float:
        return statistics.median(self.results[name])

    def best(self, name: str) -> float:
        return min(self.results[name])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dbc", default="vehicle", help="bench, vehicle (generated) or a file")
    parser.add_argument("--frames", type=int, default=60_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--udp-port", type=int, default=43_211, help="udp_multicast port")
    args = parser.parse_args(argv)
    n = args.frames
    stages = Stages(args.repeat)

    with tempfile.TemporaryDirectory(prefix="daq-bench-stages-") as tmp_name:
        tmp = Path(tmp_name)
        dbc = resolve_dbc(args.dbc, tmp)
        database = load_database(dbc)
        decoder = CanDecoder("can0", [database])
        decoder.compile_all()
        frames = make_frames(dbc, n, 1_750_000_000.0)
        values = sum(len(f.channels) for f in decoder.flows) / len(decoder.flows)
        print(
            f"{dbc.name}: {len(database.messages)} messages, {values:.1f} channels per flow; "
            f"{n:,} frames ({sum(f.is_fd for f in frames):,} CAN FD), "
            f"{args.repeat} repeats, median µs per frame",
            flush=True,
        )

        # -- read ------------------------------------------------------------------------------
        channel = "239.74.163.9"
        rx = can.Bus(interface="udp_multicast", channel=channel, port=args.udp_port)
        tx = can.Bus(interface="udp_multicast", channel=channel, port=args.udp_port)
        udp_frames = frames[: min(n, 20_000)]

        def udp() -> float:
            spent = 0.0
            for start in range(0, len(udp_frames), 100):  # the socket queue holds ~250
                for msg in udp_frames[start : start + 100]:
                    tx.send(msg)
                t0 = time.perf_counter()
                for _ in range(min(100, len(udp_frames) - start)):
                    if rx.recv(1.0) is None:
                        raise SystemExit("udp_multicast: a frame was lost on loopback")
                spent += time.perf_counter() - t0
            return spent / len(udp_frames) * n

        stages.time("read: udp_multicast recv", n, udp)
        rx.shutdown()
        tx.shutdown()
        log_path = tmp / "frames.log"
        write_candump(frames, log_path)

        def replay() -> None:
            count = 0
            for _msg in can.LogReader(log_path):
                count += 1
            assert count == n, count

        stages.time("read: candump log (LogReader)", n, replay)

        collect = _Collect()
        reader = _Processor("stage", collect)
        processor = MessageProcessor(reader, decoder, host_clock(), 1000)

        def process() -> None:
            collect.items.clear()
            for msg in frames:
                processor.process(msg)
            reader._flush_batch()

        def decode_only() -> None:
            dec = decoder.decode
            for msg in frames:
                dec(msg.arbitration_id, msg.is_extended_id, bytes(msg.data), 1)

        stages.time("process (read+decode)", n, process)
        stages.time("decode", n, decode_only)
        samples = list(collect.items)
        assert len(samples) == n, len(samples)

        # -- ring, pack, spool, unpack ---------------------------------------------------------
        ring: RingBuffer[Sample] = RingBuffer(262_144, "block")

        def ring_pass() -> None:
            got = 0
            for start in range(0, n, BURST):
                ring.put_many(samples[start : start + BURST])
                while ring.depth >= BATCH:
                    got += len(ring.get_batch(BATCH, timeout=0))
            while got < n:
                got += len(ring.get_batch(BATCH, timeout=0))

        stages.time("ring put_many + get_batch", n, ring_pass)
        batches = [samples[i : i + BATCH] for i in range(0, n, BATCH)]
        run = RunRef("daq-run-bench", "bench")
        payloads: list[bytes] = []

        def pack() -> None:
            payloads[:] = [pack_batch(batch, run) for batch in batches]

        stages.time("pack (msgpack)", n, pack)
        unwatched = LatestValues(decoder.flows, watch_s=60.0)
        watched = LatestValues(decoder.flows, watch_s=None)

        def tap(latest: LatestValues) -> Callable[[], None]:
            def observe() -> None:
                for batch in batches:
                    latest.observe(batch)

            return observe

        stages.time("latest tap (kept)", n, tap(unwatched))
        stages.time("latest tap (kept + counted)", n, tap(watched))
        spool_bytes = sum(len(p) for p in payloads)
        stages.notes["pack (msgpack)"] = f"{spool_bytes / n:.0f} B/sample"

        spools = tmp / "spools"
        counter = iter(range(1_000_000))

        def append() -> None:
            spool = Spool(spools / str(next(counter)), fsync_interval=0.1)
            try:
                for batch, payload in zip(batches, payloads, strict=True):
                    spool.append(
                        (payload,), len(batch), batch[0].timestamp_ns, batch[-1].timestamp_ns
                    )
            finally:
                spool.close()

        stages.time("spool append (+fsync thread)", n, append)
        warm = Spool(tmp / "warm", fsync_interval=0.1)
        for batch, payload in zip(batches, payloads, strict=True):
            warm.append((payload,), len(batch), batch[0].timestamp_ns, batch[-1].timestamp_ns)

        def read_all(spool: Spool) -> float:
            t0 = time.perf_counter()
            seq = 0
            got = 0
            while True:
                records = spool.read(seq, max_records=4096, max_bytes=4 * 2**20)
                if not records:
                    break
                seq = records[-1].seq
                got += sum(r.count for r in records)
            assert got == n, got
            return time.perf_counter() - t0

        stages.time("spool read (warm: cache)", n, lambda: read_all(warm))
        warm.close()

        def cold() -> float:
            spool = Spool(spools / "0", fsync_interval=0.1)  # reopened: read from disk
            try:
                return read_all(spool)
            finally:
                spool.close()

        stages.time("spool read (cold: disk)", n, cold)
        unpacked: list[Any] = []

        def unpack() -> None:
            unpacked[:] = unpack_payloads(payloads)

        stages.time("unpack (msgpack)", n, unpack)
        rows = [row for group in unpacked for row in group.rows]
        assert len(rows) == n

        # -- request build, send_requests, finish ----------------------------------------------
        db = tmp / "store.sqlite"
        with Server(db) as server:
            telemetry = TelemetryConfig("bench-stages", "bench-stages-key", flows=decoder.flows)
            unary = use_sift_channel(
                {"uri": server.uri, "apikey": server.api_key, "use_ssl": False}
            )
            service = IngestionService(unary, telemetry)
            config_id = service.ingestion_config.ingestion_config_id
            builder = RequestBuilder(decoder.flows)
            loop = StreamLoop("bench-sift-stream")
            settings = StreamSettings(server.uri, False, "bench-stages", "bench-stages-key")
            chunk = BATCH
            try:
                stages.time(
                    "request build",
                    n,
                    lambda: (
                        [
                            builder.build(rows[i : i + chunk], config_id, "")
                            for i in range(0, n, chunk)
                        ]
                        and None
                    ),
                )
                shift = 0
                for _ in range(args.repeat):
                    shift += 10**12  # new timestamps: every window is stored anew
                    moved = [(f, ts + shift, v) for f, ts, v in rows]
                    requests = [
                        builder.build(moved[i : i + chunk], config_id, "")
                        for i in range(0, n, chunk)
                    ]
                    before = stored_samples(db)
                    cpu0 = cpu_seconds()
                    t0 = time.perf_counter()
                    window = Window(loop, settings, server.api_key)
                    t1 = time.perf_counter()
                    for part in requests:
                        window.send(part)
                    t2 = time.perf_counter()
                    window.finish()
                    t3 = time.perf_counter()
                    cpu = cpu_seconds() - cpu0
                    stored = stored_samples(db) - before
                    if stored != n:
                        raise SystemExit(f"sent {n}, the server stored {stored}")
                    stages.add(
                        "window open (build the stream)",
                        per_frame(t1 - t0, n),
                        f"{(t1 - t0) * 1e3:.0f} ms per window",
                    )
                    stages.add("send_requests (Window.send)", per_frame(t2 - t1, n))
                    stages.add(
                        "finish (server commits)",
                        per_frame(t3 - t2, n),
                        f"{(t3 - t2) * 1e3:.0f} ms for {n:,}",
                    )
                    stages.add(
                        "process CPU over open+send+finish",
                        per_frame(cpu, n),
                        "every thread, Rust included",
                    )
            finally:
                loop.close()
                unary.close()

    python_stages = [
        "process (read+decode)",
        "ring put_many + get_batch",
        "pack (msgpack)",
        "latest tap (kept)",
        "spool append (+fsync thread)",
        "spool read (warm: cache)",
        "unpack (msgpack)",
        "request build",
        "send_requests (Window.send)",
    ]
    print(f"{'stage':<36} {'best':>6} {'median':>7}  µs/frame")
    for name in stages.results:
        note = stages.notes.get(name, "")
        print(f"{name:<36} {stages.best(name):>6.2f} {stages.median(name):>7.2f}  {note}")
    overhead = stages.best("process (read+decode)") - stages.best("decode")
    print(f"{'  of which reader overhead':<36} {overhead:>6.2f}          (process - decode)")
    total = sum(stages.best(name) for name in python_stages)
    print(
        f"sum of the best under the GIL (process .. send_requests, frames in memory): "
        f"{total:.2f} µs/frame "
        f"= at most {1e6 / total:,.0f} frames/s on one core"
    )
    for read in ("read: udp_multicast recv", "read: candump log (LogReader)"):
        with_read = total + stages.best(read)
        print(f"  + {read}: {with_read:.2f} µs/frame = at most {1e6 / with_read:,.0f} frames/s")
    print(f"{machine()}, pid {os.getpid()}, threads at the end {threading.active_count()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
