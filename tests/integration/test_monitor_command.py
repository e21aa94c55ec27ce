"""``daq-agent monitor``'s arguments: clear errors, and the sources it builds from a config."""

from __future__ import annotations

from pathlib import Path

import can
import pytest
from monitor_support import PACK, TEMPS, wait_until, write_dbc

from daq_agent.cli import build_parser, main
from daq_agent.commands import monitor
from daq_agent.core.errors import ConfigError
from daq_agent.monitor.sources import AgentSource, DirectSource

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "say what to watch: --agent URL, --bus IF:CH, --log FILE or --config C"),
        (["--bus", "virtual:x"], "--dbc FILE (or --config C) is needed to decode"),
        (["--bus", "virtual", "--dbc", "x.dbc"], "--bus 'virtual': expected INTERFACE:CHANNEL"),
        (["--agent", "ftp://h"], "--agent 'ftp://h': expected http://HOST:PORT"),
        (["--agent", "h:1", "--dbc", "x.dbc"], "--agent takes no --dbc or --config"),
        (["--refresh", "0", "--agent", "h:1"], "--refresh must be > 0"),
        (["--log", "missing.blf", "--dbc", "x.dbc"], "missing.blf: no such file"),
    ],
)
def test_bad_arguments_are_refused_with_a_reason(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each mistake exits 2 with a message saying what is wrong."""
    assert main(["monitor", *argv]) == 2
    assert message in capsys.readouterr().err


def test_without_a_terminal_the_monitor_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Valid arguments but no terminal (a pipe): exit 2, 'needs a terminal', nothing started."""
    assert main(["monitor", "--agent", "127.0.0.1:9"]) == 2
    assert "monitor needs a terminal" in capsys.readouterr().err


def source_for(*argv: str) -> DirectSource | AgentSource:
    args = build_parser().parse_args(["monitor", *argv])
    source: DirectSource | AgentSource = monitor._source(args)
    return source


def test_config_sources_are_read_directly_with_their_names(tmp_path: Path, channel: str) -> None:
    """``--config C`` reads every bus of the config under its own name; ``--bus … --name B``
    borrows bus B's databases and alias; nothing is stored."""
    dbc = write_dbc(tmp_path)
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"state_dir: {tmp_path / 'state'}\nasset: a\nbuses:\n"
        f"  - {{name: front, interface: virtual, channel: {channel}-f, databases: [{dbc}]}}\n"
        f"  - {{name: rear, interface: virtual, channel: {channel}-r, databases: [{dbc}]}}\n"
    )
    source = source_for("--config", str(config))
    assert isinstance(source, DirectSource)
    with source, can.Bus(f"{channel}-r", interface="virtual") as rear:
        assert [r.name for r in source.readers] == ["front", "rear"]

        def rear_values() -> set[tuple[str, str]]:
            rear.send(PACK)
            rear.send(TEMPS)
            document, _ = source.document()
            assert document is not None
            return {(c["flow"], c["name"]) for c in document["channels"]}

        wait_until(lambda: ("rear.Temps", "CoolantTemp") in rear_values(), 15, "rear's values")
        flows = {flow for flow, _ in rear_values()}
        assert flows == {"rear.Pack", "rear.Temps"}
    assert not (tmp_path / "state").exists()
    borrowed = source_for(
        "--config", str(config), "--bus", f"virtual:{channel}-x", "--name", "rear"
    )
    assert isinstance(borrowed, DirectSource)
    assert borrowed.title == f"bus virtual:{channel}-x as rear"
    assert borrowed.tap.flow_names == ["rear.Pack", "rear.Temps"]
    with pytest.raises(ConfigError, match="no bus 'middle'"):
        source_for("--config", str(config), "--log", str(dbc), "--name", "middle")


GGA = b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n"


def test_a_config_serial_device_is_read_directly(tmp_path: Path) -> None:
    """``--config C`` with a serial device (a pty): its NMEA sentences show as the device's
    flow values, with their units and value labels."""
    import os

    defs = Path(__file__).resolve().parents[2] / "configs" / "serial" / "gps_nmea.yaml"
    master, slave = os.openpty()
    try:
        config = tmp_path / "agent.yaml"
        config.write_text(
            f"asset: a\nstate_dir: {tmp_path / 'state'}\n"
            f"serial:\n  - {{name: gps, port: '{os.ttyname(slave)}', baudrate: 115200,"
            f" defs: {defs}}}\n"
        )
        source = source_for("--config", str(config))
        assert isinstance(source, DirectSource)
        with source:

            def latitude() -> dict[str, dict]:
                os.write(master, GGA)
                document, _ = source.document()
                assert document is not None
                return {c["name"]: c for c in document["channels"] if c["flow"] == "gps.gga"}

            wait_until(lambda: "latitude" in latitude(), 15, "the GGA latitude")
            values = latitude()
            assert abs(values["latitude"]["value"] - 48.1173) < 1e-4
            assert values["latitude"]["unit"] == "deg"
            assert values["altitude"]["value"] == 545.4
            assert (values["fix_quality"]["value"], values["fix_quality"]["label"]) == (1, "gps")
    finally:
        os.close(master)
        os.close(slave)
