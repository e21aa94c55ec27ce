"""``runs``, ``channels``, ``export`` and ``plot`` on stores the agent filled by real ingestion.

The store is built once per module: two recorded BLF logs (known values: a scaled speed, a signed
enum gear with ``-1 = Reverse``, a bool, and ``latitude`` in two flows) are replayed by the agent
into the local server, runs ``drive-1`` and ``drive-2``.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import can
import cantools
import pyarrow.parquet as pq
import pytest

from daq_agent.agent import Agent
from daq_agent.cli import main
from daq_agent.commands.plot import build_figure, log_series, save_figure, store_series
from daq_agent.config import LocalTarget, load_config
from daq_agent.core.clock import seconds_to_ns
from daq_agent.server.browse import StoreBrowser, iso_timestamp
from daq_agent.server.store import Store

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DBC = REPO / "tests" / "data" / "dbc" / "browse.dbc"
BASE_S = 1_760_000_000.0
STEP_S = 0.01


@dataclass(frozen=True)
class Drive:
    """What one run's log carries (expected values, by frame index)."""

    run: str
    times_ns: list[int]
    speed: list[float]
    gear: list[int]
    brake: list[bool]
    lat_times_ns: list[int]
    lat_a: list[float]
    lat_b: list[float]


@dataclass(frozen=True)
class Built:
    """The store and what went into it."""

    db: Path
    drives: dict[str, Drive]
    logs: dict[str, Path]
    began_ns: int
    """Wall-clock time before the first replay started."""


def _frames(count: int, offset_s: float, run: str) -> tuple[list[can.Message], Drive]:
    database = cantools.database.load_file(str(DBC))
    drive, gps_a, gps_b = (database.get_message_by_name(n) for n in ("Drive", "GpsA", "GpsB"))
    frames: list[can.Message] = []
    times, speed, gear, brake, lat_times, lat_a, lat_b = [], [], [], [], [], [], []
    for i in range(count):
        t = BASE_S + offset_s + i * STEP_S
        values = {"Speed": i * 0.5, "Gear": i % 4 - 1, "Brake": int(i % 3 == 0)}
        data = drive.encode(values)
        frames.append(
            can.Message(timestamp=t, arbitration_id=0x100, data=data, is_extended_id=False)
        )
        times.append(seconds_to_ns(t, 1000))
        speed.append(values["Speed"])
        gear.append(values["Gear"])
        brake.append(bool(values["Brake"]))
        if i % 4 == 0:
            ta = t + STEP_S / 2
            frames.append(can.Message(timestamp=ta, arbitration_id=0x200,
                                      data=gps_a.encode({"latitude": i * 0.25}),
                                      is_extended_id=False))  # fmt: skip
            frames.append(can.Message(timestamp=ta, arbitration_id=0x201,
                                      data=gps_b.encode({"latitude": -i * 0.25}),
                                      is_extended_id=False))  # fmt: skip
            lat_times.append(seconds_to_ns(ta, 1000))
            lat_a.append(i * 0.25)
            lat_b.append(-i * 0.25)
    return frames, Drive(run, times, speed, gear, brake, lat_times, lat_a, lat_b)


def _replay(tmp: Path, log: Path, run: str) -> Path:
    config_path = tmp / f"{run}.yaml"
    config_path.write_text(
        f"state_dir: {tmp / 'state'}\n"
        "asset: browse-test\n"
        f"run: {{name: {run}}}\n"
        "replay:\n"
        f"  - {{path: {log}, bus: can0, realtime: false, databases: [{DBC}]}}\n"
    )
    config = load_config(config_path, env={})
    before = set(threading.enumerate())
    agent = Agent(config)
    agent.start()
    try:
        assert agent.wait(timeout=60), "the replay never ended"
    finally:
        final = agent.stop()
    assert final.balanced
    # a module fixture runs before the per-test thread guard, so it checks its own threads
    leaked = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
    assert not [n for n in leaked if "grpc" not in n], leaked
    assert isinstance(config.target, LocalTarget)
    return config.target.db_path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """Two runs replayed by the agent into one store."""
    tmp = tmp_path_factory.mktemp("browse")
    began_ns = time.time_ns()
    drives, logs = {}, {}
    db = None
    for run, count, offset in (("drive-1", 120, 0.0), ("drive-2", 40, 100.0)):
        frames, drive = _frames(count, offset, run)
        log = tmp / f"{run}.blf"
        with can.Logger(str(log)) as writer:
            for msg in frames:
                writer.on_message_received(msg)
        db = _replay(tmp, log, run)
        drives[run], logs[run] = drive, log
    assert db is not None
    return Built(db, drives, logs, began_ns)


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``daq-agent`` in-process; exit code, stdout, stderr."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- runs and channels ----------------------------------------------------------------------------


def test_runs_json_and_text(built: Built, capsys: pytest.CaptureFixture[str]) -> None:
    """``runs`` lists both runs with their asset, sample and channel counts and time span."""
    code, out, _ = run_cli(capsys, "runs", "--db", str(built.db), "--json")
    assert code == 0
    runs = {r["name"]: r for r in json.loads(out)}
    assert set(runs) == {"drive-1", "drive-2"}
    for name, drive in built.drives.items():
        record = runs[name]
        assert record["assets"] == ["browse-test"]
        assert record["samples"] == len(drive.times_ns) + 2 * len(drive.lat_times_ns)
        assert record["channels"] == 5  # Speed, Gear, Brake, and latitude in GpsA and GpsB
        assert record["first_sample_ns"] == drive.times_ns[0]
        assert record["last_sample_ns"] == max(drive.times_ns[-1], drive.lat_times_ns[-1])
        assert record["client_key"]
        assert record["run_id"]
        assert record["is_stopped"] is True
        # sift_stream sets no start time: the server's creation time stands in, before the stop
        assert record["start_ns"] is None
        assert built.began_ns <= record["created_ns"] <= record["stop_ns"]
    code, out, _ = run_cli(capsys, "runs", "--db", str(built.db))
    assert code == 0
    line = next(row for row in out.splitlines() if row.startswith("drive-1 "))
    assert runs["drive-1"]["run_id"] in line
    assert "browse-test" in line
    assert f" {runs['drive-1']['samples']} " in line
    assert iso_timestamp(built.drives["drive-1"].times_ns[0]) in line
    assert f"{runs['drive-1']['created']} (created)" in line


def test_channels_show_units_signed_enum_labels_and_counts(
    built: Built, capsys: pytest.CaptureFixture[str]
) -> None:
    """``channels --run`` gives flow, type, unit, signed enum keys and the run's counts."""
    code, out, _ = run_cli(capsys, "channels", "--db", str(built.db), "--run", "drive-2", "--json")
    assert code == 0
    channels = {(c["flow"], c["name"]): c for c in json.loads(out)}
    assert set(channels) == {
        ("can0.Drive", "Speed"), ("can0.Drive", "Gear"), ("can0.Drive", "Brake"),
        ("can0.GpsA", "latitude"), ("can0.GpsB", "latitude"),
    }  # fmt: skip
    drive = built.drives["drive-2"]
    gear = channels["can0.Drive", "Gear"]
    assert gear["data_type"] == "enum"
    assert gear["enum"] == [
        {"key": -1, "name": "Reverse"}, {"key": 0, "name": "Neutral"},
        {"key": 1, "name": "Drive"}, {"key": 2, "name": "Sport"},
    ]  # fmt: skip
    assert gear["samples"] == len(drive.times_ns)
    assert gear["first_sample_ns"] == drive.times_ns[0]
    assert gear["last_sample_ns"] == drive.times_ns[-1]
    assert channels["can0.Drive", "Speed"]["unit"] == "km/h"
    assert channels["can0.Drive", "Brake"]["data_type"] == "bool"
    assert channels["can0.GpsB", "latitude"]["samples"] == len(drive.lat_times_ns)
    code, out, _ = run_cli(capsys, "channels", "--db", str(built.db))
    assert code == 0
    row = next(r for r in out.splitlines() if r.startswith("Gear "))
    assert "-1=Reverse 0=Neutral 1=Drive 2=Sport" in row
    total = len(built.drives["drive-1"].times_ns) + len(drive.times_ns)
    assert f" {total} " in row


def test_missing_or_foreign_files_are_errors_naming_them(
    built: Built, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing file, a non-SQLite file and another program's SQLite file: exit 2, named."""
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n")
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    missing = tmp_path / "missing.sqlite"
    for path in (missing, text, other):
        for command in (
            ["runs"], ["channels"], ["export"], ["plot", "-c", "x", "-o", str(tmp_path / "p.png")]
        ):  # fmt: skip
            code, _, err = run_cli(capsys, command[0], "--db", str(path), *command[1:])
            assert code == 2, (command, err)
            assert str(path) in err
    code, _, err = run_cli(capsys, "channels", "--db", str(built.db), "--run", "drive-3")
    assert code == 2
    assert "no run named 'drive-3'" in err
    assert "drive-1" in err  # the near names


# -- export -----------------------------------------------------------------------------------


def test_export_long_csv_signed_enum_with_and_without_labels(
    built: Built, capsys: pytest.CaptureFixture[str]
) -> None:
    """Long CSV: run, asset, unit and label columns; a signed key is -1, not 4294967295."""
    drive = built.drives["drive-1"]
    code, out, _ = run_cli(
        capsys, "export", "--db", str(built.db), "--run", "drive-1", "--channel", "Gear"
    )
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [int(r["timestamp_ns"]) for r in rows] == drive.times_ns
    assert [int(r["value"]) for r in rows] == drive.gear
    labels = {-1: "Reverse", 0: "Neutral", 1: "Drive", 2: "Sport"}
    assert [r["label"] for r in rows] == [labels[g] for g in drive.gear]
    assert {(r["run"], r["asset"], r["flow"], r["unit"]) for r in rows} == {
        ("drive-1", "browse-test", "can0.Drive", "")
    }
    assert "4294967295" not in out
    code, out, _ = run_cli(
        capsys, "export", "--db", str(built.db), "--channel", "Speed", "--no-labels"
    )
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert "label" not in rows[0]
    assert [r["run"] for r in rows] == ["drive-1"] * 120 + ["drive-2"] * 40
    assert [float(r["value"]) for r in rows] == drive.speed + built.drives["drive-2"].speed
    assert {r["unit"] for r in rows} == {"km/h"}


def test_export_parquet_one_file_per_flow_read_back(
    built: Built, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Parquet per flow, typed columns, units in field metadata, values as ingested; the two
    ``latitude`` channels stay in their own flow's table."""
    out = tmp_path / "parquet"
    code, _, err = run_cli(
        capsys, "export", "--db", str(built.db), "--run", "drive-1", "--format", "parquet",
        "--output", str(out),
    )  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "can0.Drive.parquet", "can0.GpsA.parquet", "can0.GpsB.parquet"
    ]  # fmt: skip
    drive = built.drives["drive-1"]
    table = pq.read_table(out / "can0.Drive.parquet")
    assert table.column_names == [
        "timestamp", "run", "asset", "Speed", "Gear", "Gear.label", "Brake"
    ]  # fmt: skip
    assert str(table.schema.field("Gear").type) == "int32"
    assert str(table.schema.field("timestamp").type) == "timestamp[ns, tz=UTC]"
    assert table.schema.field("Speed").metadata[b"unit"] == b"km/h"
    assert table.column("timestamp").cast("int64").to_pylist() == drive.times_ns
    assert table.column("Speed").to_pylist() == drive.speed
    assert table.column("Gear").to_pylist() == drive.gear
    assert table.column("Gear.label").to_pylist()[:4] == ["Reverse", "Neutral", "Drive", "Sport"]
    assert table.column("Brake").to_pylist() == drive.brake
    assert set(table.column("run").to_pylist()) == {"drive-1"}
    gps_a = pq.read_table(out / "can0.GpsA.parquet")
    gps_b = pq.read_table(out / "can0.GpsB.parquet")
    assert gps_a.column("latitude").to_pylist() == drive.lat_a
    assert gps_b.column("latitude").to_pylist() == drive.lat_b
    assert gps_a.column("timestamp").cast("int64").to_pylist() == drive.lat_times_ns


def test_export_wide_csv_per_flow_and_output_rules(
    built: Built, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One flow's wide table goes to stdout; several flows need a directory; Parquet a path."""
    code, out, _ = run_cli(
        capsys, "export", "--db", str(built.db), "--wide", "--flow", "can0.GpsB", "--run", "drive-2"
    )
    assert code == 0
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["timestamp", "timestamp_ns", "run", "asset", "latitude"]
    assert [float(r[4]) for r in rows[1:]] == built.drives["drive-2"].lat_b
    code, _, err = run_cli(capsys, "export", "--db", str(built.db), "--wide")
    assert code == 2
    assert "3 flows selected (can0.Drive, can0.GpsA, can0.GpsB)" in err
    code, _, err = run_cli(capsys, "export", "--db", str(built.db), "--format", "parquet")
    assert code == 2
    assert "needs --output" in err
    code, _, err = run_cli(capsys, "export", "--db", str(built.db), "--flow", "can0.Gpz*")
    assert code == 2
    assert "no flow matches 'can0.Gpz*'" in err
    assert "can0.GpsA" in err
    directory = tmp_path / "wide"
    code, _, err = run_cli(
        capsys, "export", "--db", str(built.db), "--wide", "--flow", "can0.Gps*", "-o",
        str(directory),
    )  # fmt: skip
    assert code == 0
    a = list(csv.DictReader(io.StringIO((directory / "can0.GpsA.csv").read_text("utf-8"))))
    assert [float(r["latitude"]) for r in a] == built.drives["drive-1"].lat_a + (
        built.drives["drive-2"].lat_a
    )


def test_export_time_filters(built: Built, capsys: pytest.CaptureFixture[str]) -> None:
    """--start/--end as ISO 8601, integer ns, and +seconds after each run's first sample."""
    drive = built.drives["drive-1"]
    lo, hi = drive.times_ns[10], drive.times_ns[20]

    def speeds(*args: str) -> list[float]:
        code, out, err = run_cli(
            capsys, "export", "--db", str(built.db), "--channel", "Speed", *args
        )
        assert code == 0, err
        return [float(r["value"]) for r in csv.DictReader(io.StringIO(out))]

    assert speeds("--start", iso_timestamp(lo), "--end", str(hi)) == drive.speed[10:21]
    # relative: the first 50 ms of each run (both runs start with a Drive frame)
    second = built.drives["drive-2"]
    assert speeds("--end", "+50ms") == drive.speed[:6] + second.speed[:6]
    assert speeds("--start", "+0.39", "--run", "drive-2") == second.speed[39:]
    code, _, err = run_cli(capsys, "export", "--db", str(built.db), "--start", "yesterday")
    assert code == 2
    assert "--start: 'yesterday' is not ISO 8601" in err


# -- plot -----------------------------------------------------------------------------------------


def test_plot_store_draws_each_channel_enums_as_labelled_steps(
    built: Built, tmp_path: Path
) -> None:
    """The figure has an axis per channel with the ingested points; the enum axis is labelled."""
    drive = built.drives["drive-1"]
    with Store.open(built.db, readonly=True) as store:
        browser = StoreBrowser(store)
        run = browser.runs_named("drive-1")[0]
        series = store_series(browser, run, ["Speed", "Gear", "lat*"])
    assert [s.label for s in series] == [
        "Speed", "Gear", "latitude (can0.GpsA)", "latitude (can0.GpsB)"
    ]  # fmt: skip
    figure = build_figure(series, "run drive-1")
    axes = figure.axes
    assert len(axes) == 4
    origin = drive.times_ns[0]
    speed_line = axes[0].get_lines()[0]
    assert list(speed_line.get_ydata()) == drive.speed
    assert list(speed_line.get_xdata()) == pytest.approx(
        [(t - origin) / 1e9 for t in drive.times_ns]
    )
    gear_line = axes[1].get_lines()[0]
    assert list(gear_line.get_ydata()) == drive.gear
    assert gear_line.get_drawstyle() == "steps-post"
    ticks = {
        int(v): t.get_text()
        for v, t in zip(axes[1].get_yticks(), axes[1].get_yticklabels(), strict=True)
    }
    assert ticks == {-1: "Reverse", 0: "Neutral", 1: "Drive", 2: "Sport"}
    assert list(axes[3].get_lines()[0].get_ydata()) == drive.lat_b
    xlabel = axes[-1].get_xlabel()
    assert re.match(r"time \[(s|min|h)\] since \d{4}-", xlabel), xlabel
    assert figure.get_suptitle() == "run drive-1"
    png = tmp_path / "plot.png"
    save_figure(figure, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 20_000
    grouped = build_figure(series, "grouped", group_by_unit=True)
    assert len(grouped.axes) == 3  # the two latitudes (deg) share an axis
    assert len(grouped.axes[2].get_lines()) == 2


def test_plot_cli_png_svg_and_errors(
    built: Built, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``plot`` writes PNG or SVG by suffix (newest run by default); a bad pattern lists near
    names; an unknown suffix is refused."""
    svg = tmp_path / "plot.svg"
    code, _, err = run_cli(
        capsys, "plot", "--db", str(built.db), "-c", "Speed", "-c", "Gear", "-o", str(svg)
    )
    assert code == 0, err
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    text = svg.read_text(encoding="utf-8")
    assert "drive-2" in text  # the title names the newest run
    assert "Reverse" in text
    code, _, err = run_cli(
        capsys, "plot", "--db", str(built.db), "-c", "Sped", "-o", str(tmp_path / "x.png")
    )
    assert code == 2
    assert "no channel matches 'Sped' (near: Speed" in err
    code, _, err = run_cli(
        capsys, "plot", "--db", str(built.db), "-c", "Speed", "-o", str(tmp_path / "x.pdf")
    )
    assert code == 2
    assert "must end in .png or .svg" in err
    png = tmp_path / "r1.png"
    code, _, err = run_cli(
        capsys, "plot", "--db", str(built.db), "--run", "drive-1", "-c", "*", "-o", str(png)
    )
    assert code == 0, err
    assert "plotted 5 channels" in err
    assert png.read_bytes()[:4] == b"\x89PNG"


def _candump(path: Path, frames: list[can.Message]) -> None:
    with path.open("w") as out:
        for msg in frames:
            out.write(
                f"({msg.timestamp:.6f}) can0 {msg.arbitration_id:03X}#{msg.data.hex().upper()}\n"
            )


def test_plot_from_logs_with_the_projects_decoder(built: Built, tmp_path: Path) -> None:
    """A candump log and a BLF log give the same points as the log's frames carried."""
    frames, drive = _frames(30, 0.0, "log")
    log = tmp_path / "drive.log"
    _candump(log, frames)
    database = cantools.database.load_file(str(DBC))
    for path in (log, built.logs["drive-2"]):
        series = log_series(path, [database], ["Gear", "Speed"])
        expected = drive if path == log else built.drives["drive-2"]
        assert [s.label for s in series] == ["Speed", "Gear"]
        assert series[0].values == expected.speed
        assert series[1].values == expected.gear
        assert series[0].times_ns == expected.times_ns
    out = tmp_path / "log.png"
    code = main(["plot", "--log", str(log), "--dbc", str(DBC), "-c", "Gear", "-o", str(out)])
    assert code == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
