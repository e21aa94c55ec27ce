"""The ``journal:`` mapping of a bus or serial device: defaults, units, and errors naming the
file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from daq_agent.config import load_config
from daq_agent.core.errors import ConfigError

DBC = """VERSION ""
NS_ :
BS_:
BU_: ECU
BO_ 256 Status: 8 ECU
 SG_ Speed : 0|16@1+ (0.1,0) [0|6553.5] "km/h" ECU
"""

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, journal: str, serial: str = "") -> Path:
    (tmp_path / "x.dbc").write_text(DBC)
    path = tmp_path / "agent.yaml"
    path.write_text(
        "asset: bench-1\n"
        "buses:\n"
        "  - name: can0\n"
        "    interface: virtual\n"
        "    dbc: x.dbc\n" + journal + serial
    )
    return path


def test_defaults_and_units(tmp_path: Path) -> None:
    """dir resolves against the config's directory; MiB, days and ms become bytes and s."""
    path = write(
        tmp_path,
        "    journal: {dir: j, format: asc, rotate_mb: 0.5, rotate_s: 600, keep_files: 4,\n"
        "              keep_days: 2, queue_size: 100, flush_interval_ms: 250}\n",
    )
    journal = load_config(path, env={}).buses[0].journal
    assert journal is not None
    assert journal.directory == tmp_path / "j"
    assert (journal.format, journal.rotate_bytes, journal.rotate_s) == ("asc", 2**19, 600.0)
    assert (journal.keep_files, journal.keep_s) == (4, 2 * 86400.0)
    assert (journal.queue_items, journal.flush_interval_s) == (100, 0.25)
    minimal = load_config(write(tmp_path, "    journal: {dir: j}\n"), env={}).buses[0].journal
    assert minimal is not None
    assert (minimal.format, minimal.rotate_bytes, minimal.rotate_s) == ("blf", 64 * 2**20, None)
    assert (minimal.keep_files, minimal.keep_s) == (None, None)
    unlimited = "    journal: {dir: j, rotate_mb: null}\n"
    assert load_config(write(tmp_path, unlimited), env={}).buses[0].journal.rotate_bytes is None  # type: ignore[union-attr]
    assert load_config(write(tmp_path, ""), env={}).buses[0].journal is None


def test_serial_journal_is_hex(tmp_path: Path) -> None:
    """A serial device's journal is the hex format; a CAN format there is refused."""
    defs = REPO / "configs" / "serial" / "gps_nmea.yaml"
    serial = f"serial:\n  - {{name: gps, port: 'loop://', defs: {defs}, journal: {{dir: s}}}}\n"
    config = load_config(write(tmp_path, "", serial), env={})
    assert config.serial[0].journal is not None
    assert config.serial[0].journal.format == "hex"
    bad = serial.replace("{dir: s}", "{dir: s, format: blf}")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "", bad), env={})
    assert info.value.key == "serial[0].journal.format"
    assert "must be one of hex" in str(info.value)


@pytest.mark.parametrize(
    ("journal", "key", "reason"),
    [
        ("    journal: {format: blf}\n", "buses[0].journal.dir", "is required"),
        ("    journal: {dir: j, format: mf4}\n", "buses[0].journal.format", "blf, asc, log"),
        ("    journal: {dir: j, rotate_mb: -1}\n", "buses[0].journal.rotate_mb", "> 0"),
        ("    journal: {dir: j, keep_files: 0}\n", "buses[0].journal.keep_files", ">= 1"),
        ("    journal: {dir: j, keep_days: x}\n", "buses[0].journal.keep_days", "a number"),
        ("    journal: {dir: j, rotate: 1}\n", "buses[0].journal.rotate", "unknown key"),
        ("    journal: j\n", "buses[0].journal", "must be a mapping"),
    ],
)
def test_errors_name_file_line_and_key(tmp_path: Path, journal: str, key: str, reason: str) -> None:
    """Each bad journal setting is refused, naming the file, the line and the key."""
    path = write(tmp_path, journal)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    err = info.value
    assert (err.source, err.key, err.line) == (str(path), key, 6)
    assert reason in str(err)
