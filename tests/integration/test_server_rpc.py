"""Every RPC of the local ingestion server, called through grpcio on 127.0.0.1 port 0."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message
from server_calls import (
    BASE_NS,
    Request,
    call,
    code_of,
    create_config,
    double_flow,
    doubles,
    ingest_method,
    stream,
)

from daq_agent._proto.sift.assets.v1 import assets_pb2
from daq_agent._proto.sift.channels.v3 import channels_pb2
from daq_agent._proto.sift.common.type.v1 import channel_data_type_pb2 as cdt
from daq_agent._proto.sift.common.type.v1.channel_enum_type_pb2 import ChannelEnumType
from daq_agent._proto.sift.ingestion_configs.v2 import ingestion_configs_pb2 as ic
from daq_agent._proto.sift.metadata.v1 import metadata_pb2
from daq_agent._proto.sift.ping.v1 import ping_pb2
from daq_agent._proto.sift.rules.v1 import rules_pb2
from daq_agent._proto.sift.runs.v2 import runs_pb2
from daq_agent._proto.sift.tags.v2 import tags_pb2
from daq_agent.server.local import LocalIngestServer, make_server
from daq_agent.server.services import PING_RESPONSE
from daq_agent.server.store import Store

pytestmark = pytest.mark.integration


def rpc(
    channel: grpc.Channel, request: Message, metadata: Sequence[tuple[str, str]] | None = None
) -> Any:
    """One unary call of the Sift method that takes ``request``'s type: the method path and the
    response type come from the request's proto service descriptor."""
    wanted = request.DESCRIPTOR
    for service in wanted.file.services_by_name.values():
        for method in service.methods:
            if method.input_type is wanted:
                return call(
                    channel,
                    f"/{service.full_name}/{method.name}",
                    request,
                    message_factory.GetMessageClass(method.output_type),
                    metadata,
                )
    raise AssertionError(f"no method of {wanted.file.name} takes {wanted.full_name}")


def test_ping(grpc_channel: grpc.Channel) -> None:
    """Ping answers with the server's name."""
    response = rpc(grpc_channel, ping_pb2.PingRequest())
    assert response.response == PING_RESPONSE


def test_create_get_and_list_ingestion_configs(grpc_channel: grpc.Channel) -> None:
    """A created config is returned by Get and found by a client_key filter."""
    created = create_config(grpc_channel, "key-1", [double_flow("f")])
    assert created.ingestion_config_id
    assert created.asset_id
    assert created.client_key == "key-1"
    got = rpc(
        grpc_channel, ic.GetIngestionConfigRequest(ingestion_config_id=created.ingestion_config_id)
    ).ingestion_config
    assert got == created
    create_config(grpc_channel, "key-2", [])
    listed = rpc(grpc_channel, ic.ListIngestionConfigsRequest(filter='client_key=="key-1"'))
    assert list(listed.ingestion_configs) == [created]
    assert listed.next_page_token == ""
    by_id = rpc(
        grpc_channel,
        ic.ListIngestionConfigsRequest(
            filter=f"ingestion_config_id == '{created.ingestion_config_id}'"
        ),
    )
    assert list(by_id.ingestion_configs) == [created]


def test_same_asset_name_shares_the_asset(grpc_channel: grpc.Channel) -> None:
    """Two configs of one asset name carry the same asset id."""
    first = create_config(grpc_channel, "a", [], asset="rig")
    second = create_config(grpc_channel, "b", [], asset="rig")
    other = create_config(grpc_channel, "c", [], asset="other")
    assert first.asset_id == second.asset_id != other.asset_id


def test_list_ingestion_configs_pages(grpc_channel: grpc.Channel) -> None:
    """page_size/page_token walk every config exactly once."""
    keys = [f"k{i}" for i in range(5)]
    for key in keys:
        create_config(grpc_channel, key, [])
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = rpc(grpc_channel, ic.ListIngestionConfigsRequest(page_size=2, page_token=token))
        pages += 1
        assert len(page.ingestion_configs) <= 2
        seen.extend(c.client_key for c in page.ingestion_configs)
        token = page.next_page_token
        if not token:
            break
    assert seen == keys
    assert pages == 3


def test_duplicate_client_key_is_already_exists(grpc_channel: grpc.Channel) -> None:
    """A second config with a taken client key is refused with ALREADY_EXISTS."""
    create_config(grpc_channel, "dup", [])
    code, details = code_of(lambda: create_config(grpc_channel, "dup", []))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert "dup" in details


def test_unknown_ingestion_config_is_not_found(grpc_channel: grpc.Channel) -> None:
    """Get, CreateFlows and ListFlows of an unknown config answer NOT_FOUND."""
    for request in (
        ic.GetIngestionConfigRequest(ingestion_config_id="nope"),
        ic.CreateIngestionConfigFlowsRequest(ingestion_config_id="nope"),
        ic.ListIngestionConfigFlowsRequest(ingestion_config_id="nope"),
    ):
        code, _ = code_of(lambda: rpc(grpc_channel, request))  # noqa: B023
        assert code == grpc.StatusCode.NOT_FOUND, request


def test_invalid_arguments(grpc_channel: grpc.Channel) -> None:
    """A bad filter, page token or a config without asset name answer INVALID_ARGUMENT."""
    for request in (
        ic.ListIngestionConfigsRequest(filter="client_key ~ 'x'"),
        ic.ListIngestionConfigsRequest(filter='colour == "red"'),
        ic.ListIngestionConfigsRequest(page_token="not-a-token"),
        ic.ListIngestionConfigsRequest(page_token="9" * 30),
        runs_pb2.ListRunsRequest(page_token="\uff11\uff12"),  # full-width digits
    ):
        code, _ = code_of(lambda: rpc(grpc_channel, request))  # noqa: B023
        assert code == grpc.StatusCode.INVALID_ARGUMENT, request
    code, _ = code_of(lambda: rpc(grpc_channel, ic.CreateIngestionConfigRequest(client_key="x")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_create_and_list_flows(grpc_channel: grpc.Channel) -> None:
    """New flows are added; a taken name answers ALREADY_EXISTS and adds nothing."""
    config = create_config(grpc_channel, "flows", [double_flow("a")])
    config_id = config.ingestion_config_id
    rpc(
        grpc_channel,
        ic.CreateIngestionConfigFlowsRequest(
            ingestion_config_id=config_id, flows=[double_flow("b"), double_flow("c", 3)]
        ),
    )
    code, details = code_of(
        lambda: rpc(
            grpc_channel,
            ic.CreateIngestionConfigFlowsRequest(
                ingestion_config_id=config_id, flows=[double_flow("d"), double_flow("a")]
            ),
        )
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert "'a'" in details

    def list_flows(**kwargs: Any) -> ic.ListIngestionConfigFlowsResponse:
        return rpc(
            grpc_channel,
            ic.ListIngestionConfigFlowsRequest(ingestion_config_id=config_id, **kwargs),
        )

    assert [f.name for f in list_flows().flows] == ["a", "b", "c"]
    (c,) = list_flows(filter='name=="c"').flows
    assert c == double_flow("c", 3)
    first = list_flows(page_size=2)
    second = list_flows(page_size=2, page_token=first.next_page_token)
    assert [f.name for f in first.flows] == ["a", "b"]
    assert [f.name for f in second.flows] == ["c"]
    assert second.next_page_token == ""


def test_runs(grpc_channel: grpc.Channel) -> None:
    """CreateRun, GetRun, ListRuns by name and StopRun keep every field."""
    metadata = metadata_pb2.MetadataValue(
        key=metadata_pb2.MetadataKey(name="bench", type=metadata_pb2.METADATA_KEY_TYPE_STRING),
        string_value="B7",
    )
    request = runs_pb2.CreateRunRequest(
        name="run-1", description="first", tags=["a", "b"], client_key="rk", metadata=[metadata]
    )
    request.start_time.FromNanoseconds(BASE_NS)
    run = rpc(grpc_channel, request).run
    assert run.run_id
    assert run.name == "run-1"
    assert list(run.tags) == ["a", "b"]
    assert run.client_key == "rk"
    assert list(run.metadata) == [metadata]
    assert run.start_time.ToNanoseconds() == BASE_NS
    assert not run.HasField("stop_time")
    assert not run.is_stopped
    rpc(grpc_channel, runs_pb2.CreateRunRequest(name="run-2"))
    got = rpc(grpc_channel, runs_pb2.GetRunRequest(run_id=run.run_id)).run
    assert got == run
    listed = rpc(grpc_channel, runs_pb2.ListRunsRequest(filter='name == "run-1"'))
    assert [r.run_id for r in listed.runs] == [run.run_id]
    everything = rpc(grpc_channel, runs_pb2.ListRunsRequest(page_size=1))
    assert len(everything.runs) == 1
    assert everything.next_page_token
    newest = rpc(grpc_channel, runs_pb2.ListRunsRequest(page_size=1, order_by="created_date desc"))
    assert [r.name for r in newest.runs] == ["run-2"]
    older = rpc(
        grpc_channel,
        runs_pb2.ListRunsRequest(order_by="created_date desc", page_token=newest.next_page_token),
    )
    assert [r.name for r in older.runs] == ["run-1"]
    assert older.next_page_token == ""
    rpc(grpc_channel, runs_pb2.StopRunRequest(run_id=run.run_id))
    stopped = rpc(grpc_channel, runs_pb2.GetRunRequest(run_id=run.run_id)).run
    assert stopped.is_stopped
    assert stopped.HasField("stop_time")
    assert stopped.stop_time.ToNanoseconds() >= stopped.created_date.ToNanoseconds()


def test_run_errors(grpc_channel: grpc.Channel) -> None:
    """Unknown run ids answer NOT_FOUND; a taken run client key ALREADY_EXISTS."""
    code, _ = code_of(lambda: rpc(grpc_channel, runs_pb2.GetRunRequest(run_id="x")))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = code_of(lambda: rpc(grpc_channel, runs_pb2.StopRunRequest(run_id="x")))
    assert code == grpc.StatusCode.NOT_FOUND
    request = runs_pb2.CreateRunRequest(name="r", client_key="same")
    rpc(grpc_channel, request)
    code, _ = code_of(lambda: rpc(grpc_channel, request))
    assert code == grpc.StatusCode.ALREADY_EXISTS


def test_every_data_type_round_trips(
    grpc_channel: grpc.Channel, local_server: LocalIngestServer
) -> None:
    """Every value type (empty, extremes, NaN, inf) is stored and read back at its ns timestamp."""
    types = [
        ("d", cdt.CHANNEL_DATA_TYPE_DOUBLE, "double"),
        ("s", cdt.CHANNEL_DATA_TYPE_STRING, "string"),
        ("e", cdt.CHANNEL_DATA_TYPE_ENUM, "enum"),
        ("bf", cdt.CHANNEL_DATA_TYPE_BIT_FIELD, "bit_field"),
        ("b", cdt.CHANNEL_DATA_TYPE_BOOL, "bool"),
        ("f", cdt.CHANNEL_DATA_TYPE_FLOAT, "float"),
        ("i32", cdt.CHANNEL_DATA_TYPE_INT_32, "int32"),
        ("u32", cdt.CHANNEL_DATA_TYPE_UINT_32, "uint32"),
        ("i64", cdt.CHANNEL_DATA_TYPE_INT_64, "int64"),
        ("u64", cdt.CHANNEL_DATA_TYPE_UINT_64, "uint64"),
        ("by", cdt.CHANNEL_DATA_TYPE_BYTES, "bytes"),
    ]
    flow = ic.FlowConfig(
        name="all",
        channels=[
            ic.ChannelConfig(
                name=name,
                data_type=data_type,
                enum_types=[ChannelEnumType(name="on", key=1)] if name == "e" else [],
            )
            for name, data_type, _ in types
        ],
    )
    config = create_config(grpc_channel, "types", [flow])
    rows: list[dict[str, Any]] = [
        {
            "d": math.inf,
            "s": "héllo",
            "e": 1,
            "bf": b"\x01\x02",
            "b": True,
            "f": 0.5,
            "i32": -(2**31),
            "u32": 2**32 - 1,
            "i64": -(2**63),
            "u64": 2**64 - 1,
            "by": b"\x00\xff",
        },
        {"d": -math.inf, "i64": 2**63 - 1, "u64": 0, "b": False, "f": math.nan},
        {"d": math.nan},
    ]
    requests = []
    for i, row in enumerate(rows):
        request = Request(ingestion_config_id=config.ingestion_config_id, flow="all")
        request.timestamp.FromNanoseconds(BASE_NS + i)
        for name, _, field in types:
            value = request.channel_values.add()
            if name in row:
                setattr(value, field, row[name])
            else:
                value.empty.SetInParent()
        requests.append(request)
    stream(grpc_channel, requests)
    with local_server.open_store() as store:
        stored = list(store.iter_samples())
        assert store.count_validation_errors() == 0
    assert [s.timestamp_ns for s in stored] == [BASE_NS, BASE_NS + 1, BASE_NS + 2]
    assert all(s.flow == "all" for s in stored)
    first = stored[0].values
    assert first["d"] == math.inf
    assert first["s"] == "héllo"
    assert first["bf"] == b"\x01\x02"
    assert first["i32"] == -(2**31)
    assert first["u64"] == 2**64 - 1
    assert first["i64"] == -(2**63)
    assert first["by"] == b"\x00\xff"
    assert first["b"] is True
    assert first["e"] == 1
    second = stored[1].values
    assert second["d"] == -math.inf
    assert math.isnan(float(second["f"] or 0))
    assert second["b"] is False
    assert second["s"] is None
    assert second["by"] is None
    assert second["u64"] == 0
    third = stored[2].values
    assert math.isnan(float(third["d"] or 0))
    assert [k for k, v in third.items() if v is not None] == ["d"]


def test_resent_stream_is_stored_once(
    grpc_channel: grpc.Channel, local_server: LocalIngestServer
) -> None:
    """The same (config, flow, run, timestamp) sent twice is one sample; OK means committed."""
    config = create_config(grpc_channel, "dedup", [double_flow("f", 2)])
    run = rpc(grpc_channel, runs_pb2.CreateRunRequest(name="r")).run
    requests = [
        doubles(config.ingestion_config_id, "f", BASE_NS + i, i, -i, run_id=run.run_id)
        for i in range(1000)
    ]
    stream(grpc_channel, requests)
    with local_server.open_store() as store:
        assert store.count_samples() == 1000
    stream(grpc_channel, [*requests[500:], doubles(config.ingestion_config_id, "f", BASE_NS, 0, 0)])
    with local_server.open_store() as store:
        assert store.count_samples() == 1001  # the last one has no run: another sample
        assert store.count_samples(run_id=run.run_id) == 1000
        assert store.flow_counts() == {"f": 1001}


def test_validation_errors_are_recorded(
    grpc_channel: grpc.Channel, local_server: LocalIngestServer
) -> None:
    """Invalid requests are recorded with their reason and index; the valid ones are stored."""
    config = create_config(grpc_channel, "v", [double_flow("f", 2)])
    cid = config.ingestion_config_id
    wrong_type = doubles(cid, "f", BASE_NS + 3, 1.0)
    wrong_type.channel_values.add(int32=3)
    with_empty = doubles(cid, "f", BASE_NS + 7, 1.0)
    with_empty.channel_values.add().empty.SetInParent()
    requests = [
        doubles(cid, "f", BASE_NS, 1, 2),
        doubles("no-such-config", "f", BASE_NS + 1, 1, 2),
        doubles(cid, "nope", BASE_NS + 2, 1, 2),
        wrong_type,
        doubles(cid, "f", BASE_NS + 4, 1),
        doubles(cid, "f", BASE_NS + 5, 1, 2, run_id="no-such-run"),
        doubles(cid, "f", BASE_NS + 6, 1, 2),
        with_empty,
    ]
    stream(grpc_channel, requests)
    with local_server.open_store() as store:
        assert store.count_samples() == 3
        errors = store.validation_errors()
    assert [e.request_index for e in errors] == [1, 2, 3, 4, 5]
    reasons = [e.reason for e in errors]
    assert "unknown ingestion config" in reasons[0]
    assert "unknown flow 'nope'" in reasons[1]
    assert "is int32, expected double" in reasons[2]
    assert "has 2 channels, the request has 1 values" in reasons[3]
    assert "unknown run 'no-such-run'" in reasons[4]
    assert errors[1].flow == "nope"
    assert errors[0].ingestion_config_id == "no-such-config"


def test_end_stream_on_validation_error(
    grpc_channel: grpc.Channel, local_server: LocalIngestServer
) -> None:
    """With end_stream_on_validation_error the stream ends INVALID_ARGUMENT naming the problem."""
    config = create_config(grpc_channel, "end", [double_flow("f", 2)])
    bad = doubles(config.ingestion_config_id, "f", BASE_NS + 1, 1.0)
    bad.end_stream_on_validation_error = True
    good = doubles(config.ingestion_config_id, "f", BASE_NS, 1, 2)
    code, details = code_of(lambda: stream(grpc_channel, [good, bad, good]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "has 2 channels, the request has 1 values" in details
    with local_server.open_store() as store:
        assert store.count_validation_errors() == 1


def test_api_key_is_required(tmp_path: Path) -> None:
    """With an API key, calls without it or with a wrong one get UNAUTHENTICATED."""
    with make_server(tmp_path / "auth.sqlite", api_key="s3cret") as server:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        try:
            ping = ping_pb2.PingRequest()
            for metadata in (
                None,
                [("authorization", "Bearer wrong")],
                [("authorization", "s3cret")],
            ):
                code, _ = code_of(
                    lambda: rpc(channel, ping, metadata)  # noqa: B023
                )
                assert code == grpc.StatusCode.UNAUTHENTICATED
            code, _ = code_of(lambda: stream(channel, [], metadata=[("authorization", "Bearer x")]))
            assert code == grpc.StatusCode.UNAUTHENTICATED
            ok = rpc(channel, ping, [("authorization", "Bearer s3cret")])
            assert ok.response == PING_RESPONSE
        finally:
            channel.close()


def test_stalled_stream_does_not_block_others(
    grpc_channel: grpc.Channel, local_server: LocalIngestServer
) -> None:
    """A stream that is opened and never finished does not delay another stream's OK."""
    config = create_config(grpc_channel, "stall", [double_flow("f", 1)])
    cid = config.ingestion_config_id
    release = threading.Event()
    sent_first = threading.Event()

    def stalled() -> Iterator[Request]:
        yield doubles(cid, "f", BASE_NS, 1.0)
        sent_first.set()
        release.wait(30)

    method = ingest_method(grpc_channel)
    pending = method.future(stalled(), timeout=30)
    try:
        assert sent_first.wait(10)
        stream(grpc_channel, [doubles(cid, "f", BASE_NS + i, float(i)) for i in range(1, 101)])
        with local_server.open_store() as store:
            assert store.count_samples() >= 100
        assert not pending.done()
    finally:
        release.set()
    pending.result(timeout=10)
    with local_server.open_store() as store:
        assert store.count_samples() == 101


def test_cancelled_stream_keeps_what_it_delivered(
    grpc_channel: grpc.Channel, local_server: LocalIngestServer
) -> None:
    """A stream the client cancels mid-way has its delivered samples committed; serving goes on."""
    config = create_config(grpc_channel, "cancel", [double_flow("f", 1)])
    cid = config.ingestion_config_id
    release = threading.Event()
    sent = threading.Event()

    def stalled() -> Iterator[Request]:
        yield from (doubles(cid, "f", BASE_NS + i, float(i)) for i in range(10))
        sent.set()
        release.wait(30)

    method = ingest_method(grpc_channel)
    pending = method.future(stalled(), timeout=30)
    try:
        assert sent.wait(10)
        pending.cancel()  # type: ignore[no-untyped-call]
        deadline = time.monotonic() + 10
        count = 0
        while time.monotonic() < deadline:
            with local_server.open_store() as store:
                count = store.count_samples()
            if count == 10:
                break
            release.wait(0.05)
        assert count == 10
    finally:
        release.set()
    assert pending.cancelled()
    response = rpc(grpc_channel, ping_pb2.PingRequest())
    assert response.response == PING_RESPONSE


def test_stop_keeps_what_open_streams_delivered(tmp_path: Path) -> None:
    """Stopping the server with a stream still open commits the samples it already received."""
    server = make_server(tmp_path / "stop.sqlite")
    server.start()
    release = threading.Event()
    sent = threading.Event()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        config = create_config(channel, "stop", [double_flow("f", 1)])

        def stalled() -> Iterator[Request]:
            yield from (
                doubles(config.ingestion_config_id, "f", BASE_NS + i, 1.0) for i in range(5)
            )
            sent.set()
            release.wait(30)

        method = ingest_method(channel)
        pending = method.future(stalled(), timeout=30)
        assert sent.wait(10)
        # the stream's requests are on the wire; wait until the server has parsed them
        deadline = time.monotonic() + 10
        while len(server.services.rows) + server.store.pending < 5 and time.monotonic() < deadline:
            release.wait(0.02)
        server.stop(grace=0.2)
        with pytest.raises(grpc.RpcError):
            pending.result(timeout=10)
    finally:
        release.set()
        server.stop()
        channel.close()
    with Store.open(tmp_path / "stop.sqlite", readonly=True) as store:
        assert store.count_samples() == 5


def test_a_quiet_open_stream_is_committed_by_the_tick(
    grpc_channel: grpc.Channel, local_server: LocalIngestServer
) -> None:
    """Samples of a stream that went quiet (still open) reach the file within the commit tick."""
    config = create_config(grpc_channel, "quiet", [double_flow("f", 1)])
    cid = config.ingestion_config_id
    release = threading.Event()

    def quiet() -> Iterator[Request]:
        yield from (doubles(cid, "f", BASE_NS + i, float(i)) for i in range(5))
        release.wait(30)

    method = ingest_method(grpc_channel)
    pending = method.future(quiet(), timeout=30)
    try:
        deadline = time.monotonic() + 10
        seen = 0
        while time.monotonic() < deadline and seen < 5:
            with local_server.open_store() as store:
                seen = store.count_samples()
            time.sleep(0.05)
        assert seen == 5
        assert not pending.done()
    finally:
        release.set()
    pending.result(timeout=10)


def _metadata(key: str, value: str) -> metadata_pb2.MetadataValue:
    return metadata_pb2.MetadataValue(
        key=metadata_pb2.MetadataKey(name=key, type=metadata_pb2.METADATA_KEY_TYPE_STRING),
        string_value=value,
    )


def test_filters_of_every_list_rpc(grpc_channel: grpc.Channel) -> None:
    """`in [...]`, `&&` and `!=` work through every List* RPC; a bad filter is INVALID_ARGUMENT
    naming the offset and the fields the RPC supports."""
    a = create_config(grpc_channel, "ka", [double_flow("x"), double_flow("y"), double_flow("z")])
    create_config(grpc_channel, "kb", [], asset="other")
    configs = rpc(
        grpc_channel,
        ic.ListIngestionConfigsRequest(filter="client_key in ['ka', 'kc'] && asset_id != ''"),
    )
    assert [c.client_key for c in configs.ingestion_configs] == ["ka"]
    flows = rpc(
        grpc_channel,
        ic.ListIngestionConfigFlowsRequest(
            ingestion_config_id=a.ingestion_config_id, filter="flow_name in ['z','x','q']"
        ),
    )
    assert [f.name for f in flows.flows] == ["x", "z"]
    assets = rpc(grpc_channel, assets_pb2.ListAssetsRequest(filter='name in ["bench", "nope"]'))
    assert [x.name for x in assets.assets] == ["bench"]
    channels = rpc(
        grpc_channel,
        channels_pb2.ListChannelsRequest(
            filter=f'asset_id == \'{a.asset_id}\' && name in ["y.c1", "x.c0"]'
        ),
    )
    assert [c.name for c in channels.channels] == ["x.c0", "y.c1"]
    assert {c.asset_id for c in channels.channels} == {a.asset_id}
    assert channels.channels[0].data_type == cdt.CHANNEL_DATA_TYPE_DOUBLE
    code, details = code_of(
        lambda: rpc(grpc_channel, runs_pb2.ListRunsRequest(filter="name == 'a' && colour == 'red'"))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "at offset 15" in details
    assert "cannot filter on 'colour'" in details
    assert "client_key" in details
    code, details = code_of(
        lambda: rpc(grpc_channel, assets_pb2.ListAssetsRequest(filter="name in ['a'"))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "at offset 12: expected ',' or ']', found end of filter" in details


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("(" * 5000 + "name == 'a'" + ")" * 5000, "at offset 32: nested deeper than 32"),
        ("!" * 5000 + "name == 'a'", "at offset 32: nested deeper than 32"),
        (" || ".join(["name == 'a'"] * 2000), "at offset 1500: more than 100 comparisons"),
    ],
    ids=["parentheses", "negations", "comparisons"],
)
def test_an_oversized_filter_is_invalid_argument(
    grpc_channel: grpc.Channel, text: str, problem: str
) -> None:
    """A filter nested too deep or with too many comparisons (which once ended in Python's
    recursion limit or SQLite's expression depth: INTERNAL) is INVALID_ARGUMENT saying which,
    quoting only the part of a long filter around the offset (all of it would not fit in the
    status trailer: the client would see RESOURCE_EXHAUSTED)."""
    code, details = code_of(lambda: rpc(grpc_channel, runs_pb2.ListRunsRequest(filter=text)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert problem in details


def test_assets_get_list_and_update(grpc_channel: grpc.Channel) -> None:
    """A config's asset is got by id, listed newest first, and its tags and metadata updated;
    unknown ids are NOT_FOUND, a missing or unknown mask INVALID_ARGUMENT."""
    first = create_config(grpc_channel, "k1", [], asset="rig-1")
    second = create_config(grpc_channel, "k2", [], asset="rig-2")
    asset = rpc(grpc_channel, assets_pb2.GetAssetRequest(asset_id=first.asset_id)).asset
    assert (asset.asset_id, asset.name, list(asset.tags)) == (first.asset_id, "rig-1", [])
    assert asset.created_date.ToNanoseconds() > 0
    listed = rpc(grpc_channel, assets_pb2.ListAssetsRequest())
    assert [x.asset_id for x in listed.assets] == [second.asset_id, first.asset_id]
    page = rpc(grpc_channel, assets_pb2.ListAssetsRequest(page_size=1, order_by="created_date"))
    assert [x.name for x in page.assets] == ["rig-1"]
    assert page.next_page_token
    update = assets_pb2.UpdateAssetRequest(
        asset=assets_pb2.Asset(
            asset_id=first.asset_id,
            name="ignored",
            tags=["t1", "t2"],
            metadata=[_metadata("k", "v")],
        ),
        update_mask=FieldMask(paths=["tags", "metadata"]),
    )
    updated = rpc(grpc_channel, update).asset
    assert updated.name == "rig-1"
    assert list(updated.tags) == ["t1", "t2"]
    assert list(updated.metadata) == [_metadata("k", "v")]
    assert updated.modified_date.ToNanoseconds() >= asset.modified_date.ToNanoseconds()
    only_tags = assets_pb2.UpdateAssetRequest(
        asset=assets_pb2.Asset(asset_id=first.asset_id, tags=["t3"]),
        update_mask=FieldMask(paths=["tags"]),
    )
    again = rpc(grpc_channel, only_tags)
    assert list(again.asset.tags) == ["t3"]
    assert list(again.asset.metadata) == [_metadata("k", "v")]
    for request, expected in (
        (
            assets_pb2.UpdateAssetRequest(asset=assets_pb2.Asset(asset_id=first.asset_id)),
            "update_mask",
        ),
        (
            assets_pb2.UpdateAssetRequest(
                asset=assets_pb2.Asset(asset_id=first.asset_id),
                update_mask=FieldMask(paths=["name"]),
            ),
            "cannot update name",
        ),
    ):
        code, details = code_of(lambda: rpc(grpc_channel, request))  # noqa: B023
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert expected in details
    code, _ = code_of(lambda: rpc(grpc_channel, assets_pb2.GetAssetRequest(asset_id="nope")))
    assert code == grpc.StatusCode.NOT_FOUND


def test_update_run_and_get_or_create_by_client_key(grpc_channel: grpc.Channel) -> None:
    """ListRuns by client key finds the run CreateRun made; UpdateRun sets the masked fields only;
    a client key is set once; the newest run of a name is listed first."""
    created = rpc(
        grpc_channel, runs_pb2.CreateRunRequest(name="r", client_key="rk", tags=["a"])
    ).run
    found = rpc(grpc_channel, runs_pb2.ListRunsRequest(page_size=1, filter="client_key == 'rk'"))
    assert [r.run_id for r in found.runs] == [created.run_id]
    run = runs_pb2.Run(run_id=created.run_id, name="r2", description="d", tags=["b", "c"])
    run.metadata.append(_metadata("op", "me"))
    run.stop_time.FromNanoseconds(BASE_NS)
    updated = rpc(
        grpc_channel,
        runs_pb2.UpdateRunRequest(
            run=run, update_mask=FieldMask(paths=["description", "tags", "metadata", "stop_time"])
        ),
    ).run
    assert (updated.name, updated.description, list(updated.tags)) == ("r", "d", ["b", "c"])
    assert list(updated.metadata) == [_metadata("op", "me")]
    assert updated.stop_time.ToNanoseconds() == BASE_NS
    assert updated.client_key == "rk"
    got = rpc(grpc_channel, runs_pb2.GetRunRequest(run_id=created.run_id)).run
    assert got == updated
    same_key = runs_pb2.UpdateRunRequest(
        run=runs_pb2.Run(run_id=created.run_id, client_key="rk"),
        update_mask=FieldMask(paths=["client_key", "is_pinned"]),
    )
    rpc(grpc_channel, same_key)
    for request, code_wanted in (
        (
            runs_pb2.UpdateRunRequest(
                run=runs_pb2.Run(run_id=created.run_id, client_key="other"),
                update_mask=FieldMask(paths=["client_key"]),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            runs_pb2.UpdateRunRequest(
                run=runs_pb2.Run(run_id=created.run_id), update_mask=FieldMask(paths=["name"])
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            runs_pb2.UpdateRunRequest(
                run=runs_pb2.Run(run_id="nope", name="x"), update_mask=FieldMask(paths=["name"])
            ),
            grpc.StatusCode.NOT_FOUND,
        ),
    ):
        code, _ = code_of(
            lambda: rpc(grpc_channel, request)  # noqa: B023
        )
        assert code == code_wanted
    later = rpc(grpc_channel, runs_pb2.CreateRunRequest(name="r")).run
    by_name = rpc(grpc_channel, runs_pb2.ListRunsRequest(page_size=1, filter='name=="r"'))
    assert [r.run_id for r in by_name.runs] == [later.run_id]


def _rule_update(
    name: str, client_key: str, asset_id: str, tag_id: str
) -> rules_pb2.UpdateRuleRequest:
    update = rules_pb2.UpdateRuleRequest(
        name=name, description="too hot", client_key=client_key, is_live_evaluation_enabled=True
    )
    update.asset_configuration.asset_ids.append(asset_id)
    condition = update.conditions.add()
    calculated = condition.expression.calculated_channel
    calculated.expression = "$1 > 80"
    calculated.channel_references["$1"].name = "x.c0"
    action = condition.actions.add(action_type=rules_pb2.ANNOTATION)
    action.configuration.annotation.tag_ids.append(tag_id)
    update.contextual_channels.channels.add(name="x.c1")
    return update


def test_rules_create_update_and_read_back(grpc_channel: grpc.Channel) -> None:
    """A rule is created, read back by id and client key, updated (ids of its conditions kept),
    listed and batch-updated; bad rules are refused with the field named."""
    config = create_config(grpc_channel, "k", [double_flow("x")])
    tag = rpc(grpc_channel, tags_pb2.CreateTagRequest(name="hot")).tag
    code, _ = code_of(lambda: rpc(grpc_channel, tags_pb2.CreateTagRequest(name="hot")))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    tags = rpc(
        grpc_channel,
        tags_pb2.ListTagsRequest(
            filter="name in ['hot', 'cold']", tag_type=tags_pb2.TAG_TYPE_ANNOTATION
        ),
    )
    assert [t.tag_id for t in tags.tags] == [tag.tag_id]
    update = _rule_update("overheat", "rule-key", config.asset_id, tag.tag_id)
    rule_id = rpc(grpc_channel, rules_pb2.CreateRuleRequest(update=update)).rule_id
    by_key = rpc(grpc_channel, rules_pb2.GetRuleRequest(client_key="rule-key")).rule
    by_id = rpc(grpc_channel, rules_pb2.GetRuleRequest(rule_id=rule_id)).rule
    assert by_key == by_id
    assert (by_key.rule_id, by_key.name, by_key.client_key) == (rule_id, "overheat", "rule-key")
    assert by_key.is_enabled
    assert by_key.is_live_evaluation_enabled
    assert list(by_key.asset_configuration.asset_ids) == [config.asset_id]
    (condition,) = by_key.conditions
    assert condition.rule_id == rule_id
    assert condition.expression == update.conditions[0].expression
    (action,) = condition.actions
    assert list(action.configuration.annotation.tag_ids) == [tag.tag_id]
    assert action.rule_condition_id == condition.rule_condition_id
    assert [c.name for c in by_key.contextual_channels.channels] == ["x.c1"]

    edited = _rule_update("overheat", "rule-key", config.asset_id, tag.tag_id)
    edited.rule_id = rule_id
    edited.description = "much too hot"
    edited.conditions[0].rule_condition_id = condition.rule_condition_id
    edited.conditions[0].actions[0].rule_action_id = action.rule_action_id
    edited.conditions[0].expression.calculated_channel.expression = "$1 > 90"
    rpc(grpc_channel, edited)
    after = rpc(grpc_channel, rules_pb2.GetRuleRequest(rule_id=rule_id)).rule
    assert after.description == "much too hot"
    assert after.conditions[0].rule_condition_id == condition.rule_condition_id
    assert after.conditions[0].actions[0].rule_action_id == action.rule_action_id
    assert after.conditions[0].expression.calculated_channel.expression == "$1 > 90"
    assert after.created_date == by_key.created_date

    batch = rpc(
        grpc_channel,
        rules_pb2.BatchUpdateRulesRequest(
            rules=[
                _rule_update("second", "rule-2", config.asset_id, tag.tag_id),
                _rule_update("overheat", "rule-key", config.asset_id, tag.tag_id),
            ]
        ),
    )
    assert batch.success
    assert (batch.rules_created_count, batch.rules_updated_count) == (1, 1)
    assert [(r.name, r.client_key) for r in batch.created_rule_identifiers] == [
        ("second", "rule-2")
    ]
    listed = rpc(
        grpc_channel,
        rules_pb2.ListRulesRequest(
            filter="client_key in ['rule-2', 'rule-key']", order_by="created_date"
        ),
    )
    assert [r.name for r in listed.rules] == ["overheat", "second"]
    got = rpc(
        grpc_channel, rules_pb2.BatchGetRulesRequest(rule_ids=[rule_id], client_keys=["rule-2"])
    )
    assert [r.name for r in got.rules] == ["overheat", "second"]

    bad_asset = _rule_update("x", "rule-3", "no-such-asset", tag.tag_id)
    no_expression = _rule_update("y", "rule-4", config.asset_id, tag.tag_id)
    no_expression.conditions[0].ClearField("expression")
    invalid = rpc(grpc_channel, rules_pb2.BatchUpdateRulesRequest(rules=[bad_asset, no_expression]))
    assert not invalid.success
    assert [v.error for v in invalid.validation_results] == [
        "asset_configuration.asset_ids: unknown asset 'no-such-asset'",
        "conditions[0].expression is required",
    ]
    for request, wanted in (
        (
            rules_pb2.CreateRuleRequest(
                update=_rule_update("z", "rule-key", config.asset_id, tag.tag_id)
            ),
            grpc.StatusCode.ALREADY_EXISTS,
        ),
        (
            rules_pb2.CreateRuleRequest(update=_rule_update("z", "k5", config.asset_id, "no-tag")),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (rules_pb2.GetRuleRequest(client_key="nope"), grpc.StatusCode.NOT_FOUND),
        (rules_pb2.GetRuleRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        (
            _rule_update("z", "no-such-rule", config.asset_id, tag.tag_id),
            grpc.StatusCode.NOT_FOUND,
        ),
    ):
        code, _ = code_of(lambda: rpc(grpc_channel, request))  # noqa: B023
        assert code == wanted, request
    with_rules = rpc(grpc_channel, rules_pb2.ListRulesRequest())
    assert len(with_rules.rules) == 2


def test_unimplemented_methods_name_themselves(grpc_channel: grpc.Channel) -> None:
    """A Sift method the local server does not serve answers UNIMPLEMENTED with its name."""
    code, details = code_of(
        lambda: call(
            grpc_channel,
            "/sift.rules.v1.RuleService/EvaluateRules",
            rules_pb2.GetRuleRequest(),
            rules_pb2.GetRuleResponse,
        )
    )
    assert code == grpc.StatusCode.UNIMPLEMENTED
    assert "/sift.rules.v1.RuleService/EvaluateRules" in details


def test_a_server_never_stopped_warns_when_collected(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A started server that is collected unstopped says so on its module's logger; once stopped,
    it does not."""
    server = make_server(tmp_path / "w.sqlite")
    server.start()
    try:
        server.__del__()
        (record,) = [r for r in caplog.records if "not properly stopped" in r.getMessage()]
        assert record.name == "daq_agent.server.local"
        assert record.levelname == "WARNING"
    finally:
        server.stop(grace=0.2)
    caplog.clear()
    server.__del__()
    assert not caplog.records
