"""Agent config: loading, defaults, and errors that name the file, line and key."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from daq_agent.config import (
    AgentConfig,
    IdFilter,
    LocalTarget,
    SiftTarget,
    load_config,
)
from daq_agent.core.errors import ConfigError

DBC = """VERSION ""
NS_ :
BS_:
BU_: ECU
BO_ 256 Status: 8 ECU
 SG_ Speed : 0|16@1+ (0.1,0) [0|6553.5] "km/h" ECU
"""


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A directory with a config subdirectory and a database beside it."""
    (tmp_path / "dbc").mkdir()
    (tmp_path / "dbc" / "x.dbc").write_text(DBC)
    (tmp_path / "cfg").mkdir()
    return tmp_path


def write(tree: Path, text: str) -> Path:
    path = tree / "cfg" / "agent.yaml"
    path.write_text(text)
    return path


MINIMAL = """\
asset: bench-1
buses:
  - name: can0
    interface: virtual
    channel: vbus
    dbc: ../dbc/x.dbc
"""


def test_minimal_config_gets_defaults(tree: Path) -> None:
    """A minimal config resolves the database against its own directory and fills defaults."""
    config = load_config(write(tree, MINIMAL), env={})
    assert isinstance(config, AgentConfig)
    assert config.asset == "bench-1"
    assert config.buses[0].databases == ((tree / "dbc" / "x.dbc").resolve(),)
    assert isinstance(config.target, LocalTarget)
    assert config.target.db_path.parent == config.state_dir
    assert config.ring.policy == "drop_oldest"
    assert config.run is not None
    assert config.ingestion_client_key is None


def test_state_dir_from_environment(tree: Path) -> None:
    """DAQ_AGENT_STATE_DIR sets the state directory when the config does not."""
    config = load_config(write(tree, MINIMAL), env={"DAQ_AGENT_STATE_DIR": str(tree / "st")})
    assert config.state_dir == (tree / "st").resolve()
    assert isinstance(config.target, LocalTarget)
    assert config.target.db_path == (tree / "st" / "local.sqlite").resolve()


def test_bus_kwargs_pass_options_and_filters(tree: Path) -> None:
    """Bus options, FD settings and id filters become python-can keyword arguments."""
    text = MINIMAL + (
        "    fd: true\n    data_bitrate: 2000000\n    bitrate: 500000\n"
        "    options: {preserve_timestamps: true}\n"
        "    filters:\n      - {id: 0x100, mask: 0x7F0}\n      - {id: 0x18FF0000, extended: true}\n"
    )
    bus = load_config(write(tree, text), env={}).buses[0]
    kwargs = bus.bus_kwargs()
    assert kwargs["interface"] == "virtual"
    assert kwargs["fd"] is True
    assert kwargs["data_bitrate"] == 2_000_000
    assert kwargs["preserve_timestamps"] is True
    assert bus.filters == (
        IdFilter(0x100, 0x7F0, None),
        IdFilter(0x18FF0000, 0x1FFFFFFF, True),
    )
    assert kwargs["can_filters"][1] == {
        "can_id": 0x18FF0000,
        "can_mask": 0x1FFFFFFF,
        "extended": True,
    }


def test_run_name_template_renders_asset_and_time(tree: Path) -> None:
    """The run name template takes {asset} and strftime codes."""
    text = MINIMAL + 'run:\n  name: "bench-{asset}-%Y%m%d-%H%M%S"\n  tags: [a, b]\n'
    run = load_config(write(tree, text), env={}).run
    assert run is not None
    assert run.render_name("b1", datetime(2026, 1, 2, 3, 4, 5)) == "bench-b1-20260102-030405"
    assert run.tags == ("a", "b")


def test_sift_target_reads_key_from_env_and_file(tree: Path) -> None:
    """A Sift target reads its key from the named environment variable or file."""
    text = MINIMAL + "target:\n  sift: {uri: 'api.example:443', api_key_env: MY_KEY}\n"
    target = load_config(write(tree, text), env={}).target
    assert isinstance(target, SiftTarget)
    assert target.api_key({"MY_KEY": "s3cret\n"}) == "s3cret"
    with pytest.raises(ConfigError, match="MY_KEY is not set") as info:
        target.api_key({})
    assert "s3cret" not in str(info.value)
    (tree / "cfg" / "key.txt").write_text("k3y\n")
    text = MINIMAL + "target:\n  sift: {uri: 'x:443', api_key_file: key.txt, use_ssl: false}\n"
    target = load_config(write(tree, text), env={}).target
    assert isinstance(target, SiftTarget)
    assert target.api_key() == "k3y"
    assert target.use_ssl is False


def test_key_file_under_systemd_credentials(tree: Path) -> None:
    """``api_key_file: ${CREDENTIALS_DIRECTORY}/sift-api-key`` (systemd's LoadCredential=) is
    expanded when the key is read; an unset variable is named, the key never shown."""
    creds = tree / "creds"
    creds.mkdir()
    (creds / "sift-api-key").write_text("cr3d\n")
    text = MINIMAL + (
        "target:\n  sift: {uri: 'x:443', api_key_file: '${CREDENTIALS_DIRECTORY}/sift-api-key'}\n"
    )
    target = load_config(write(tree, text), env={}).target
    assert isinstance(target, SiftTarget)
    assert target.api_key({"CREDENTIALS_DIRECTORY": str(creds)}) == "cr3d"
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY is not set"):
        target.api_key({})


def test_replay_borrows_databases_from_named_bus(tree: Path) -> None:
    """A replay source naming a configured bus uses that bus's databases."""
    (tree / "cfg" / "drive.asc").write_text("")
    text = MINIMAL + "replay:\n  - {path: drive.asc, bus: can0, realtime: true}\n"
    config = load_config(write(tree, text), env={})
    replay = config.replay[0]
    assert replay.name == "replay-drive"
    assert replay.realtime is True
    assert replay.databases == config.buses[0].databases


def test_serial_section_is_parsed(tree: Path) -> None:
    """The serial section keeps the port settings and the definitions path."""
    (tree / "cfg" / "gps.yaml").write_text("{}")
    text = MINIMAL + (
        "serial:\n  - {name: gps, port: 'loop://', baudrate: 9600, parity: e, stopbits: 2,"
        " defs: gps.yaml}\n"
    )
    serial = load_config(write(tree, text), env={}).serial[0]
    assert (serial.name, serial.port, serial.baudrate, serial.parity, serial.stopbits) == (
        "gps",
        "loop://",
        9600,
        "E",
        2.0,
    )
    assert serial.defs == (tree / "cfg" / "gps.yaml").resolve()


@pytest.mark.parametrize(
    ("extra", "key", "line", "reason"),
    [
        ("ring:\n  policy: newest\n", "ring.policy", 8, "must be one of"),
        ("ring:\n  capacity: 0\n", "ring.capacity", 8, "must be >= 1"),
        ("flush:\n  max_batch: many\n", "flush.max_batch", 8, "must be an integer"),
        ("bogus: 1\n", "bogus", 7, "unknown key"),
        ("naming:\n  can_flow: '{bus}'\n", "naming.can_flow", 8, "must contain {message}"),
        ("naming:\n  can_flow: '{bux}.{message}'\n", "naming.can_flow", 8, "unknown placeholder"),
        (
            "target:\n  sift: {uri: x, api_key: hunter2, api_key_env: K}\n",
            "target.sift.api_key",
            8,
            "do not belong",
        ),
        ("run:\n  metadata: {a: [1]}\n", "run.metadata.a", 8, "string, number or bool"),
        (
            "  - {name: c2, interface: nosuch, dbc: ../dbc/x.dbc}\n",
            "buses[1].interface",
            7,
            "unknown python-can interface 'nosuch'",
        ),
        (
            "  - {name: c2, interface: udp_multicast, channel: can0, dbc: ../dbc/x.dbc}\n",
            "buses[1].channel",
            7,
            "'can0' is not an IP address: a udp_multicast bus's channel is its multicast group",
        ),
        (
            "  - {name: c2, interface: udp_multicast, channel: 10.1.2.3, dbc: ../dbc/x.dbc}\n",
            "buses[1].channel",
            7,
            "10.1.2.3 is not a multicast address",
        ),
    ],
)
def test_errors_name_file_line_and_key(
    tree: Path, extra: str, key: str, line: int, reason: str
) -> None:
    """Each invalid value is reported with the file, its line and its key path."""
    path = write(tree, MINIMAL + extra)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    err = info.value
    assert (err.source, err.key, err.line) == (str(path), key, line)
    assert reason in err.reason
    assert str(err).startswith(f"{path}:{line}: {key}: ")
    assert "hunter2" not in str(err)


def test_missing_database_file_is_named(tree: Path) -> None:
    """A database that does not exist is reported at its key with the resolved path."""
    path = write(tree, MINIMAL.replace("../dbc/x.dbc", "nope.dbc"))
    with pytest.raises(ConfigError, match=r"no such file: .*nope\.dbc") as info:
        load_config(path, env={})
    assert info.value.key == "buses[0].dbc"
    assert info.value.line == 6


def test_missing_required_keys(tree: Path) -> None:
    """A bus without an interface and a config without sources are errors naming the key."""
    path = write(tree, "asset: a\nbuses:\n  - name: c\n    dbc: ../dbc/x.dbc\n")
    with pytest.raises(ConfigError, match="is required") as info:
        load_config(path, env={})
    assert info.value.key == "buses[0].interface"
    with pytest.raises(ConfigError, match="no sources"):
        load_config(write(tree, "asset: a\n"), env={})
    with pytest.raises(ConfigError, match="is required") as info:
        load_config(write(tree, "buses: []\n"), env={})
    assert info.value.key == "asset"


def test_duplicate_source_names(tree: Path) -> None:
    """Two sources with one name are refused (flow names would collide)."""
    text = MINIMAL + "  - {name: can0, interface: virtual, dbc: ../dbc/x.dbc}\n"
    with pytest.raises(ConfigError, match="duplicate source name") as info:
        load_config(write(tree, text), env={})
    assert info.value.key == "buses[1].name"


def test_yaml_syntax_error_has_line(tree: Path) -> None:
    """A YAML syntax error is one ConfigError with the file and line."""
    path = write(tree, "asset: a\nbuses: [\n  - x: : :\n")
    with pytest.raises(ConfigError, match="invalid YAML") as info:
        load_config(path, env={})
    assert info.value.source == str(path)
    assert info.value.line is not None
