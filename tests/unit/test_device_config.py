"""The agent config's devices: section (polled Modbus and SCPI devices)."""

from __future__ import annotations

from pathlib import Path

import pytest

from daq_agent.agent import plan_agent
from daq_agent.config import load_config
from daq_agent.core.errors import ConfigError
from daq_agent.readers.modbus import ModbusTarget, parse_modbus_url

REPO = Path(__file__).resolve().parents[2]
PM_MAP = REPO / "configs" / "devices" / "pm_meter.yaml"
PSU = REPO / "configs" / "devices" / "psu_scpi.yaml"


def _write(tmp_path: Path, devices: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(f"asset: a\nstate_dir: {tmp_path / 's'}\ndevices:\n{devices}")
    return path


def test_devices_parse_and_plan_one_flow_per_group_and_reply(tmp_path: Path) -> None:
    """A modbus and a scpi device give their settings and flows named {device}.{frame}."""
    path = _write(
        tmp_path,
        f"  - {{name: pm1, kind: modbus, url: 'tcp://127.0.0.1:1502', unit: 7, rate_hz: 10,"
        f" timeout_s: 0.25, map: {PM_MAP}}}\n"
        f"  - {{name: psu, kind: scpi, url: /dev/ttyUSB9, baudrate: 9600, parity: E,"
        f" map: {PSU}, optional: true}}\n",
    )
    config = load_config(path, env={})
    pm1, psu = config.devices
    assert (pm1.kind, pm1.unit, pm1.rate_hz, pm1.timeout_s) == ("modbus", 7, 10.0, 0.25)
    assert psu.serial_options == {"baudrate": 9600, "parity": "E"}
    assert config.optional_sources == {"psu"}
    assert not config.has_finite_sources_only
    plan = plan_agent(config)
    assert [s.kind for s in plan.sources] == ["modbus", "scpi"]
    assert [f.name for f in plan.flows] == ["pm1.power", "pm1.state", "psu.output", "psu.identity"]


@pytest.mark.parametrize(
    ("entry", "key", "reason"),
    [
        ("{name: d, kind: opcua, url: x, map: M}", "devices[0].kind", "modbus, scpi"),
        ("{name: d, kind: modbus, url: 'udp://h:1', map: M}", "devices[0].url", "scheme"),
        ("{name: d, kind: modbus, url: 'tcp://h:1', map: nope.yaml}", "devices[0].map", "no such"),
        ("{name: d, kind: modbus, url: 'tcp://h:1', map: M, unit: 300}", "devices[0].unit", "247"),
        (
            "{name: d, kind: modbus, url: 'tcp://h:1', map: M, baudrate: 9600}",
            "devices[0].baudrate",
            "unknown key",
        ),
        ("{name: d, kind: scpi, url: x, map: M, rate_hz: 0}", "devices[0].rate_hz", "> 0"),
    ],
)
def test_invalid_devices_name_the_file_line_and_key(
    tmp_path: Path, entry: str, key: str, reason: str
) -> None:
    """Each mistake names the config file, its line and the key."""
    path = _write(tmp_path, "  - " + entry.replace("map: M", f"map: {PM_MAP}") + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    error = caught.value
    assert (error.source, error.key, error.line) == (str(path), key, 4)
    assert reason in error.reason


def test_a_broken_register_map_fails_the_plan_naming_the_map(tmp_path: Path) -> None:
    """plan_agent (what `daq-agent check` runs) reports the map's own file and line."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nname: b\ngroups:\n  - name: g\n    points:\n      - {name: x}\n")
    path = _write(tmp_path, f"  - {{name: d, kind: modbus, url: 'tcp://h:1', map: {bad}}}\n")
    with pytest.raises(ConfigError) as caught:
        plan_agent(load_config(path, env={}))
    assert (caught.value.source, caught.value.line) == (str(bad), 6)
    assert caught.value.key == "groups[0].points[0].address"


def test_modbus_urls() -> None:
    """tcp, rtu (with line settings) and rtu+tcp URLs; bad ones are refused."""
    assert parse_modbus_url("tcp://10.0.0.5") == ModbusTarget("tcp", "socket", "10.0.0.5", 502)
    assert parse_modbus_url("rtu+tcp://gw:4001") == ModbusTarget("tcp", "rtu", "gw", 4001)
    assert parse_modbus_url("rtu:///dev/ttyUSB0?baud=19200&parity=even") == ModbusTarget(
        "serial", "rtu", "/dev/ttyUSB0", 0, (("baudrate", 19200), ("parity", "E"))
    )
    for bad in ("/dev/ttyUSB0", "tcp://:502", "rtu:///dev/x?speed=1", "rtu:///dev/x?baud=fast"):
        with pytest.raises(ConfigError):
            parse_modbus_url(bad)
