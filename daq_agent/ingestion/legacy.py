"""Read a spool written by daq-agent 0.1, whose payloads were serialized wire requests.

Version 0.1 spooled each sample as an ``IngestWithConfigDataStreamRequest`` (ingestion config id,
flow, timestamp, channel values, run id). :func:`decode_request` turns one back into the sample it
carried, so a backlog spooled before an upgrade is still delivered after it (into the same run,
by its id). The flow name and the values are what matter: the ingestion config id is looked up
again by the sink.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from daq_agent._proto.sift.ingest.v1 import ingest_pb2
from daq_agent.core.sample import Value

__all__ = ["decode_request"]


def _value(channel_value: ingest_pb2.IngestWithConfigDataChannelValue) -> Value:
    kind = channel_value.WhichOneof("type")
    if kind is None or kind == "empty":
        return None
    if kind == "bit_field":
        return bytes(channel_value.bit_field)
    value: Value = getattr(channel_value, kind)
    return value


def decode_request(payload: bytes) -> tuple[tuple[str, int, tuple[Value, ...]], str]:
    """The sample a serialized request carries, and its run id ("" for none).

    Raises:
        ValueError: the payload is not such a request, or carries no timestamp or flow.
    """
    request = ingest_pb2.IngestWithConfigDataStreamRequest()
    try:
        request.ParseFromString(payload)
    except DecodeError as exc:
        raise ValueError(f"not an IngestWithConfigDataStreamRequest: {exc}") from exc
    if not request.flow or not request.HasField("timestamp"):
        raise ValueError("a spooled request without a flow or a timestamp")
    ts = request.timestamp.seconds * 1_000_000_000 + request.timestamp.nanos
    values = tuple(_value(v) for v in request.channel_values)
    return (request.flow, ts, values), request.run_id
