"""``daq-agent check`` and ``daq-agent run`` as processes: exit codes, errors, SIGTERM drains."""

from __future__ import annotations

import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import can
import pytest

from daq_agent.server.store import Store

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BENCH_DBC = REPO / "dbc" / "bench.dbc"


def daq_agent(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run the command line in a new interpreter and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "daq_agent.cli", "-q", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_check_prints_flows_of_the_demo_config() -> None:
    """``check`` on the demo config exits 0 and lists its bus, flows and derived client key."""
    result = daq_agent("check", str(REPO / "configs" / "demo.yaml"), "--flows")
    assert result.returncode == 0, result.stderr
    assert "can     can0: 17 flows" in result.stdout
    assert "can0.BMS_PackStatus" in result.stdout
    assert "serial  imu: 2 flows" in result.stdout
    assert "ingestion client key bench-demo-" in result.stdout


def test_check_reports_database_warnings_and_json(tmp_path: Path) -> None:
    """``check`` passes a database that needs fixing, with a warning naming file and line."""
    dbc = tmp_path / "odd.dbc"
    dbc.write_text(
        'VERSION ""\nNS_ :\nBS_:\nBU_: ECU\nBO_ 256 Msg: 8 ECU\n'
        ' SG_ Sig : 0|8@1+ (1,0) [0|255] "" ECU\n'
        'VAL_ 256 Ghost 0 "off" 1 "on" ;\n'
    )
    path = tmp_path / "agent.yaml"
    path.write_text(f"asset: a\nbuses:\n  - {{name: c, interface: virtual, dbc: {dbc}}}\n")
    result = daq_agent("check", str(path))
    assert result.returncode == 0, result.stderr
    assert f"warning: {dbc}:7:" in result.stdout
    report = json.loads(daq_agent("check", str(path), "--json").stdout)
    assert report["sources"][0]["flows"] == ["c.Msg"]
    assert report["client_key"].startswith("a-")


def test_config_error_exits_2_naming_file_line_and_key(tmp_path: Path) -> None:
    """An invalid value makes ``check`` and ``run`` exit 2 with file:line: key: reason."""
    path = tmp_path / "bad.yaml"
    path.write_text(
        "asset: a\n"
        "buses:\n"
        f"  - {{name: c, interface: virtual, dbc: {BENCH_DBC}}}\n"
        "ring:\n"
        "  policy: newest\n"
    )
    for command in ("check", "run"):
        result = daq_agent(command, str(path))
        assert result.returncode == 2
        assert f"{path}:5: ring.policy: must be one of drop_oldest, block" in result.stderr
        assert "Traceback" not in result.stderr


def test_check_refuses_what_run_would_refuse_an_unset_key_variable(tmp_path: Path) -> None:
    """``check`` reads the API key as ``run`` does: an unset variable exits 2, naming it."""
    config = tmp_path / "agent.yaml"
    config.write_text(
        "asset: a\ntarget:\n  sift: {uri: 'api.example:443', api_key_env: NO_SUCH_DAQ_KEY}\n"
        f"buses:\n  - {{name: can0, interface: virtual, channel: c, databases: [{BENCH_DBC}]}}\n"
    )
    result = daq_agent("check", str(config))
    assert result.returncode == 2
    assert "NO_SUCH_DAQ_KEY is not set" in result.stderr


def test_a_source_that_never_opened_makes_the_run_exit_1(tmp_path: Path) -> None:
    """A bus that never opens (no SocketCAN here, or no such interface) is retried during the
    run, and the run then exits 1 naming it: a bench that acquired nothing is not a success."""
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"asset: a\nstate_dir: {tmp_path / 'state'}\n"
        "buses:\n  - {name: can7, interface: socketcan, channel: daqabsent7, "
        f"databases: [{BENCH_DBC}]}}\n"
    )
    result = daq_agent("run", "--no-live", "--duration", "2", str(config))
    assert result.returncode == 1, result.stderr
    assert "can can7 never opened during the run" in result.stderr
    # marked optional (a bus that may be unplugged): the same run exits 0, with a warning
    config.write_text(
        config.read_text().replace("channel: daqabsent7,", "channel: daqabsent7, optional: true,")
    )
    optional = subprocess.run(
        [sys.executable, "-m", "daq_agent.cli", "run", "--no-live", "--duration", "2", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert optional.returncode == 0, optional.stderr
    assert "optional can can7 never opened during the run" in optional.stderr


def test_log_lines_under_systemd_carry_no_timestamp(tmp_path: Path) -> None:
    """With JOURNAL_STREAM set (systemd's journal), log lines start with the level: the journal
    stamps them; without it, they start with the time."""
    dbc = tmp_path / "broken.dbc"
    dbc.write_text('VERSION ""\nBO_ 256 M: 8 X\n SG_ s : 0|8@1+ (1,0) [0|1] "" X\nBO_ 256 N: 8 X\n')
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    args = [sys.executable, "-m", "daq_agent.cli", "flows", "--dbc", str(dbc)]
    plain = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60, check=False)
    journal = subprocess.run(
        args,
        capture_output=True,
        text=True,
        env={**env, "JOURNAL_STREAM": "8:1234"},
        timeout=60,
        check=False,
    )
    plain_lines = [line for line in plain.stderr.splitlines() if "WARNING" in line]
    journal_lines = [line for line in journal.stderr.splitlines() if "WARNING" in line]
    assert plain_lines, plain.stderr
    assert journal_lines, journal.stderr
    assert all(line[:4].isdigit() for line in plain_lines)  # 2026-…
    assert all(line.startswith("WARNING") for line in journal_lines)


def test_broken_database_is_one_line_with_file_and_line(tmp_path: Path) -> None:
    """A DBC syntax error is reported on one line naming the database file and line."""
    dbc = tmp_path / "broken.dbc"
    dbc.write_text(
        'VERSION ""\nNS_ :\nBS_:\nBU_: ECU\nBO_ 256 Msg: 8 ECU\n'
        ' SG_ Sig : 0|8@1+ (1,0) [0|255] "" ECU\nBO_ 257 Other: eight ECU\n'
    )
    path = tmp_path / "agent.yaml"
    path.write_text(f"asset: a\nbuses:\n  - {{name: c, interface: virtual, dbc: {dbc}}}\n")
    result = daq_agent("check", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{dbc}:7: syntax error" in lines[0]
    assert "Traceback" not in result.stderr


def _multicast() -> tuple[str, int]:
    """A multicast group and port no concurrent test is likely to use."""
    rng = random.Random()
    return f"239.{rng.randrange(1, 255)}.{rng.randrange(1, 255)}.{rng.randrange(1, 255)}", (
        rng.randrange(20000, 40000)
    )


@pytest.mark.slow
def test_sigterm_drains_before_exit(tmp_path: Path) -> None:
    """SIGTERM to ``daq-agent run`` stops the readers, delivers what was read, exits 0."""
    group, port = _multicast()
    path = tmp_path / "agent.yaml"
    path.write_text(
        "asset: sigterm\n"
        f"state_dir: {tmp_path / 'state'}\n"
        "buses:\n"
        f"  - {{name: can0, interface: udp_multicast, channel: '{group}', fd: true,"
        f" options: {{port: {port}}}, dbc: {BENCH_DBC}}}\n"
        "flush: {checkpoint_seconds: 60}\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "daq_agent.cli", "run", str(path), "--log-interval", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    errors: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            errors.put(line)

    pumper = threading.Thread(target=pump, name="test-stderr-pump")
    pumper.start()
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()  # printed once the bus listens
        assert banner.startswith("daq-agent: asset sigterm"), banner

        def received_at_least(count: int) -> None:
            """Wait for a periodic status log line reporting ``count`` frames received."""
            deadline = time.monotonic() + 20
            while True:
                line = errors.get(timeout=max(0.1, deadline - time.monotonic()))
                match = re.search(r" rx (\d+) ", line)
                if match and int(match.group(1)) >= count:
                    return
                assert time.monotonic() < deadline, f"the agent never reported {count} frames"

        sent = 0
        # in chunks, so the receiving socket's buffer never overflows on a loaded machine
        with can.Bus(interface="udp_multicast", channel=group, port=port) as bus:
            for chunk in range(8):
                for i in range(50):
                    bus.send(
                        can.Message(
                            arbitration_id=0x100,
                            data=bytes([(chunk * 50 + i) % 256] + [0] * 7),
                            is_extended_id=False,
                        )
                    )
                    sent += 1
                received_at_least(sent)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        out = process.stdout.read()
        process.wait(timeout=30)
        elapsed = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        pumper.join(timeout=10)
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()
    assert process.returncode == 0, "".join(errors.queue)
    assert elapsed < 10.0
    assert "frames received 400, decoded 400" in out, out
    assert "delivered 400," in out
    assert "accounting: balanced" in out
    db = tmp_path / "state" / "local.sqlite"
    with Store.open(db, readonly=True) as store:
        assert store.count_samples() == sent
