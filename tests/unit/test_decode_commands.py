"""The ``flows`` and ``decode`` subcommands, run through the real command line."""

from __future__ import annotations

import functools
import json
import operator
import sys
from pathlib import Path

import pytest

from daq_agent.cli import main
from daq_agent.decode.can_decoder import CanDecoder
from daq_agent.decode.dbc import load_database

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "dbc" / "bench.dbc"
BROKEN = ROOT / "tests" / "data" / "dbc" / "syntax_error.dbc"
GPS_DEFS = ROOT / "configs" / "serial" / "gps_nmea.yaml"

LOG = """\
(1700000000.123456) can0 100#1027F6FF961A05AA
(1700000000.200000) can0 00000100#0102030405060708
(1700000000.300000) can0 7FF#00
(1700000000.400000) can0 102#0201020304050607
(1700000000.500000) can0 200#01
this is not a candump line
(1700000000.600000) can0 210##1000000000000004000000000
(1700000000.700000) can0 123#R
"""


def test_flows_json_lists_every_message_with_typed_channels(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``flows --json`` prints one flow per message with the documented channel keys."""
    assert main(["flows", "--dbc", str(BENCH), "--bus", "bench", "--json"]) == 0
    flows = json.loads(capsys.readouterr().out)
    assert len(flows) == len(load_database(BENCH).messages)
    pack = next(f for f in flows if f["name"] == "bench.BMS_PackStatus")
    contactor = next(c for c in pack["channels"] if c["name"] == "ContactorState")
    assert set(contactor) == {"name", "data_type", "unit", "description", "enum_types"}
    assert contactor["data_type"] == "enum"
    assert {"name": "Closed", "key": 2} in contactor["enum_types"]
    types = {c["data_type"] for f in flows for c in f["channels"]}
    assert types == {"double", "uint32", "int32", "bool", "enum"}


def test_flows_text_names_ids_and_totals(capsys: pytest.CaptureFixture[str]) -> None:
    """Plain ``flows`` shows each flow with its id and a total line."""
    assert main(["flows", "--dbc", str(BENCH)]) == 0
    out = capsys.readouterr().out
    assert "can0.BMS_CellVoltagesFD  [FD 0x18FF60E5 (extended), 64 bytes]" in out
    assert "    ContactorState: enum {0=Open, 1=Precharge, 2=Closed, 3=Welded, 4=Fault}" in out
    assert out.rstrip().endswith("channels")


def test_flows_with_a_broken_database_is_one_line_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A syntax error ends the command with one stderr line naming file and line, exit 2."""
    assert main(["flows", "--dbc", str(BROKEN)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert f"{BROKEN}:13: syntax error at column 22" in err


def test_decode_json_from_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``decode --json`` prints one object per decoded frame and reports the rest on stderr."""
    log = tmp_path / "bench.log"
    log.write_text(LOG)
    assert main(["decode", "--dbc", str(BENCH), "--json", str(log)]) == 1  # a bad line
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["message"] for r in records] == [
        "BMS_PackStatus",
        "GNSS_Position",
        "BMS_CellVoltages",
        "INV_PhaseCurrentsFD",
    ]
    first = records[0]
    assert set(first) == {"bus", "message", "frame_id", "timestamp_ns", "flow", "signals"}
    assert first["bus"] == "can0"
    assert first["frame_id"] == 0x100
    assert first["timestamp_ns"] == 1_700_000_000_123_456_000
    assert first["flow"] == "can0.BMS_PackStatus"
    assert first["signals"]["PackVoltage"] == 100.0
    assert first["signals"]["ContactorState"] == "Closed"  # labels by default, as cantools
    assert set(records[2]["signals"]) == {
        "CellMux",
        "CellVoltage07",
        "CellVoltage08",
        "CellVoltage09",
        "CellBalancingMask",
    }
    assert records[3]["signals"]["PhaseCurrentV"] == 2.0
    err = captured.err
    assert "line 3: unknown id 0x7FF on can0" in err
    assert "line 5: INV_Status: 1 bytes, expected 8" in err
    assert "line 6: not a candump log line" in err
    assert "8 lines: 4 decoded, 1 unknown id, 1 decode errors, 1 bad lines, 1 remote" in err


def test_decode_values_equal_the_agent_decoder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command prints exactly the values the agent's decoder yields (same decoder)."""
    log = tmp_path / "one.log"
    log.write_text("(5.0) can7 201#E803F4FF40064019\n")
    argv = ["decode", "--dbc", str(BENCH), "--json", "--no-choices", "--bus", "rig", str(log)]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    message = CanDecoder("rig", [load_database(BENCH)]).message(0x201, False)
    assert message is not None
    assert record["flow"] == "rig.INV_Torque"
    assert record["signals"] == message.signals(bytes.fromhex("E803F4FF40064019"))


def test_decode_text_from_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Without a file, ``decode`` reads stdin and prints name=value pairs with units."""
    source = tmp_path / "stdin.log"
    source.write_text("(1700000000.123456) can0 100#1027F6FF961A05AA\n")
    with source.open() as handle:
        monkeypatch.setattr(sys, "stdin", handle)
        assert main(["decode", "--dbc", str(BENCH)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("(1700000000.123456000) can0 BMS_PackStatus PackVoltage=100 V ")
    assert "ContactorState=Closed " in out


def _nmea(body: str) -> bytes:
    checksum = functools.reduce(operator.xor, body.encode(), 0)
    return f"${body}*{checksum:02X}\r\n".encode()


def test_decode_defs_delegates_to_serial_definitions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``decode --defs`` hands the capture to the serial frame decoder."""
    capture = tmp_path / "gps.bin"
    capture.write_bytes(_nmea("GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"))
    code = main(["decode", "--defs", str(GPS_DEFS), "--json", str(capture)])
    out = capsys.readouterr().out
    assert code == 0
    assert json.loads(out.splitlines()[0])["frame"] == "gga"


def test_decode_defs_without_serial_support_exits_3(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """When the serial decoder cannot be imported, ``decode --defs`` says so and exits 3."""
    monkeypatch.setitem(sys.modules, "daq_agent.serialdefs.cli", None)
    capture = tmp_path / "x.bin"
    capture.write_bytes(b"")
    assert main(["decode", "--defs", str(GPS_DEFS), str(capture)]) == 3
    assert "serial decoding unavailable" in capsys.readouterr().err


def test_decode_dbc_and_defs_are_mutually_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    """``--dbc`` and ``--defs`` together are a usage error."""
    with pytest.raises(SystemExit) as exited:
        main(["decode", "--dbc", str(BENCH), "--defs", str(GPS_DEFS)])
    assert exited.value.code == 2
    assert "not allowed with" in capsys.readouterr().err
