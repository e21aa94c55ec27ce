"""The local ingestion server's services: the parts of Sift's API that Sift's clients call.

Ingest, ingestion configs, runs, assets, rules, channels (list), tags and ping; every List* RPC
takes Sift's CEL filters (:mod:`daq_agent.server.filters`).

Handlers take and return serialized protobuf bytes (the seam in :mod:`daq_agent.server.rpc`) and
run on the server's one thread, so the caches here need no lock.

The ingest stream is the hot path (tens of thousands of requests per second). Each request is parsed
once, with a *shadow* message that has the wire layout of ``IngestWithConfigDataStreamRequest`` but
keeps ``channel_values`` as raw bytes. The types of all values are then checked in one C call: a
per-flow compiled pattern over the canonical serialization of the request (flows with only fixed
and varint types), or else a signature of the values' oneof tags (the first byte of each value)
looked up in the flow's set of accepted signatures, each value also checked to be exactly one
well-formed field (a value's last field wins in a parse, so a tag alone proves nothing). Anything
the fast path does not accept is decided by the full, authoritative parse (``WhichOneof`` per
value); a property test (tests/unit/test_fast_path.py) holds the two to the same decisions.
The request is stored as received (see :mod:`daq_agent.server.store`).
"""

from __future__ import annotations

import functools
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError as ProtobufDecodeError
from google.protobuf.message import Message

from daq_agent import methods
from daq_agent._proto.sift.assets.v1 import assets_pb2
from daq_agent._proto.sift.channels.v3 import channels_pb2
from daq_agent._proto.sift.common.type.v1 import channel_data_type_pb2 as cdt
from daq_agent._proto.sift.ingest.v1 import ingest_pb2
from daq_agent._proto.sift.ingestion_configs.v2 import ingestion_configs_pb2 as ic_pb2
from daq_agent._proto.sift.ping.v1 import ping_pb2
from daq_agent._proto.sift.rules.v1 import rules_pb2
from daq_agent._proto.sift.runs.v2 import runs_pb2
from daq_agent._proto.sift.tags.v2 import tags_pb2
from daq_agent.core.errors import DaqError
from daq_agent.server.filters import FilterError
from daq_agent.server.rpc import (
    CallContext,
    RpcError,
    StreamHandler,
    StreamHandlerFactory,
    UnaryHandler,
)
from daq_agent.server.store import (
    DEFAULT_MAX_VALIDATION_ERRORS,
    AssetRecord,
    FlowRecord,
    IngestionConfigRecord,
    RuleRecord,
    RunRecord,
    SampleRow,
    Store,
    TagRecord,
    ValidationErrorRecord,
)

__all__ = ["DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "LocalServices"]

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 1000
MAX_PAGE_SIZE = 10_000
PING_RESPONSE = "daq-agent local ingestion server"

# Oneof tag byte ((field number << 3) | wire type) of each IngestWithConfigDataChannelValue field.
_TAG_BY_FIELD = {
    "string": 0x0A,
    "double": 0x11,
    "float": 0x1D,
    "bool": 0x20,
    "int32": 0x28,
    "uint32": 0x30,
    "int64": 0x38,
    "uint64": 0x40,
    "bit_field": 0x4A,
    "enum": 0x50,
    "empty": 0x5A,
    "bytes": 0x62,
}
_EMPTY_TAG = _TAG_BY_FIELD["empty"]
_FIELD_BY_TYPE = {
    cdt.CHANNEL_DATA_TYPE_DOUBLE: "double",
    cdt.CHANNEL_DATA_TYPE_STRING: "string",
    cdt.CHANNEL_DATA_TYPE_ENUM: "enum",
    cdt.CHANNEL_DATA_TYPE_BIT_FIELD: "bit_field",
    cdt.CHANNEL_DATA_TYPE_BOOL: "bool",
    cdt.CHANNEL_DATA_TYPE_FLOAT: "float",
    cdt.CHANNEL_DATA_TYPE_INT_32: "int32",
    cdt.CHANNEL_DATA_TYPE_UINT_32: "uint32",
    cdt.CHANNEL_DATA_TYPE_INT_64: "int64",
    cdt.CHANNEL_DATA_TYPE_UINT_64: "uint64",
    cdt.CHANNEL_DATA_TYPE_BYTES: "bytes",
}
_RUN_UPDATABLE = {
    "name", "description", "start_time", "stop_time", "is_pinned", "client_key", "tags",
    "is_archived", "metadata",
}  # fmt: skip
# order_by values the local server supports, and whether each lists newest first; as in Sift,
# no order_by means newest first.
_ORDERS = {"": True, "created_date": False, "created_date asc": False, "created_date desc": True}
_MAX_TIMESTAMP_NS = 1 << 63  # samples are stored as SQLite (64-bit) integer nanoseconds
_WRITE_ROWS = 1024  # accepted samples buffered before one multi-row INSERT
_MAX_SIGNATURES = 4096  # accepted value signatures cached per flow (multiplexed flows vary)


class _Record(Protocol):
    """A stored record a listing pages by."""

    @property
    def pk(self) -> int: ...


_R = TypeVar("_R", bound=_Record)
_T = TypeVar("_T")


def _shadow_request_class() -> Any:
    """A message with the wire layout of IngestWithConfigDataStreamRequest, values kept as bytes."""
    f = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="daq_agent/server/shadow_ingest.proto", package="daq_agent.shadow", syntax="proto3"
    )
    ts = file.message_type.add(name="Timestamp")
    ts.field.add(name="seconds", number=1, type=f.TYPE_INT64, label=f.LABEL_OPTIONAL)
    ts.field.add(name="nanos", number=2, type=f.TYPE_INT32, label=f.LABEL_OPTIONAL)
    req = file.message_type.add(name="Request")
    for name, number, kind, label in (
        ("ingestion_config_id", 1, f.TYPE_BYTES, f.LABEL_OPTIONAL),
        ("flow", 2, f.TYPE_BYTES, f.LABEL_OPTIONAL),
        ("timestamp", 3, f.TYPE_MESSAGE, f.LABEL_OPTIONAL),
        ("channel_values", 4, f.TYPE_BYTES, f.LABEL_REPEATED),
        ("run_id", 5, f.TYPE_BYTES, f.LABEL_OPTIONAL),
        ("end_stream_on_validation_error", 6, f.TYPE_BOOL, f.LABEL_OPTIONAL),
        ("organization_id", 7, f.TYPE_BYTES, f.LABEL_OPTIONAL),
    ):
        added = req.field.add(name=name, number=number, type=kind, label=label)
        if kind == f.TYPE_MESSAGE:
            added.type_name = ".daq_agent.shadow.Timestamp"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("daq_agent.shadow.Request"))


_ShadowRequest = _shadow_request_class()
_parse_shadow: Callable[[bytes], Any] = _ShadowRequest.FromString
_parse_request = ingest_pb2.IngestWithConfigDataStreamRequest.FromString
_INGEST_RESPONSE = ingest_pb2.IngestWithConfigDataStreamResponse().SerializeToString()


# -- filters and paging ------------------------------------------------------------------------


def _paged(
    request: Any, lister: Callable[..., list[_R]], *, ordered: bool = False
) -> tuple[list[_R], str]:
    """One page of a List* RPC and the next page token: ``lister`` (a store listing) called
    with the request's ``filter``, page size and token, and with ``ordered`` its ``order_by``.

    Raises:
        RpcError: INVALID_ARGUMENT for a bad filter, page token or order.
    """
    limit, after = _page(request.page_size, request.page_token)
    order = {"newest_first": _newest_first(request.order_by)} if ordered else {}
    try:
        records = lister(request.filter, after=after, limit=limit + 1, **order)
    except FilterError as exc:
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
    next_token = str(records[limit - 1].pk) if len(records) > limit else ""
    return records[:limit], next_token


def _found(record: _T | None, what: str) -> _T:
    """``record``, unless it is None: then NOT_FOUND, "``what`` not found".

    Raises:
        RpcError: NOT_FOUND.
    """
    if record is None:
        raise RpcError(grpc.StatusCode.NOT_FOUND, f"{what} not found")
    return record


def _page(page_size: int, page_token: str) -> tuple[int, int]:
    """(limit, after pk) from a request's paging fields."""
    limit = DEFAULT_PAGE_SIZE if page_size == 0 else min(page_size, MAX_PAGE_SIZE)
    if not page_token:
        return limit, 0
    # a token is a pk: ASCII digits, within SQLite's 64-bit integers
    if not (page_token.isascii() and page_token.isdigit() and int(page_token) < 1 << 63):
        raise RpcError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"invalid page_token {page_token[:40]!r}: not one this server returned",
        )
    return limit, int(page_token)


def _parse(message_class: type[Message], data: bytes) -> Any:
    try:
        return message_class.FromString(data)
    except ProtobufDecodeError as exc:
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {exc}") from exc


def _newest_first(order_by: str) -> bool:
    """Whether ``order_by`` lists newest first (also when empty, as in Sift).

    Raises:
        RpcError: INVALID_ARGUMENT for an order the local server does not support.
    """
    order = " ".join(order_by.lower().split())
    if order not in _ORDERS:
        raise RpcError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"unsupported order_by {order_by!r} (supported: created_date [asc|desc])",
        )
    return _ORDERS[order]


def _mask_paths(request: Any, allowed: set[str]) -> set[str]:
    """The paths of a request's ``update_mask``, each one of ``allowed``.

    Raises:
        RpcError: INVALID_ARGUMENT for an empty mask or a path not allowed.
    """
    paths = {p for path in request.update_mask.paths for p in path.split(",") if p}
    if not paths:
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "update_mask is required")
    unknown = paths - allowed
    if unknown:
        raise RpcError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"cannot update {', '.join(sorted(unknown))} (updatable: {', '.join(sorted(allowed))})",
        )
    return paths


def _timestamp_ns(message: Any, name: str) -> int | None:
    if not message.HasField(name):
        return None
    ts = getattr(message, name)
    return int(ts.seconds) * 1_000_000_000 + int(ts.nanos)


def _set_timestamp(target: Any, ns: int) -> None:
    target.seconds, target.nanos = divmod(ns, 1_000_000_000)


# -- ingestion cache ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Flow:
    """A flow as the ingest path needs it."""

    pk: int
    name: str
    ingestion_config_id: str
    channel_names: tuple[str, ...]
    fields: tuple[str, ...]
    """The value oneof field of each channel, in order."""
    expected: bytes
    """The value signature with no empty value."""
    count: int
    """The number of channels."""
    match: Callable[[bytes], re.Match[bytes] | None] | None
    """Matches a canonically serialized valid request of this flow, group 1 being its values;
    None when the flow has a length-delimited type (string, bytes, bit field)."""
    accepted: set[bytes] = field(default_factory=set)

    @classmethod
    def from_record(cls, record: FlowRecord) -> _Flow:
        channels = record.flow_config().channels
        fields = tuple(_FIELD_BY_TYPE.get(c.data_type, "?") for c in channels)
        expected = bytes(_TAG_BY_FIELD.get(f, 0) for f in fields)
        pattern = _request_pattern(record.ingestion_config_id, record.name, fields)
        return cls(
            pk=record.pk,
            name=record.name,
            ingestion_config_id=record.ingestion_config_id,
            channel_names=tuple(c.name for c in channels),
            fields=fields,
            expected=expected,
            count=len(fields),
            match=None if pattern is None else pattern.match,
            # strings must be valid UTF-8, which only the full parse checks: no fast path
            accepted=set() if "string" in fields else {expected},
        )


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)
    return bytes(out)


def _varint_pattern(length: int) -> bytes:
    """A varint of exactly ``length`` bytes."""
    return rb"[\x80-\xff]{%d}[\x00-\x7f]" % (length - 1)


_EMPTY_PATTERN = re.escape(b"\x22\x02\x5a\x00")
# Seconds since 1970 as a 5-byte varint (1978..3058), nanos absent or 1..5 varint bytes.
_TIMESTAMP_PATTERN = (
    rb"\x1a(?:\x06\x08"
    + _varint_pattern(5)
    + b"|"
    + b"|".join(
        re.escape(bytes([8 + n - 1, 0x08])) + _varint_pattern(5) + rb"\x10" + _varint_pattern(n)
        for n in range(1, 6)
    )
    + b")"
)
_VARINT_FIELDS = frozenset({"bool", "int32", "uint32", "int64", "uint64", "enum"})
# A serialized varint value (tag byte, then 1 to 10 varint bytes), matched in full.
_one_varint_value = re.compile(rb"[\x00-\xff][\x80-\xff]{0,9}[\x00-\x7f]", re.DOTALL).fullmatch


def _one_field(value: bytes) -> bool:
    """Whether a serialized ``IngestWithConfigDataChannelValue`` is exactly one well-formed
    field (its first byte, the tag, then says what the full parse sees). ``empty`` must be
    empty, and no caller passes string values (UTF-8 is for the full parse to check)."""
    tag = value[0]
    wire = tag & 7
    size = len(value)
    if wire == 1:
        return size == 9
    if wire == 5:
        return size == 5
    if wire == 0:
        return _one_varint_value(value) is not None
    if tag == _EMPTY_TAG:
        return value == b"\x5a\x00"
    if wire != 2:
        return False
    length = shift = 0
    for i in range(1, min(size, 6)):
        byte = value[i]
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            return i + 1 + length == size
        shift += 7
    return False


def _utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def _value_pattern(field_name: str) -> bytes | None:
    """The serialized channel value (field 4 entry) of one type, or None if not checkable."""
    tag = bytes([_TAG_BY_FIELD[field_name]])
    if field_name == "double":
        return re.escape(b"\x22\x09" + tag) + rb"[\x00-\xff]{8}"
    if field_name == "float":
        return re.escape(b"\x22\x05" + tag) + rb"[\x00-\xff]{4}"
    if field_name in _VARINT_FIELDS:
        options = (re.escape(bytes([0x22, 1 + n]) + tag) + _varint_pattern(n) for n in range(1, 11))
        return b"(?:" + b"|".join(options) + b")"
    return None


def _request_pattern(
    ingestion_config_id: str, flow: str, fields: tuple[str, ...]
) -> re.Pattern[bytes] | None:
    """A pattern matching exactly the canonical serializations of valid requests of a flow.

    Canonical order (every protobuf serializer's): config id, flow, timestamp, the values, then
    run id / end-stream flag / organization. Anchored at the start with the config id and flow
    as literals, every field boundary up to the last value is pinned, so a match proves the type
    of every value (or ``empty``); the caller also checks the number of values.
    """
    values = []
    for name in fields:
        value = _value_pattern(name) if name in _TAG_BY_FIELD else None
        if value is None:
            return None
        values.append(b"(?:" + value + b"|" + _EMPTY_PATTERN + b")")
    config = ingestion_config_id.encode()
    flow_bytes = flow.encode()
    prefix = (
        b"\x0a" + _varint(len(config)) + config + b"\x12" + _varint(len(flow_bytes)) + flow_bytes
    )
    return re.compile(
        re.escape(prefix)
        + _TIMESTAMP_PATTERN
        + b"("
        + b"".join(values)
        + b")"
        + rb"(?=[\x2a\x30\x3a]|\Z)"
    )


class _IngestStream:
    """One IngestWithConfigDataStream call."""

    __slots__ = ("_ctx", "_index", "_services")

    def __init__(self, services: LocalServices, ctx: CallContext) -> None:
        self._services = services
        self._ctx = ctx
        self._index = 0

    def on_messages(self, messages: list[bytes]) -> None:
        """Validate and write a batch of requests (committed at the end or periodically).

        Raises:
            RpcError: INVALID_ARGUMENT for a malformed request, or for an invalid one that asks
                to end the stream on validation errors.
        """
        services = self._services
        flows = services.flows
        runs = services.runs
        append = services.rows.append
        index = self._index
        try:
            for raw in messages:
                try:
                    request = _parse_shadow(raw)
                except ProtobufDecodeError as exc:
                    raise RpcError(
                        grpc.StatusCode.INVALID_ARGUMENT, f"malformed request {index}: {exc}"
                    ) from exc
                flow = flows.get((request.ingestion_config_id, request.flow))
                run_id = request.run_id
                run_pk = runs.get(run_id) if run_id else 0
                ts = request.timestamp
                timestamp_ns = ts.seconds * 1_000_000_000 + ts.nanos
                data = raw
                org = request.organization_id
                if flow is None or run_pk is None or not 0 < timestamp_ns < _MAX_TIMESTAMP_NS:
                    valid = False
                elif org and not _utf8(org):
                    valid = False  # the full parse refuses the request: it says why
                elif flow.match is not None:
                    found = flow.match(raw)
                    valid = found is not None and len(request.channel_values) == flow.count
                    if valid:
                        # only the serialized values: itself a valid request, half the bytes
                        data = found.group(1)  # type: ignore[union-attr]
                else:
                    values = request.channel_values
                    try:
                        valid = bytes([v[0] for v in values]) in flow.accepted and all(
                            map(_one_field, values)
                        )
                    except IndexError:
                        valid = False  # a value with no type
                if not valid:
                    accepted = services.check_request(raw, request, index, self._ctx)
                    if accepted is None:
                        index += 1
                        continue
                    flow, run_pk = accepted
                append((flow.pk, run_pk, timestamp_ns, data))  # type: ignore[union-attr,arg-type]
                index += 1
        finally:
            self._index = index
            services.after_batch()

    def on_end(self) -> bytes:
        """Commit everything received so far and answer OK."""
        self._services.commit()
        return _INGEST_RESPONSE

    def on_abort(self) -> None:
        """Commit what the stream delivered before it broke (a re-send is deduplicated)."""
        self._services.commit()


# -- the services ------------------------------------------------------------------------------


class LocalServices:
    """Every RPC of the local ingestion server, over one :class:`Store`.

    Args:
        store: the writable store; the services commit to it.
        commit_interval: seconds between commits while streams are open (a stream's end always
            commits).
        commit_rows: sample rows after which a commit happens regardless of time.
        max_validation_errors: validation errors kept in the store (the newest); older ones are
            deleted and counted (:meth:`Store.validation_errors_overflow`).
    """

    def __init__(
        self,
        store: Store,
        *,
        commit_interval: float = 1.0,
        commit_rows: int = 200_000,
        max_validation_errors: int = DEFAULT_MAX_VALIDATION_ERRORS,
    ) -> None:
        self.store = store
        self.commit_interval = commit_interval
        self.commit_rows = commit_rows
        self.max_validation_errors = max_validation_errors
        self.rows: list[SampleRow] = []
        """Accepted samples not yet written to the store (written in chunks)."""
        self.flows: dict[tuple[bytes, bytes], _Flow] = {}
        self.runs: dict[bytes, int] = {}
        self._last_commit = time.monotonic()
        self.validation_errors = 0
        self.full_parses = 0
        """Requests the fast path left to the full parse (:meth:`check_request`)."""

    def unary_handlers(self) -> dict[str, UnaryHandler]:
        """The unary handlers by method path."""
        return {
            methods.GET_INGESTION_CONFIG: self.get_ingestion_config,
            methods.CREATE_INGESTION_CONFIG: self.create_ingestion_config,
            methods.LIST_INGESTION_CONFIGS: self.list_ingestion_configs,
            methods.CREATE_INGESTION_CONFIG_FLOWS: self.create_ingestion_config_flows,
            methods.LIST_INGESTION_CONFIG_FLOWS: self.list_ingestion_config_flows,
            methods.GET_RUN: self.get_run,
            methods.LIST_RUNS: self.list_runs,
            methods.CREATE_RUN: self.create_run,
            methods.STOP_RUN: self.stop_run,
            methods.UPDATE_RUN: self.update_run,
            methods.PING: self.ping,
            methods.GET_ASSET: self.get_asset,
            methods.LIST_ASSETS: self.list_assets,
            methods.UPDATE_ASSET: self.update_asset,
            methods.LIST_CHANNELS: self.list_channels,
            methods.CREATE_TAG: self.create_tag,
            methods.LIST_TAGS: self.list_tags,
            methods.GET_RULE: self.get_rule,
            methods.BATCH_GET_RULES: self.batch_get_rules,
            methods.CREATE_RULE: self.create_rule,
            methods.UPDATE_RULE: self.update_rule,
            methods.BATCH_UPDATE_RULES: self.batch_update_rules,
            methods.LIST_RULES: self.list_rules,
        }

    def stream_handlers(self) -> dict[str, StreamHandlerFactory]:
        """The client-streaming handler factories by method path."""
        return {methods.INGEST_WITH_CONFIG_DATA_STREAM: self.ingest_stream}

    def ingest_stream(self, ctx: CallContext) -> StreamHandler:
        """Start one IngestWithConfigDataStream call."""
        return _IngestStream(self, ctx)

    # -- ingest internals ----------------------------------------------------------------------

    def after_batch(self) -> None:
        """Write buffered samples in chunks; commit when the interval or row budget is reached."""
        rows = self.rows
        if len(rows) >= _WRITE_ROWS:
            self.store.insert_samples(rows)
            rows.clear()
        store = self.store
        if store.pending >= self.commit_rows or (
            (store.pending or rows) and time.monotonic() - self._last_commit >= self.commit_interval
        ):
            self.commit()

    def commit_if_due(self) -> None:
        """Commit what open streams delivered once ``commit_interval`` has passed (run by the
        server's tick, so a stream that went quiet is committed without waiting for its end)."""
        if (self.rows or self.store.pending) and (
            time.monotonic() - self._last_commit >= self.commit_interval
        ):
            self.commit()

    def commit(self) -> None:
        """Write every buffered sample and commit: all of it is then durable in the file."""
        if self.rows:
            self.store.insert_samples(self.rows)
            self.rows.clear()
        self.store.commit()
        self._last_commit = time.monotonic()

    def check_request(
        self, raw: bytes, shadow: Any, index: int, ctx: CallContext
    ) -> tuple[_Flow, int] | None:
        """The slow path: resolve and validate one request; (flow, run pk), or None if refused.

        Raises:
            RpcError: INVALID_ARGUMENT when the request is invalid and asks to end the stream.
        """
        self.full_parses += 1
        try:
            request = _parse_request(raw)
        except ProtobufDecodeError as exc:
            raise RpcError(
                grpc.StatusCode.INVALID_ARGUMENT, f"malformed request {index}: {exc}"
            ) from exc
        reason, flow, run_pk = self._validate(request, shadow)
        if reason is None:
            assert flow is not None
            return flow, run_pk
        self.validation_errors += 1
        self.store.insert_validation_errors(
            [
                ValidationErrorRecord(
                    time_ns=time.time_ns(),
                    ingestion_config_id=request.ingestion_config_id,
                    flow=request.flow,
                    run_id=request.run_id,
                    request_index=index,
                    reason=reason,
                    peer=ctx.peer,
                )
            ],
            max_rows=self.max_validation_errors,
        )
        if self.validation_errors <= 10 or self.validation_errors % 1000 == 0:
            log.warning(
                "validation error #%d from %s: %s", self.validation_errors, ctx.peer, reason
            )
        if request.end_stream_on_validation_error:
            self.commit()
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, reason)
        return None

    def _validate(
        self, request: ingest_pb2.IngestWithConfigDataStreamRequest, shadow: Any
    ) -> tuple[str | None, _Flow | None, int]:
        config_id = request.ingestion_config_id
        flow_name = request.flow
        flow = self.flows.get((shadow.ingestion_config_id, shadow.flow))
        if flow is None:
            if self.store.get_ingestion_config(config_id) is None:
                return f"unknown ingestion config {config_id!r}", None, 0
            record = self.store.get_flow(config_id, flow_name)
            if record is None:
                return f"unknown flow {flow_name!r} in ingestion config {config_id!r}", None, 0
            flow = _Flow.from_record(record)
            self.flows[(shadow.ingestion_config_id, shadow.flow)] = flow
        run_pk = 0
        if request.run_id:
            cached = self.runs.get(shadow.run_id)
            if cached is None:
                run = self.store.get_run(request.run_id)
                if run is None:
                    return f"unknown run {request.run_id!r}", flow, 0
                cached = self.runs[shadow.run_id] = run.pk
            run_pk = cached
        if not request.HasField("timestamp"):
            return f"request for flow {flow_name!r} has no timestamp", flow, run_pk
        timestamp_ns = _timestamp_ns(request, "timestamp")
        if timestamp_ns is None or timestamp_ns <= 0:
            return f"request for flow {flow_name!r} has a timestamp before 1970", flow, run_pk
        if timestamp_ns >= _MAX_TIMESTAMP_NS:
            reason = (
                f"request for flow {flow_name!r} has a timestamp after 2262-04-11, the latest"
                " the local server stores (integer nanoseconds)"
            )
            return reason, flow, run_pk
        values = request.channel_values
        if len(values) != len(flow.fields):
            return (
                (
                    f"flow {flow_name!r} has {len(flow.fields)} channels,"
                    f" the request has {len(values)} values"
                ),
                flow,
                run_pk,
            )
        for i, value in enumerate(values):
            kind = value.WhichOneof("type")
            if kind != flow.fields[i] and kind != "empty":
                return (
                    (
                        f"value {i} of flow {flow_name!r} (channel {flow.channel_names[i]!r})"
                        f" is {kind or 'not set'}, expected {flow.fields[i]}"
                    ),
                    flow,
                    run_pk,
                )
        try:
            signature = bytes([v[0] for v in shadow.channel_values])
        except IndexError:
            signature = b""
        if (
            len(flow.accepted) < _MAX_SIGNATURES
            and "string" not in flow.fields
            and all(
                got in (want, _EMPTY_TAG)
                for got, want in zip(signature, flow.expected, strict=False)
            )
            and len(signature) == len(flow.expected)
        ):
            flow.accepted.add(signature)
        return None, flow, run_pk

    # -- ingestion configs ---------------------------------------------------------------------

    def _config_or_404(self, ingestion_config_id: str) -> IngestionConfigRecord:
        return _found(
            self.store.get_ingestion_config(ingestion_config_id),
            f"ingestion config {ingestion_config_id!r}",
        )

    @staticmethod
    def _config_pb(record: IngestionConfigRecord) -> ic_pb2.IngestionConfig:
        return ic_pb2.IngestionConfig(
            ingestion_config_id=record.ingestion_config_id,
            asset_id=record.asset_id,
            client_key=record.client_key,
        )

    @staticmethod
    def _check_flows(flows: Any) -> list[tuple[str, bytes]]:
        seen: set[str] = set()
        checked: list[tuple[str, bytes]] = []
        for i, flow in enumerate(flows):
            if not flow.name:
                raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"flows[{i}]: name is empty")
            if flow.name in seen:
                raise RpcError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"flow {flow.name!r} appears twice"
                )
            seen.add(flow.name)
            channels: set[str] = set()
            for j, channel in enumerate(flow.channels):
                where = f"flow {flow.name!r} channels[{j}]"
                if not channel.name:
                    raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: name is empty")
                if channel.name in channels:
                    raise RpcError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"{where}: channel {channel.name!r} appears twice",
                    )
                channels.add(channel.name)
                if channel.data_type not in _FIELD_BY_TYPE:
                    raise RpcError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"{where}: invalid data type {channel.data_type}",
                    )
            checked.append((flow.name, flow.SerializeToString()))
        return checked

    def create_ingestion_config(self, data: bytes, ctx: CallContext) -> bytes:
        """CreateIngestionConfig: a new config (its asset created by name if new) and its flows.

        Raises:
            RpcError: INVALID_ARGUMENT (no asset name, bad flows), ALREADY_EXISTS (client key).
        """
        request: ic_pb2.CreateIngestionConfigRequest = _parse(
            ic_pb2.CreateIngestionConfigRequest, data
        )
        if not request.asset_name:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "asset_name is required")
        flows = self._check_flows(request.flows)
        if request.client_key and self.store.list_ingestion_configs(
            {"client_key": request.client_key}, limit=1
        ):
            raise RpcError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"an ingestion config with client key {request.client_key!r} exists",
            )
        try:
            record = self.store.create_ingestion_config(
                asset_name=request.asset_name,
                client_key=request.client_key,
                organization_id=request.organization_id,
            )
            if flows:
                self.store.add_flows(record.pk, flows)
        except DaqError as exc:
            raise RpcError(grpc.StatusCode.ALREADY_EXISTS, str(exc)) from exc
        log.info(
            "created ingestion config %s (asset %r, %d flows)",
            record.ingestion_config_id,
            record.asset_name,
            len(flows),
        )
        return ic_pb2.CreateIngestionConfigResponse(
            ingestion_config=self._config_pb(record)
        ).SerializeToString()

    def get_ingestion_config(self, data: bytes, ctx: CallContext) -> bytes:
        """GetIngestionConfig.

        Raises:
            RpcError: NOT_FOUND.
        """
        request: ic_pb2.GetIngestionConfigRequest = _parse(ic_pb2.GetIngestionConfigRequest, data)
        record = self._config_or_404(request.ingestion_config_id)
        return ic_pb2.GetIngestionConfigResponse(
            ingestion_config=self._config_pb(record)
        ).SerializeToString()

    def list_ingestion_configs(self, data: bytes, ctx: CallContext) -> bytes:
        """ListIngestionConfigs with ``client_key``/``ingestion_config_id``/``asset_id`` filters.

        Raises:
            RpcError: INVALID_ARGUMENT for a bad filter or page token.
        """
        request: ic_pb2.ListIngestionConfigsRequest = _parse(
            ic_pb2.ListIngestionConfigsRequest, data
        )
        records, token = _paged(request, self.store.list_ingestion_configs)
        return ic_pb2.ListIngestionConfigsResponse(
            ingestion_configs=[self._config_pb(r) for r in records], next_page_token=token
        ).SerializeToString()

    def create_ingestion_config_flows(self, data: bytes, ctx: CallContext) -> bytes:
        """CreateIngestionConfigFlows: all flows are added, or none.

        Raises:
            RpcError: NOT_FOUND (config), ALREADY_EXISTS (a flow name exists in the config),
                INVALID_ARGUMENT (bad flows).
        """
        request: ic_pb2.CreateIngestionConfigFlowsRequest = _parse(
            ic_pb2.CreateIngestionConfigFlowsRequest, data
        )
        record = self._config_or_404(request.ingestion_config_id)
        flows = self._check_flows(request.flows)
        existing = self.store.flow_names(record.pk)
        taken = [name for name, _ in flows if name in existing]
        if taken:
            raise RpcError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"flow {taken[0]!r} already exists in ingestion config"
                f" {record.ingestion_config_id!r}",
            )
        try:
            self.store.add_flows(record.pk, flows)
        except DaqError as exc:
            raise RpcError(grpc.StatusCode.ALREADY_EXISTS, str(exc)) from exc
        return ic_pb2.CreateIngestionConfigFlowsResponse().SerializeToString()

    def list_ingestion_config_flows(self, data: bytes, ctx: CallContext) -> bytes:
        """ListIngestionConfigFlows with a ``name`` filter.

        Raises:
            RpcError: NOT_FOUND (config), INVALID_ARGUMENT (filter, page token).
        """
        request: ic_pb2.ListIngestionConfigFlowsRequest = _parse(
            ic_pb2.ListIngestionConfigFlowsRequest, data
        )
        record = self._config_or_404(request.ingestion_config_id)
        flows, token = _paged(request, functools.partial(self.store.list_flows, record.pk))
        return ic_pb2.ListIngestionConfigFlowsResponse(
            flows=[f.flow_config() for f in flows], next_page_token=token
        ).SerializeToString()

    # -- runs ----------------------------------------------------------------------------------

    @staticmethod
    def _run_pb(record: RunRecord) -> runs_pb2.Run:
        run = runs_pb2.Run.FromString(record.metadata) if record.metadata else runs_pb2.Run()
        run.run_id = record.run_id
        run.name = record.name
        run.description = record.description
        run.tags.extend(record.tags)
        run.organization_id = record.organization_id
        run.is_stopped = record.is_stopped
        if record.client_key is not None:
            run.client_key = record.client_key
        _set_timestamp(run.created_date, record.created_ns)
        _set_timestamp(run.modified_date, record.modified_ns)
        if record.start_ns is not None:
            _set_timestamp(run.start_time, record.start_ns)
        if record.stop_ns is not None:
            _set_timestamp(run.stop_time, record.stop_ns)
        return run

    def create_run(self, data: bytes, ctx: CallContext) -> bytes:
        """CreateRun.

        Raises:
            RpcError: INVALID_ARGUMENT (no name), ALREADY_EXISTS (client key taken).
        """
        request: runs_pb2.CreateRunRequest = _parse(runs_pb2.CreateRunRequest, data)
        if not request.name:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "name is required")
        client_key = request.client_key if request.HasField("client_key") else None
        if client_key and self.store.list_runs({"client_key": client_key}, limit=1):
            raise RpcError(
                grpc.StatusCode.ALREADY_EXISTS, f"a run with client key {client_key!r} exists"
            )
        metadata = (
            runs_pb2.Run(metadata=request.metadata).SerializeToString() if request.metadata else b""
        )
        try:
            record = self.store.create_run(
                name=request.name,
                description=request.description,
                tags=list(request.tags),
                metadata=metadata,
                client_key=client_key,
                organization_id=request.organization_id,
                start_ns=_timestamp_ns(request, "start_time"),
                stop_ns=_timestamp_ns(request, "stop_time"),
            )
        except DaqError as exc:
            raise RpcError(grpc.StatusCode.ALREADY_EXISTS, str(exc)) from exc
        log.info("created run %s (%r)", record.run_id, record.name)
        return runs_pb2.CreateRunResponse(run=self._run_pb(record)).SerializeToString()

    def get_run(self, data: bytes, ctx: CallContext) -> bytes:
        """GetRun.

        Raises:
            RpcError: NOT_FOUND.
        """
        request: runs_pb2.GetRunRequest = _parse(runs_pb2.GetRunRequest, data)
        record = _found(self.store.get_run(request.run_id), f"run {request.run_id!r}")
        return runs_pb2.GetRunResponse(run=self._run_pb(record)).SerializeToString()

    def list_runs(self, data: bytes, ctx: CallContext) -> bytes:
        """ListRuns with a filter (``run_id``, ``name``, ``description``, ``client_key``,
        ``organization_id``, ``is_stopped``), newest first unless ``order_by`` is
        ``created_date [asc]``.

        Raises:
            RpcError: INVALID_ARGUMENT for a bad filter or page token.
        """
        request: runs_pb2.ListRunsRequest = _parse(runs_pb2.ListRunsRequest, data)
        records, token = _paged(request, self.store.list_runs, ordered=True)
        return runs_pb2.ListRunsResponse(
            runs=[self._run_pb(r) for r in records], next_page_token=token
        ).SerializeToString()

    def stop_run(self, data: bytes, ctx: CallContext) -> bytes:
        """StopRun: sets the stop time to now and ``is_stopped``.

        Raises:
            RpcError: NOT_FOUND.
        """
        request: runs_pb2.StopRunRequest = _parse(runs_pb2.StopRunRequest, data)
        _found(self.store.stop_run(request.run_id), f"run {request.run_id!r}")
        return runs_pb2.StopRunResponse().SerializeToString()

    def update_run(self, data: bytes, ctx: CallContext) -> bytes:
        """UpdateRun: the fields of ``update_mask`` (``is_pinned``/``is_archived`` are accepted and
        ignored). A client key can be set once: changing it is INVALID_ARGUMENT, as in Sift.

        Raises:
            RpcError: INVALID_ARGUMENT (no run id, bad mask, empty name, changed client key),
                NOT_FOUND, ALREADY_EXISTS (client key of another run).
        """
        request: runs_pb2.UpdateRunRequest = _parse(runs_pb2.UpdateRunRequest, data)
        run = request.run
        if not run.run_id:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "run.run_id is required")
        paths = _mask_paths(request, _RUN_UPDATABLE)
        record = _found(self.store.get_run(run.run_id), f"run {run.run_id!r}")
        changes: dict[str, object] = {}
        if "name" in paths:
            if not run.name:
                raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "run.name cannot be empty")
            changes["name"] = run.name
        if "description" in paths:
            changes["description"] = run.description
        if "tags" in paths:
            changes["tags"] = list(run.tags)
        if "metadata" in paths:
            changes["metadata"] = (
                runs_pb2.Run(metadata=run.metadata).SerializeToString() if run.metadata else b""
            )
        if "start_time" in paths:
            changes["start_ns"] = _timestamp_ns(run, "start_time")
        if "stop_time" in paths:
            changes["stop_ns"] = _timestamp_ns(run, "stop_time")
        if "client_key" in paths:
            key = run.client_key if run.HasField("client_key") and run.client_key else None
            if record.client_key is not None and key != record.client_key:
                raise RpcError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"run {run.run_id!r} already has client key {record.client_key!r};"
                    " a client key can only be set once",
                )
            if record.client_key is None and key is not None:
                changes["client_key"] = key
        try:
            updated = self.store.update_run(run.run_id, changes)
        except DaqError as exc:
            raise RpcError(grpc.StatusCode.ALREADY_EXISTS, str(exc)) from exc
        updated = _found(updated, f"run {run.run_id!r}")
        return runs_pb2.UpdateRunResponse(run=self._run_pb(updated)).SerializeToString()

    # -- assets --------------------------------------------------------------------------------

    @staticmethod
    def _asset_pb(record: AssetRecord) -> assets_pb2.Asset:
        asset = (
            assets_pb2.Asset.FromString(record.metadata) if record.metadata else assets_pb2.Asset()
        )
        asset.asset_id = record.asset_id
        asset.name = record.name
        asset.tags.extend(record.tags)
        _set_timestamp(asset.created_date, record.created_ns)
        _set_timestamp(asset.modified_date, record.modified_ns)
        return asset

    def get_asset(self, data: bytes, ctx: CallContext) -> bytes:
        """GetAsset.

        Raises:
            RpcError: NOT_FOUND.
        """
        request: assets_pb2.GetAssetRequest = _parse(assets_pb2.GetAssetRequest, data)
        record = _found(self.store.get_asset(request.asset_id), f"asset {request.asset_id!r}")
        return assets_pb2.GetAssetResponse(asset=self._asset_pb(record)).SerializeToString()

    def list_assets(self, data: bytes, ctx: CallContext) -> bytes:
        """ListAssets with a filter on ``asset_id``, ``name``, ``name_lower``, ``is_archived``,
        newest first unless ``order_by`` is ``created_date [asc]``.

        Raises:
            RpcError: INVALID_ARGUMENT for a bad filter or page token.
        """
        request: assets_pb2.ListAssetsRequest = _parse(assets_pb2.ListAssetsRequest, data)
        records, token = _paged(request, self.store.list_assets, ordered=True)
        return assets_pb2.ListAssetsResponse(
            assets=[self._asset_pb(r) for r in records], next_page_token=token
        ).SerializeToString()

    def update_asset(self, data: bytes, ctx: CallContext) -> bytes:
        """UpdateAsset: ``tags`` and ``metadata`` (``is_archived``/``archived_date`` accepted and
        ignored: the local server does not archive).

        Raises:
            RpcError: INVALID_ARGUMENT (no asset id, no or unknown mask path), NOT_FOUND.
        """
        request: assets_pb2.UpdateAssetRequest = _parse(assets_pb2.UpdateAssetRequest, data)
        asset = request.asset
        if not asset.asset_id:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "asset.asset_id is required")
        paths = _mask_paths(request, {"tags", "metadata", "is_archived", "archived_date"})
        record = self.store.update_asset(
            asset.asset_id,
            tags=list(asset.tags) if "tags" in paths else None,
            metadata=(
                assets_pb2.Asset(metadata=asset.metadata).SerializeToString()
                if "metadata" in paths
                else None
            ),
        )
        record = _found(record, f"asset {asset.asset_id!r}")
        return assets_pb2.UpdateAssetResponse(asset=self._asset_pb(record)).SerializeToString()

    # -- channels and tags ---------------------------------------------------------------------

    def list_channels(self, data: bytes, ctx: CallContext) -> bytes:
        """ListChannels (v3): an asset's channels are those of its configs' flows; filter fields
        ``channel_id``, ``asset_id``, ``name``.

        Raises:
            RpcError: INVALID_ARGUMENT for a bad filter or page token.
        """
        request: channels_pb2.ListChannelsRequest = _parse(channels_pb2.ListChannelsRequest, data)
        records, token = _paged(request, self.store.list_channels)
        channels = []
        for record in records:
            config = record.channel_config()
            channel = channels_pb2.Channel(
                channel_id=record.channel_id,
                name=record.name,
                asset_id=record.asset_id,
                description=config.description,
                data_type=config.data_type,
                enum_types=config.enum_types,
                bit_field_elements=config.bit_field_elements,
                active=True,
            )
            _set_timestamp(channel.created_date, record.created_ns)
            _set_timestamp(channel.modified_date, record.created_ns)
            channels.append(channel)
        return channels_pb2.ListChannelsResponse(
            channels=channels, next_page_token=token
        ).SerializeToString()

    def create_tag(self, data: bytes, ctx: CallContext) -> bytes:
        """CreateTag.

        Raises:
            RpcError: INVALID_ARGUMENT (no name), ALREADY_EXISTS.
        """
        request: tags_pb2.CreateTagRequest = _parse(tags_pb2.CreateTagRequest, data)
        if not request.name:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "name is required")
        try:
            record = self.store.create_tag(request.name)
        except DaqError as exc:
            raise RpcError(grpc.StatusCode.ALREADY_EXISTS, str(exc)) from exc
        return tags_pb2.CreateTagResponse(tag=self._tag_pb(record)).SerializeToString()

    @staticmethod
    def _tag_pb(record: TagRecord) -> tags_pb2.Tag:
        tag = tags_pb2.Tag(tag_id=record.tag_id, name=record.name)
        _set_timestamp(tag.created_date, record.created_ns)
        return tag

    def list_tags(self, data: bytes, ctx: CallContext) -> bytes:
        """ListTags with a filter on ``tag_id``/``name``; ``tag_type`` is accepted and ignored
        (every tag is listed whatever it tags).

        Raises:
            RpcError: INVALID_ARGUMENT for a bad filter or page token.
        """
        request: tags_pb2.ListTagsRequest = _parse(tags_pb2.ListTagsRequest, data)
        records, token = _paged(request, self.store.list_tags)
        return tags_pb2.ListTagsResponse(
            tags=[self._tag_pb(r) for r in records], next_page_token=token
        ).SerializeToString()

    # -- rules ---------------------------------------------------------------------------------

    @staticmethod
    def _rule_pb(record: RuleRecord) -> rules_pb2.Rule:
        rule = rules_pb2.Rule.FromString(record.definition)
        _set_timestamp(rule.created_date, record.created_ns)
        _set_timestamp(rule.modified_date, record.modified_ns)
        return rule

    def _existing_rule(self, update: rules_pb2.UpdateRuleRequest) -> RuleRecord | None:
        """The rule an update names by ``rule_id`` (which must exist) or else by ``client_key``.

        Raises:
            RpcError: NOT_FOUND for a ``rule_id`` that does not exist.
        """
        if update.HasField("rule_id") and update.rule_id:
            return _found(self.store.get_rule(rule_id=update.rule_id), f"rule {update.rule_id!r}")
        if update.HasField("client_key") and update.client_key:
            return self.store.get_rule(client_key=update.client_key)
        return None

    def _build_rule(
        self, update: rules_pb2.UpdateRuleRequest, rule_id: str, previous: RuleRecord | None
    ) -> rules_pb2.Rule:
        """The rule an UpdateRuleRequest describes, with ids for its conditions and actions
        (those it names that exist are kept).

        Raises:
            RpcError: INVALID_ARGUMENT for a missing name or expression, an unknown asset or tag,
                or a client key that differs from the rule's.
        """
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        if not update.name:
            raise RpcError(invalid, "name is required")
        old = rules_pb2.Rule.FromString(previous.definition) if previous else rules_pb2.Rule()
        client_key = update.client_key if update.HasField("client_key") else ""
        if previous is not None and previous.client_key:
            if client_key and client_key != previous.client_key:
                raise RpcError(
                    invalid,
                    f"rule {rule_id!r} has client key {previous.client_key!r};"
                    " a client key can only be set once",
                )
            client_key = previous.client_key
        if not update.conditions:
            raise RpcError(invalid, "a rule needs at least one condition")
        assets = update.asset_configuration
        for asset_id in assets.asset_ids:
            if self.store.get_asset(asset_id) is None:
                raise RpcError(
                    invalid, f"asset_configuration.asset_ids: unknown asset {asset_id!r}"
                )
        for tag_id in assets.tag_ids:
            if not self.store.list_tags({"tag_id": tag_id}, limit=1):
                raise RpcError(invalid, f"asset_configuration.tag_ids: unknown tag {tag_id!r}")
        old_conditions = {c.rule_condition_id: c for c in old.conditions}
        rule = rules_pb2.Rule(
            rule_id=rule_id,
            name=update.name,
            description=update.description,
            is_enabled=True,
            organization_id=update.organization_id or old.organization_id,
            client_key=client_key,
            asset_configuration=assets,
            contextual_channels=update.contextual_channels,
            is_external=update.is_external,
            metadata=update.metadata,
            is_archived=update.is_archived,
            is_live_evaluation_enabled=(
                update.is_live_evaluation_enabled
                if update.HasField("is_live_evaluation_enabled")
                else old.is_live_evaluation_enabled
            ),
            current_version_id=str(uuid.uuid4()),
        )
        for i, condition in enumerate(update.conditions):
            kind = condition.expression.WhichOneof("expression")
            if kind is None:
                raise RpcError(invalid, f"conditions[{i}].expression is required")
            if (
                kind == "calculated_channel"
                and not condition.expression.calculated_channel.expression
            ):
                raise RpcError(invalid, f"conditions[{i}]: the expression is empty")
            before = old_conditions.get(condition.rule_condition_id)
            condition_id = before.rule_condition_id if before else str(uuid.uuid4())
            old_actions = {a.rule_action_id for a in before.actions} if before else set()
            stored = rule.conditions.add(
                rule_condition_id=condition_id,
                rule_id=rule_id,
                expression=condition.expression,
                rule_condition_version_id=str(uuid.uuid4()),
            )
            for action in condition.actions:
                for tag_id in action.configuration.annotation.tag_ids:
                    if not self.store.list_tags({"tag_id": tag_id}, limit=1):
                        raise RpcError(
                            invalid, f"conditions[{i}].actions: unknown annotation tag {tag_id!r}"
                        )
                stored.actions.add(
                    rule_action_id=(
                        action.rule_action_id
                        if action.rule_action_id in old_actions
                        else str(uuid.uuid4())
                    ),
                    rule_condition_id=condition_id,
                    action_type=action.action_type,
                    configuration=action.configuration,
                    rule_action_version_id=str(uuid.uuid4()),
                )
        return rule

    def _save_rule(
        self, update: rules_pb2.UpdateRuleRequest, previous: RuleRecord | None
    ) -> RuleRecord:
        """Create (``previous`` None) or replace a rule.

        Raises:
            RpcError: INVALID_ARGUMENT (see :meth:`_build_rule`), ALREADY_EXISTS (client key).
        """
        rule_id = previous.rule_id if previous is not None else str(uuid.uuid4())
        rule = self._build_rule(update, rule_id, previous)
        try:
            if previous is None:
                return self.store.create_rule(
                    rule_id=rule_id,
                    name=rule.name,
                    client_key=rule.client_key or None,
                    definition=rule.SerializeToString(),
                )
            record = self.store.update_rule(
                rule_id,
                name=rule.name,
                client_key=rule.client_key or None,
                definition=rule.SerializeToString(),
            )
        except DaqError as exc:
            raise RpcError(grpc.StatusCode.ALREADY_EXISTS, str(exc)) from exc
        return _found(record, f"rule {rule_id!r}")

    def get_rule(self, data: bytes, ctx: CallContext) -> bytes:
        """GetRule by ``rule_id`` or else ``client_key``.

        Raises:
            RpcError: INVALID_ARGUMENT (neither given), NOT_FOUND.
        """
        request: rules_pb2.GetRuleRequest = _parse(rules_pb2.GetRuleRequest, data)
        if not request.rule_id and not request.client_key:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "rule_id or client_key is required")
        record = self.store.get_rule(
            rule_id=request.rule_id or None, client_key=request.client_key or None
        )
        which = (
            repr(request.rule_id) if request.rule_id else f"with client key {request.client_key!r}"
        )
        record = _found(record, f"rule {which}")
        return rules_pb2.GetRuleResponse(rule=self._rule_pb(record)).SerializeToString()

    def batch_get_rules(self, data: bytes, ctx: CallContext) -> bytes:
        """BatchGetRules by ids and client keys.

        Raises:
            RpcError: NOT_FOUND naming the first that does not exist.
        """
        request: rules_pb2.BatchGetRulesRequest = _parse(rules_pb2.BatchGetRulesRequest, data)
        rules = []
        for rule_id in request.rule_ids:
            record = _found(self.store.get_rule(rule_id=rule_id), f"rule {rule_id!r}")
            rules.append(self._rule_pb(record))
        for client_key in request.client_keys:
            record = _found(
                self.store.get_rule(client_key=client_key), f"rule with client key {client_key!r}"
            )
            rules.append(self._rule_pb(record))
        return rules_pb2.BatchGetRulesResponse(rules=rules).SerializeToString()

    def create_rule(self, data: bytes, ctx: CallContext) -> bytes:
        """CreateRule: the rule its ``update`` describes (stored, never evaluated).

        Raises:
            RpcError: INVALID_ARGUMENT (see :meth:`_build_rule`, or a rule id given),
                ALREADY_EXISTS (client key).
        """
        request: rules_pb2.CreateRuleRequest = _parse(rules_pb2.CreateRuleRequest, data)
        update = request.update
        if update.rule_id:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "a new rule cannot have a rule_id")
        if update.client_key and self.store.get_rule(client_key=update.client_key) is not None:
            raise RpcError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"a rule with client key {update.client_key!r} exists",
            )
        record = self._save_rule(update, None)
        log.info("created rule %s (%r)", record.rule_id, record.name)
        return rules_pb2.CreateRuleResponse(rule_id=record.rule_id).SerializeToString()

    def update_rule(self, data: bytes, ctx: CallContext) -> bytes:
        """UpdateRule: replaces the rule named by ``rule_id`` or ``client_key``.

        Raises:
            RpcError: INVALID_ARGUMENT (neither given, or see :meth:`_build_rule`), NOT_FOUND.
        """
        request: rules_pb2.UpdateRuleRequest = _parse(rules_pb2.UpdateRuleRequest, data)
        if not request.rule_id and not request.client_key:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "rule_id or client_key is required")
        previous = _found(
            self._existing_rule(request), f"rule with client key {request.client_key!r}"
        )
        record = self._save_rule(request, previous)
        return rules_pb2.UpdateRuleResponse(rule_id=record.rule_id).SerializeToString()

    def batch_update_rules(self, data: bytes, ctx: CallContext) -> bytes:
        """BatchUpdateRules: creates or updates every rule, or none when one is invalid (then
        ``success`` is false and its ValidationResult says why); ``validate_only`` writes nothing.
        """
        request: rules_pb2.BatchUpdateRulesRequest = _parse(rules_pb2.BatchUpdateRulesRequest, data)
        response = rules_pb2.BatchUpdateRulesResponse(validate_only=request.validate_only)
        plans: list[tuple[rules_pb2.UpdateRuleRequest, RuleRecord | None]] = []
        for update in request.rules:
            try:
                previous = self._existing_rule(update)
                self._build_rule(update, previous.rule_id if previous else "", previous)
            except RpcError as exc:
                response.validation_results.add(
                    rule_id=update.rule_id,
                    client_key=update.client_key,
                    rule_name=update.name,
                    error=exc.message,
                )
                continue
            plans.append((update, previous))
        response.success = not response.validation_results
        if not response.success or request.validate_only:
            return response.SerializeToString()
        for update, previous in plans:
            record = self._save_rule(update, previous)
            if previous is None:
                response.rules_created_count += 1
                identifier = response.created_rule_identifiers.add(
                    rule_id=record.rule_id, name=record.name
                )
                if record.client_key:
                    identifier.client_key = record.client_key
            else:
                response.rules_updated_count += 1
        return response.SerializeToString()

    def list_rules(self, data: bytes, ctx: CallContext) -> bytes:
        """ListRules with a filter on ``rule_id``, ``client_key``, ``name`` (newest first unless
        ``order_by`` is ``created_date [asc]``).

        Raises:
            RpcError: INVALID_ARGUMENT for a bad filter, order or page token.
        """
        request: rules_pb2.ListRulesRequest = _parse(rules_pb2.ListRulesRequest, data)
        records, token = _paged(request, self.store.list_rules, ordered=True)
        return rules_pb2.ListRulesResponse(
            rules=[self._rule_pb(r) for r in records], next_page_token=token
        ).SerializeToString()

    # -- ping ----------------------------------------------------------------------------------

    def ping(self, data: bytes, ctx: CallContext) -> bytes:
        """Ping."""
        _parse(ping_pb2.PingRequest, data)
        return ping_pb2.PingResponse(response=PING_RESPONSE).SerializeToString()
