"""The flusher on its own against the real local server: the spool seam (a pre-filled window)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from daq_agent.core.sample import Sample
from daq_agent.ingestion import (
    ChannelConfig,
    ChannelDataType,
    FlowConfig,
    IngestionService,
    SiftChannel,
    TelemetryConfig,
    use_sift_channel,
)
from daq_agent.ingestion.encode import RequestEncoder
from daq_agent.pipeline.flusher import Flusher, FlusherSettings, MemoryWindow
from daq_agent.pipeline.ring_buffer import RingBuffer
from daq_agent.server.local import LocalIngestServer
from daq_agent.server.store import Store

pytestmark = pytest.mark.integration

FLOW = FlowConfig(
    "bench.values",
    [ChannelConfig("a", ChannelDataType.DOUBLE), ChannelConfig("b", ChannelDataType.UINT_32)],
)


@pytest.fixture
def channel(local_server: LocalIngestServer) -> Iterator[SiftChannel]:
    """A SiftChannel to the local server (plain text on loopback, no key)."""
    with use_sift_channel(
        {"uri": f"127.0.0.1:{local_server.port}", "apikey": "", "use_ssl": False}
    ) as sift_channel:
        yield sift_channel


def test_a_prefilled_window_is_recovered_and_delivered_first(
    local_server: LocalIngestServer, channel: SiftChannel, tmp_path: Path
) -> None:
    """What a window holds at start (a spool's backlog) is sent, acknowledged and counted apart."""
    service = IngestionService(channel, TelemetryConfig("flusher", "flusher-key", flows=[FLOW]))
    encoder = RequestEncoder(service.ingestion_config.ingestion_config_id, [FLOW])
    backlog = [Sample(FLOW.name, 1_000 + i, (float(i), i)) for i in range(30)]
    window = MemoryWindow()
    window.append(encoder.encode_many(backlog[:10]), 10, 1_000, 1_009)
    window.append(encoder.encode_many(backlog[10:]), 20, 1_010, 1_029)
    ring: RingBuffer[Sample] = RingBuffer(100)
    flusher = Flusher(
        ring,
        service.open_stream,
        encoder,
        settings=FlusherSettings(checkpoint_seconds=0.1),
        window=window,
    )
    assert flusher.stats().recovered == 30
    flusher.start()
    for i in range(5):
        ring.put(Sample(FLOW.name, 5_000 + i, (0.5, i)))
    assert flusher.stop(drain=True, timeout=30)
    stats = flusher.stats()
    assert (stats.recovered, stats.taken, stats.delivered, stats.pending) == (30, 5, 35, 0)
    assert stats.balanced
    with Store.open(local_server.db_path, readonly=True) as store:
        assert store.count_samples(flow=FLOW.name) == 35
