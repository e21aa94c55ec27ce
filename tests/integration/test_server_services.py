"""The services' handlers called directly with serialized bytes, over a real SQLite file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from daq_agent import cli
from daq_agent._proto.sift.common.type.v1 import channel_data_type_pb2 as cdt
from daq_agent._proto.sift.ingest.v1 import ingest_pb2
from daq_agent._proto.sift.ingestion_configs.v2 import ingestion_configs_pb2 as ic
from daq_agent._proto.sift.runs.v2 import runs_pb2
from daq_agent.server.rpc import CallContext, RpcError
from daq_agent.server.services import LocalServices
from daq_agent.server.store import Store

Request = ingest_pb2.IngestWithConfigDataStreamRequest
CTX = CallContext(method="test", peer="test-peer")
BASE = 1_700_000_000_000_000_001


@pytest.fixture
def services(tmp_path: Path) -> Iterator[LocalServices]:
    """Services over a fresh store."""
    with Store.open(tmp_path / "s.sqlite") as store:
        yield LocalServices(store)


def _config(services: LocalServices, *flows: ic.FlowConfig) -> str:
    request = ic.CreateIngestionConfigRequest(asset_name="rig", client_key="k", flows=flows)
    response = ic.CreateIngestionConfigResponse.FromString(
        services.create_ingestion_config(request.SerializeToString(), CTX)
    )
    return response.ingestion_config.ingestion_config_id


def _flow(name: str, *types: cdt.ChannelDataType.ValueType) -> ic.FlowConfig:
    return ic.FlowConfig(
        name=name,
        channels=[ic.ChannelConfig(name=f"c{i}", data_type=t) for i, t in enumerate(types)],
    )


def _request(config_id: str, flow: str, ts: int, **values: object) -> Request:
    request = Request(ingestion_config_id=config_id, flow=flow)
    request.timestamp.FromNanoseconds(ts)
    for field, value in values.items():
        item = request.channel_values.add()
        if value is None:
            item.empty.SetInParent()
        else:
            setattr(item, field, value)
    return request


def _ingest(services: LocalServices, *messages: bytes) -> None:
    handler = services.ingest_stream(CTX)
    handler.on_messages(list(messages))
    handler.on_end()


def test_non_canonical_request_is_accepted(services: LocalServices) -> None:
    """A valid request serialized in another field order takes the slow path and is stored."""
    config_id = _config(services, _flow("f", cdt.CHANNEL_DATA_TYPE_DOUBLE))
    run = runs_pb2.CreateRunResponse.FromString(
        services.create_run(runs_pb2.CreateRunRequest(name="r").SerializeToString(), CTX)
    ).run
    body = _request(config_id, "f", BASE, double=1.5).SerializeToString()
    reordered = Request(run_id=run.run_id).SerializeToString() + body
    _ingest(services, reordered)
    assert services.store.count_samples(run_id=run.run_id) == 1
    assert services.store.count_validation_errors() == 0


def test_mixed_and_length_delimited_types(services: LocalServices) -> None:
    """Flows with strings use the tag signatures: empties, wrong types and untyped values."""
    config_id = _config(
        services,
        _flow("s", cdt.CHANNEL_DATA_TYPE_STRING, cdt.CHANNEL_DATA_TYPE_UINT_32),
        _flow("n", cdt.CHANNEL_DATA_TYPE_INT_64, cdt.CHANNEL_DATA_TYPE_ENUM),
    )
    untyped = _request(config_id, "s", BASE + 9, string="x")
    untyped.channel_values.add()
    messages = [
        _request(config_id, "s", BASE, string="a", uint32=1),
        _request(config_id, "s", BASE + 1, string=None, uint32=2),
        _request(config_id, "s", BASE + 2, string="b", uint32=None),
        _request(config_id, "s", BASE + 3, string="c", int32=3),
        _request(config_id, "n", BASE + 4, int64=-(2**63), enum=7),
        _request(config_id, "n", BASE + 5, int64=None, enum=None),
        _request(config_id, "n", BASE + 6, uint64=5, enum=1),
        untyped,
    ]
    _ingest(services, *(m.SerializeToString() for m in messages))
    store = services.store
    assert store.flow_counts() == {"n": 2, "s": 3}
    reasons = [e.reason for e in store.validation_errors()]
    assert len(reasons) == 3
    assert "is int32, expected uint32" in reasons[0]
    assert "is uint64, expected int64" in reasons[1]
    assert "is not set, expected uint32" in reasons[2]
    samples = {s.timestamp_ns: s.values for s in store.iter_samples()}
    assert samples[BASE + 1] == {"c0": None, "c1": 2}
    assert samples[BASE + 4] == {"c0": -(2**63), "c1": 7}


def test_missing_timestamp_is_a_validation_error(services: LocalServices) -> None:
    """A request without a timestamp is refused and recorded."""
    config_id = _config(services, _flow("f", cdt.CHANNEL_DATA_TYPE_DOUBLE))
    request = Request(ingestion_config_id=config_id, flow="f")
    request.channel_values.add(double=1.0)
    _ingest(services, request.SerializeToString())
    assert services.store.count_samples() == 0
    (error,) = services.store.validation_errors()
    assert "has no timestamp" in error.reason


def test_malformed_request_ends_the_stream(services: LocalServices) -> None:
    """Bytes that are not a request end the stream with INVALID_ARGUMENT."""
    handler = services.ingest_stream(CTX)
    with pytest.raises(RpcError) as info:
        handler.on_messages([b"\xff\xff\xff"])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_samples_are_committed_periodically_and_on_abort(services: LocalServices) -> None:
    """An open stream's samples are committed by the interval; an aborted one's on abort."""
    config_id = _config(services, _flow("f", cdt.CHANNEL_DATA_TYPE_DOUBLE))
    services.commit_interval = 0.0
    with Store.open(services.store.path, readonly=True) as reader:
        first = services.ingest_stream(CTX)
        first.on_messages([_request(config_id, "f", BASE, double=1.0).SerializeToString()])
        assert reader.count_samples() == 1
        services.commit_interval = 3600.0
        second = services.ingest_stream(CTX)
        second.on_messages([_request(config_id, "f", BASE + 1, double=2.0).SerializeToString()])
        assert reader.count_samples() == 1
        second.on_abort()
        assert reader.count_samples() == 2
        first.on_end()
        assert reader.count_samples() == 2


def test_flow_cache_follows_new_flows(services: LocalServices) -> None:
    """A flow added after a refused request is accepted once created."""
    config_id = _config(services)
    message = _request(config_id, "late", BASE, float=1.0).SerializeToString()
    _ingest(services, message)
    assert services.store.count_samples() == 0
    add = ic.CreateIngestionConfigFlowsRequest(
        ingestion_config_id=config_id, flows=[_flow("late", cdt.CHANNEL_DATA_TYPE_FLOAT)]
    )
    services.create_ingestion_config_flows(add.SerializeToString(), CTX)
    _ingest(services, message)
    assert services.store.count_samples() == 1
    assert services.store.count_validation_errors() == 1


def test_flow_definitions_are_checked(services: LocalServices) -> None:
    """Duplicate flow or channel names and unspecified types answer INVALID_ARGUMENT."""
    for flows in (
        [_flow("f", cdt.CHANNEL_DATA_TYPE_DOUBLE), _flow("f", cdt.CHANNEL_DATA_TYPE_DOUBLE)],
        [
            ic.FlowConfig(
                name="f",
                channels=[ic.ChannelConfig(name="c", data_type=cdt.CHANNEL_DATA_TYPE_DOUBLE)] * 2,
            )
        ],
        [_flow("f", cdt.CHANNEL_DATA_TYPE_UNSPECIFIED)],
        [_flow("", cdt.CHANNEL_DATA_TYPE_DOUBLE)],
    ):
        request = ic.CreateIngestionConfigRequest(asset_name="a", flows=flows)
        with pytest.raises(RpcError) as info:
            services.create_ingestion_config(request.SerializeToString(), CTX)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_invalid_utf8_string_ends_the_stream(services: LocalServices) -> None:
    """A string value that is not UTF-8 is refused as malformed, never stored."""
    config_id = _config(services, _flow("s", cdt.CHANNEL_DATA_TYPE_STRING))
    good = _request(config_id, "s", BASE, string="ok").SerializeToString()
    bad = good.replace(b"ok", b"\xff\xfe")
    _ingest(services, good)
    handler = services.ingest_stream(CTX)
    with pytest.raises(RpcError) as info:
        handler.on_messages([bad])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    handler.on_abort()
    assert [s.values for s in services.store.iter_samples()] == [{"c0": "ok"}]


def test_validation_errors_are_capped_and_daq_agent_errors_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With max_validation_errors=3, 8 refused requests keep the newest 3 and count 5 more;
    ``daq-agent errors`` shows the 3 and says 5 older ones were not kept."""
    db = tmp_path / "s.sqlite"
    with Store.open(db) as store:
        services = LocalServices(store, max_validation_errors=3)
        config_id = _config(services, _flow("f", cdt.CHANNEL_DATA_TYPE_DOUBLE))
        bad = [_request(config_id, "f", BASE + i, int64=i).SerializeToString() for i in range(8)]
        good = _request(config_id, "f", BASE + 100, double=1.5).SerializeToString()
        _ingest(services, *bad, good)
        assert services.validation_errors == 8
        assert store.count_samples() == 1
        assert [e.request_index for e in store.validation_errors()] == [5, 6, 7]
        assert store.validation_errors_overflow() == 5
    assert cli.main(["errors", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert out.count("is int64, expected double") == 3
    assert "3 validation errors\n" in out
    assert "5 older validation errors not kept" in out
