"""candump log lines: classic, extended, FD, remote and error frames; bad lines are counted."""

from __future__ import annotations

from pathlib import Path

import can
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daq_agent.core.errors import DecodeError
from daq_agent.decode.candump import CandumpFrame, CandumpParser, parse_candump_line


def test_classic_standard_frame() -> None:
    """A 3-digit id is a standard frame; the timestamp becomes exact nanoseconds."""
    frame = parse_candump_line("(1700000000.123456) can0 1F0#0102030405060708")
    assert frame == CandumpFrame(
        timestamp_ns=1_700_000_000_123_456_000,
        channel="can0",
        frame_id=0x1F0,
        is_extended=False,
        data=bytes(range(1, 9)),
        dlc=8,
    )


def test_eight_digit_id_is_extended_even_when_small() -> None:
    """An id written with 8 hex digits is a 29-bit id, even below 0x800."""
    frame = parse_candump_line("(1.5) vcan1 00000100#AA")
    assert frame is not None
    assert frame.is_extended
    assert frame.frame_id == 0x100
    assert frame.timestamp_ns == 1_500_000_000
    assert frame.channel == "vcan1"


def test_fd_frame_flags_and_length() -> None:
    """``##`` marks CAN FD; the first digit carries BRS and ESI; the length must be an FD one."""
    frame = parse_candump_line("(2.0) can0 18FF60E5##3" + "11" * 64)
    assert frame is not None
    assert frame.is_fd
    assert frame.bitrate_switch
    assert frame.error_state_indicator
    assert frame.data == b"\x11" * 64
    with pytest.raises(DecodeError, match="not a CAN FD length"):
        parse_candump_line("(2.0) can0 123##0" + "00" * 9)


def test_remote_and_error_frames_are_marked() -> None:
    """``#R`` is a remote request; an id with CAN_ERR_FLAG is an error frame."""
    remote = parse_candump_line("(3.0) can0 123#R4")
    assert remote is not None
    assert remote.is_remote
    assert remote.dlc == 4
    assert remote.data == b""
    error = parse_candump_line("(3.0) can0 20000080#0000000000000000")
    assert error is not None
    assert error.is_error
    assert not error.is_extended
    assert error.frame_id == 0x80


def test_blank_and_comment_lines_are_skipped() -> None:
    """Blank lines and # comments are neither frames nor errors."""
    assert parse_candump_line("   \n") is None
    assert parse_candump_line("# recorded on the bench") is None


@pytest.mark.parametrize(
    "line",
    [
        "can0 123#00",
        "(1.0) can0 12#00",
        "(1.0) can0 123#0",
        "(1.0) can0 123#0102030405060708AA",
        "(1.0) can0 123#zz",
        "(1.0) can0 123##",
        "(1.0) can0 123#R99",
        "(x) can0 123#00",
    ],
)
def test_bad_lines_raise_decode_error(line: str) -> None:
    """Malformed lines raise DecodeError from the single-line parser."""
    with pytest.raises(DecodeError):
        parse_candump_line(line)


def test_parser_counts_bad_lines_with_numbers_and_continues() -> None:
    """The stream parser reports bad lines with their numbers and keeps going."""
    parser = CandumpParser()
    seen: list[tuple[int, str]] = []
    lines = [
        "(1.0) can0 100#01\n",
        b"garbage\n",
        "\n",
        b"(1.1) can0 101#0203\n",
        "(1.2) can0 102#XYZ\n",
    ]
    frames = list(parser.parse(lines, lambda n, reason: seen.append((n, reason))))
    assert [(n, f.frame_id) for n, f in frames] == [(1, 0x100), (4, 0x101)]
    assert parser.lines == 5
    assert parser.frames == 2
    assert parser.bad == 2
    assert [n for n, _ in parser.bad_lines] == [2, 5]
    assert seen == parser.bad_lines


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_parser_never_raises_on_arbitrary_text(text: str) -> None:
    """Whatever the input, the stream parser counts and never raises."""
    parser = CandumpParser()
    frames = list(parser.parse(text.splitlines()))
    assert parser.frames == len(frames)
    assert parser.frames + parser.bad <= parser.lines


def test_reads_what_python_can_writes(tmp_path: Path) -> None:
    """Logs written by python-can's candump writer parse back to the same frames."""
    messages = [
        can.Message(
            timestamp=1.5, arbitration_id=0x100, data=bytes(range(8)), is_extended_id=False
        ),
        can.Message(timestamp=1.6, arbitration_id=0x100, data=b"\x01", is_extended_id=True),
        can.Message(
            timestamp=1.7,
            arbitration_id=0x18FF60E5,
            data=bytes(range(64)),
            is_fd=True,
            bitrate_switch=True,
        ),
        can.Message(timestamp=1.8, arbitration_id=0x123, is_remote_frame=True, dlc=4),
        can.Message(timestamp=1.9, arbitration_id=0x80, is_error_frame=True, data=bytes(8)),
    ]
    path = tmp_path / "written.log"
    with can.io.CanutilsLogWriter(str(path), channel="can0") as writer:
        for message in messages:
            writer.on_message_received(message)
    parser = CandumpParser()
    with path.open() as lines:
        frames = [frame for _, frame in parser.parse(lines)]
    assert parser.bad == 0
    assert [(f.frame_id, f.is_extended) for f in frames[:3]] == [
        (0x100, False),
        (0x100, True),
        (0x18FF60E5, True),
    ]
    assert frames[2].is_fd
    assert frames[2].bitrate_switch
    assert frames[2].data == bytes(range(64))
    assert frames[3].is_remote
    assert frames[4].is_error
    assert [f.timestamp_ns for f in frames] == [1_500_000_000 + i * 100_000_000 for i in range(5)]
