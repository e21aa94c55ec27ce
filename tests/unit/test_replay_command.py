"""``daq-agent replay``: which bus a log belongs to, and the record of logs backfilled."""

from __future__ import annotations

from pathlib import Path

import pytest

from daq_agent.cli import main as cli_main
from daq_agent.commands.replay import BackfillRecord, file_digest

REPO = Path(__file__).resolve().parents[2]
BENCH_DBC = REPO / "dbc" / "bench.dbc"


def two_buses(tmp_path: Path) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(
        f"asset: a\nstate_dir: {tmp_path / 'state'}\nbuses:\n"
        f"  - {{name: can0, interface: virtual, databases: [{BENCH_DBC}]}}\n"
        f"  - {{name: can1, interface: virtual, databases: [{BENCH_DBC}]}}\n"
    )
    return path


def test_a_log_of_no_known_bus_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With two buses and a file name naming neither, the command asks for --bus (exit 2), and
    an unknown --bus or a missing file is refused the same way; nothing is started."""
    log = tmp_path / "drive.log"
    log.write_text("(1750000000.000000) can0 100#0000000000000000 R\n")
    config = two_buses(tmp_path)
    assert cli_main(["replay", str(log), "--config", str(config)]) == 2
    assert "give --bus" in capsys.readouterr().err
    assert cli_main(["replay", str(log), "--config", str(config), "--bus", "can7"]) == 2
    assert "no such bus" in capsys.readouterr().err
    assert cli_main(["replay", str(tmp_path / "nope.blf"), "--config", str(config)]) == 2
    assert "no such log file" in capsys.readouterr().err
    assert not (tmp_path / "state" / "local.sqlite").exists()


def test_backfill_record_round_trip(tmp_path: Path) -> None:
    """The record keeps each log's content hash, survives a reload, and is replaced atomically."""
    log = tmp_path / "can0-20261201T000000.000000Z.log"
    log.write_bytes(b"(1.0) can0 100#00 R\n")
    digest = file_digest(log)
    path = tmp_path / "backfill" / "key.json"
    record = BackfillRecord(path, "bf")
    assert record.done(digest) is None
    record.add(digest, log, 1)
    record.save()
    again = BackfillRecord(path, "bf")
    done = again.done(digest)
    assert done is not None
    assert (done["path"], done["frames"]) == (str(log), 1)
    assert [p.name for p in path.parent.iterdir()] == ["key.json"]  # no temporary left
    log.write_bytes(b"(2.0) can0 100#01 R\n")  # other content: not done
    assert again.done(file_digest(log)) is None
