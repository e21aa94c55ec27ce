"""IngestionService against the real local ingestion server (127.0.0.1, port 0): unary calls on
grpcio, data streams on sift_stream, every value read back from the server's SQLite store."""

from __future__ import annotations

import logging
import math
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import grpc
import pytest

from daq_agent import methods
from daq_agent._proto.sift.ingestion_configs.v2 import ingestion_configs_pb2 as ic_pb2
from daq_agent._proto.sift.runs.v2 import runs_pb2
from daq_agent.core.errors import ConfigError, DaqError, TransportError
from daq_agent.core.sample import Sample
from daq_agent.ingestion import (
    MAX_MESSAGE_BYTES,
    ChannelBitFieldElement,
    ChannelConfig,
    ChannelDataType,
    ChannelEnumType,
    ChannelValue,
    FlowConfig,
    FlowOrderedChannelValues,
    IngestionService,
    IngestionValidationError,
    IngestWithConfigDataChannelValue,
    RpcError,
    SiftChannel,
    TelemetryConfig,
    bit_field_value,
    bool_value,
    bytes_value,
    double_value,
    enum_value,
    float_value,
    int32_value,
    int64_value,
    string_value,
    telemetry_config_hash,
    uint32_value,
    uint64_value,
    use_sift_channel,
)
from daq_agent.server.local import LocalIngestServer, make_server
from daq_agent.server.store import Store, StoredSample

pytestmark = pytest.mark.integration

_T0 = 1_700_000_000_123_456_789
_BITS = [
    ChannelBitFieldElement("low", index=0, bit_count=4),
    ChannelBitFieldElement("high", index=4, bit_count=4),
]
_ALL_TYPES = FlowConfig(
    "all_types",
    [
        ChannelConfig("d", ChannelDataType.DOUBLE, unit="V"),
        ChannelConfig("f", ChannelDataType.FLOAT),
        ChannelConfig("s", ChannelDataType.STRING),
        ChannelConfig("b", ChannelDataType.BOOL),
        ChannelConfig("i32", ChannelDataType.INT_32),
        ChannelConfig("u32", ChannelDataType.UINT_32),
        ChannelConfig("i64", ChannelDataType.INT_64),
        ChannelConfig("u64", ChannelDataType.UINT_64),
        ChannelConfig(
            "e",
            ChannelDataType.ENUM,
            enum_types=[ChannelEnumType("off", 0), ChannelEnumType("on", 1)],
        ),
        ChannelConfig("bf", ChannelDataType.BIT_FIELD, bit_field_elements=_BITS),
        ChannelConfig("raw", ChannelDataType.BYTES),
    ],
)
# The value maker of each _ALL_TYPES channel, in order.
_ALL_TYPES_MAKERS: list[Callable[[Any], IngestWithConfigDataChannelValue]] = [
    double_value,
    float_value,
    string_value,
    bool_value,
    int32_value,
    uint32_value,
    int64_value,
    uint64_value,
    enum_value,
    bit_field_value,
    bytes_value,
]


def _all_types_request(service: IngestionService, timestamp: int, row: Sequence[Any]) -> Any:
    """A request of flow all_types with one value of ``row`` per channel, made by its maker."""
    values = [make(v) for make, v in zip(_ALL_TYPES_MAKERS, row, strict=True)]
    return service.try_create_ingestion_request("all_types", timestamp, values)


_READINGS = FlowConfig(
    "readings",
    [
        ChannelConfig("voltage", ChannelDataType.DOUBLE),
        ChannelConfig("count", ChannelDataType.INT_64),
    ],
)


class _Server:
    """A started local server, the path of its store and a way to read it back."""

    def __init__(self, db_path: Path, api_key: str | None = None, port: int = 0) -> None:
        self.db_path = db_path
        self.server: Any = make_server(db_path, host="127.0.0.1", port=port, api_key=api_key)
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

    def samples(self, **filters: Any) -> list[StoredSample]:
        with Store.open(self.db_path, readonly=True) as store:
            return list(store.iter_samples(**filters))

    def count(self, **filters: Any) -> int:
        with Store.open(self.db_path, readonly=True) as store:
            return store.count_samples(**filters)

    def validation_errors(self) -> int:
        with Store.open(self.db_path, readonly=True) as store:
            return store.count_validation_errors()

    def stop(self, grace: float = 1.0) -> None:
        if self.running:
            self.running = False
            self.server.stop(grace=grace)


@pytest.fixture
def server(local_server: LocalIngestServer) -> _Server:
    """The shared local_server fixture, with helpers to read its store back."""
    return _Server.wrap(local_server)


# A keyless server takes any key; sift_stream needs a non-empty one (it sends "Bearer " for none).
_ANY_KEY = "any-key"


@pytest.fixture
def channel(server: _Server) -> Iterator[SiftChannel]:
    """A plain-text SiftChannel to the local server."""
    config = {"uri": f"127.0.0.1:{server.port}", "apikey": _ANY_KEY, "use_ssl": False}
    with use_sift_channel(config) as ch:  # type: ignore[arg-type]
        yield ch


def _config(*flows: FlowConfig, key: str | None = "bench-key") -> TelemetryConfig:
    return TelemetryConfig(
        asset_name="bench", ingestion_client_key=key, flows=list(flows) or [_READINGS]
    )


def _server_flows(channel: SiftChannel, config_id: str) -> set[str]:
    names: set[str] = set()
    token = ""
    while True:
        call = channel.unary_unary(
            methods.LIST_INGESTION_CONFIG_FLOWS,
            ic_pb2.ListIngestionConfigFlowsRequest.SerializeToString,
            ic_pb2.ListIngestionConfigFlowsResponse.FromString,
        )
        response = call(
            ic_pb2.ListIngestionConfigFlowsRequest(
                ingestion_config_id=config_id, page_size=1000, page_token=token
            ),
            timeout=30,
        )
        names.update(f.name for f in response.flows)
        token = response.next_page_token
        if not token:
            return names


def _get_run(channel: SiftChannel, run_id: str) -> runs_pb2.Run:
    call = channel.unary_unary(
        methods.GET_RUN,
        runs_pb2.GetRunRequest.SerializeToString,
        runs_pb2.GetRunResponse.FromString,
    )
    run: runs_pb2.Run = call(runs_pb2.GetRunRequest(run_id=run_id), timeout=10).run
    return run


def _run_id(service: IngestionService) -> str | None:
    return service.run_id


def _readings(service: IngestionService, n: int, t0: int = _T0) -> list[Any]:
    return [
        service.create_ingestion_request(
            "readings", t0 + i, [double_value(float(i)), int64_value(i)]
        )
        for i in range(n)
    ]


# -- construction and attributes --------------------------------------------------------------


def test_attributes(channel: SiftChannel) -> None:
    """A new service exposes the documented attributes with the config's values."""
    config = TelemetryConfig(
        asset_name="bench", ingestion_client_key="k1", organization_id="org-1", flows=[_READINGS]
    )
    service = IngestionService(channel, config, run_id=None, end_stream_on_error=True)
    assert service.transport_channel is channel
    assert service.asset_name == "bench"
    assert service.organization_id == "org-1"
    assert service.run_id is None
    assert service.end_stream_on_error is True
    assert service.lazy_flow_creation is False
    assert service.flow_configs_by_name == {"readings": _READINGS}
    assert isinstance(service.ingestion_config, ic_pb2.IngestionConfig)
    assert service.ingestion_config.client_key == "k1"
    assert service.ingestion_config.ingestion_config_id
    assert _server_flows(channel, service.ingestion_config.ingestion_config_id) == {"readings"}


def test_config_is_fetched_by_client_key(channel: SiftChannel) -> None:
    """A second service with the same client key reuses the config and adds only missing flows."""
    first = IngestionService(channel, _config(_READINGS))
    second = IngestionService(channel, _config(_READINGS, _ALL_TYPES))
    config_id = first.ingestion_config.ingestion_config_id
    assert second.ingestion_config.ingestion_config_id == config_id
    assert _server_flows(channel, config_id) == {"readings", "all_types"}
    second.ingest(*_readings(second, 2))


def _config_count(channel: SiftChannel) -> int:
    call = channel.unary_unary(
        methods.LIST_INGESTION_CONFIGS,
        ic_pb2.ListIngestionConfigsRequest.SerializeToString,
        ic_pb2.ListIngestionConfigsResponse.FromString,
    )
    response = call(ic_pb2.ListIngestionConfigsRequest(page_size=1000), timeout=10)
    return len(response.ingestion_configs)


def test_derived_client_key_finds_the_same_config(server: _Server, channel: SiftChannel) -> None:
    """Without a client key, the key is the hash of the config's content: a second start with
    the same config finds the same ingestion config (and its data), a changed config gets its
    own."""
    first = IngestionService(channel, _config(key=None))
    assert first.ingestion_config.client_key == telemetry_config_hash(_config(key=None))
    first.ingest(*_readings(first, 3))
    again = IngestionService(channel, _config(key=None))
    assert again.ingestion_config.ingestion_config_id == first.ingestion_config.ingestion_config_id
    assert _config_count(channel) == 1
    again.ingest(*_readings(again, 2, t0=_T0 + 10))
    assert server.count() == 5
    changed = IngestionService(channel, _config(_READINGS, _ALL_TYPES, key=None))
    assert changed.ingestion_config.client_key != first.ingestion_config.client_key
    assert (
        changed.ingestion_config.ingestion_config_id != first.ingestion_config.ingestion_config_id
    )
    assert _config_count(channel) == 2


def test_a_derived_key_refuses_new_flows_at_runtime(channel: SiftChannel) -> None:
    """As in sift_py, a config whose key is derived from its content cannot gain flows at
    runtime (its key would no longer describe it); a named key can."""
    service = IngestionService(channel, _config(key=None))
    extra = FlowConfig("extra", [ChannelConfig("x", ChannelDataType.DOUBLE)])
    for create in (service.try_create_flow, service.create_flows):
        with pytest.raises(IngestionValidationError, match="ingestion_client_key"):
            create(extra)
    assert "extra" not in service.flow_configs_by_name
    config_id = service.ingestion_config.ingestion_config_id
    assert _server_flows(channel, config_id) == {"readings"}
    service.create_flow(_READINGS)  # a flow of the config itself is fine
    named = IngestionService(channel, _config(key="named"))
    named.create_flows(extra)
    assert _server_flows(channel, named.ingestion_config.ingestion_config_id) == {
        "readings",
        "extra",
    }


# -- data round trips -------------------------------------------------------------------------


def test_every_data_type_round_trips(server: _Server, channel: SiftChannel) -> None:
    """Every data type, extremes and special floats come back from the store unchanged."""
    service = IngestionService(channel, _config(_ALL_TYPES))
    rows: list[list[Any]] = [
        [
            1.5,
            0.1,
            "héllo",
            True,
            -(2**31),
            2**32 - 1,
            -(2**63),
            2**64 - 1,
            1,
            b"\x21",
            b"\x00\xff",
        ],
        [math.nan, math.inf, "", False, 2**31 - 1, 0, 2**63 - 1, 0, 0, b"\x00", b""],
        [-math.inf, -math.inf, "x", True, 0, 1, 0, 1, 1, b"\xff", b"\x01" * 300],
    ]
    requests = [_all_types_request(service, _T0 + i, row) for i, row in enumerate(rows)]
    empty_row = service.try_create_ingestion_request("all_types", _T0 + 10, [])
    service.ingest(*requests, empty_row)

    stored = server.samples(flows=["all_types"])
    assert [s.timestamp_ns for s in stored] == [_T0, _T0 + 1, _T0 + 2, _T0 + 10]
    names = [c.name for c in _ALL_TYPES.channels]
    for sample, row in zip(stored, rows, strict=False):
        expected = dict(zip(names, row, strict=True))
        expected["f"] = struct.unpack("<f", struct.pack("<f", row[1]))[0]
        for name, want in expected.items():
            got = sample.values[name]
            if isinstance(want, float) and math.isnan(want):
                assert isinstance(got, float), name
                assert math.isnan(got), name
            else:
                assert got == want, (name, got, want)
                assert type(got) is type(want), name
    assert stored[3].values == dict.fromkeys(names)


def test_bit_field_packed_by_name_round_trips(server: _Server, channel: SiftChannel) -> None:
    """A bit field packed from element values is stored as the packed bytes."""
    service = IngestionService(channel, _config(_ALL_TYPES))
    value = bit_field_value({"low": 0x3, "high": 0xA}, _BITS)
    service.try_ingest_flows(
        {
            "flow_name": "all_types",
            "timestamp": _T0,
            "channel_values": [{"channel_name": "bf", "value": value}],
        }
    )
    (sample,) = server.samples()
    assert sample.values["bf"] == b"\xa3"
    assert sample.values["d"] is None


def test_nanosecond_timestamps_are_kept(server: _Server, channel: SiftChannel) -> None:
    """Integer ns and aware UTC datetimes are stored to the nanosecond / microsecond."""
    service = IngestionService(channel, _config())
    when = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    early = 1  # one nanosecond after the epoch
    service.ingest_flows(
        {
            "flow_name": "readings",
            "timestamp": _T0,
            "channel_values": [double_value(1), int64_value(1)],
        },
        {
            "flow_name": "readings",
            "timestamp": when,
            "channel_values": [double_value(2), int64_value(2)],
        },
        {
            "flow_name": "readings",
            "timestamp": early,
            "channel_values": [double_value(3), int64_value(3)],
        },
    )
    stamps = sorted(s.timestamp_ns for s in server.samples())
    when_ns = (int(when.timestamp()) * 1_000_000 + when.microsecond) * 1_000
    assert stamps == sorted([early, when_ns, _T0])


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flow", "timestamp", "values", "message"),
    [
        ("nope", _T0, [], "unknown flow 'nope'"),
        ("readings", _T0, [{"channel_name": "x", "value": double_value(1)}], "unknown channel 'x'"),
        (
            "readings",
            _T0,
            [
                {"channel_name": "voltage", "value": double_value(1)},
                {"channel_name": "voltage", "value": double_value(2)},
            ],
            "given twice",
        ),
        (
            "readings",
            _T0,
            [{"channel_name": "voltage", "value": int32_value(1)}],
            "expects double, got int32",
        ),
        ("readings", _T0, [double_value(1)], "has 2 channels, got 1 positional"),
        ("readings", _T0, [double_value(1), double_value(2)], "expects int64, got double"),
        ("readings", datetime(2024, 1, 1), [], "no time zone"),
        (
            "readings",
            datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=2))),
            [],
            "is not UTC",
        ),
        ("readings", True, [], "not bool"),
        ("readings", 1.5, [], "not float"),
        ("readings", 10**30, [], "out of range"),
    ],
)
def test_try_create_ingestion_request_refuses(
    channel: SiftChannel, flow: str, timestamp: Any, values: Any, message: str
) -> None:
    """Each invalid request raises IngestionValidationError with a precise reason."""
    service = IngestionService(channel, _config())
    with pytest.raises(IngestionValidationError, match=message):
        service.try_create_ingestion_request(flow, timestamp, values)


def test_try_create_fills_missing_channels(channel: SiftChannel) -> None:
    """Channels not named are sent empty, in the flow's order; run and flags are set."""
    service = IngestionService(channel, _config(), run_id="run-x", end_stream_on_error=True)
    values: list[ChannelValue] = [{"channel_name": "count", "value": int64_value(7)}]
    request = service.try_create_ingestion_request("readings", _T0, values)
    assert [v.WhichOneof("type") for v in request.channel_values] == ["empty", "int64"]
    assert request.flow == "readings"
    assert request.run_id == "run-x"
    assert request.end_stream_on_validation_error is True
    assert request.ingestion_config_id == service.ingestion_config.ingestion_config_id
    assert (request.timestamp.seconds, request.timestamp.nanos) == divmod(_T0, 10**9)


def test_try_ingest_flows_sends_nothing_when_one_is_invalid(
    server: _Server, channel: SiftChannel
) -> None:
    """try_ingest_flows validates every flow before sending any."""
    service = IngestionService(channel, _config())
    good = {
        "flow_name": "readings",
        "timestamp": _T0,
        "channel_values": [double_value(1), int64_value(1)],
    }
    bad = {"flow_name": "readings", "timestamp": _T0 + 1, "channel_values": [double_value(1)]}
    with pytest.raises(IngestionValidationError):
        service.try_ingest_flows(good, bad)  # type: ignore[arg-type]
    assert server.count() == 0
    service.try_ingest_flows(good)  # type: ignore[arg-type]
    assert server.count() == 1


def test_invalid_request_is_recorded_without_end_stream(
    server: _Server, channel: SiftChannel
) -> None:
    """Without end_stream_on_error a bad request is recorded by the server, the rest stored."""
    service = IngestionService(channel, _config())
    bad = service.create_ingestion_request("readings", _T0 + 5, [double_value(1)])
    service.ingest(*_readings(service, 3), bad)
    assert server.count() == 3
    assert server.validation_errors() == 1


def test_invalid_request_ends_the_stream_with_end_stream(
    server: _Server, channel: SiftChannel
) -> None:
    """With end_stream_on_error a bad request ends the stream with INVALID_ARGUMENT: ingest
    raises it as a grpc.RpcError (and a DaqError) with the server's details."""
    service = IngestionService(channel, _config(), end_stream_on_error=True)
    bad = service.create_ingestion_request("readings", _T0 + 5, [string_value("x"), int64_value(1)])
    with pytest.raises(grpc.RpcError) as info:
        service.ingest(*_readings(service, 3), bad)
    error = info.value
    assert isinstance(error, RpcError)
    assert isinstance(error, DaqError)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "expected double" in str(error.details())
    assert error.method == methods.INGEST_WITH_CONFIG_DATA_STREAM
    assert server.validation_errors() == 1


def test_ingest_returns_after_commit(server: _Server, channel: SiftChannel) -> None:
    """When ingest returns, every request of the stream is in the store."""
    service = IngestionService(channel, _config())
    service.ingest(*_readings(service, 500))
    assert server.count() == 500
    service.ingest()  # nothing to send: no stream
    assert server.count() == 500


# -- flows ------------------------------------------------------------------------------------


def test_try_create_flow(channel: SiftChannel) -> None:
    """try_create_flow registers a new flow and refuses an existing name."""
    service = IngestionService(channel, _config())
    extra = FlowConfig("extra", [ChannelConfig("x", ChannelDataType.UINT_32)])
    service.try_create_flow(extra)
    assert service.flow_configs_by_name["extra"] is extra
    config_id = service.ingestion_config.ingestion_config_id
    assert _server_flows(channel, config_id) == {"readings", "extra"}
    with pytest.raises(IngestionValidationError, match="'extra' already exists"):
        service.try_create_flow(extra)
    with pytest.raises(IngestionValidationError, match="'readings' already exists"):
        service.try_create_flows(FlowConfig("new"), _READINGS)
    assert "new" not in service.flow_configs_by_name
    service.try_ingest_flows(
        {
            "flow_name": "extra",
            "timestamp": _T0,
            "channel_values": [{"channel_name": "x", "value": uint32_value(4)}],
        }
    )


def test_create_flow_ignores_existing(channel: SiftChannel) -> None:
    """create_flows skips existing names and registers the new ones."""
    service = IngestionService(channel, _config())
    service.create_flow(_READINGS)
    service.create_flows(_READINGS, _ALL_TYPES)
    config_id = service.ingestion_config.ingestion_config_id
    assert _server_flows(channel, config_id) == {"readings", "all_types"}
    assert set(service.flow_configs_by_name) == {"readings", "all_types"}


def test_already_existing_flow_in_a_batch_falls_back(channel: SiftChannel) -> None:
    """A batch refused with ALREADY_EXISTS is retried one flow at a time."""
    first = IngestionService(channel, _config())
    second = IngestionService(channel, _config())
    extra = FlowConfig("extra", [ChannelConfig("x", ChannelDataType.DOUBLE)])
    first.create_flows(extra)
    more = FlowConfig("more", [ChannelConfig("y", ChannelDataType.DOUBLE)])
    second.create_flows(extra, more)  # second does not know that "extra" exists
    config_id = first.ingestion_config.ingestion_config_id
    assert _server_flows(channel, config_id) == {"readings", "extra", "more"}


def test_lazy_flow_creation_forced(server: _Server, channel: SiftChannel) -> None:
    """With the flag, flows are registered only when first ingested."""
    service = IngestionService(
        channel, _config(_READINGS, _ALL_TYPES), force_lazy_flow_creation=True
    )
    assert service.lazy_flow_creation is True
    config_id = service.ingestion_config.ingestion_config_id
    assert _server_flows(channel, config_id) == set()
    service.ingest(*_readings(service, 3))
    assert _server_flows(channel, config_id) == {"readings"}
    service.ingest(*_readings(service, 3, t0=_T0 + 100))
    assert server.count() == 6


def test_lazy_flow_creation_for_a_config_over_4_mib(server: _Server, channel: SiftChannel) -> None:
    """A config of 3,000 flows x 30 channels (> 4 MiB) switches to lazy creation by itself."""
    flows = [
        FlowConfig(
            f"message_{i:04d}",
            [
                ChannelConfig(
                    f"signal_{i:04d}_{j:02d}",
                    ChannelDataType.DOUBLE,
                    unit="km/h",
                    description=f"signal {j} of message {i}",
                )
                for j in range(30)
            ],
        )
        for i in range(3000)
    ]
    size = sum(f.as_pb().ByteSize() for f in flows)
    assert size > MAX_MESSAGE_BYTES
    service = IngestionService(channel, _config(*flows, key="big"))
    assert service.lazy_flow_creation is True
    config_id = service.ingestion_config.ingestion_config_id
    assert _server_flows(channel, config_id) == set()
    firsts: list[FlowOrderedChannelValues] = [
        {
            "flow_name": f"message_{i:04d}",
            "timestamp": _T0,
            "channel_values": [double_value(j) for j in range(30)],
        }
        for i in (7, 2999)
    ]
    service.ingest_flows(*firsts)
    assert _server_flows(channel, config_id) == {"message_0007", "message_2999"}
    assert server.count() == 2
    # A restart with the same client key finds the config and its registered flows.
    again = IngestionService(channel, _config(*flows, key="big"))
    assert again.ingestion_config.ingestion_config_id == config_id
    assert again.lazy_flow_creation is True
    assert _server_flows(channel, config_id) == {"message_0007", "message_2999"}
    # Explicitly created flows are registered now, in batches under 4 MiB each.
    again.create_flows(*flows)
    assert len(_server_flows(channel, config_id)) == 3000


# -- runs -------------------------------------------------------------------------------------


def test_attach_run_get_or_create(server: _Server, channel: SiftChannel) -> None:
    """attach_run reuses a run by name, force_new makes a new one, detach_run clears it."""
    service = IngestionService(channel, _config())
    service.attach_run(
        channel,
        "bench-42",
        description="first try",
        tags=["a", "b"],
        metadata={"operator": "ann", "gain": 2.5, "cold": True, "count": 3},
    )
    first = service.run_id
    assert first
    run = _get_run(channel, first)
    assert (run.name, run.description, list(run.tags)) == ("bench-42", "first try", ["a", "b"])
    meta = {m.key.name: m.WhichOneof("value") for m in run.metadata}
    assert meta == {
        "operator": "string_value",
        "gain": "number_value",
        "cold": "boolean_value",
        "count": "number_value",
    }
    service.ingest(*_readings(service, 2))
    assert server.count(run_id=first) == 2

    service.attach_run(channel, "bench-42")
    assert service.run_id == first
    service.attach_run(channel, "bench-42", force_new=True)
    assert service.run_id not in (None, first)

    service.detach_run()
    assert _run_id(service) is None
    service.ingest(*_readings(service, 2, t0=_T0 + 50))
    assert server.count() == 4
    assert server.count(run_id=first) == 2


def test_attach_run_refuses_bad_metadata(channel: SiftChannel) -> None:
    """A metadata value that is not a string, number or boolean is refused."""
    service = IngestionService(channel, _config())
    with pytest.raises(IngestionValidationError, match="'bad'"):
        service.attach_run(channel, "r", metadata={"bad": [1]})  # type: ignore[dict-item]
    assert service.run_id is None


# -- authentication ---------------------------------------------------------------------------


def test_wrong_api_key_is_unauthenticated(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With the server's key the service works; with another it fails UNAUTHENTICATED."""
    caplog.set_level(logging.DEBUG)
    secured = _Server(tmp_path / "secured.db", api_key="right-key")
    try:
        uri = f"127.0.0.1:{secured.port}"
        with use_sift_channel({"uri": uri, "apikey": "wrong-key", "use_ssl": False}) as ch:
            with pytest.raises(grpc.RpcError) as info:
                IngestionService(ch, _config())
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert "wrong-key" not in str(info.value)
        with use_sift_channel({"uri": uri, "apikey": "right-key", "use_ssl": False}) as ch:
            service = IngestionService(ch, _config())
            service.ingest(*_readings(service, 2))
        assert secured.count() == 2
    finally:
        secured.stop()
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("daq_agent")]
    assert ours  # the server logged its start, refusals…
    assert not [m for m in ours if "wrong-key" in m or "right-key" in m]


def test_existing_flows_are_listed_page_by_page(channel: SiftChannel) -> None:
    """A service on an existing config with 2,500 flows lists them all and adds only the new."""
    flows = [FlowConfig(f"f{i}", [ChannelConfig("x", ChannelDataType.DOUBLE)]) for i in range(2500)]
    first = IngestionService(channel, _config(*flows, key="paged"))
    assert not first.lazy_flow_creation
    newest = FlowConfig("newest", [ChannelConfig("y", ChannelDataType.INT_32)])
    second = IngestionService(channel, _config(*flows, newest, key="paged"))
    config_id = first.ingestion_config.ingestion_config_id
    assert second.ingestion_config.ingestion_config_id == config_id
    assert len(_server_flows(channel, config_id)) == 2501
    second.try_ingest_flows(
        {
            "flow_name": "newest",
            "timestamp": _T0,
            "channel_values": [{"channel_name": "y", "value": int32_value(1)}],
        }
    )


def test_lazy_registration_from_many_threads(server: _Server, channel: SiftChannel) -> None:
    """Threads ingesting at once in lazy mode register each flow once and lose nothing."""
    flows = [FlowConfig(f"t{i}", [ChannelConfig("x", ChannelDataType.DOUBLE)]) for i in range(8)]
    service = IngestionService(channel, _config(*flows), force_lazy_flow_creation=True)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for n in range(5):
                batch: list[FlowOrderedChannelValues] = [
                    {
                        "flow_name": f.name,
                        "timestamp": _T0 + worker * 100 + n,
                        "channel_values": [double_value(n)],
                    }
                    for f in flows
                ]
                service.ingest_flows(*batch)
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,), name=f"test-ingest-{w}") for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert server.count() == 4 * 5 * 8
    config_id = service.ingestion_config.ingestion_config_id
    assert _server_flows(channel, config_id) == {f.name for f in flows}


def test_component_names_a_channel(channel: SiftChannel) -> None:
    """A ChannelValue with a component addresses the channel named component.name."""
    flow = FlowConfig("motor", [ChannelConfig("left.rpm", ChannelDataType.DOUBLE)])
    service = IngestionService(channel, _config(flow))
    values: list[ChannelValue] = [
        {"channel_name": "rpm", "component": "left", "value": double_value(1200.0)}
    ]
    request = service.try_create_ingestion_request("motor", _T0, values)
    assert request.channel_values[0].double == 1200.0


# -- data streams on sift_stream ----------------------------------------------------------------


def _all_types_row(i: int) -> tuple[Any, ...]:
    return (
        1.5 + i,
        0.25,
        f"s{i}",
        bool(i % 2),
        -(2**31) + i,
        2**32 - 1 - i,
        -(2**63) + i,
        2**64 - 1 - i,
        i % 2,
        bytes([i]),
        b"\x00\xff" * i,
    )


def test_open_stream_carries_requests_and_samples(server: _Server, channel: SiftChannel) -> None:
    """One stream carries protobuf requests and plain samples (None for empty); close returns
    once they are committed, and the store holds every value as sent."""
    service = IngestionService(channel, _config(_ALL_TYPES))
    rows = [_all_types_row(i) for i in range(6)]
    requests = [_all_types_request(service, _T0 + i, row) for i, row in enumerate(rows[:3])]
    samples = [Sample("all_types", _T0 + i, row) for i, row in enumerate(rows) if i >= 3]
    samples.append(Sample("all_types", _T0 + 9, (None,) * len(_ALL_TYPES.channels)))
    with service.open_stream() as stream:
        stream.send(*requests)
        stream.send_samples(samples)
        assert stream.sent == 7
    assert stream.closed
    stored = server.samples(flows=["all_types"])
    assert [s.timestamp_ns for s in stored] == [_T0 + i for i in (0, 1, 2, 3, 4, 5, 9)]
    names = [c.name for c in _ALL_TYPES.channels]
    for sample, row in zip(stored, rows, strict=False):
        expected = dict(zip(names, row, strict=True))
        expected["f"] = struct.unpack("<f", struct.pack("<f", row[1]))[0]
        assert sample.values == expected
        assert [type(sample.values[n]) for n in names] == [type(expected[n]) for n in names]
    assert stored[-1].values == dict.fromkeys(names)
    with pytest.raises(TransportError, match="closed"):
        stream.send(*requests)


def test_samples_that_do_not_fit_are_refused_before_sending(
    server: _Server, channel: SiftChannel
) -> None:
    """A sample of an unknown flow, with a wrong value count or a value out of its channel's
    range is refused (IngestionValidationError); nothing of that call is sent, the stream goes
    on."""
    service = IngestionService(channel, _config())
    with service.open_stream() as stream:
        for bad in (
            Sample("nope", _T0, (1.0,)),
            Sample("readings", _T0, (1.0,)),
            Sample("readings", _T0, (1.0, 2**63)),
            Sample("readings", _T0, ("volts", 1)),
        ):
            with pytest.raises(IngestionValidationError):
                stream.send_samples([Sample("readings", _T0 + 1, (0.5, 1)), bad])
        stream.send_samples([Sample("readings", _T0 + 2, (2.5, -3))])
    (stored,) = server.samples()
    assert (stored.timestamp_ns, stored.values) == (_T0 + 2, {"voltage": 2.5, "count": -3})


def test_lazy_flows_are_registered_on_an_open_stream(server: _Server, channel: SiftChannel) -> None:
    """With lazy flow creation, a flow first sent on a stream already open is registered then,
    and its data is stored."""
    service = IngestionService(
        channel, _config(_READINGS, _ALL_TYPES), force_lazy_flow_creation=True
    )
    config_id = service.ingestion_config.ingestion_config_id
    with service.open_stream() as stream:
        assert _server_flows(channel, config_id) == set()
        stream.send_samples([Sample("readings", _T0, (1.0, 1))])
        stream.send(*_readings(service, 2, t0=_T0 + 1))
    assert _server_flows(channel, config_id) == {"readings"}
    assert server.count(flow="readings") == 3


def test_a_server_gone_before_close_fails_the_close(tmp_path: Path) -> None:
    """A stream whose server stops before its close fails with an RpcError (never a silent OK);
    sent again once the server is back, every sample is stored once."""
    db = tmp_path / "store.db"
    first = _Server(db)
    second: _Server | None = None
    try:
        uri = f"127.0.0.1:{first.port}"
        with use_sift_channel({"uri": uri, "apikey": _ANY_KEY, "use_ssl": False}) as ch:
            service = IngestionService(ch, _config())
            requests = _readings(service, 200)
            stream = service.open_stream(timeout=10)
            stream.send(*requests)
            first.stop(grace=0.2)
            with pytest.raises(grpc.RpcError) as info:
                stream.close()
            assert isinstance(info.value, RpcError)
            assert info.value.code() is not grpc.StatusCode.OK
            with pytest.raises(grpc.RpcError) as down:
                service.ingest(*requests)
            assert down.value.code() is grpc.StatusCode.UNAVAILABLE
            second = _Server(db, port=first.port)
            service.ingest(*requests)
        assert second.count() == 200
        assert [s.values["count"] for s in second.samples()] == list(range(200))
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_a_plain_grpc_channel_refuses_data_streams(grpc_channel: grpc.Channel) -> None:
    """On a grpcio channel of the user's own, unary calls work but a data stream needs the
    address and key only a SiftChannel knows: a ConfigError says so."""
    service = IngestionService(grpc_channel, _config())
    assert service.ingestion_config.ingestion_config_id
    with pytest.raises(ConfigError, match="use_sift_channel"):
        service.ingest(*_readings(service, 1))
