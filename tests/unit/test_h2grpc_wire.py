"""gRPC message framing: reassembly over any split, linear time, limits after decompression."""

from __future__ import annotations

import itertools
import time
import zlib

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from daq_agent.h2grpc.wire import FramingError, MessageReader, frame

MIB = 1024 * 1024


def _compressed(payload: bytes, wbits: int) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, wbits)
    body = compressor.compress(payload) + compressor.flush()
    return b"\x01" + len(body).to_bytes(4, "big") + body


@given(
    payloads=st.lists(st.binary(max_size=300), max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=7000), max_size=30),
)
def test_any_split_of_the_bytes_gives_the_same_messages(
    payloads: list[bytes], cuts: list[int]
) -> None:
    """However DATA frames cut the stream, the messages come out whole and in order."""
    data = frame(payloads)
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    reader = MessageReader()
    out: list[bytes] = []
    for start, end in itertools.pairwise(bounds):
        out.extend(reader.feed(data[start:end]))
        assert reader.pending == end - len(frame(out))
    assert out == payloads
    assert reader.pending == 0


def test_reassembly_is_linear_in_the_message_size() -> None:
    """4 MiB in 1 KiB pieces is parsed in milliseconds (copying the buffer per piece took ~1 s)."""
    data = frame([bytes(4 * MIB - 5)])
    pieces = [data[i : i + 1024] for i in range(0, len(data), 1024)]
    best = float("inf")
    for _ in range(3):
        reader = MessageReader()
        started = time.perf_counter()
        messages = [m for piece in pieces for m in reader.feed(piece)]
        best = min(best, time.perf_counter() - started)
        assert [len(m) for m in messages] == [4 * MIB - 5]
    assert best < 0.1


@pytest.mark.parametrize(("encoding", "wbits"), [("gzip", 31), ("deflate", 15)])
def test_the_limit_applies_to_the_decompressed_message(encoding: str, wbits: int) -> None:
    """A message exactly at the limit once inflated passes; one byte more is RESOURCE_EXHAUSTED."""
    limit = 64 * 1024
    reader = MessageReader(encoding=encoding, max_message_bytes=limit)
    assert reader.feed(_compressed(bytes(limit), wbits)) == [bytes(limit)]
    with pytest.raises(FramingError, match="once decompressed") as caught:
        reader.feed(_compressed(bytes(limit + 1), wbits))
    assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_message_whose_prefix_exceeds_the_limit_is_refused_before_it_arrives() -> None:
    """The length prefix alone is enough to refuse: nothing of the body is buffered."""
    reader = MessageReader(max_message_bytes=1000)
    with pytest.raises(FramingError, match="larger than max") as caught:
        reader.feed(b"\x00" + (1001).to_bytes(4, "big"))
    assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(
    ("encoding", "data", "match"),
    [
        ("identity", _compressed(b"abc", 31), "without a grpc-encoding"),
        ("gzip", _compressed(b"abc" * 100, 31)[:-6], "truncated"),
        ("gzip", b"\x01\x00\x00\x00\x04junk", "bad gzip message"),
        ("deflate", _compressed(b"abc", 31), "bad deflate message"),
    ],
    ids=["no-encoding", "truncated", "corrupt", "wrong-format"],
)
def test_bad_compression_is_an_internal_error(encoding: str, data: bytes, match: str) -> None:
    """A compressed message the reader cannot inflate ends the call with INTERNAL."""
    reader = MessageReader(encoding=encoding)
    if match == "truncated":  # the prefix must still describe the shortened body
        data = b"\x01" + (len(data) - 5).to_bytes(4, "big") + data[5:]
    with pytest.raises(FramingError, match=match) as caught:
        reader.feed(data)
    assert caught.value.code is grpc.StatusCode.INTERNAL
