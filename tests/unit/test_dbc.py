"""Loading CAN databases: the bench database, messy real-world files and broken ones."""

from __future__ import annotations

import logging
from pathlib import Path

import cantools
import pytest

from daq_agent.core.errors import ConfigError
from daq_agent.decode.dbc import DatabaseWarning, load_database

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "dbc" / "bench.dbc"
DATA = ROOT / "tests" / "data" / "dbc"
MESSY = DATA / "messy_cp1252.dbc"
BROKEN = DATA / "syntax_error.dbc"


def test_bench_database_loads_clean_and_complete() -> None:
    """The demo database loads without warnings and has mux, FD, 29-bit ids and cycle times."""
    warnings: list[DatabaseWarning] = []
    db = load_database(BENCH, warnings=warnings)
    assert warnings == []
    assert 12 <= len(db.messages) <= 20
    assert any(m.is_multiplexed() for m in db.messages)
    assert any(m.is_fd and m.length == 64 for m in db.messages)
    assert sum(m.is_extended_frame for m in db.messages) >= 3
    assert all(m.cycle_time for m in db.messages)
    assert any(s.conversion.choices for m in db.messages for s in m.signals)
    assert any(s.byte_order == "big_endian" for m in db.messages for s in m.signals)


def test_bench_database_is_strictly_valid_for_cantools() -> None:
    """cantools also loads the demo database in strict mode (the simulator sends all of it)."""
    db = cantools.database.load_file(str(BENCH), strict=True)
    assert len(db.messages) == len(load_database(BENCH).messages)


def test_messy_file_loads_with_warnings_naming_file_and_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """cp1252 text, high standard ids, duplicate names and orphan value tables are worked around."""
    warnings: list[DatabaseWarning] = []
    with caplog.at_level(logging.WARNING, logger="daq_agent.decode"):
        db = load_database(MESSY, warnings=warnings)
    by_line = {w.line: w.message for w in warnings}
    assert "treated as a 29-bit id" in by_line[21]
    assert "duplicate message name 'Engine'" in by_line[24]
    assert "'Turbo'" in by_line[38]
    assert "dropped" in by_line[38]
    assert "'Ghost'" in by_line[39]
    assert "SIG_VALTYPE_" in by_line[41]
    assert all(w.source == str(MESSY) for w in warnings)
    assert str(warnings[0]).startswith(f"{MESSY}:21: ")
    logged = [r.getMessage() for r in caplog.records if r.name == "daq_agent.decode"]
    assert len(logged) == len(warnings)
    high = db.get_message_by_name("HighIdNotExtended")
    assert high.is_extended_frame
    assert high.frame_id == 0x1234
    engine = db.get_message_by_frame_id(500)
    assert engine.get_signal_by_name("OilTemp").unit == "\u00b0C"
    assert engine.get_signal_by_name("Mode").choices[2] == "Run"


def test_high_id_fix_moves_its_attributes_and_value_tables(tmp_path: Path) -> None:
    """A standard id above 0x7FF made extended keeps its comment, cycle time and value table."""
    path = tmp_path / "high.dbc"
    path.write_text(
        'VERSION ""\n\nNS_ :\n\nBS_:\n\nBU_: A\n\n'
        "BO_ 2048 High: 2 A\n"
        ' SG_ State : 0|2@1+ (1,0) [0|3] "" A\n\n'
        'CM_ BO_ 2048 "high id";\n'
        'BA_DEF_ BO_ "GenMsgCycleTime" INT 0 10000;\n'
        'BA_DEF_DEF_ "GenMsgCycleTime" 0;\n'
        'BA_ "GenMsgCycleTime" BO_ 2048 2048;\n'
        'VAL_ 2048 State 0 "Off" 1 "On" ;\n',
        encoding="utf-8",
    )
    warnings: list[DatabaseWarning] = []
    message = load_database(path, warnings=warnings).messages[0]
    assert [w.line for w in warnings] == [9]
    assert message.is_extended_frame
    assert message.frame_id == 0x800
    assert message.comment == "high id"
    assert message.cycle_time == 2048
    assert message.get_signal_by_name("State").choices[1] == "On"


def test_syntax_error_is_one_line_with_file_line_and_column() -> None:
    """A real syntax error becomes a ConfigError rendered as one line: file:line plus column."""
    with pytest.raises(ConfigError) as caught:
        load_database(BROKEN)
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(f"{BROKEN}:13: syntax error at column 22")
    assert caught.value.line == 13


def test_utf8_bom_file_loads(tmp_path: Path) -> None:
    """A UTF-8 file with a byte-order mark loads and keeps non-ASCII units."""
    path = tmp_path / "bom.dbc"
    text = (
        'VERSION ""\n\nNS_ :\n\nBS_:\n\nBU_: A\n\n'
        'BO_ 1 M: 1 A\n SG_ T : 0|8@1+ (1,0) [0|1] "\u00b5s" A\n'
    )
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert load_database(path).messages[0].signals[0].unit == "\u00b5s"


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A database that cannot be read is a ConfigError naming the file."""
    with pytest.raises(ConfigError, match="cannot read database") as caught:
        load_database(tmp_path / "nope.dbc")
    assert caught.value.source == str(tmp_path / "nope.dbc")


def test_kcd_and_sym_load_through_cantools(tmp_path: Path) -> None:
    """KCD and SYM versions of the bench database load with the same messages."""
    db = cantools.database.load_file(str(BENCH))
    names = sorted(m.name for m in db.messages)
    kcd = tmp_path / "bench.kcd"
    kcd.write_text(db.as_kcd_string(), encoding="utf-8")
    assert sorted(m.name for m in load_database(kcd).messages) == names
    sym = tmp_path / "bench.sym"
    sym.write_text(db.as_sym_string(), encoding="utf-8")
    assert sorted(m.name for m in load_database(sym).messages) == names


def test_broken_xml_names_line_and_column(tmp_path: Path) -> None:
    """A KCD file that is not well-formed XML reports the line and column in one line."""
    path = tmp_path / "broken.kcd"
    path.write_text('<?xml version="1.0"?>\n<NetworkDefinition>\n  <Bus name="x">\n</Network>\n')
    with pytest.raises(ConfigError) as caught:
        load_database(path)
    assert caught.value.line == 4
    assert "column" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_garbage_with_unknown_extension_is_a_config_error(tmp_path: Path) -> None:
    """A file that is no CAN database at all is a one-line ConfigError."""
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is not a database\n")
    with pytest.raises(ConfigError) as caught:
        load_database(path)
    assert "\n" not in str(caught.value)
    assert caught.value.source == str(path)
