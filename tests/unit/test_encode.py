"""The direct wire encoder produces what protobuf itself would."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daq_agent._proto.sift.ingest.v1.ingest_pb2 import IngestWithConfigDataStreamRequest
from daq_agent.core.errors import IngestionValidationError
from daq_agent.core.model import ChannelConfig, ChannelDataType, FlowConfig
from daq_agent.core.sample import Sample
from daq_agent.ingestion.encode import RequestEncoder

T = ChannelDataType
FLOW = FlowConfig(
    "mixed",
    [
        ChannelConfig("d", T.DOUBLE),
        ChannelConfig("f", T.FLOAT),
        ChannelConfig("b", T.BOOL),
        ChannelConfig("s", T.STRING),
        ChannelConfig("i32", T.INT_32),
        ChannelConfig("u32", T.UINT_32),
        ChannelConfig("i64", T.INT_64),
        ChannelConfig("u64", T.UINT_64),
        ChannelConfig("bits", T.BIT_FIELD),
        ChannelConfig("e", T.ENUM),
        ChannelConfig("raw", T.BYTES),
    ],
)
DOUBLES = FlowConfig("doubles", [ChannelConfig(f"c{i}", T.DOUBLE) for i in range(8)])

_F32 = st.floats(width=32, allow_nan=False)


def _maybe(strategy: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return st.none() | strategy


MIXED_VALUES = st.tuples(
    _maybe(st.floats()),
    _maybe(_F32),
    _maybe(st.booleans()),
    _maybe(st.text()),
    _maybe(st.integers(-(2**31), 2**31 - 1)),
    _maybe(st.integers(0, 2**32 - 1)),
    _maybe(st.integers(-(2**63), 2**63 - 1)),
    _maybe(st.integers(0, 2**64 - 1)),
    _maybe(st.binary(max_size=8)),
    _maybe(st.integers(0, 2**32 - 1)),
    _maybe(st.binary(max_size=40)),
)
TIMESTAMPS = st.integers(0, 2**62)


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def _decoded(payload: bytes) -> tuple[IngestWithConfigDataStreamRequest, list[object]]:
    request = IngestWithConfigDataStreamRequest.FromString(payload)
    values: list[object] = []
    for value in request.channel_values:
        kind = value.WhichOneof("type")
        values.append(None if kind == "empty" else getattr(value, str(kind)))
    return request, values


@settings(max_examples=200, deadline=None)
@given(values=MIXED_VALUES, timestamp=TIMESTAMPS)
def test_mixed_flow_round_trips(values: tuple[object, ...], timestamp: int) -> None:
    """Every channel type, empty included, parses back to the value that was encoded."""
    encoder = RequestEncoder("cfg-1", [FLOW], run_id="run-9", organization_id="org")
    request, decoded = _decoded(encoder.encode(Sample("mixed", timestamp, values)))  # type: ignore[arg-type]
    assert request.ingestion_config_id == "cfg-1"
    assert request.flow == "mixed"
    assert request.run_id == "run-9"
    assert request.organization_id == "org"
    assert request.timestamp.seconds * 1_000_000_000 + request.timestamp.nanos == timestamp
    assert all(_same(a, b) for a, b in zip(decoded, values, strict=True)), (decoded, values)


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.floats(), min_size=8, max_size=8), timestamp=TIMESTAMPS)
def test_all_double_fast_path_is_protobuf_identical(values: list[float], timestamp: int) -> None:
    """The one-struct path for all-double flows gives protobuf's own serialization."""
    encoder = RequestEncoder("cfg", [DOUBLES])
    ours = encoder.encode(Sample("doubles", timestamp, tuple(values)))
    request, decoded = _decoded(ours)
    assert all(_same(a, b) for a, b in zip(decoded, values, strict=True))
    assert ours == request.SerializeToString(deterministic=True)


def test_unknown_flow_and_wrong_width_are_rejected() -> None:
    """A sample of an unknown flow or with the wrong number of values raises a clear error."""
    encoder = RequestEncoder("cfg", [DOUBLES])
    with pytest.raises(IngestionValidationError, match="unknown flow 'nope'"):
        encoder.encode(Sample("nope", 1, ()))
    with pytest.raises(IngestionValidationError, match="8 channels, got 2"):
        encoder.encode_many([Sample("doubles", 1, (1.0, 2.0))])


def test_integer_out_of_range_is_rejected() -> None:
    """An integer that does not fit its channel's type is refused, not truncated."""
    flow = FlowConfig("ints", [ChannelConfig("u", T.UINT_32)])
    with pytest.raises(IngestionValidationError, match="does not fit uint32"):
        RequestEncoder("cfg", [flow]).encode(Sample("ints", 1, (2**32,)))


@pytest.mark.parametrize(
    "timestamp",
    [0, 1, 127, 128, 2**28 - 1, 2**28, 999_999_999, 1_000_000_000, 1_700_000_000_123_456_789],
)
def test_timestamps_at_varint_boundaries(timestamp: int) -> None:
    """Timestamps whose nanoseconds sit at varint size boundaries serialize like protobuf."""
    ours = RequestEncoder("cfg", [DOUBLES]).encode(Sample("doubles", timestamp, (0.0,) * 8))
    request = IngestWithConfigDataStreamRequest.FromString(ours)
    assert request.timestamp.seconds * 1_000_000_000 + request.timestamp.nanos == timestamp
    assert ours == request.SerializeToString(deterministic=True)
