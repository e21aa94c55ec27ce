"""Buffered ingestion against the real local ingestion server (127.0.0.1, port 0), each flush a
sift_stream data stream."""

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
    RpcError,
    SiftChannelConfig,
    TelemetryConfig,
    double_value,
    string_value,
    use_sift_channel,
)
from daq_agent.server.local import LocalIngestServer, make_server
from daq_agent.server.store import Store

pytestmark = pytest.mark.integration

_T0 = 1_700_000_000_000_000_000
_FLOW = FlowConfig("readings", [ChannelConfig("voltage", ChannelDataType.DOUBLE)])
_THREAD = "daq-buffer-flush"
_WAIT_SEC = 20.0
# A keyless server takes any key; sift_stream needs a non-empty one (it sends "Bearer " for none).
_ANY_KEY = "any-key"


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

    def values(self) -> list[float]:
        """The stored voltages, in time order."""
        with Store.open(self.db_path, readonly=True) as store:
            return [s.values["voltage"] for s in store.iter_samples()]

    def channel_config(self) -> SiftChannelConfig:
        return {"uri": f"127.0.0.1:{self.port}", "apikey": _ANY_KEY, "use_ssl": False}

    def stop(self) -> None:
        if self.running:
            self.running = False
            self.server.stop(grace=0.5)


@pytest.fixture
def server(local_server: LocalIngestServer) -> _Server:
    """The shared local_server fixture, with helpers to read its store back."""
    return _Server.wrap(local_server)


@pytest.fixture
def service(server: _Server) -> Iterator[IngestionService]:
    """An IngestionService with one double flow, on a plain-text channel to the server."""
    with use_sift_channel(server.channel_config()) as channel:
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


def test_on_error_gets_the_live_buffer(server: _Server, service: IngestionService) -> None:
    """on_error gets the error, the live buffer and a flush, as in sift_py: what the callback
    leaves in the buffer is what the flush sends; the error is re-raised."""
    seen: list[tuple[BaseException, list[float]]] = []
    extra = service.create_ingestion_request("readings", _T0 + 100, [double_value(100.0)])

    def on_error(
        error: BaseException,
        buffer: list[IngestWithConfigDataStreamRequest],
        flush: Callable[[], None],
    ) -> None:
        seen.append((error, [r.channel_values[0].double for r in buffer]))
        assert server.count() == 0
        del buffer[0]  # drop one request, add another: the flush sends the list as it is now
        buffer.append(extra)
        flush()
        assert buffer == []  # delivered requests leave the live buffer

    def block() -> None:
        with service.buffered_ingestion(on_error=on_error) as buffered:
            buffered.ingest_flows(*_flows(4))
            raise ValueError("bad sample")

    with pytest.raises(ValueError, match="bad sample"):
        block()
    ((error, unsent),) = seen
    assert isinstance(error, ValueError)
    assert unsent == [0.0, 1.0, 2.0, 3.0]
    assert server.values() == [1.0, 2.0, 3.0, 100.0]


def test_failed_size_flush_keeps_requests(tmp_path: Path, server: _Server) -> None:
    """A size flush that fails raises an RpcError (a grpc.RpcError), keeps the requests, and
    on_error receives them."""
    with use_sift_channel(server.channel_config()) as channel:
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
        assert isinstance(info.value, RpcError)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert unsent_seen == [3]
        assert buffered.buffered == 3


def _outage_test(tmp_path: Path, buffer_size: int, scenario: Callable[..., None]) -> list[float]:
    """Run ``scenario(buffered, restart)`` with the server down from the start; ``restart()``
    brings it back on the same port. Returns the voltages stored in the end."""
    db = tmp_path / "store.db"
    first = _Server(db)
    servers = [first]
    try:
        with use_sift_channel(first.channel_config()) as channel:
            telemetry = TelemetryConfig("bench", ingestion_client_key="k", flows=[_FLOW])
            service = IngestionService(channel, telemetry)
            first.stop()

            def restart() -> None:
                servers.append(_Server(db, port=first.port))

            with service.buffered_ingestion(buffer_size=buffer_size) as buffered:
                scenario(buffered, restart)
        return servers[-1].values()
    finally:
        for server in servers:
            server.stop()


def test_after_a_failed_flush_the_next_calls_are_kept(tmp_path: Path) -> None:
    """A failed flush raises once, to its caller; the calls after it buffer their requests
    behind the unsent ones (none is dropped, the old error is not raised again) and the next
    flush that succeeds delivers them all, in order."""

    def scenario(buffered: BufferedIngestionService, restart: Callable[[], None]) -> None:
        buffered.ingest_flows(*_flows(2))
        with pytest.raises(grpc.RpcError):
            buffered.flush()
        assert buffered.last_error is not None
        buffered.ingest_flows(*_flows(2, start=2))  # not full: no flush, and no old error
        buffered.try_ingest_flows(
            {
                "flow_name": "readings",
                "timestamp": _T0 + 4,
                "channel_values": [{"channel_name": "voltage", "value": double_value(4)}],
            }
        )
        assert buffered.buffered == 5
        restart()  # the exit flush delivers everything

    assert _outage_test(tmp_path, 100, scenario) == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_a_full_buffer_tries_again_at_each_call(tmp_path: Path) -> None:
    """While the buffer stays full after a failed flush, each call buffers its requests and
    tries again, raising its own failure; once the server is back, one flush delivers all."""

    def scenario(buffered: BufferedIngestionService, restart: Callable[[], None]) -> None:
        with pytest.raises(grpc.RpcError) as failed:
            buffered.ingest_flows(*_flows(3))  # full: the flush fails
        assert buffered.buffered == 3
        with pytest.raises(grpc.RpcError) as again:
            buffered.ingest_flows(*_flows(2, start=3))  # still full: a new try fails
        assert again.value is not failed.value  # its own failure, not the old one raised again
        assert buffered.buffered == 5
        restart()
        buffered.ingest_flows(*_flows(1, start=5))  # full: this flush delivers everything
        assert buffered.buffered == 0
        assert buffered.last_error is None

    assert _outage_test(tmp_path, 3, scenario) == [float(i) for i in range(6)]


def test_a_stream_error_surfaces_from_the_flush(server: _Server) -> None:
    """A request the server ends the stream on (INVALID_ARGUMENT, with end_stream_on_error)
    fails the flush with that RpcError, never silently; the requests stay buffered."""
    with use_sift_channel(server.channel_config()) as channel:
        telemetry = TelemetryConfig("bench", ingestion_client_key="k", flows=[_FLOW])
        service = IngestionService(channel, telemetry, end_stream_on_error=True)
        buffered = service.buffered_ingestion(buffer_size=100)
        buffered.ingest_flows(*_flows(3))
        buffered.ingest(service.create_ingestion_request("readings", _T0 + 3, [string_value("x")]))
        with pytest.raises(grpc.RpcError) as info:
            buffered.flush()
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert buffered.buffered == 4
        assert buffered.last_error is info.value
        with pytest.raises(grpc.RpcError):
            buffered.close()  # the last flush fails the same way: close says so
        assert buffered.buffered == 4


def test_periodic_flush_survives_a_server_outage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A failed periodic flush keeps its requests, surfaces its error once on the next ingest
    (whose requests are buffered all the same), logs one warning however many tries fail, and
    later recovers."""
    caplog.set_level(logging.DEBUG, logger="daq_agent.ingestion.buffer")
    db = tmp_path / "store.db"
    first = _Server(db)
    port = first.port
    second: _Server | None = None

    def failures() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "periodic flush failed" in r.getMessage()]

    try:
        with use_sift_channel(first.channel_config()) as channel:
            telemetry = TelemetryConfig("bench", ingestion_client_key="k", flows=[_FLOW])
            service = IngestionService(channel, telemetry)
            first.stop()
            with service.buffered_ingestion(flush_interval_sec=0.05) as buffered:
                buffered.ingest_flows(*_flows(3))
                _wait_for(lambda: buffered.last_error is not None, "a failed periodic flush")
                assert buffered.buffered == 3
                # The error surfaces on the next ingest, which buffers its requests all the same.
                with pytest.raises(grpc.RpcError) as info:
                    buffered.ingest_flows(*_flows(1, start=3))
                assert info.value.code() is grpc.StatusCode.UNAVAILABLE
                assert buffered.buffered == 4
                assert len(_flush_threads()) == 1  # still flushing periodically
                _wait_for(lambda: len(failures()) >= 3, "more failed periodic flushes")

                second = _Server(db, port=port)
                _wait_for(lambda: buffered.buffered == 0, "the periodic flush to recover")
                assert second.count() == 4
                assert buffered.last_error is None
                buffered.ingest_flows(*_flows(2, start=4))
            assert second.values() == [float(i) for i in range(6)]
    finally:
        first.stop()
        if second is not None:
            second.stop()
    assert [r.levelno for r in failures()].count(logging.WARNING) == 1
    assert "delivered again after" in caplog.text


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
