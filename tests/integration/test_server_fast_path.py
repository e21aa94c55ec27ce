"""The ingest fast path and the full parse agree: a property test over random and mutated wire
bytes, with the decision of the real handler checked against an oracle built only on the full
protobuf parse and the flows' definitions."""

from __future__ import annotations

import math
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daq_agent._proto.sift.common.type.v1 import channel_data_type_pb2 as cdt
from daq_agent._proto.sift.ingest.v1 import ingest_pb2
from daq_agent._proto.sift.ingestion_configs.v2 import ingestion_configs_pb2 as ic
from daq_agent._proto.sift.runs.v2 import runs_pb2
from daq_agent.server.rpc import CallContext, RpcError
from daq_agent.server.services import LocalServices
from daq_agent.server.store import Store, decode_values

pytestmark = pytest.mark.integration

CTX = CallContext(method="test", peer="test-peer")
Request = ingest_pb2.IngestWithConfigDataStreamRequest

# (wire field number, wire type) of each value type, and the ChannelDataType
TYPES: dict[str, tuple[int, int, int]] = {
    "string": (1, 2, cdt.CHANNEL_DATA_TYPE_STRING),
    "double": (2, 1, cdt.CHANNEL_DATA_TYPE_DOUBLE),
    "float": (3, 5, cdt.CHANNEL_DATA_TYPE_FLOAT),
    "bool": (4, 0, cdt.CHANNEL_DATA_TYPE_BOOL),
    "int32": (5, 0, cdt.CHANNEL_DATA_TYPE_INT_32),
    "uint32": (6, 0, cdt.CHANNEL_DATA_TYPE_UINT_32),
    "int64": (7, 0, cdt.CHANNEL_DATA_TYPE_INT_64),
    "uint64": (8, 0, cdt.CHANNEL_DATA_TYPE_UINT_64),
    "bit_field": (9, 2, cdt.CHANNEL_DATA_TYPE_BIT_FIELD),
    "enum": (10, 0, cdt.CHANNEL_DATA_TYPE_ENUM),
    "bytes": (12, 2, cdt.CHANNEL_DATA_TYPE_BYTES),
}
FLOWS = {
    # only fixed and varint types: the compiled-pattern fast path
    "fixed": ("double", "float", "int32", "uint64", "bool", "enum"),
    # length-delimited types: the signature fast path
    "mixed": ("double", "bytes", "bit_field", "int64"),
    # strings: always the full parse
    "text": ("string", "double"),
}


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while value > 0x7F:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)
    return bytes(out)


def field(number: int, wire: int, payload: bytes) -> bytes:
    """One serialized field; ``payload`` is the value (a varint, fixed bytes, or the content of a
    length-delimited field)."""
    tag = varint(number << 3 | wire)
    if wire == 2:
        return tag + varint(len(payload)) + payload
    return tag + payload


@dataclass
class Setup:
    services: LocalServices
    config_id: str
    run_id: str
    flow_pks: dict[str, int]
    run_pk: int


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    """Services over one store with the three flows and a run (shared by all examples)."""
    with tempfile.TemporaryDirectory() as tmp, Store.open(Path(tmp) / "s.sqlite") as store:
        services = LocalServices(store)
        request = ic.CreateIngestionConfigRequest(
            asset_name="rig",
            client_key="k",
            flows=[
                ic.FlowConfig(
                    name=name,
                    channels=[
                        ic.ChannelConfig(name=f"c{i}", data_type=TYPES[t][2])
                        for i, t in enumerate(types)
                    ],
                )
                for name, types in FLOWS.items()
            ],
        )
        config_id = ic.CreateIngestionConfigResponse.FromString(
            services.create_ingestion_config(request.SerializeToString(), CTX)
        ).ingestion_config.ingestion_config_id
        run = runs_pb2.CreateRunResponse.FromString(
            services.create_run(runs_pb2.CreateRunRequest(name="r").SerializeToString(), CTX)
        ).run
        flow_pks = {f.name: f.pk for f in store.list_flows()}
        run_record = store.get_run(run.run_id)
        assert run_record is not None
        yield Setup(services, config_id, run.run_id, flow_pks, run_record.pk)


# -- the oracle --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    outcome: str  # "accept", "refuse" (a validation error) or "error" (the stream ends)
    values: tuple[Any, ...] = ()
    timestamp_ns: int = 0
    flow: str = ""
    run: bool = False


def oracle(raw: bytes, setup: Setup) -> Verdict:
    """What the server must decide, from the full parse and the flow definitions only."""
    try:
        request = Request.FromString(raw)
    except Exception:
        return Verdict("error")
    refuse = Verdict("error" if request.end_stream_on_validation_error else "refuse")
    types = FLOWS.get(request.flow)
    if request.ingestion_config_id != setup.config_id or types is None:
        return refuse
    if request.run_id not in ("", setup.run_id):
        return refuse
    if not request.HasField("timestamp"):
        return refuse
    ts = request.timestamp.seconds * 1_000_000_000 + request.timestamp.nanos
    if not 0 < ts < 2**63 or len(request.channel_values) != len(types):
        return refuse
    values = []
    for value, expected in zip(request.channel_values, types, strict=True):
        kind = value.WhichOneof("type")
        if kind == "empty":
            values.append(None)
        elif kind == expected:
            values.append(getattr(value, kind))
        else:
            return refuse
    return Verdict("accept", tuple(values), ts, request.flow, bool(request.run_id))


def same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Equal, with NaN equal to NaN and -0.0 apart from 0.0 (the bytes must round-trip)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if isinstance(x, float) and isinstance(y, float):
            if struct.pack("<d", x) != struct.pack("<d", y) and not (
                math.isnan(x) and math.isnan(y)
            ):
                return False
        elif x != y or type(x) is not type(y):
            return False
    return True


def handle(raw: bytes, setup: Setup) -> tuple[str, bool, Any]:
    """Feed one request to a real ingest handler: (outcome, fast path taken, stored row)."""
    services = setup.services
    rows_before, full_before = len(services.rows), services.full_parses
    errors_before = services.validation_errors
    handler = services.ingest_stream(CTX)
    try:
        handler.on_messages([raw])
    except RpcError:
        outcome = "error"
    else:
        if len(services.rows) > rows_before:
            outcome = "accept"
        else:
            assert services.validation_errors == errors_before + 1
            outcome = "refuse"
    row = services.rows[-1] if outcome == "accept" else None
    # (a request that does not even parse as the shadow ends the stream before any path)
    fast = outcome == "accept" and services.full_parses == full_before
    services.rows.clear()  # keep the shared store small: nothing is written
    return outcome, fast, row


def check(raw: bytes, setup: Setup) -> bool:
    """The handler decides as the oracle does and stores what the full parse reads; returns
    whether the fast path took it."""
    expected = oracle(raw, setup)
    outcome, fast, row = handle(raw, setup)
    assert outcome == expected.outcome, (raw.hex(), expected)
    if outcome == "accept":
        flow_pk, run_pk, ts, data = row
        assert flow_pk == setup.flow_pks[expected.flow]
        assert run_pk == (setup.run_pk if expected.run else 0)
        assert ts == expected.timestamp_ns
        stored = tuple(decode_values(data))
        assert same(stored, expected.values), (raw.hex(), stored, expected.values)
    return fast


# -- strategies --------------------------------------------------------------------------------


def payload(kind: str, draw: Any) -> bytes:
    """A well-formed payload of a value of ``kind``."""
    wire = TYPES[kind][1]
    if kind == "string":
        return str(draw(st.text(max_size=6))).encode()
    if wire == 2:
        return bytes(draw(st.binary(max_size=6)))
    if kind == "double":
        return struct.pack("<d", draw(st.floats(allow_nan=True, allow_infinity=True)))
    if kind == "float":
        return struct.pack("<f", draw(st.floats(width=32)))
    return varint(draw(st.integers(min_value=-(2**63), max_value=2**64 - 1)))


def value_field(kind: str, draw: Any) -> bytes:
    if kind == "empty":
        return field(11, 2, b"")
    number, wire, _ = TYPES[kind]
    return field(number, wire, payload(kind, draw))


KINDS = [*TYPES, "empty"]


@st.composite
def requests(draw: Any, setup: Setup) -> bytes:
    """A request: mostly well-typed values of a known flow, serialized canonically or not, then
    perhaps mutated at the wire level."""
    flow = draw(st.sampled_from([*FLOWS, "unknown"]))
    types = FLOWS.get(flow, ("double",))
    values = []
    for expected in types:
        kind = draw(st.sampled_from([expected] * 24 + ["empty"] * 2 + KINDS))
        value = value_field(kind, draw)
        extra = draw(st.sampled_from(["none"] * 12 + ["field"] * 2 + ["repeat", "garbage", "cut"]))
        if extra == "field":  # a second field in the same value: the last one wins
            value += value_field(draw(st.sampled_from(KINDS)), draw)
        elif extra == "repeat":
            value += value
        elif extra == "garbage":
            value += draw(st.binary(min_size=1, max_size=3))
        elif extra == "cut" and len(value) > 1:
            value = value[: draw(st.integers(1, len(value) - 1))]
        values.append(field(4, 2, value))
    count = draw(st.sampled_from(["same"] * 8 + ["fewer", "more"]))
    if count == "fewer" and values:
        values.pop()
    elif count == "more":
        values.append(field(4, 2, value_field(draw(st.sampled_from(KINDS)), draw)))
    seconds = draw(st.sampled_from([1_700_000_000] * 6 + [0, -5, 2**40]))
    nanos = draw(st.sampled_from([123_456_789] * 3 + [0, 999_999_999, -1, 7]))
    timestamp = (field(1, 0, varint(seconds)) if seconds else b"") + (
        field(2, 0, varint(nanos)) if nanos else b""
    )
    fields = [
        field(1, 2, draw(st.sampled_from([setup.config_id.encode()] * 9 + [b"other"]))),
        field(2, 2, flow.encode()),
    ]
    if draw(st.integers(0, 9)):
        fields.append(field(3, 2, timestamp))
    fields.extend(values)
    run = draw(st.sampled_from(["none"] * 4 + ["run"] * 3 + ["unknown", "empty"]))
    if run != "none":
        run_id = {"run": setup.run_id, "unknown": "nope", "empty": ""}[run]
        fields.append(field(5, 2, run_id.encode()))
    org = draw(st.sampled_from([b""] * 10 + [b"org", b"\xff\xfe", "é".encode()]))
    if org:
        fields.append(field(7, 2, org))
    if draw(st.integers(0, 19)) == 0:
        fields.append(field(6, 0, b"\x01"))  # end the stream on a validation error
    if draw(st.integers(0, 9)) == 0:
        fields.append(field(99, 0, b"\x05"))  # an unknown field
    if draw(st.integers(0, 9)) == 0:
        fields = draw(st.permutations(fields))  # non-canonical order
    raw = b"".join(fields)
    mutation = draw(st.sampled_from(["none"] * 16 + ["flip", "insert", "delete", "truncate"]))
    if mutation != "none" and raw:
        at = draw(st.integers(0, len(raw) - 1))
        if mutation == "flip":
            raw = raw[:at] + bytes([raw[at] ^ (1 << draw(st.integers(0, 7)))]) + raw[at + 1 :]
        elif mutation == "insert":
            raw = raw[:at] + draw(st.binary(min_size=1, max_size=2)) + raw[at:]
        elif mutation == "delete":
            raw = raw[:at] + raw[at + 1 :]
        else:
            raw = raw[:at]
    return raw


# -- the tests ---------------------------------------------------------------------------------


@settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=st.data())
def test_fast_path_and_full_parse_agree(setup: Setup, data: Any) -> None:
    """For random and mutated requests the handler accepts, refuses or ends the stream exactly
    as the full parse says, and what it stores decodes to the values the full parse reads."""
    check(data.draw(requests(setup)), setup)


def _canonical(
    setup: Setup, flow: str, *values: ingest_pb2.IngestWithConfigDataChannelValue
) -> bytes:
    request = Request(ingestion_config_id=setup.config_id, flow=flow, channel_values=values)
    request.timestamp.FromNanoseconds(1_700_000_000_123_456_789)
    return request.SerializeToString()


def test_canonical_requests_take_the_fast_path(setup: Setup) -> None:
    """Well-formed requests of fixed/varint and of bytes/bit-field flows take the fast path
    (so the property above tests it), and string flows always the full parse."""
    V = ingest_pb2.IngestWithConfigDataChannelValue
    fixed = _canonical(
        setup, "fixed", V(double=1.5), V(float=2.0), V(int32=-3), V(uint64=4), V(bool=True),
        V(enum=2),
    )  # fmt: skip
    mixed = _canonical(
        setup, "mixed", V(double=1.0), V(bytes=b"ab"), V(bit_field=b"\x01"), V(int64=-1)
    )
    with_empty = _canonical(
        setup, "mixed", V(double=1.0), V(empty={}), V(bit_field=b""), V(int64=9)
    )
    text = _canonical(setup, "text", V(string="é"), V(double=0.0))
    for first in (fixed, mixed, with_empty):  # a flow's first request, and the first of a
        check(first, setup)  # signature, are learnt by the full parse
    assert check(fixed, setup)
    assert check(mixed, setup)
    assert check(with_empty, setup)
    assert not check(text, setup)


def test_a_bytes_value_with_a_double_appended_is_not_stored(setup: Setup) -> None:
    """A value whose first field is bytes and whose last is a double is a double to the full
    parse: in a bytes channel it is a validation error, never stored (the fast path once took
    the first byte for the type)."""
    V = ingest_pb2.IngestWithConfigDataChannelValue
    good = _canonical(
        setup, "mixed", V(double=1.0), V(bytes=b"ab"), V(bit_field=b"\x01"), V(int64=-1)
    )
    check(good, setup)  # the signature is now known to the fast path
    smuggled = V(bytes=b"ab").SerializeToString() + V(double=6.25).SerializeToString()
    assert V.FromString(smuggled).WhichOneof("type") == "double"
    raw = good.replace(field(4, 2, V(bytes=b"ab").SerializeToString()), field(4, 2, smuggled))
    assert raw != good
    outcome, fast, _ = handle(raw, setup)
    assert (outcome, fast) == ("refuse", False)


def test_a_request_the_full_parse_refuses_is_never_stored(setup: Setup) -> None:
    """An organization id that is not UTF-8 makes the whole request malformed to the full parse,
    so the fast path must not take it; a timestamp past 2262 (beyond int64 ns) is refused rather
    than poisoning the write buffer."""
    V = ingest_pb2.IngestWithConfigDataChannelValue
    fixed = _canonical(
        setup, "fixed", V(double=1.5), V(float=2.0), V(int32=-3), V(uint64=4), V(bool=True),
        V(enum=2),
    )  # fmt: skip
    mixed = _canonical(
        setup, "mixed", V(double=1.0), V(bytes=b"ab"), V(bit_field=b"\x01"), V(int64=-1)
    )
    for good in (fixed, mixed):
        check(good, setup)  # learnt by the full parse; from now on the fast path's
        assert check(good, setup)
        assert handle(good + field(7, 2, b"\xff"), setup)[0] == "error"
        late = Request.FromString(good)
        late.timestamp.seconds = 2**40
        assert check(late.SerializeToString(), setup) is False
        assert handle(late.SerializeToString(), setup)[0] == "refuse"
    setup.services.commit()  # nothing unwritable was buffered
