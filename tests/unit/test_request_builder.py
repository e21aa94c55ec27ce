"""Samples to sift_stream request objects: every type, empties, and values that do not fit."""

from __future__ import annotations

import pytest

from daq_agent.core.errors import IngestionValidationError
from daq_agent.core.model import ChannelConfig, ChannelDataType, FlowConfig
from daq_agent.ingestion.sift_stream import RequestBuilder

T = ChannelDataType
FLOW = FlowConfig(
    "all",
    [
        ChannelConfig("d", T.DOUBLE),
        ChannelConfig("f", T.FLOAT),
        ChannelConfig("s", T.STRING),
        ChannelConfig("b", T.BOOL),
        ChannelConfig("i32", T.INT_32),
        ChannelConfig("u32", T.UINT_32),
        ChannelConfig("i64", T.INT_64),
        ChannelConfig("u64", T.UINT_64),
        ChannelConfig("e", T.ENUM),
        ChannelConfig("bf", T.BIT_FIELD),
        ChannelConfig("by", T.BYTES),
    ],
)
GOOD = (1.5, 2.5, "x", True, -(2**31), 2**32 - 1, -(2**63), 2**64 - 1, 3, b"\x01\x02", b"\xff")


def channel_values(request: object) -> list[object]:
    return [v.ty for v in request.channel_values]  # type: ignore[attr-defined]


def test_every_type_and_the_request_fields() -> None:
    (request,) = RequestBuilder([FLOW]).build(
        [("all", 1_700_000_000_123_456_789, GOOD)], "cfg", "run"
    )
    assert (request.ingestion_config_id, request.flow, request.run_id) == ("cfg", "all", "run")
    assert request.end_stream_on_validation_error  # the agent's default: never dropped silently
    assert len(channel_values(request)) == len(GOOD)


def test_none_is_empty_and_a_one_bit_integer_is_a_bool() -> None:
    builder = RequestBuilder([FLOW])
    values = list(GOOD)
    values[0] = None  # a multiplexed signal absent from this frame
    values[3] = 1  # integer decoders give 0/1 for 1-bit signals
    (request,) = builder.build([("all", 1, tuple(values))], "cfg", "")
    assert len(channel_values(request)) == len(GOOD)


@pytest.mark.parametrize(
    ("index", "bad"),
    [(0, "not a number"), (4, 2**31), (5, -1), (7, 2**64), (2, 3.0), (3, "yes")],
)
def test_a_value_that_does_not_fit_its_channel_is_refused(index: int, bad: object) -> None:
    values = list(GOOD)
    values[index] = bad
    with pytest.raises(IngestionValidationError, match="does not fit"):
        RequestBuilder([FLOW]).build([("all", 1, tuple(values))], "cfg", "")


def test_unknown_flows_and_wrong_counts_are_refused() -> None:
    builder = RequestBuilder([FLOW])
    with pytest.raises(IngestionValidationError, match="not in the config"):
        builder.build([("nope", 1, GOOD)], "cfg", "")
    with pytest.raises(IngestionValidationError, match="10 values for 11 channels"):
        builder.build([("all", 1, GOOD[:-1])], "cfg", "")
