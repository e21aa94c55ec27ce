"""``daq-agent serve``, ``export`` and ``errors`` against data sent to the real local server."""

from __future__ import annotations

import csv
import io
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from server_calls import BASE_NS, call, create_config, stream

from daq_agent import methods
from daq_agent._proto.sift.common.type.v1 import channel_data_type_pb2 as cdt
from daq_agent._proto.sift.ingest.v1 import ingest_pb2
from daq_agent._proto.sift.ingestion_configs.v2 import ingestion_configs_pb2 as ic
from daq_agent._proto.sift.ping.v1 import ping_pb2
from daq_agent._proto.sift.runs.v2 import runs_pb2
from daq_agent.cli import main
from daq_agent.commands.export import iso_timestamp
from daq_agent.server.local import LocalIngestServer

pytestmark = pytest.mark.integration

Request = ingest_pb2.IngestWithConfigDataStreamRequest


@pytest.fixture
def populated(grpc_channel: grpc.Channel, local_server: LocalIngestServer) -> Path:
    """A db with two flows (engine: rpm, temp; gear: gear) in run "r1", one sample in "r2"."""
    engine = ic.FlowConfig(
        name="engine",
        channels=[
            ic.ChannelConfig(name="rpm", data_type=cdt.CHANNEL_DATA_TYPE_DOUBLE),
            ic.ChannelConfig(name="temp", data_type=cdt.CHANNEL_DATA_TYPE_INT_32),
        ],
    )
    gear = ic.FlowConfig(
        name="gear",
        channels=[ic.ChannelConfig(name="gear", data_type=cdt.CHANNEL_DATA_TYPE_UINT_32)],
    )
    config = create_config(grpc_channel, "cli", [engine, gear])
    runs = {
        name: call(
            grpc_channel,
            methods.CREATE_RUN,
            runs_pb2.CreateRunRequest(name=name),
            runs_pb2.CreateRunResponse,
        ).run.run_id
        for name in ("r1", "r2")
    }

    def request(flow: str, ts: int, run: str, **values: float | int | None) -> Request:
        req = Request(ingestion_config_id=config.ingestion_config_id, flow=flow, run_id=runs[run])
        req.timestamp.FromNanoseconds(ts)
        for field, value in values.items():
            item = req.channel_values.add()
            if value is None:
                item.empty.SetInParent()
            else:
                setattr(item, field, value)
        return req

    stream(
        grpc_channel,
        [
            request("engine", BASE_NS, "r1", double=1500.5, int32=-4),
            request("gear", BASE_NS, "r1", uint32=3),
            request("engine", BASE_NS + 1, "r1", double=math.nan, int32=None),
            request("engine", BASE_NS + 2, "r2", double=7.0, int32=8),
        ],
    )
    bad = request("engine", BASE_NS + 3, "r1", double=1.0)
    stream(grpc_channel, [bad])
    return local_server.db_path


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``daq-agent`` in-process; exit code, stdout, stderr."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_export_long(populated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Long CSV: one row per sample and channel with a value, ISO and integer ns timestamps, run,
    asset and unit columns (and an empty label column: no enum channels here)."""
    code, out, _ = run_cli(capsys, "export", "--db", str(populated), "--run", "r1")
    assert code == 0
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == [
        "timestamp", "timestamp_ns", "run", "asset", "flow", "channel", "value", "unit", "label"
    ]  # fmt: skip
    stamp = iso_timestamp(BASE_NS)
    assert stamp.endswith(".123456789Z")
    assert rows[1:] == [
        [stamp, str(BASE_NS), "r1", "bench", "engine", "rpm", "1500.5", "", ""],
        [stamp, str(BASE_NS), "r1", "bench", "engine", "temp", "-4", "", ""],
        [stamp, str(BASE_NS), "r1", "bench", "gear", "gear", "3", "", ""],
        [
            iso_timestamp(BASE_NS + 1),
            str(BASE_NS + 1),
            "r1",
            "bench",
            "engine",
            "rpm",
            "nan",
            "",
            "",
        ],
    ]


def test_export_wide_with_channel_filter(
    populated: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Wide CSV of the one flow the channels select: a row per sample of every run, a column
    per selected channel, empty cells."""
    output = tmp_path / "out.csv"
    code, _, err = run_cli(
        capsys,
        "export",
        "--db",
        str(populated),
        "--wide",
        "--channel",
        "rpm",
        "--channel",
        "temp",
        "--output",
        str(output),
    )
    assert code == 0
    assert f"wrote 3 rows of engine to {output}" in err
    rows = list(csv.reader(io.StringIO(output.read_text(encoding="utf-8"))))
    assert rows == [
        ["timestamp", "timestamp_ns", "run", "asset", "rpm", "temp"],
        [iso_timestamp(BASE_NS), str(BASE_NS), "r1", "bench", "1500.5", "-4"],
        [iso_timestamp(BASE_NS + 1), str(BASE_NS + 1), "r1", "bench", "nan", ""],
        [iso_timestamp(BASE_NS + 2), str(BASE_NS + 2), "r2", "bench", "7.0", "8"],
    ]


def test_export_errors_exit_2(
    populated: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing db, an unknown run or channel is a clear error with exit code 2."""
    code, _, err = run_cli(capsys, "export", "--db", str(tmp_path / "missing.sqlite"))
    assert code == 2
    assert "no database at" in err
    code, _, err = run_cli(capsys, "export", "--db", str(populated), "--run", "nope")
    assert code == 2
    assert "no run named 'nope'" in err
    code, _, err = run_cli(capsys, "export", "--db", str(populated), "--channel", "nope")
    assert code == 2
    assert "no channel matches 'nope'" in err
    code, _, err = run_cli(capsys, "errors", "--db", str(tmp_path / "missing.sqlite"))
    assert code == 2
    assert "no database at" in err


def test_errors_lists_validation_errors(
    populated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``daq-agent errors`` prints each recorded validation error with its reason."""
    code, out, _ = run_cli(capsys, "errors", "--db", str(populated))
    assert code == 0
    assert "has 2 channels, the request has 1 values" in out
    assert "flow=engine" in out
    assert out.rstrip().endswith("1 validation error")
    code, out, _ = run_cli(capsys, "errors", "--db", str(populated), "--limit", "0")
    assert code == 0
    assert out.strip() == "0 of 1 validation error"


def test_serve_runs_until_sigterm(tmp_path: Path) -> None:
    """``daq-agent serve --port 0`` logs its address, answers calls and exits 0 on SIGTERM."""
    db = tmp_path / "served.sqlite"
    env = {**os.environ, "DAQ_AGENT_API_KEY": "k3y"}
    process = subprocess.Popen(
        [sys.executable, "-m", "daq_agent.cli", "serve", "--db", str(db), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stderr is not None
        port = None
        deadline = time.monotonic() + 30
        while port is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            assert line, "serve exited before listening"
            assert "k3y" not in line
            match = re.search(r"listening on 127\.0\.0\.1:(\d+) \(db (.+?)[,)]", line)
            if match:
                port = int(match.group(1))
                assert match.group(2) == str(db)
        assert port is not None
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.RpcError) as info:
                call(channel, methods.PING, ping_pb2.PingRequest(), ping_pb2.PingResponse)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            answer = call(
                channel,
                methods.PING,
                ping_pb2.PingRequest(),
                ping_pb2.PingResponse,
                [("authorization", "Bearer k3y")],
            )
            assert answer.response
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        rest = process.stderr.read()
        assert "k3y" not in rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()
    assert db.is_file()


def test_serve_port_in_use_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``serve`` on a port already listened on is a clear error with exit code 2."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, _, err = run_cli(
            capsys, "serve", "--db", str(tmp_path / "s.sqlite"), "--port", str(port)
        )
    assert code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in err
