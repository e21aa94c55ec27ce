"""A friendlier ``decode``: enum labels by default, plain ``candump`` output, signed value tables.

cantools is the oracle: labels and numbers equal ``decode_message(..., decode_choices=...)``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import can
import cantools
import pytest

from daq_agent.cli import main
from daq_agent.core.errors import DecodeError
from daq_agent.core.model import ChannelDataType
from daq_agent.decode.can_decoder import CanDecoder, enum_key
from daq_agent.decode.candump import CandumpParser, parse_candump_line
from daq_agent.decode.dbc import load_database

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "dbc" / "bench.dbc"

SIGNED_DBC = """\
VERSION ""
NS_ :
BS_:
BU_: TCU
BO_ 100 Transmission: 2 TCU
 SG_ Gear : 0|8@1- (1,0) [-1|6] "" Vector__XXX
 SG_ Mode : 8|8@1+ (1,0) [0|2] "" Vector__XXX
VAL_ 100 Gear -1 "Reverse" 0 "Neutral" 1 "First" 2 "Second" ;
VAL_ 100 Mode 0 "Eco" 1 "Sport" ;
"""


def _plain(message: can.Message, timestamp: str | None = None) -> str:
    """A line as ``candump can0`` prints it (can-utils' long format), optionally with ``-t``."""
    ident = (
        f"{message.arbitration_id:08X}"
        if message.is_extended_id
        else (f"{message.arbitration_id:03X}")
    )
    length = f"[{message.dlc:02d}]" if message.is_fd else f"[{message.dlc}]"
    if message.is_remote_frame:
        body = "remote request"
    else:
        body = " ".join(f"{b:02X}" for b in message.data)
    prefix = f" ({timestamp}) " if timestamp is not None else "  "
    return f"{prefix}can0  {ident}  {length:>5}  {body}"


def test_plain_candump_lines_parse_like_the_log_format() -> None:
    """Every plain variant gives the frame the ``-L`` line of the same message gives."""
    messages = [
        can.Message(
            timestamp=1.5, arbitration_id=0x100, data=bytes(range(8)), is_extended_id=False
        ),
        can.Message(timestamp=1.6, arbitration_id=0x18FF50E5, data=b"\x01\x02"),
        can.Message(
            timestamp=1.7,
            arbitration_id=0x210,
            is_extended_id=False,
            is_fd=True,
            data=bytes(range(12)),
        ),
        can.Message(
            timestamp=1.8, arbitration_id=0x123, is_extended_id=False, is_remote_frame=True, dlc=4
        ),
    ]
    log_lines = []
    for message in messages:
        data = message.data.hex().upper()
        ident = (
            f"{message.arbitration_id:08X}"
            if message.is_extended_id
            else (f"{message.arbitration_id:03X}")
        )
        sep = "##0" if message.is_fd else "#"
        body = "R4" if message.is_remote_frame else data
        log_lines.append(f"({message.timestamp:.6f}) can0 {ident}{sep}{body}")
    for message, log_line in zip(messages, log_lines, strict=True):
        expected = parse_candump_line(log_line)
        assert parse_candump_line(_plain(message, f"{message.timestamp:.6f}")) == expected
        untimed = parse_candump_line(_plain(message), now_ns=expected.timestamp_ns)  # type: ignore[union-attr]
        assert untimed == expected


def test_plain_timestamps_flags_ascii_and_error_frames() -> None:
    """``-t A`` local dates, ``-t d`` relative seconds, ``-x`` FD flags, ``-a`` ASCII, errors."""
    dated = parse_candump_line(" (2023-11-14 22:13:20.123456)  can0  100   [1]  FF")
    assert dated is not None
    local = datetime(2023, 11, 14, 22, 13, 20).timestamp()
    assert dated.timestamp_ns == int(local) * 1_000_000_000 + 123_456_000
    relative = parse_candump_line(" (000.000123)  can0  100   [1]  FF")
    assert relative is not None
    assert relative.timestamp_ns == 123_000
    flagged = parse_candump_line(
        "  can0  RX B E  18FF60E5  [08]  01 02 03 04 05 06 07 08", now_ns=5
    )
    assert flagged is not None
    assert (flagged.is_fd, flagged.bitrate_switch, flagged.error_state_indicator) == (
        True,
        True,
        True,
    )
    ascii_view = parse_candump_line("  can0  100   [2]  41 42   'AB'", now_ns=5)
    assert ascii_view is not None
    assert ascii_view.data == b"AB"
    error = parse_candump_line(
        "  can0  20000080   [8]  00 00 00 00 00 00 00 00   ERRORFRAME", now_ns=1
    )
    assert error is not None
    assert error.is_error


@pytest.mark.parametrize(
    "line",
    [
        "  can0  100   [8]  01 02",  # fewer bytes than the length
        "  can0  100   [2]  01 02 03",  # more
        "  can0  100   [2]  01 zz",
        "  can0  100  [09]  " + "00 " * 9,  # not an FD length
        " (yesterday)  can0  100   [1]  00",
    ],
)
def test_bad_plain_lines_raise(line: str) -> None:
    """A plain line whose length, data or time does not parse is a DecodeError."""
    with pytest.raises(DecodeError):
        parse_candump_line(line, now_ns=0)


def _printed_signals(out: str) -> list[dict[str, str]]:
    rows = []
    for line in out.splitlines():
        pairs = line.split(" ")[3:]
        rows.append(dict(pair.split("=", 1) for pair in pairs if "=" in pair))
    return rows


@pytest.mark.parametrize("choices", [True, False])
def test_text_labels_and_numbers_equal_cantools(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], choices: bool
) -> None:
    """Plain candump input; each printed value equals cantools' with or without choices."""
    db = cantools.database.load_file(str(BENCH), strict=False)
    frames = [
        (0x100, bytes.fromhex("1027F6FF961A05AA")),
        (0x100, bytes.fromhex("1027F6FF96" + "04" + "05AA")),
        (0x100, bytes.fromhex("1027F6FF96" + "07" + "05AA")),  # 7: no label in the table
    ]
    log = tmp_path / "plain.log"
    log.write_text(
        "".join(
            f" (1700000000.{i:06d})  can0  {fid:03X}   [8]  "
            + " ".join(f"{b:02X}" for b in data)
            + "\n"
            for i, (fid, data) in enumerate(frames)
        )
    )
    argv = ["decode", str(BENCH), str(log)] + ([] if choices else ["--no-choices"])
    assert main(argv) == 0
    printed = _printed_signals(capsys.readouterr().out)
    assert len(printed) == len(frames)
    for (fid, data), row in zip(frames, printed, strict=True):
        oracle = db.decode_message(fid, data, decode_choices=choices)
        assert set(row) == set(oracle)
        for name, value in oracle.items():
            text = row[name].split(" ")[0]
            if isinstance(value, int | float) and not isinstance(value, bool):
                assert float(text) == pytest.approx(float(value)), name
            else:
                assert text == str(value), name
    labelled = [row["ContactorState"] for row in printed]
    assert labelled == (["Closed", "Fault", "7"] if choices else ["2", "4", "7"])


def test_signed_value_table_is_signed_wherever_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``-1 "Reverse"``: wire key 0xFFFFFFFF (is_signed), but decode and flows show -1/Reverse."""
    dbc = tmp_path / "gear.dbc"
    dbc.write_text(SIGNED_DBC)
    db = cantools.database.load_file(str(dbc))
    decoder = CanDecoder("tcu", [load_database(dbc)])
    gear = decoder.flows[0].channels[0]
    assert gear.data_type is ChannelDataType.ENUM
    reverse = next(e for e in gear.enum_types if e.name == "Reverse")
    assert (reverse.key, reverse.is_signed, enum_key(reverse)) == (0xFFFFFFFF, True, -1)
    data = bytes([0xFF, 0x01])
    log = tmp_path / "gear.log"
    log.write_text("(1.000000) can0 064#FF01\n")
    assert main(["decode", str(dbc), str(log)]) == 0
    out = capsys.readouterr().out
    assert "Gear=Reverse Mode=Sport" in out
    assert str(db.decode_message(100, data)["Gear"]) == "Reverse"
    assert main(["decode", "--no-choices", "--json", str(dbc), str(log)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["signals"] == db.decode_message(100, data, decode_choices=False)
    assert record["signals"]["Gear"] == -1
    assert main(["flows", "--dbc", str(dbc)]) == 0
    listing = capsys.readouterr().out
    assert "{-1=Reverse, 0=Neutral, 1=First, 2=Second}" in listing
    assert "4294967295" not in listing
    assert main(["flows", "--dbc", str(dbc), "--json"]) == 0
    keys = json.loads(capsys.readouterr().out)[0]["channels"][0]["enum_types"]
    assert {"name": "Reverse", "key": -1, "is_signed": True} in keys


def test_candump_pipe_into_decode_with_a_positional_database() -> None:
    """``candump can0 | daq-agent decode bench.dbc``: plain untimed lines from stdin."""
    plain = "  can0  100   [8]  10 27 F6 FF 96 1A 05 AA\n  can0  7FF   [1]  00\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "daq_agent.cli", "decode", str(BENCH)],
        input=plain,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "can0 BMS_PackStatus PackVoltage=100 V" in done.stdout
    assert "ContactorState=Closed" in done.stdout
    assert "2 lines: 1 decoded, 1 unknown id, 0 decode errors, 0 bad lines" in done.stderr


def test_parser_stream_takes_both_formats() -> None:
    """One stream may mix the formats; none of the lines is counted bad."""
    parser = CandumpParser()
    frames = list(
        parser.parse(["(1.0) can0 100#01", "  can0  100   [1]  01", " (1.0)  can0  100   [1]  01"])
    )
    assert parser.bad == 0
    assert [f.data for _, f in frames] == [b"\x01"] * 3
