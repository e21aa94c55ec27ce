"""Serialize samples straight to ``IngestWithConfigDataStreamRequest`` wire bytes.

Building protobuf objects costs microseconds per channel value; the flusher sends tens of
thousands of samples per second, so it writes the wire format directly with encoders compiled once
per flow: the constant parts of a request (ingestion config id, flow name, run id, organization)
are pre-serialized, and each channel has a small function for its type. The output parses as the
same message protobuf builds (a test compares them field by field).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence

from daq_agent.core.errors import IngestionValidationError
from daq_agent.core.model import ChannelDataType, FlowConfig
from daq_agent.core.sample import Sample, Value

__all__ = ["RequestEncoder"]

_DOUBLE = struct.Struct("<d").pack
_FLOAT = struct.Struct("<f").pack
_EMPTY = b"\x22\x02\x5a\x00"  # channel_values { empty {} }
_UINT64_MASK = (1 << 64) - 1

_ValueEncoder = Callable[[Value], bytes]


def _varint(value: int) -> bytes:
    """Protobuf base-128 varint; negative numbers as 64-bit two's complement."""
    if value < 0:
        value &= _UINT64_MASK
    if value < 0x80:
        return bytes((value,))
    if value < 0x4000:
        return bytes((value & 0x7F | 0x80, value >> 7))
    if value < 0x200000:
        return bytes((value & 0x7F | 0x80, (value >> 7) & 0x7F | 0x80, value >> 14))
    if value < 0x10000000:
        return bytes(
            (
                value & 0x7F | 0x80,
                (value >> 7) & 0x7F | 0x80,
                (value >> 14) & 0x7F | 0x80,
                value >> 21,
            )
        )
    if value < 0x800000000:
        return bytes(
            (
                value & 0x7F | 0x80,
                (value >> 7) & 0x7F | 0x80,
                (value >> 14) & 0x7F | 0x80,
                (value >> 21) & 0x7F | 0x80,
                value >> 28,
            )
        )
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field_bytes(tag: int, data: bytes) -> bytes:
    return bytes((tag,)) + _varint(len(data)) + data


def _wrap(inner: bytes) -> bytes:
    """``inner`` (one channel value's fields) as a ``channel_values`` entry."""
    return b"\x22" + _varint(len(inner)) + inner


def _double(value: Value) -> bytes:
    if value is None:
        return _EMPTY
    return b"\x22\x09\x11" + _DOUBLE(value)


def _float(value: Value) -> bytes:
    if value is None:
        return _EMPTY
    return b"\x22\x05\x1d" + _FLOAT(value)


def _bool(value: Value) -> bytes:
    if value is None:
        return _EMPTY
    return b"\x22\x02\x20\x01" if value else b"\x22\x02\x20\x00"


def _varint_encoder(tag: int, low: int, high: int, name: str) -> _ValueEncoder:
    small = [bytes((0x22, 2, tag, n)) for n in range(0x80)]  # the common case, precomputed
    head = bytes((tag,))

    def encode(value: Value) -> bytes:
        if value is None:
            return _EMPTY
        number = int(value)
        if 0 <= number < 0x80:
            return small[number]
        if not low <= number <= high:
            raise IngestionValidationError(f"{number} does not fit {name}")
        return _wrap(head + _varint(number))

    return encode


def _length_encoder(tag: int) -> _ValueEncoder:
    def encode(value: Value) -> bytes:
        if value is None:
            return _EMPTY
        data = value.encode() if isinstance(value, str) else bytes(value)  # type: ignore[arg-type]
        return _wrap(_field_bytes(tag, data))

    return encode


_ENCODERS: dict[ChannelDataType, _ValueEncoder] = {
    ChannelDataType.DOUBLE: _double,
    ChannelDataType.FLOAT: _float,
    ChannelDataType.BOOL: _bool,
    ChannelDataType.STRING: _length_encoder(0x0A),
    ChannelDataType.INT_32: _varint_encoder(0x28, -(1 << 31), (1 << 31) - 1, "int32"),
    ChannelDataType.UINT_32: _varint_encoder(0x30, 0, (1 << 32) - 1, "uint32"),
    ChannelDataType.INT_64: _varint_encoder(0x38, -(1 << 63), (1 << 63) - 1, "int64"),
    ChannelDataType.UINT_64: _varint_encoder(0x40, 0, _UINT64_MASK, "uint64"),
    ChannelDataType.BIT_FIELD: _length_encoder(0x4A),
    ChannelDataType.ENUM: _varint_encoder(0x50, 0, (1 << 32) - 1, "enum (uint32)"),
    ChannelDataType.BYTES: _length_encoder(0x62),
}


_SECONDS_CACHE: dict[int, bytes] = {}
_BYTE = [bytes((i,)) for i in range(256)]
# Two varint bytes, both with the continuation bit, for every 14-bit value: nanoseconds of 2^28
# and above (most of them) encode as two lookups and one byte instead of a loop.
_VARINT14 = [bytes((k & 0x7F | 0x80, (k >> 7) | 0x80)) for k in range(1 << 14)]


def _timestamp(ns: int) -> bytes:
    """The ``timestamp`` field (a google.protobuf.Timestamp) for ``ns`` since the epoch."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    head = _SECONDS_CACHE.get(seconds)
    if head is None:
        if len(_SECONDS_CACHE) > 4096:
            _SECONDS_CACHE.clear()
        head = _SECONDS_CACHE[seconds] = b"\x08" + _varint(seconds) if seconds else b""
    if nanos >= 0x10000000:
        inner = (
            head
            + b"\x10"
            + _VARINT14[nanos & 0x3FFF]
            + _VARINT14[(nanos >> 14) & 0x3FFF]
            + _BYTE[nanos >> 28]
        )
    elif nanos:
        inner = head + b"\x10" + _varint(nanos)
    else:
        inner = head
    return b"\x1a" + _BYTE[len(inner)] + inner  # at most 17 bytes: a one-byte length


class _FlowEncoder:
    __slots__ = (
        "all_double",
        "encoders",
        "head",
        "name",
        "pack_doubles",
        "tail",
        "template",
        "width",
    )

    def __init__(self, flow: FlowConfig, head: bytes, tail: bytes) -> None:
        self.name = flow.name
        self.head = head
        self.tail = tail
        self.width = len(flow.channels)
        self.encoders = tuple(_ENCODERS[c.data_type] for c in flow.channels)
        self.all_double = bool(flow.channels) and all(
            c.data_type is ChannelDataType.DOUBLE for c in flow.channels
        )
        # All-double flows (the common case for scaled CAN signals) pack in one struct call.
        self.pack_doubles = struct.Struct("<" + "3sd" * self.width).pack
        self.template: list[object] = [b"\x22\x09\x11", 0.0] * self.width

    def encode(self, timestamp_ns: int, values: Sequence[Value]) -> bytes:
        if len(values) != self.width:
            raise IngestionValidationError(
                f"flow {self.name!r} has {self.width} channels, got {len(values)} values"
            )
        if self.all_double and None not in values:
            args = self.template.copy()
            args[1::2] = values
            body = self.pack_doubles(*args)
        else:
            body = b"".join([enc(v) for enc, v in zip(self.encoders, values, strict=True)])
        return self.head + _timestamp(timestamp_ns) + body + self.tail


class RequestEncoder:
    """Encodes samples of known flows into serialized ``IngestWithConfigDataStreamRequest``.

    Args:
        ingestion_config_id: the ingestion config the flows belong to.
        flows: the flows whose samples will be encoded.
        run_id: the run the data belongs to ("" for none).
        organization_id: the organization ("" for the key's default).
        end_stream_on_validation_error: ask the server to end the stream on a bad request.
    """

    def __init__(
        self,
        ingestion_config_id: str,
        flows: Iterable[FlowConfig],
        *,
        run_id: str = "",
        organization_id: str = "",
        end_stream_on_validation_error: bool = False,
    ) -> None:
        self.ingestion_config_id = ingestion_config_id
        self.run_id = run_id
        config = _field_bytes(0x0A, ingestion_config_id.encode()) if ingestion_config_id else b""
        tail = b""
        if run_id:
            tail += _field_bytes(0x2A, run_id.encode())
        if end_stream_on_validation_error:
            tail += b"\x30\x01"
        if organization_id:
            tail += _field_bytes(0x3A, organization_id.encode())
        self._flows = {
            flow.name: _FlowEncoder(flow, config + _field_bytes(0x12, flow.name.encode()), tail)
            for flow in flows
        }

    def encode(self, sample: Sample) -> bytes:
        """The serialized request for one sample.

        Raises:
            IngestionValidationError: unknown flow, wrong number of values, or an integer that
                does not fit its channel type.
        """
        flow = self._flows.get(sample.flow)
        if flow is None:
            raise IngestionValidationError(f"unknown flow {sample.flow!r}")
        return flow.encode(sample.timestamp_ns, sample.values)

    def encode_many(self, samples: Iterable[Sample]) -> list[bytes]:
        """The serialized requests for ``samples``, in order.

        Raises:
            IngestionValidationError: as :meth:`encode`, for the first bad sample.
        """
        flows = self._flows
        out: list[bytes] = []
        append = out.append
        for sample in samples:
            flow = flows.get(sample.flow)
            if flow is None:
                raise IngestionValidationError(f"unknown flow {sample.flow!r}")
            append(flow.encode(sample.timestamp_ns, sample.values))
        return out
