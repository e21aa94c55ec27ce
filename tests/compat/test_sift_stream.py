"""Sift's Rust streaming client (``sift_stream_bindings``) against the local server, unmodified."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest
import sift_stream_bindings as ss
from compat_support import Cell, export

from daq_agent.server.local import LocalIngestServer

pytestmark = pytest.mark.integration

D = ss.ChannelDataTypePy
BASE_NS = 1_700_000_000_000_000_000
READINGS = ss.FlowConfigPy(
    "readings",
    [
        ss.ChannelConfigPy("voltage", "V", "", D.Double, [], []),
        ss.ChannelConfigPy("count", "", "", D.Int64, [], []),
    ],
)


def _builder(
    server: LocalIngestServer, client_key: str, flows: Sequence[ss.FlowConfigPy]
) -> ss.StreamConfigBuilderPy:
    builder = ss.SiftStreamBuilderPy(uri=f"http://{server.address}", apikey="local-key")
    builder.enable_tls = False
    return builder.ingestion_config(ss.IngestionConfigFormPy("rig", client_key, list(flows)))


def _reading(i: int, base_ns: int) -> tuple[ss.FlowPy, dict[Cell, str]]:
    """The i-th readings flow and the cells export must show for it."""
    ts = base_ns + i * 1000
    voltage = i * 0.25 - 3.0
    flow = ss.FlowPy(
        "readings",
        ss.TimeValuePy.from_timestamp_nanos(ts),
        [
            ss.ChannelValuePy("voltage", ss.ValuePy.Double(voltage)),
            ss.ChannelValuePy("count", ss.ValuePy.Int64(i - 5000)),
        ],
    )
    return flow, {
        (ts, "readings", "voltage"): repr(voltage),
        (ts, "readings", "count"): str(i - 5000),
    }


def test_streams_10k_flows_and_rebuilds_with_the_same_client_key(
    local_server: LocalIngestServer, tmp_path: Path
) -> None:
    """sift_stream builds, streams 10k flows (all stored), finishes, and builds again with the
    same client key (ListIngestionConfigs, ListIngestionConfigFlows ``flow_name in [...]``)."""
    expected: dict[Cell, str] = {}

    async def one_stream(base_ns: int) -> None:
        stream = await _builder(local_server, "rig-key", [READINGS]).live_only().build()
        flows = []
        for i in range(10_000):
            flow, cells = _reading(i, base_ns)
            flows.append(flow)
            expected.update(cells)
        await stream.batch_send(flows)
        await stream.finish()

    asyncio.run(one_stream(BASE_NS))
    asyncio.run(one_stream(BASE_NS + 10**12))

    with local_server.open_store() as store:
        configs = store.list_ingestion_configs("client_key == 'rig-key'")
        assert len(configs) == 1
        assert store.count_samples(flow="readings") == 20_000
        assert store.count_validation_errors() == 0
    assert export(local_server.db_path, flows=["readings"]) == expected
