"""``daq-agent service install``: the unit and config skeleton it writes, checked with
``systemd-analyze`` and ``daq-agent check``; what exists is never clobbered without --force."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from daq_agent.cli import main

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BENCH_DBC = REPO / "dbc" / "bench.dbc"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def daq(*args: str) -> Result:
    """``daq-agent ARGS`` in this process (the CLI's own entry point), its output captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse
            code = int(exc.code or 0)
    return Result(code, out.getvalue(), err.getvalue())


def install(root: Path, *extra: str) -> Result:
    return daq("service", "install", "--root", str(root), "--asset", "rig-7", *extra)


def test_install_writes_a_unit_and_a_skeleton_that_check_accepts(tmp_path: Path) -> None:
    root = tmp_path / "root"
    result = install(root, "--api-key-file", "/etc/daq-agent/sift.key")
    assert result.returncode == 0, result.stderr
    unit = root / "etc/systemd/system/daq-agent.service"
    config = root / "etc/daq-agent/config.yaml"
    assert f"wrote {unit}" in result.stdout
    assert "does not exist yet" in result.stdout  # the key is the user's to place
    text = unit.read_text()
    exec_start = re.search(r"^ExecStart=(\S+) run --no-live (\S+)$", text, re.M)
    assert exec_start is not None, text
    assert Path(exec_start.group(1)).is_file()  # this installation's daq-agent
    assert exec_start.group(2) == "/etc/daq-agent/config.yaml"
    assert "LoadCredential=sift-api-key:/etc/daq-agent/sift.key" in text
    assert not (root / "etc/daq-agent/sift.key").exists()

    skeleton = config.read_text()
    assert "asset: rig-7" in skeleton
    # the skeleton is a working config once its database path is real
    edited = tmp_path / "config.yaml"
    edited.write_text(skeleton.replace("/etc/daq-agent/dbc/bus.dbc", str(BENCH_DBC)))
    checked = daq("check", str(edited))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_without_a_key_file_the_unit_loads_no_credential(tmp_path: Path) -> None:
    result = daq("service", "unit")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^LoadCredential=", result.stdout, re.M) is None
    assert "# LoadCredential=" in result.stdout
    named = daq("service", "unit", "--name", "rig-b")
    assert "StateDirectory=rig-b" in named.stdout
    assert "DAQ_AGENT_STATE_DIR=%S/rig-b" in named.stdout


def test_install_keeps_the_config_and_refuses_a_changed_unit(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert install(root).returncode == 0
    config = root / "etc/daq-agent/config.yaml"
    unit = root / "etc/systemd/system/daq-agent.service"
    config.write_text("asset: mine\n")
    again = install(root)  # the same unit: fine; the edited config is kept
    assert again.returncode == 0, again.stderr
    assert f"kept {config}" in again.stdout
    assert config.read_text() == "asset: mine\n"

    unit.write_text(unit.read_text() + "# local edit\n")
    refused = install(root)
    assert refused.returncode == 2
    assert "exists and differs" in refused.stderr
    assert unit.read_text().endswith("# local edit\n")
    forced = install(root, "--force")
    assert forced.returncode == 0, forced.stderr
    assert not unit.read_text().endswith("# local edit\n")
    assert config.read_text() == "asset: mine\n"  # --force never touches the config


def test_bad_arguments_are_clear_errors(tmp_path: Path) -> None:
    relative = daq("service", "install", "--root", str(tmp_path), "--config-dir", "etc/x")
    assert relative.returncode == 2
    assert "--config-dir" in relative.stderr
    assert "absolute" in relative.stderr
    name = daq("service", "unit", "--name", "a b")
    assert name.returncode == 2
    assert "--name" in name.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_the_installed_unit_verifies_and_keeps_its_hardening(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    root = tmp_path / "root"
    assert install(root, "--api-key-file", "/etc/daq-agent/sift.key").returncode == 0
    unit = root / "etc/systemd/system/daq-agent.service"
    verify = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    complaints = [line for line in verify.stderr.splitlines() if "daq-agent.service" in line]
    assert verify.returncode == 0, verify.stderr
    assert complaints == [], verify.stderr
    security = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for daq-agent\.service: (\d+\.\d+)", security.stdout)
    assert match is not None, security.stdout + security.stderr
    assert float(match.group(1)) <= 3.0, security.stdout
