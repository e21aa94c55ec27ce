"""The flusher with the Sift sink against the real local server: windows are acknowledged only
once the server committed them, a spool of an earlier version is still delivered, and a stream
cut in the middle of a window (which sift_stream reconnects silently) is re-sent, not
acknowledged."""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from daq_agent._proto.sift.ingest.v1 import ingest_pb2
from daq_agent.core.model import ChannelConfig, ChannelDataType, FlowConfig, TelemetryConfig
from daq_agent.core.sample import Sample
from daq_agent.ingestion import IngestionService, use_sift_channel
from daq_agent.ingestion.legacy import decode_request
from daq_agent.pipeline.batch import RunRef, pack_batch
from daq_agent.pipeline.deadletter import DeadLetter, read_dead_letters
from daq_agent.pipeline.flusher import Flusher, FlusherSettings, MemoryWindow
from daq_agent.pipeline.ring_buffer import RingBuffer
from daq_agent.pipeline.spool import Spool
from daq_agent.server.local import LocalIngestServer, make_server
from daq_agent.server.store import Store
from daq_agent.sinks.sift import SiftSink

pytestmark = pytest.mark.integration

KEY = "flusher-" + uuid.uuid4().hex
FLOW = FlowConfig(
    "bench.values",
    [ChannelConfig("a", ChannelDataType.DOUBLE), ChannelConfig("b", ChannelDataType.UINT_32)],
)
TELEMETRY = TelemetryConfig("flusher", "flusher-key", flows=[FLOW])
BASE_NS = 1_750_000_000_000_000_000


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LocalIngestServer]:
    """The local server, requiring ``KEY``."""
    srv = make_server(tmp_path / "local.sqlite", host="127.0.0.1", port=0, api_key=KEY)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop(grace=1.0)


def make_sink(port: int) -> SiftSink:
    return SiftSink(
        uri=f"127.0.0.1:{port}",
        use_tls=False,
        api_key=lambda: KEY,
        telemetry=TELEMETRY,
        timeout_s=10.0,
    )


def samples(n: int, start: int = 0) -> list[Sample]:
    return [Sample(FLOW.name, BASE_NS + (start + i) * 1000, (i * 0.5, i)) for i in range(n)]


def stored(db: Path) -> list[tuple[int, float]]:
    with Store.open(db, readonly=True) as store:
        return sorted(
            (s.timestamp_ns, s.values["a"]) for s in store.iter_samples() if s.flow == FLOW.name
        )


def run_flusher(flusher: Flusher, ring: RingBuffer[Sample], items: list[Sample]) -> None:
    flusher.start()
    for sample in items:
        ring.put(sample)
    assert flusher.stop(drain=True, timeout=60)


class CutOnceProxy:
    """A TCP proxy to ``upstream`` that cuts the first connection which carries more than
    ``cut_after`` bytes from the client, once: a broken stream in the middle of a window."""

    def __init__(self, upstream: int, cut_after: int) -> None:
        self.upstream = upstream
        self.cut_after = cut_after
        self.cuts = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._spawn(self._accept, "proxy-accept")

    def _spawn(self, target: object, name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        self._listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            self._sockets += [client, upstream]
            self._spawn(self._pipe, "proxy-up", client, upstream, True)
            self._spawn(self._pipe, "proxy-down", upstream, client, False)

    def _pipe(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        moved = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                moved += len(data)
                if from_client and moved > self.cut_after:
                    with self._lock:
                        cut = self.cuts == 0
                        self.cuts += cut
                    if cut:
                        break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:  # a reset, as a broken path gives, not an orderly close
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for sock in self._sockets:
            try:
                sock.close()
            except OSError:
                pass
        for thread in self._threads:
            thread.join(2.0)


def test_windows_are_acknowledged_once_committed(server: LocalIngestServer) -> None:
    """Every sample is stored, in its run, and counted delivered only after its window's commit."""
    ring: RingBuffer[Sample] = RingBuffer(10_000)
    sink = make_sink(server.port)
    run = RunRef("flusher-run-key", "flusher-run")
    flusher = Flusher(ring, sink, settings=FlusherSettings(checkpoint_seconds=0.2), run=run)
    try:
        run_flusher(flusher, ring, samples(3000))
        stats = flusher.stats()
        assert (stats.taken, stats.delivered, stats.pending) == (3000, 3000, 0)
        assert stats.checkpoints >= 1
        assert stats.balanced
        run_id = sink.run_id(run)
        assert run_id
        with Store.open(server.db_path, readonly=True) as store:
            assert store.count_samples(run_id=run_id) == 3000
        assert sink.metrics()["messages_sent"] == 3000
    finally:
        sink.close()


def test_a_connection_reset_in_a_window_fails_its_commit(server: LocalIngestServer) -> None:
    """A connection reset in the middle of a window: the commit fails, the window is re-sent
    and nothing is missing from the store (the server keeps one copy of each sample)."""
    proxy = CutOnceProxy(server.port, cut_after=200_000)
    ring: RingBuffer[Sample] = RingBuffer(50_000)
    sink = make_sink(proxy.port)
    settings = FlusherSettings(checkpoint_seconds=5.0, idle_checkpoint_s=0.5, retry_initial_s=0.05)
    flusher = Flusher(ring, sink, settings=settings)
    items = samples(20_000)
    try:
        run_flusher(flusher, ring, items)
        assert proxy.cuts == 1, "the proxy never cut a stream: the test proves nothing"
        stats = flusher.stats()
        assert stats.failures >= 1
        assert (stats.delivered, stats.pending) == (20_000, 0)
        assert stored(server.db_path) == [(s.timestamp_ns, s.values[0]) for s in items]
    finally:
        sink.close()
        proxy.close()


def test_a_spool_of_the_earlier_version_is_delivered(
    server: LocalIngestServer, tmp_path: Path
) -> None:
    """A spool written by 0.1 (serialized requests, with the run's id) is read as it is and its
    samples land in that run; new batches follow."""
    with use_sift_channel(
        {"uri": f"127.0.0.1:{server.port}", "apikey": KEY, "use_ssl": False}
    ) as channel:
        service = IngestionService(channel, TELEMETRY)
        service.attach_run(channel, "old-run")
        run_id = service.run_id
        config_id = service.ingestion_config.ingestion_config_id
    assert run_id
    old = samples(30)
    payloads = []
    for s in old:
        request = ingest_pb2.IngestWithConfigDataStreamRequest(
            ingestion_config_id=config_id, flow=s.flow, run_id=run_id
        )
        request.timestamp.FromNanoseconds(s.timestamp_ns)
        request.channel_values.add(double=s.values[0])
        request.channel_values.add(uint32=s.values[1])
        payloads.append(request.SerializeToString())
    spool = Spool(tmp_path / "spool")
    spool.append(payloads[:10], 10, old[0].timestamp_ns, old[9].timestamp_ns)
    spool.append(payloads[10:], 20, old[10].timestamp_ns, old[-1].timestamp_ns)
    ring: RingBuffer[Sample] = RingBuffer(100)
    sink = make_sink(server.port)
    flusher = Flusher(
        ring,
        sink,
        settings=FlusherSettings(checkpoint_seconds=0.1),
        window=spool,
        legacy=decode_request,
    )
    try:
        assert flusher.stats().recovered == 30
        run_flusher(flusher, ring, samples(5, start=100))
        stats = flusher.stats()
        assert (stats.recovered, stats.taken, stats.delivered, stats.pending) == (30, 5, 35, 0)
        assert stats.balanced
    finally:
        sink.close()
        spool.close()
    with Store.open(server.db_path, readonly=True) as store:
        assert store.count_samples(run_id=run_id) == 30
        assert store.count_samples(flow=FLOW.name) == 35


def test_the_agent_spools_while_the_api_is_down_and_delivers_when_it_comes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No server at first: the sink fails (transient) and the flusher keeps everything; once a
    server listens on the port, everything is delivered. The outage is logged once when it
    starts and once when it ends (with the count of attempts), never once per attempt."""
    caplog.set_level(logging.INFO, logger="daq_agent.pipeline.flusher")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ring: RingBuffer[Sample] = RingBuffer(10_000)
    sink = make_sink(port)
    settings = FlusherSettings(checkpoint_seconds=0.2, retry_initial_s=0.05, retry_max_s=0.2)
    flusher = Flusher(ring, sink, settings=settings, window=MemoryWindow())
    srv = None
    try:
        flusher.start()
        for sample in samples(500):
            ring.put(sample)
        deadline = time.monotonic() + 20
        while flusher.stats().failures < 2:
            assert time.monotonic() < deadline, "the sink never failed against a closed port"
            time.sleep(0.02)
        assert flusher.stats().delivered == 0
        srv = make_server(tmp_path / "late.sqlite", host="127.0.0.1", port=port, api_key=KEY)
        srv.start()
        assert flusher.stop(drain=True, timeout=30)
        stats = flusher.stats()
        assert (stats.delivered, stats.pending) == (500, 0)
    finally:
        sink.close()
        if srv is not None:
            srv.stop(grace=1.0)
    assert len(stored(tmp_path / "late.sqlite")) == 500
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len([m for m in said if m.startswith("cannot deliver")]) == 1, said
    (recovered,) = [m for m in said if m.startswith("delivering again")]
    assert f"after {stats.failures} failed attempts" in recovered


def test_a_stream_the_server_ends_early_is_not_acknowledged(
    server: LocalIngestServer, tmp_path: Path
) -> None:
    """The server ends a stream early in a window (a request it refuses); sift_stream
    reconnects by itself, the rest of the window goes out on the new stream and its finish says
    OK. The window must still not count as committed: it is isolated, the refused sample is
    dead-lettered and every other sample is stored."""
    good = samples(6000)
    bad = Sample(FLOW.name, BASE_NS - 1, (1.0, 1))
    window = MemoryWindow()
    window.append(
        (pack_batch([bad], RunRef("", "", "no-such-run")),), 1, bad.timestamp_ns, bad.timestamp_ns
    )
    ring: RingBuffer[Sample] = RingBuffer(10_000)
    sink = make_sink(server.port)
    dead = DeadLetter(tmp_path / "dead.letters")
    settings = FlusherSettings(
        max_age_s=0.01, checkpoint_seconds=10.0, idle_checkpoint_s=1.0, retry_initial_s=0.05
    )
    flusher = Flusher(ring, sink, settings=settings, window=window, dead_letter=dead)
    try:
        flusher.start()
        for i in range(0, len(good), 500):  # a live source: the window fills over ~1 s
            for sample in good[i : i + 500]:
                ring.put(sample)
            time.sleep(0.1)
        assert flusher.stop(drain=True, timeout=60)
        stats = flusher.stats()
        assert (stats.recovered, stats.delivered, stats.dead_lettered) == (1, 6000, 1)
        assert stats.balanced
    finally:
        sink.close()
    assert stored(server.db_path) == [(s.timestamp_ns, s.values[0]) for s in good]
    (entry,) = read_dead_letters(tmp_path / "dead.letters")
    assert "no-such-run" in entry.reason


def test_records_after_a_chunk_of_corrupt_ones_are_still_sent(
    server: LocalIngestServer, tmp_path: Path
) -> None:
    """Records that rot on disk after the spool was opened are skipped when read back; a read
    chunk holding nothing but corrupt records must not make the window skip the valid records
    after it: they are delivered, only the corrupt ones are lost (and counted)."""
    items = samples(6)
    with Spool(tmp_path / "spool", fsync_interval=0) as spool:
        for sample in items:
            spool.append((pack_batch([sample]),), 1, sample.timestamp_ns, sample.timestamp_ns)
    spool = Spool(tmp_path / "spool", fsync_interval=0)  # reopened: nothing cached, all valid
    (segment,) = sorted((tmp_path / "spool").glob("seg-*"))
    data = bytearray(segment.read_bytes())
    size = len(data) // 6
    for i in range(3):  # rot inside the first three records' payloads
        data[i * size + size // 2] ^= 0xFF
    segment.write_bytes(bytes(data))
    ring: RingBuffer[Sample] = RingBuffer(10)
    sink = make_sink(server.port)
    settings = FlusherSettings(checkpoint_seconds=0.1, read_chunk_bytes=3 * size)
    flusher = Flusher(ring, sink, settings=settings, window=spool)
    try:
        run_flusher(flusher, ring, [])
        stats = flusher.stats()
        assert (stats.recovered, stats.delivered, stats.corrupt) == (6, 3, 3)
        assert stats.balanced
    finally:
        sink.close()
        spool.close()
    assert stored(server.db_path) == [(s.timestamp_ns, s.values[0]) for s in items[3:]]
