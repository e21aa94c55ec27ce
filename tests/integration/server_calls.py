"""grpcio helpers shared by the local-server tests: generic unary and client-streaming calls."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf.message import Message

from daq_agent import methods
from daq_agent._proto.sift.common.type.v1 import channel_data_type_pb2 as cdt
from daq_agent._proto.sift.ingest.v1 import ingest_pb2
from daq_agent._proto.sift.ingestion_configs.v2 import ingestion_configs_pb2 as ic

M = TypeVar("M", bound=Message)
Value = ingest_pb2.IngestWithConfigDataChannelValue
Request = ingest_pb2.IngestWithConfigDataStreamRequest
BASE_NS = 1_700_000_000_123_456_789


def call(
    channel: grpc.Channel,
    path: str,
    request: Message,
    response_class: type[M],
    metadata: Sequence[tuple[str, str]] | None = None,
) -> M:
    """One unary call with the generic grpcio API."""
    method = channel.unary_unary(
        path,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_class.FromString,
    )
    response: M = method(request, timeout=10, metadata=tuple(metadata) if metadata else None)
    return response


def ingest_method(channel: grpc.Channel) -> grpc.StreamUnaryMultiCallable[Any, Any]:
    """IngestWithConfigDataStream through grpcio's generic API (call it, or ``.future`` it)."""
    return channel.stream_unary(
        methods.INGEST_WITH_CONFIG_DATA_STREAM,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=ingest_pb2.IngestWithConfigDataStreamResponse.FromString,
    )


def stream(
    channel: grpc.Channel,
    requests: Iterator[Request] | Sequence[Request],
    metadata: Sequence[tuple[str, str]] | None = None,
) -> ingest_pb2.IngestWithConfigDataStreamResponse:
    """One IngestWithConfigDataStream call with the generic grpcio API."""
    method = ingest_method(channel)
    response: ingest_pb2.IngestWithConfigDataStreamResponse = method(
        iter(requests), timeout=10, metadata=tuple(metadata) if metadata else None
    )
    return response


def code_of(action: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """The status code and details of a call expected to fail."""
    with pytest.raises(grpc.RpcError) as info:
        action()
    error: Any = info.value
    return error.code(), error.details()


def double_flow(name: str, count: int = 2) -> ic.FlowConfig:
    """A flow of ``count`` double channels."""
    return ic.FlowConfig(
        name=name,
        channels=[
            ic.ChannelConfig(name=f"{name}.c{i}", data_type=cdt.CHANNEL_DATA_TYPE_DOUBLE)
            for i in range(count)
        ],
    )


def create_config(
    channel: grpc.Channel, client_key: str, flows: Sequence[ic.FlowConfig], asset: str = "bench"
) -> ic.IngestionConfig:
    """Create an ingestion config and return it."""
    request = ic.CreateIngestionConfigRequest(asset_name=asset, client_key=client_key, flows=flows)
    return call(
        channel, methods.CREATE_INGESTION_CONFIG, request, ic.CreateIngestionConfigResponse
    ).ingestion_config


def doubles(config_id: str, flow: str, ts: int, *values: float, run_id: str = "") -> Request:
    """A request of double values."""
    request = Request(ingestion_config_id=config_id, flow=flow, run_id=run_id)
    request.timestamp.FromNanoseconds(ts)
    for value in values:
        request.channel_values.add(double=value)
    return request
