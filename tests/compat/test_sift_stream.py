"""Sift's Rust streaming client (``sift_stream_bindings``) against the local server, unmodified."""

from __future__ import annotations

import asyncio
import time
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


TYPED = ss.FlowConfigPy(
    "typed",
    [
        ss.ChannelConfigPy("f32", "", "", D.Float, [], []),
        ss.ChannelConfigPy("i32", "", "", D.Int32, [], []),
        ss.ChannelConfigPy("u32", "", "", D.Uint32, [], []),
        ss.ChannelConfigPy("u64", "", "", D.Uint64, [], []),
        ss.ChannelConfigPy("ok", "", "", D.Bool, [], []),
        ss.ChannelConfigPy("text", "", "", D.String, [], []),
        ss.ChannelConfigPy("mode", "", "", D.Enum, [ss.ChannelEnumTypePy("idle", 0)], []),
        ss.ChannelConfigPy(
            "bits", "", "", D.BitField, [], [ss.ChannelBitFieldElementPy("lo", 0, 4)]
        ),
        ss.ChannelConfigPy("raw", "", "", D.Bytes, [], []),
    ],
)


def _typed(i: int, base_ns: int) -> tuple[ss.FlowPy, dict[Cell, str]]:
    """The i-th typed flow (every other one leaves ``text`` and ``raw`` empty) and its cells."""
    ts = base_ns + i * 1000
    values: list[tuple[str, ss.ValuePy, str]] = [
        ("f32", ss.ValuePy.Float(i * 0.5), repr(i * 0.5)),
        ("i32", ss.ValuePy.Int32(-(2**31) + i), str(-(2**31) + i)),
        ("u32", ss.ValuePy.Uint32(2**32 - 1 - i), str(2**32 - 1 - i)),
        ("u64", ss.ValuePy.Uint64(2**64 - 1 - i), str(2**64 - 1 - i)),
        ("ok", ss.ValuePy.Bool(i % 3 == 0), "true" if i % 3 == 0 else "false"),
        ("mode", ss.ValuePy.Enum(i % 4), str(i % 4)),
        ("bits", ss.ValuePy.BitField([i % 256]), bytes([i % 256]).hex()),
    ]
    if i % 2:
        values.append(("text", ss.ValuePy.String(f"line {i} é"), f"line {i} é"))
        values.append(("raw", ss.ValuePy.Bytes([0, i % 256, 255]), bytes([0, i % 256, 255]).hex()))
    flow = ss.FlowPy(
        "typed",
        ss.TimeValuePy.from_timestamp_nanos(ts),
        [ss.ChannelValuePy(name, value) for name, value, _ in values],
    )
    return flow, {(ts, "typed", name): cell for name, _, cell in values}


def test_checkpointed_stream_with_lazy_flows_runs_and_a_reconnect(
    local_server: LocalIngestServer,
) -> None:
    """live_with_backups with 100 ms checkpoints: a run by client key, a flow registered at run
    time (add_new_flows), a second run attached then the first reattached by id; then a new
    stream with the same config and run client keys reuses both (UpdateRun, UpdateAsset). Export
    shows every value sent, each under the run it was sent with."""
    by_run: dict[str, dict[Cell, str]] = {"ss-run": {}, "ss-other": {}}
    run_ids: list[str | None] = []
    checkpoints: list[int] = []

    async def stream_once(base_ns: int, description: str, reattach: bool) -> None:
        builder = _builder(local_server, "rig-ckpt", [READINGS])
        builder.run = ss.RunFormPy("ss-run", "ss-run-key", description, ["bench"], None)
        builder.asset_tags = ["rig", description]
        mode = builder.live_with_backups()
        mode.checkpoint_interval = ss.DurationPy(0, 100_000_000)
        stream = await mode.build()
        run_ids.append(stream.run())
        await stream.add_new_flows([TYPED])
        batch = []
        for i in range(200):
            for flow, cells in (_reading(i, base_ns), _typed(i, base_ns + 1)):
                batch.append(flow)
                by_run["ss-run"].update(cells)
        await stream.batch_send(batch)
        # let checkpoints pass while the stream is open
        deadline = time.monotonic() + 10
        while stream.get_metrics_snapshot().checkpoint.checkpoint_count < 2:
            assert time.monotonic() < deadline, "no checkpoint in 10 s"
            await asyncio.sleep(0.05)
        if reattach:
            await stream.attach_run(
                ss.RunSelectorPy.by_form(ss.RunFormPy("ss-other", "ss-other-key", None, None, None))
            )
            other = []
            for i in range(200, 300):
                flow, cells = _reading(i, base_ns)
                other.append(flow)
                by_run["ss-other"].update(cells)
            await stream.batch_send(other)
            first = run_ids[-1]
            assert first is not None
            await stream.attach_run(ss.RunSelectorPy.by_id(first))
            again = []
            for i in range(300, 350):
                flow, cells = _reading(i, base_ns)
                again.append(flow)
                by_run["ss-run"].update(cells)
            await stream.batch_send(again)
        checkpoints.append(stream.get_metrics_snapshot().checkpoint.checkpoint_count)
        await stream.finish()

    asyncio.run(stream_once(BASE_NS, "first", reattach=True))
    asyncio.run(stream_once(BASE_NS + 10**12, "second", reattach=False))

    assert run_ids[0] is not None
    assert run_ids[0] == run_ids[1]
    assert min(checkpoints) >= 2
    flows = ["readings", "typed"]
    everything = {**by_run["ss-run"], **by_run["ss-other"]}
    # 350 + 200 readings (2 values each) and 400 typed flows (7 values, 9 every other one)
    assert len(everything) == (350 + 200) * 2 + 400 * 8
    assert export(local_server.db_path, flows=flows) == everything
    for run, cells in by_run.items():
        assert export(local_server.db_path, run=run, flows=flows) == cells, run
    with local_server.open_store() as store:
        assert store.count_validation_errors() == 0
        (config,) = store.list_ingestion_configs("client_key == 'rig-ckpt'")
        assert [f.name for f in store.list_flows(config.pk)] == ["readings", "typed"]
        run = store.get_run(run_ids[0])
        assert run is not None
        assert (run.name, run.description, run.client_key) == ("ss-run", "second", "ss-run-key")
        asset = store.get_asset(config.asset_id)
        assert asset is not None
        assert asset.tags == ("rig", "second")
