"""Buffered ingestion against the real local ingestion server (127.0.0.1, port 0)."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from daq_agent.ingestion import (
    DEFAULT_BUFFER_SIZE,
    BufferedIngestionService,
    ChannelConfig,
    ChannelDataType,
    Flow,
    FlowConfig,
    FlowOrderedChannelValues,
    IngestionService,
    IngestionValidationError,
    IngestWithConfigDataStreamRequest,
    TelemetryConfig,
    double_value,
    use_sift_channel,
)
from daq_agent.server.local import LocalIngestServer, make_server
from daq_agent.server.store import Store

pytestmark = pytest.mark.integration

_T0 = 1_700_000_000_000_000_000
_FLOW = FlowConfig("readings", [ChannelConfig("voltage", ChannelDataType.DOUBLE)])
_THREAD = "daq-buffer-flush"
_WAIT_SEC = 20.0


class _Server:
    """A started local server and a way to count what its store holds."""

    def __init__(self, db_path: Path, port: int = 0) -> None:
        self.db_path = db_path
        self.server: Any = make_server(db_path, host="127.0.0.1", port=port)
        self.server.start()
        self.port: int = self.server.port
        self.running = True

    @classmethod
    def wrap(cls, started: LocalIngestServer) -> _Server:
        """Wrap a server started elsewhere (the conftest fixture, which also stops it)."""
        wrapper = cls.__new__(cls)
        wrapper.db_path = started.db_path
        wrapper.server = started
        wrapper.port = started.port
        wrapper.running = True
        return wrapper

    def count(self) -> int:
        with Store.open(self.db_path, readonly=True) as store:
            return store.count_samples()

    def stop(self) -> None:
        if self.running:
            self.running = False
            self.server.stop()


@pytest.fixture
def server(local_server: LocalIngestServer) -> _Server:
    """The shared local_server fixture, with helpers to read its store back."""
    return _Server.wrap(local_server)


@pytest.fixture
def service(server: _Server) -> Iterator[IngestionService]:
    """An IngestionService with one double flow, on a plain-text channel to the server."""
    config = {"uri": f"127.0.0.1:{server.port}", "apikey": "any-key", "use_ssl": False}
    with use_sift_channel(config) as channel:  # type: ignore[arg-type]
        telemetry = TelemetryConfig("bench", ingestion_client_key="buffer-key", flows=[_FLOW])
        yield IngestionService(channel, telemetry)


def _flows(n: int, start: int = 0) -> list[FlowOrderedChannelValues]:
    return [
        {"flow_name": "readings", "timestamp": _T0 + i, "channel_values": [double_value(i)]}
        for i in range(start, start + n)
    ]


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + _WAIT_SEC
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _flush_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == _THREAD]


def test_size_flush(server: _Server, service: IngestionService) -> None:
    """A full buffer is flushed at once; the rest waits for the exit flush."""
    with service.buffered_ingestion(buffer_size=10) as buffered:
        assert buffered.buffer_size == 10
        buffered.ingest_flows(*_flows(9))
        assert server.count() == 0
        assert buffered.buffered == 9
        buffered.ingest_flows(*_flows(16, start=9))
        assert server.count() == 25  # 9 + 16 >= 10: one flush of everything
        assert buffered.buffered == 0
        buffered.ingest_flows(*_flows(3, start=25))
        assert server.count() == 25
    assert server.count() == 28


def test_default_buffer_size(server: _Server, service: IngestionService) -> None:
    """Without buffer_size the buffer holds DEFAULT_BUFFER_SIZE requests (1000)."""
    assert DEFAULT_BUFFER_SIZE == 1000
    with service.buffered_ingestion() as buffered:
        assert buffered.buffer_size == DEFAULT_BUFFER_SIZE
        assert buffered.flush_interval_sec is None
        assert _flush_threads() == []  # no periodic thread without an interval
        buffered.ingest_flows(*_flows(999))
        assert server.count() == 0
        buffered.ingest_flows(*_flows(1, start=999))
        assert server.count() == 1000


def test_interval_flush(server: _Server, service: IngestionService) -> None:
    """With an interval, one named thread flushes the buffer periodically and is joined on exit."""
    with service.buffered_ingestion(flush_interval_sec=0.05) as buffered:
        assert len(_flush_threads()) == 1
        buffered.ingest_flows(*_flows(3))
        _wait_for(lambda: server.count() == 3, "the first periodic flush")
        buffered.ingest_flows(*_flows(2, start=3))
        _wait_for(lambda: server.count() == 5, "the second periodic flush")
        assert len(_flush_threads()) == 1  # the same thread, not one per flush
    assert _flush_threads() == []


def test_interval_restarts_after_size_flush(server: _Server, service: IngestionService) -> None:
    """A size flush restarts the periodic timer: nothing is flushed early after it."""
    interval = 0.5
    with service.buffered_ingestion(buffer_size=5, flush_interval_sec=interval) as buffered:
        time.sleep(interval * 0.7)  # most of an interval passes without a flush
        flushed_at = time.monotonic()
        buffered.ingest_flows(*_flows(5))  # size flush: the timer restarts here
        buffered.ingest_flows(*_flows(1, start=5))
        _wait_for(lambda: server.count() == 6, "the periodic flush")
        assert time.monotonic() - flushed_at >= interval * 0.9


def test_exit_flush(server: _Server, service: IngestionService) -> None:
    """What is buffered is flushed when the block is left."""
    with service.buffered_ingestion(buffer_size=100) as buffered:
        flows: list[Flow] = [
            {
                "flow_name": "readings",
                "timestamp": _T0 + i,
                "channel_values": [{"channel_name": "voltage", "value": double_value(i)}],
            }
            for i in range(7)
        ]
        buffered.try_ingest_flows(*flows)
        buffered.ingest(service.create_ingestion_request("readings", _T0 + 7, [double_value(7)]))
        assert server.count() == 0
    assert server.count() == 8
    with pytest.raises(RuntimeError, match="closed"):
        buffered.ingest_flows(*_flows(1))


def test_explicit_flush(server: _Server, service: IngestionService) -> None:
    """flush() sends what is buffered now."""
    with service.buffered_ingestion(buffer_size=100) as buffered:
        buffered.ingest_flows(*_flows(4))
        buffered.flush()
        assert server.count() == 4
        buffered.flush()  # nothing buffered: no stream
        assert server.count() == 4


def test_validation_error_buffers_nothing(server: _Server, service: IngestionService) -> None:
    """try_ingest_flows refuses an invalid flow before buffering any of the call's flows."""
    with service.buffered_ingestion(buffer_size=100) as buffered:
        with pytest.raises(IngestionValidationError):
            buffered.try_ingest_flows(
                {"flow_name": "readings", "timestamp": _T0, "channel_values": []},
                {"flow_name": "nope", "timestamp": _T0, "channel_values": []},
            )
        assert buffered.buffered == 0


def test_error_in_block_flushes_then_reraises(server: _Server, service: IngestionService) -> None:
    """Without on_error, an error in the block triggers one last flush and is re-raised."""

    def block() -> None:
        with service.buffered_ingestion() as buffered:
            buffered.ingest_flows(*_flows(6))
            raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        block()
    assert server.count() == 6


def test_on_error_receives_unsent_requests(server: _Server, service: IngestionService) -> None:
    """on_error gets the error, the unsent requests and a flush; the error is re-raised."""
    seen: list[tuple[BaseException, list[IngestWithConfigDataStreamRequest]]] = []

    def on_error(
        error: BaseException,
        unsent: list[IngestWithConfigDataStreamRequest],
        flush: Callable[[], None],
    ) -> None:
        seen.append((error, unsent))
        assert server.count() == 0
        flush()

    def block() -> None:
        with service.buffered_ingestion(on_error=on_error) as buffered:
            buffered.ingest_flows(*_flows(4))
            raise ValueError("bad sample")

    with pytest.raises(ValueError, match="bad sample"):
        block()
    ((error, unsent),) = seen
    assert isinstance(error, ValueError)
    assert [r.timestamp.nanos for r in unsent] == [(_T0 + i) % 10**9 for i in range(4)]
    assert server.count() == 4


def test_failed_size_flush_keeps_requests(tmp_path: Path, server: _Server) -> None:
    """A size flush that fails raises, keeps the requests, and on_error receives them."""
    config = {"uri": f"127.0.0.1:{server.port}", "apikey": "any-key", "use_ssl": False}
    with use_sift_channel(config) as channel:  # type: ignore[arg-type]
        telemetry = TelemetryConfig("bench", ingestion_client_key="k", flows=[_FLOW])
        service = IngestionService(channel, telemetry)
        server.stop()
        unsent_seen: list[int] = []

        def on_error(error: BaseException, unsent: list[Any], flush: Callable[[], None]) -> None:
            unsent_seen.append(len(unsent))

        buffered = service.buffered_ingestion(buffer_size=3, on_error=on_error)

        def block() -> None:
            with buffered:
                buffered.ingest_flows(*_flows(2))
                buffered.ingest_flows(*_flows(1, start=2))  # the size flush fails

        with pytest.raises(grpc.RpcError) as info:
            block()
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert unsent_seen == [3]
        assert buffered.buffered == 3


def test_periodic_flush_survives_a_server_outage(tmp_path: Path) -> None:
    """A failed periodic flush keeps its requests, surfaces the error, and later recovers."""
    db = tmp_path / "store.db"
    first = _Server(db)
    port = first.port
    config = {"uri": f"127.0.0.1:{port}", "apikey": "any-key", "use_ssl": False}
    second: _Server | None = None
    try:
        with use_sift_channel(config) as channel:  # type: ignore[arg-type]
            telemetry = TelemetryConfig("bench", ingestion_client_key="k", flows=[_FLOW])
            service = IngestionService(channel, telemetry)
            first.stop()
            with service.buffered_ingestion(flush_interval_sec=0.05) as buffered:
                buffered.ingest_flows(*_flows(3))
                _wait_for(lambda: buffered.last_error is not None, "a failed periodic flush")
                assert buffered.buffered == 3
                # The error surfaces on the next ingest, which buffers nothing.
                with pytest.raises(grpc.RpcError) as info:
                    buffered.ingest_flows(*_flows(1, start=3))
                assert info.value.code() is grpc.StatusCode.UNAVAILABLE
                assert buffered.buffered == 3
                assert len(_flush_threads()) == 1  # still flushing periodically

                second = _Server(db, port=port)
                _wait_for(lambda: buffered.buffered == 0, "the periodic flush to recover")
                assert second.count() == 3
                assert buffered.last_error is None
                buffered.ingest_flows(*_flows(2, start=3))
            assert second.count() == 5
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_bad_arguments(service: IngestionService) -> None:
    """A non-positive buffer size or interval is refused."""
    with pytest.raises(ValueError, match="buffer_size"):
        service.buffered_ingestion(buffer_size=0)
    with pytest.raises(ValueError, match="flush_interval_sec"):
        service.buffered_ingestion(flush_interval_sec=0)


def test_close_without_with_block(server: _Server, service: IngestionService) -> None:
    """Without a with-block, close() stops the thread and flushes; closing again is a no-op."""
    buffered = service.buffered_ingestion(flush_interval_sec=30)
    assert isinstance(buffered, BufferedIngestionService)
    buffered.ingest_flows(*_flows(2))
    buffered.close()
    buffered.close()
    assert server.count() == 2
    assert _flush_threads() == []


def test_unclosed_instance_stops_its_thread(
    service: IngestionService, caplog: pytest.LogCaptureFixture
) -> None:
    """An instance dropped without close() is collected, stops its thread and logs a warning."""
    buffered: BufferedIngestionService | None = service.buffered_ingestion(flush_interval_sec=30)
    assert buffered is not None
    buffered.ingest_flows(*_flows(2))
    (thread,) = _flush_threads()
    with caplog.at_level(logging.WARNING, logger="daq_agent.ingestion.buffer"):
        buffered = None
        gc.collect()
        thread.join(_WAIT_SEC)
    assert not thread.is_alive()
    assert "not properly closed: 2 requests not sent" in caplog.text
