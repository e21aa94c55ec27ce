"""The agent config (YAML): load, validate, and report problems naming the file, line and key.

A config describes one asset: where its data goes (the embedded local server by default, or Sift),
the run it is recorded under, and its sources (CAN buses, recorded logs, serial devices), plus the
tuning of the ring buffer and the flusher::

    asset: bench-1                       # required
    state_dir: ./daq-agent-state         # default: $DAQ_AGENT_STATE_DIR or ./daq-agent-state
    ingestion_client_key: null           # default: derived from the asset and the flows
    target:                              # default: local (embedded server, SQLite under state_dir)
      local: {db: null, host: 127.0.0.1, port: 0}
      # sift: {uri: api.siftstack.com:443, api_key_env: SIFT_API_KEY, use_ssl: true}
    run:                                 # or `run: false` for no run
      name: "bench-{asset}-%Y%m%d-%H%M%S"
      description: ""
      tags: []
      metadata: {}
    naming:
      can_flow: "{bus}.{message}"
    buses:
      - name: can0
        interface: socketcan
        channel: can0
        bitrate: 500000
        fd: false
        data_bitrate: null
        receive_own_messages: false
        optional: false                  # true: may be absent (a run without it still exits 0)
        protocol: can                    # or j1939: by PGN, TP reassembly, DM1 (docs/j1939.md)
        options: {}                      # any other python-can Bus keyword argument
        databases: [../dbc/bench.dbc]    # dbc, kcd, arxml, sym
        filters: [{id: 0x100, mask: 0x7FF, extended: false}]
        journal:                         # optional: every raw frame on disk (python-can writers)
          dir: journal                   # required; files <dir>/<bus>-<UTC start>Z.<format>
          format: blf                    # blf, asc or log (candump -L)
          rotate_mb: 64                  # a new file at this size (null: no limit)
          rotate_s: null                 # ... or at this age, seconds
          keep_files: null               # retention: the newest N files of this bus
          keep_days: null                # ... and/or those written in the last N days
          queue_size: 65536              # frames waiting for the disk; beyond: dropped, counted
          flush_interval_ms: 1000        # written data reaches the OS at least this often
    replay:
      - {path: logs/drive.blf, bus: can0, realtime: false}
    serial:
      - {name: gps, port: /dev/ttyUSB0, baudrate: 9600, defs: serial/gps.yaml,
         journal: {dir: journal}}       # raw bytes per read: format hex, the same other keys
    devices:                             # polled request/response devices (docs/devices.md)
      - {name: pm1, kind: modbus, url: "tcp://10.0.0.5:502", unit: 1, rate_hz: 10,
         timeout_s: 0.5, map: devices/pm_meter.yaml}
      - {name: psu, kind: scpi, url: /dev/ttyUSB1, baudrate: 9600, rate_hz: 2,
         map: devices/psu_scpi.yaml}
    ring: {capacity: 65536, policy: drop_oldest}      # or block
    flush: {max_batch: 2000, max_age_ms: 50, checkpoint_seconds: 1, checkpoint_records: 50000,
            checkpoint_timeout_s: 30, retry_initial_s: 0.2, retry_max_s: 10, auth_retry_s: 30,
            drain_timeout_s: 30}
    spool:                               # the durable backlog between the flusher and the API
      enabled: true
      dir: null                          # default: <state_dir>/spool
      fsync_interval_ms: 100             # group commit; 0 fsyncs every batch
      quota_mb: null                     # null: no quota; else drop-oldest beyond it (counted)
      segment_mb: 64

Relative paths resolve against the directory of the config file. API keys never appear in the YAML:
``sift.api_key_env`` names an environment variable, ``sift.api_key_file`` a file holding the key.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Literal

from daq_agent.core.errors import ConfigError
from daq_agent.core.yamlfile import load_yaml
from daq_agent.readers.journal import CAN_FORMATS, SERIAL_FORMAT, JournalSettings

__all__ = [
    "DATABASE_SUFFIXES",
    "DEFAULT_STATE_DIR",
    "STATE_DIR_ENV",
    "AgentConfig",
    "BusConfig",
    "DeviceConfig",
    "FlushConfig",
    "IdFilter",
    "LocalTarget",
    "NamingConfig",
    "ReplayConfig",
    "RingConfig",
    "RunConfig",
    "SerialConfig",
    "SiftTarget",
    "SpoolConfig",
    "load_config",
    "parse_config",
]

STATE_DIR_ENV: Final = "DAQ_AGENT_STATE_DIR"
DEFAULT_STATE_DIR: Final = "./daq-agent-state"
DATABASE_SUFFIXES: Final = frozenset({".dbc", ".kcd", ".arxml", ".sym"})
"""File types cantools loads (``Database.add_file`` picks the format by suffix)."""

OverflowPolicy = Literal["drop_oldest", "block"]
_POLICIES: Final = ("drop_oldest", "block")
_PARITIES: Final = ("N", "E", "O", "M", "S")
_DEFAULT_RUN_NAME: Final = "{asset}-%Y%m%d-%H%M%S"
_DEFAULT_CAN_FLOW: Final = "{bus}.{message}"
_DEFAULT_SERIAL_FLOW: Final = "{device}.{frame}"
_DEFAULT_RING_CAPACITY: Final = 65536
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


# -- the config values ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IdFilter:
    """A receive filter: a frame passes when ``frame_id & mask == id & mask``.

    Attributes:
        can_id: the id to match.
        can_mask: the bits of the id that must match.
        extended: match only extended (True) or standard (False) frames; None for both.
    """

    can_id: int
    can_mask: int
    extended: bool | None = None

    def as_python_can(self) -> dict[str, Any]:
        """The filter as python-can's ``can_filters`` entry."""
        out: dict[str, Any] = {"can_id": self.can_id, "can_mask": self.can_mask}
        if self.extended is not None:
            out["extended"] = self.extended
        return out


@dataclass(frozen=True, slots=True)
class BusConfig:
    """A CAN bus: its alias, how python-can opens it, and its databases.

    Attributes:
        name: the bus alias, part of every flow name of this bus.
        interface: the python-can interface (``socketcan``, ``virtual``, ``udp_multicast``, …).
        channel: the interface's channel, if it needs one.
        bitrate: nominal bit rate, if the interface takes one.
        fd: whether the bus is CAN FD.
        data_bitrate: CAN FD data-phase bit rate.
        receive_own_messages: whether frames sent on this host are received too.
        options: any other keyword arguments for ``can.Bus``, passed through.
        databases: database files (absolute), in load order.
        filters: receive filters (empty: everything).
        optional: a bus that may be absent: a run in which it never opened still exits 0.
        protocol: ``None`` (plain CAN; a DBC marked J1939 still is) or ``"j1939"``: every 29-bit
            message of the bus's databases is J1939 (matched by PGN; see ``docs/j1939.md``).
        journal: the raw-frame journal of this bus (None: none).
    """

    name: str
    interface: str
    channel: str | int | None = None
    bitrate: int | None = None
    fd: bool = False
    data_bitrate: int | None = None
    receive_own_messages: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    databases: tuple[Path, ...] = ()
    filters: tuple[IdFilter, ...] = ()

    def bus_kwargs(self) -> dict[str, Any]:
        """The keyword arguments for ``can.Bus(**kwargs)``."""
        kwargs: dict[str, Any] = dict(self.options)
        kwargs["interface"] = self.interface
        if self.channel is not None:
            kwargs["channel"] = self.channel
        if self.bitrate is not None:
            kwargs["bitrate"] = self.bitrate
        if self.fd:
            kwargs["fd"] = True
        if self.data_bitrate is not None:
            kwargs["data_bitrate"] = self.data_bitrate
        if self.receive_own_messages:
            kwargs["receive_own_messages"] = True
        if self.filters:
            kwargs["can_filters"] = [f.as_python_can() for f in self.filters]
        return kwargs

    optional: bool = False
    protocol: str | None = None
    journal: JournalSettings | None = None


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    """A recorded log played back as a bus (any format python-can reads).

    Attributes:
        name: the reader's name (default: ``replay-<file stem>``).
        path: the log file (absolute).
        bus: the bus alias its frames belong to (flow names); a configured bus of that name lends
            its databases.
        realtime: play at the recorded pace (True) or as fast as possible (False).
        databases: the databases decoding it (absolute).
    """

    name: str
    path: Path
    bus: str
    realtime: bool = False
    databases: tuple[Path, ...] = ()


@dataclass(frozen=True, slots=True)
class SerialConfig:
    """A serial device (issue 4): the port, its line settings and its frame definitions.

    Attributes:
        name: the device alias, part of its flow names.
        port: a pyserial URL or device path (``/dev/ttyUSB0``, ``socket://…``, ``loop://``).
        baudrate: bits per second.
        bytesize: data bits (5 to 8).
        parity: ``N``, ``E``, ``O``, ``M`` or ``S``.
        stopbits: 1, 1.5 or 2.
        rtscts: hardware flow control.
        xonxoff: software flow control.
        optional: a device that may be absent: a run in which it never opened still exits 0.
        defs: the frame-definition file (absolute).
        journal: the raw-bytes journal of this device (None: none).
    """

    name: str
    port: str
    defs: Path
    baudrate: int = 115200
    bytesize: int = 8
    parity: str = "N"
    stopbits: float = 1
    rtscts: bool = False
    xonxoff: bool = False
    optional: bool = False
    journal: JournalSettings | None = None


DEVICE_KINDS: Final = ("modbus", "scpi")
"""The kinds of polled device: a Modbus register map, or line queries (SCPI)."""


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """A polled request/response device (issue 12): Modbus TCP/RTU or a line-query instrument.

    Attributes:
        name: the device alias, part of its flow names (``naming.serial_flow``: ``{device}``;
            ``{frame}`` is the poll group or the reply's name).
        kind: ``modbus`` or ``scpi``.
        url: modbus: ``tcp://host:port``, ``rtu:///dev/ttyUSB0?baudrate=19200``,
            ``rtu+tcp://host:port``; scpi: a pyserial URL or device path.
        map: the register map (modbus) or query file (scpi), absolute.
        rate_hz: polls per second of each group/query without a rate of its own.
        timeout_s: the longest to wait for one reply.
        unit: modbus: the unit (slave) id.
        serial_options: scpi: the line settings given (``baudrate``, ``bytesize``, ``parity``,
            ``stopbits``, ``rtscts``, ``xonxoff``).
        optional: a device that may be absent: a run in which it never answered still exits 0.
    """

    name: str
    kind: str
    url: str
    map: Path
    rate_hz: float = 1.0
    timeout_s: float = 1.0
    unit: int = 1
    serial_options: Mapping[str, Any] = field(default_factory=dict)
    optional: bool = False


@dataclass(frozen=True, slots=True)
class LocalTarget:
    """The embedded local ingestion server, started by the agent.

    Attributes:
        db_path: the SQLite file (absolute).
        host: the address it listens on (loopback by default).
        port: the port (0: any free port).
    """

    db_path: Path
    host: str = "127.0.0.1"
    port: int = 0


_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def _expand_variables(text: str, env: Mapping[str, str]) -> str:
    """``$NAME`` and ``${NAME}`` replaced from ``env``.

    Raises:
        ConfigError: a variable is not set (under systemd, ``CREDENTIALS_DIRECTORY`` is set only
            with ``LoadCredential=``).
    """

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in env:
            raise ConfigError(
                f"{name} is not set (used in {text!r})", key="target.sift.api_key_file"
            )
        return env[name]

    return _VARIABLE.sub(value, text)


@dataclass(frozen=True, slots=True)
class SiftTarget:
    """A Sift API endpoint; the key comes from an environment variable or a file.

    Attributes:
        uri: ``host:port`` of the gRPC API.
        api_key_env: the environment variable holding the key.
        api_key_file: the file holding the key (absolute).
        use_ssl: TLS (real Sift requires it).
    """

    uri: str
    api_key_env: str | None = None
    api_key_file: Path | None = None
    use_ssl: bool = True

    def api_key(self, env: Mapping[str, str] | None = None) -> str:
        """Read the API key from its environment variable or file.

        Raises:
            ConfigError: the variable is unset or empty, or the file cannot be read or is empty.
                The message never contains the key.
        """
        if self.api_key_env is not None:
            value = (os.environ if env is None else env).get(self.api_key_env, "").strip()
            if not value:
                raise ConfigError(
                    f"environment variable {self.api_key_env} is not set or empty",
                    key="target.sift.api_key_env",
                )
            return value
        assert self.api_key_file is not None  # parse_config guarantees one of the two
        path = _expand_variables(str(self.api_key_file), os.environ if env is None else env)
        try:
            value = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"cannot read API key file {path}: {exc.strerror}",
                key="target.sift.api_key_file",
            ) from exc
        if not value:
            raise ConfigError(f"API key file {path} is empty", key="target.sift.api_key_file")
        return value


@dataclass(frozen=True, slots=True)
class RunConfig:
    """The run the data is recorded under: created (or reused by name) at start, stopped at end.

    Attributes:
        name: a template: ``{asset}`` is replaced by the asset name, then strftime codes
            (``%Y%m%d-%H%M%S``) by the start time.
        description: the run's description.
        tags: the run's tags.
        metadata: the run's metadata (string, number or bool values).
    """

    name: str = _DEFAULT_RUN_NAME
    description: str = ""
    tags: tuple[str, ...] = ()
    metadata: Mapping[str, str | float | bool] = field(default_factory=dict)

    def render_name(self, asset: str, when: datetime | None = None) -> str:
        """The run name for ``asset`` started at ``when`` (default: now, local time)."""
        when = when or datetime.now().astimezone()
        return when.strftime(self.name.replace("{asset}", asset.replace("%", "%%")))


@dataclass(frozen=True, slots=True)
class RingConfig:
    """The ring buffer between the readers and the flusher.

    Attributes:
        capacity: the most samples it holds.
        policy: ``drop_oldest`` (counted) or ``block`` (the readers wait).
    """

    capacity: int = _DEFAULT_RING_CAPACITY
    policy: OverflowPolicy = "drop_oldest"


@dataclass(frozen=True, slots=True)
class FlushConfig:
    """How the flusher batches and checkpoints.

    Attributes:
        max_batch: the most samples sent in one batch.
        max_age_ms: the longest a sample waits in the ring before its batch is sent.
        checkpoint_seconds: a stream is closed (the server commits and answers) and a new one
            opened at least this often.
        checkpoint_records: … and after at most this many samples.
        retry_initial_s: the first delay before re-sending a failed window.
        retry_max_s: the cap of that delay.
        checkpoint_timeout_s: the longest to wait for the server's answer at a checkpoint (then
            the stream is abandoned and the window re-sent).
        drain_timeout_s: at shutdown, how long to keep trying to deliver what is left.
        auth_retry_s: the delay between attempts while the API refuses the key.
    """

    max_batch: int = 2000
    max_age_ms: int = 50
    checkpoint_seconds: float = 1.0
    checkpoint_records: int = 50_000
    retry_initial_s: float = 0.2
    retry_max_s: float = 10.0
    checkpoint_timeout_s: float = 30.0
    drain_timeout_s: float = 30.0
    auth_retry_s: float = 30.0


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    """The durable spool between the flusher and the ingestion API.

    Attributes:
        enabled: spool on disk (True) or keep the unacknowledged window in memory (False).
        directory: the spool directory (absolute; default ``<state_dir>/spool``).
        fsync_interval_ms: the longest a batch stays unsynced (group commit); 0: every batch.
        quota_mb: the most MiB of segment files; beyond it the oldest are dropped and counted
            (None: no quota).
        segment_mb: a segment file is rolled at this size, MiB.
    """

    directory: Path
    enabled: bool = True
    fsync_interval_ms: int = 100
    quota_mb: float | None = None
    segment_mb: float = 64.0

    @property
    def quota_bytes(self) -> int | None:
        """The quota in bytes (None: no quota)."""
        return None if self.quota_mb is None else max(1, int(self.quota_mb * 2**20))

    @property
    def segment_bytes(self) -> int:
        """The segment size in bytes."""
        return max(1, int(self.segment_mb * 2**20))


@dataclass(frozen=True, slots=True)
class NamingConfig:
    """Naming templates.

    Attributes:
        can_flow: the flow name of a CAN message: ``{bus}``, ``{message}``, ``{frame_id}``
            (an int: ``{frame_id:X}``) are replaced.
        serial_flow: the flow name of a serial frame type: ``{device}``, ``{frame}``.
    """

    can_flow: str = _DEFAULT_CAN_FLOW
    serial_flow: str = _DEFAULT_SERIAL_FLOW


Target = LocalTarget | SiftTarget


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """A validated agent config.

    Attributes:
        asset: the asset name.
        source: the config file, if loaded from one.
        state_dir: where the agent keeps its state (the local server's SQLite file, the spool).
        target: where the data goes.
        run: the run, or None to ingest without one.
        buses: live CAN buses.
        replay: recorded logs played as buses.
        serial: serial devices.
        devices: polled devices (Modbus, SCPI).
        ring: the ring buffer.
        flush: the flusher.
        naming: naming templates.
        ingestion_client_key: the ingestion config's client key; None: derived from the asset and
            the fingerprint of the flows.
        spool: the durable spool (default: on, under ``state_dir``).
        raw: the parsed document (for sections read by later components, e.g. ``spool``).
    """

    asset: str
    state_dir: Path
    target: Target
    source: Path | None = None
    run: RunConfig | None = field(default_factory=RunConfig)
    buses: tuple[BusConfig, ...] = ()
    replay: tuple[ReplayConfig, ...] = ()
    serial: tuple[SerialConfig, ...] = ()
    devices: tuple[DeviceConfig, ...] = ()
    ring: RingConfig = field(default_factory=RingConfig)
    flush: FlushConfig = field(default_factory=FlushConfig)
    naming: NamingConfig = field(default_factory=NamingConfig)
    ingestion_client_key: str | None = None
    spool: SpoolConfig | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def optional_sources(self) -> frozenset[str]:
        """The names of the buses, serial and polled devices marked ``optional: true``."""
        return frozenset(
            [b.name for b in self.buses if b.optional]
            + [d.name for d in self.serial if d.optional]
            + [d.name for d in self.devices if d.optional]
        )

    @property
    def spool_config(self) -> SpoolConfig:
        """The spool settings (the defaults under ``state_dir`` when not given)."""
        return self.spool or SpoolConfig(directory=self.state_dir / "spool")

    @property
    def dead_letter_path(self) -> Path:
        """The dead-letter file: requests the API can never accept (under ``state_dir``)."""
        return self.state_dir / "deadletter.dqdl"

    @property
    def has_finite_sources_only(self) -> bool:
        """True when every source is a recorded log (the run ends when they end)."""
        return bool(self.replay) and not self.buses and not self.serial and not self.devices


# -- loading ----------------------------------------------------------------------------------


def load_config(path: str | Path, *, env: Mapping[str, str] | None = None) -> AgentConfig:
    """Load and validate an agent config file.

    Args:
        path: the YAML file.
        env: the environment (default ``os.environ``), for ``DAQ_AGENT_STATE_DIR``.

    Returns:
        The validated config, every path absolute.

    Raises:
        ConfigError: naming the file, the line and the key path of the first problem.
    """
    source = Path(path)
    document, lines = load_yaml(source)
    return parse_config(
        document, source=source, base_dir=source.resolve().parent, lines=lines, env=env
    )


def parse_config(
    document: object,
    *,
    source: Path | None = None,
    base_dir: Path | None = None,
    lines: Mapping[str, int] | None = None,
    env: Mapping[str, str] | None = None,
) -> AgentConfig:
    """Validate a parsed config document.

    Args:
        document: the parsed YAML.
        source: the file it came from (named in errors).
        base_dir: the directory relative paths resolve against (default: the current one).
        lines: key path → 1-based line, for errors.
        env: the environment (default ``os.environ``).

    Returns:
        The validated config.

    Raises:
        ConfigError: naming the source, line and key path of the first problem.
    """
    parser = _Parser(
        source=str(source) if source is not None else None,
        base_dir=(base_dir or Path.cwd()).resolve(),
        lines=lines or {},
        env=os.environ if env is None else env,
    )
    return parser.config(document, source)


_TOP_KEYS: Final = frozenset(
    {
        "asset",
        "state_dir",
        "target",
        "run",
        "buses",
        "replay",
        "serial",
        "devices",
        "ring",
        "flush",
        "naming",
        "ingestion_client_key",
        "spool",
    }
)


class _Parser:
    __slots__ = ("base_dir", "env", "lines", "source")

    def __init__(
        self,
        *,
        source: str | None,
        base_dir: Path,
        lines: Mapping[str, int],
        env: Mapping[str, str],
    ) -> None:
        self.source = source
        self.base_dir = base_dir
        self.lines = lines
        self.env = env

    # -- helpers ------------------------------------------------------------------------------

    def error(self, reason: str, key: str) -> ConfigError:
        line = self.lines.get(key)
        if line is None:  # a missing key: point at its parent
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            line = self.lines.get(parent) if parent else None
        return ConfigError(reason, source=self.source, key=key or None, line=line)

    def mapping(self, raw: object, where: str, allowed: frozenset[str]) -> Mapping[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, Mapping):
            raise self.error(f"must be a mapping, not {_kind(raw)}", where or "<document>")
        for key in raw:
            if not isinstance(key, str):
                raise self.error(f"keys must be strings, not {_kind(key)}", where or "<document>")
            if key not in allowed:
                hint = ", ".join(sorted(allowed))
                raise self.error(f"unknown key (expected one of: {hint})", _join(where, key))
        return raw

    def free_mapping(self, raw: object, where: str) -> Mapping[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, Mapping):
            raise self.error(f"must be a mapping, not {_kind(raw)}", where)
        for key in raw:
            if not isinstance(key, str):
                raise self.error(f"keys must be strings, not {_kind(key)}", where)
        return raw

    def string(
        self, raw: Mapping[str, Any], key: str, where: str, default: str | None = None
    ) -> str | None:
        value = raw.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.error(f"must be a string, not {_kind(value)}", _join(where, key))
        return value

    def required_string(self, raw: Mapping[str, Any], key: str, where: str) -> str:
        value = self.string(raw, key, where)
        if not value:
            raise self.error("is required", _join(where, key))
        return value

    def integer(
        self,
        raw: Mapping[str, Any],
        key: str,
        where: str,
        default: int | None,
        *,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int | None:
        value = raw.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"must be an integer, not {_kind(value)}", _join(where, key))
        if minimum is not None and value < minimum:
            raise self.error(f"must be >= {minimum}, got {value}", _join(where, key))
        if maximum is not None and value > maximum:
            raise self.error(f"must be <= {maximum}, got {value}", _join(where, key))
        return value

    def number(
        self, raw: Mapping[str, Any], key: str, where: str, default: float, *, positive: bool = True
    ) -> float:
        value = raw.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(f"must be a number, not {_kind(value)}", _join(where, key))
        if positive and not value > 0:
            raise self.error(f"must be > 0, got {value}", _join(where, key))
        return float(value)

    def boolean(self, raw: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
        value = raw.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(f"must be true or false, not {_kind(value)}", _join(where, key))
        return value

    def sequence(self, raw: Mapping[str, Any], key: str, where: str) -> list[Any]:
        value = raw.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(f"must be a list, not {_kind(value)}", _join(where, key))
        return value

    def path(self, value: str) -> Path:
        expanded = Path(os.path.expandvars(os.path.expanduser(value)))
        return (expanded if expanded.is_absolute() else (self.base_dir / expanded)).resolve()

    def existing_file(self, value: object, key: str) -> Path:
        if not isinstance(value, str) or not value:
            raise self.error(f"must be a file path, not {_kind(value)}", key)
        path = self.path(value)
        if not path.is_file():
            raise self.error(f"no such file: {path}", key)
        return path

    def name(self, raw: Mapping[str, Any], key: str, where: str, default: str | None) -> str:
        value = self.string(raw, key, where, default)
        if not value:
            raise self.error("is required", _join(where, key))
        if not _NAME_RE.match(value):
            raise self.error(
                f"{value!r} is not a valid name (letters, digits, '_', '.', '-')",
                _join(where, key),
            )
        return value

    # -- sections -----------------------------------------------------------------------------

    def config(self, document: object, source: Path | None) -> AgentConfig:
        if document is None:
            raise self.error("the config is empty", "")
        top = self.mapping(document, "", _TOP_KEYS)
        asset = self.name(top, "asset", "", None)
        state_raw = self.string(top, "state_dir", "")
        if state_raw is None:
            state_raw = self.env.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR
            state_dir = Path(state_raw).expanduser()
            state_dir = state_dir if state_dir.is_absolute() else (Path.cwd() / state_dir)
        else:
            state_dir = self.path(state_raw)
        state_dir = state_dir.resolve()
        buses = self.buses(top)
        bus_by_name = {b.name: b for b in buses}
        replay = self.replays(top, bus_by_name)
        serial = self.serials(top)
        devices = self.devices(top)
        self.unique_names(
            [(b.name, f"buses[{i}].name") for i, b in enumerate(buses)]
            + [(r.name, f"replay[{i}].name") for i, r in enumerate(replay)]
            + [(s.name, f"serial[{i}].name") for i, s in enumerate(serial)]
            + [(d.name, f"devices[{i}].name") for i, d in enumerate(devices)]
        )
        if not (buses or replay or serial or devices):
            raise self.error("no sources: configure buses, replay, serial or devices", "buses")
        client_key = self.string(top, "ingestion_client_key", "")
        if client_key is not None and not client_key.strip():
            raise self.error(
                "must not be empty (leave it out to derive one)", "ingestion_client_key"
            )
        return AgentConfig(
            asset=asset,
            source=source.resolve() if source is not None else None,
            state_dir=state_dir,
            target=self.target(top, state_dir),
            run=self.run(top),
            buses=buses,
            replay=replay,
            serial=serial,
            devices=devices,
            ring=self.ring(top),
            flush=self.flush(top),
            naming=self.naming(top),
            ingestion_client_key=client_key,
            spool=self.spool(top, state_dir),
            raw=dict(top),
        )

    def unique_names(self, names: list[tuple[str, str]]) -> None:
        seen: set[str] = set()
        for value, key in names:
            if value in seen:
                raise self.error(f"duplicate source name {value!r}", key)
            seen.add(value)

    def target(self, top: Mapping[str, Any], state_dir: Path) -> Target:
        raw = top.get("target")
        if raw is None or raw == "local":
            return LocalTarget(db_path=state_dir / "local.sqlite")
        target = self.mapping(raw, "target", frozenset({"local", "sift"}))
        if ("local" in target) == ("sift" in target):
            raise self.error("give exactly one of 'local' or 'sift'", "target")
        if "local" in target:
            local = self.mapping(target["local"], "target.local", frozenset({"db", "host", "port"}))
            db = self.string(local, "db", "target.local")
            return LocalTarget(
                db_path=self.path(db) if db else state_dir / "local.sqlite",
                host=self.string(local, "host", "target.local", "127.0.0.1") or "127.0.0.1",
                port=self.integer(local, "port", "target.local", 0, minimum=0, maximum=65535) or 0,
            )
        where = "target.sift"
        sift = self.mapping(
            target["sift"],
            where,
            frozenset({"uri", "api_key_env", "api_key_file", "use_ssl", "api_key"}),
        )
        if "api_key" in sift:
            # Never echo the value: it may be a real key.
            raise self.error(
                "API keys do not belong in the config; use api_key_env or api_key_file",
                f"{where}.api_key",
            )
        uri = self.required_string(sift, "uri", where)
        key_env = self.string(sift, "api_key_env", where)
        key_file = self.string(sift, "api_key_file", where)
        if (key_env is None) == (key_file is None):
            raise self.error("give exactly one of api_key_env or api_key_file", where)
        return SiftTarget(
            uri=uri,
            api_key_env=key_env,
            # ``${CREDENTIALS_DIRECTORY}/key`` (systemd's LoadCredential=) is expanded when read
            api_key_file=(
                None
                if key_file is None
                else Path(key_file)
                if "$" in key_file
                else self.path(key_file)
            ),
            use_ssl=self.boolean(sift, "use_ssl", where, True),
        )

    def run(self, top: Mapping[str, Any]) -> RunConfig | None:
        raw = top.get("run", {})
        if raw is False:
            return None
        where = "run"
        run = self.mapping(raw, where, frozenset({"name", "description", "tags", "metadata"}))
        name = self.string(run, "name", where, _DEFAULT_RUN_NAME) or _DEFAULT_RUN_NAME
        try:
            RunConfig(name=name).render_name("asset")
        except ValueError as exc:
            raise self.error(f"invalid name template: {exc}", f"{where}.name") from exc
        tags = []
        for i, tag in enumerate(self.sequence(run, "tags", where)):
            if not isinstance(tag, str) or not tag:
                raise self.error(
                    f"must be a non-empty string, not {_kind(tag)}", f"{where}.tags[{i}]"
                )
            tags.append(tag)
        metadata: dict[str, str | float | bool] = {}
        meta = self.free_mapping(run.get("metadata"), f"{where}.metadata")
        for key, value in meta.items():
            if isinstance(value, bool | str | float | int):
                metadata[key] = (
                    float(value)
                    if isinstance(value, int) and not isinstance(value, bool)
                    else value
                )
            else:
                raise self.error(
                    f"must be a string, number or bool, not {_kind(value)}",
                    f"{where}.metadata.{key}",
                )
        return RunConfig(
            name=name,
            description=self.string(run, "description", where, "") or "",
            tags=tuple(tags),
            metadata=metadata,
        )

    def databases(self, raw: Mapping[str, Any], where: str, *, required: bool) -> tuple[Path, ...]:
        if "dbc" in raw and "databases" in raw:
            raise self.error("give either 'dbc' or 'databases', not both", where)
        key = "dbc" if "dbc" in raw else "databases"
        value = raw.get(key)
        items: list[Any] = [value] if isinstance(value, str) else self.sequence(raw, key, where)
        if not items:
            if required:
                raise self.error(
                    "at least one database file is required", _join(where, "databases")
                )
            return ()
        paths: list[Path] = []
        for i, item in enumerate(items):
            at = f"{where}.{key}" if isinstance(value, str) else f"{where}.{key}[{i}]"
            path = self.existing_file(item, at)
            if path.suffix.lower() not in DATABASE_SUFFIXES:
                kinds = ", ".join(sorted(DATABASE_SUFFIXES))
                raise self.error(f"{path.name}: not a database file (expected {kinds})", at)
            paths.append(path)
        return tuple(paths)

    def filters(self, raw: Mapping[str, Any], where: str) -> tuple[IdFilter, ...]:
        out: list[IdFilter] = []
        for i, item in enumerate(self.sequence(raw, "filters", where)):
            at = f"{where}.filters[{i}]"
            entry = self.mapping(item, at, frozenset({"id", "mask", "extended"}))
            extended = entry.get("extended")
            if extended is not None and not isinstance(extended, bool):
                raise self.error("must be true or false", f"{at}.extended")
            limit = 0x1FFFFFFF if extended is not False else 0x7FF
            can_id = self.integer(entry, "id", at, None, minimum=0, maximum=limit)
            if can_id is None:
                raise self.error("is required", f"{at}.id")
            default_mask = 0x1FFFFFFF if (extended or can_id > 0x7FF) else 0x7FF
            mask = self.integer(entry, "mask", at, default_mask, minimum=0, maximum=0x1FFFFFFF)
            assert mask is not None
            out.append(IdFilter(can_id=can_id, can_mask=mask, extended=extended))
        return tuple(out)

    def buses(self, top: Mapping[str, Any]) -> tuple[BusConfig, ...]:
        out: list[BusConfig] = []
        allowed = frozenset(
            {
                "name",
                "interface",
                "channel",
                "bitrate",
                "fd",
                "data_bitrate",
                "receive_own_messages",
                "options",
                "databases",
                "dbc",
                "filters",
                "optional",
                "protocol",
                "journal",
            }
        )
        for i, item in enumerate(self.sequence(top, "buses", "")):
            where = f"buses[{i}]"
            bus = self.mapping(item, where, allowed)
            if not bus:
                raise self.error("must be a mapping with name, interface and databases", where)
            channel = bus.get("channel")
            if channel is not None and (
                isinstance(channel, bool) or not isinstance(channel, str | int)
            ):
                raise self.error(
                    f"must be a string or integer, not {_kind(channel)}", f"{where}.channel"
                )
            options_raw = bus.get("options")
            options = self.free_mapping(options_raw, f"{where}.options")
            for key in options:
                if key in allowed or key in {"interface", "can_filters", "bustype"}:
                    raise self.error(
                        f"set {key!r} on the bus itself, not in options", f"{where}.options.{key}"
                    )
            fd = self.boolean(bus, "fd", where, False)
            data_bitrate = self.integer(bus, "data_bitrate", where, None, minimum=1)
            if data_bitrate is not None and not fd:
                raise self.error("data_bitrate needs fd: true", f"{where}.data_bitrate")
            interface = self.required_string(bus, "interface", where)
            if interface not in _can_interfaces():
                known = ", ".join(sorted(_can_interfaces()))
                raise self.error(
                    f"unknown python-can interface {interface!r} (known: {known})",
                    f"{where}.interface",
                )
            if interface == "udp_multicast" and channel is not None:
                problem = _multicast_group_problem(str(channel))
                if problem:
                    raise self.error(problem, f"{where}.channel")
            out.append(
                BusConfig(
                    name=self.name(bus, "name", where, None),
                    interface=interface,
                    channel=channel,
                    bitrate=self.integer(bus, "bitrate", where, None, minimum=1),
                    fd=fd,
                    data_bitrate=data_bitrate,
                    receive_own_messages=self.boolean(bus, "receive_own_messages", where, False),
                    options=dict(options),
                    databases=self.databases(bus, where, required=True),
                    filters=self.filters(bus, where),
                    optional=self.boolean(bus, "optional", where, False),
                    protocol=self.protocol(bus, where),
                    journal=self.journal(bus, where, CAN_FORMATS),
                )
            )
        return tuple(out)

    def protocol(self, raw: Mapping[str, Any], where: str) -> str | None:
        value = self.string(raw, "protocol", where, None)
        if value is None or value.lower() == "can":
            return None
        if value.lower() != "j1939":
            raise self.error(f"must be can or j1939, not {value!r}", _join(where, "protocol"))
        return "j1939"

    def replays(
        self, top: Mapping[str, Any], buses: Mapping[str, BusConfig]
    ) -> tuple[ReplayConfig, ...]:
        out: list[ReplayConfig] = []
        allowed = frozenset({"name", "path", "bus", "realtime", "databases", "dbc"})
        for i, item in enumerate(self.sequence(top, "replay", "")):
            where = f"replay[{i}]"
            entry = self.mapping(item, where, allowed)
            path = self.existing_file(entry.get("path"), f"{where}.path")
            bus_name = self.name(entry, "bus", where, None)
            lender = buses.get(bus_name)
            databases = self.databases(entry, where, required=lender is None)
            if lender is not None:
                databases = databases or lender.databases
            stem = re.sub(r"[^A-Za-z0-9_.\-]", "_", path.stem) or "log"
            out.append(
                ReplayConfig(
                    name=self.name(entry, "name", where, f"replay-{stem}"),
                    path=path,
                    bus=bus_name,
                    realtime=self.boolean(entry, "realtime", where, False),
                    databases=databases,
                )
            )
        return tuple(out)

    def serials(self, top: Mapping[str, Any]) -> tuple[SerialConfig, ...]:
        out: list[SerialConfig] = []
        allowed = frozenset(
            {
                "name",
                "port",
                "baudrate",
                "bytesize",
                "parity",
                "stopbits",
                "rtscts",
                "xonxoff",
                "defs",
                "optional",
                "journal",
            }
        )
        for i, item in enumerate(self.sequence(top, "serial", "")):
            where = f"serial[{i}]"
            entry = self.mapping(item, where, allowed)
            parity = (self.string(entry, "parity", where, "N") or "N").upper()[:1]
            if parity not in _PARITIES:
                raise self.error(f"must be one of {', '.join(_PARITIES)}", f"{where}.parity")
            stopbits = self.number(entry, "stopbits", where, 1.0)
            if stopbits not in (1.0, 1.5, 2.0):
                raise self.error("must be 1, 1.5 or 2", f"{where}.stopbits")
            out.append(
                SerialConfig(
                    name=self.name(entry, "name", where, None),
                    port=self.required_string(entry, "port", where),
                    defs=self.existing_file(entry.get("defs"), f"{where}.defs"),
                    baudrate=self.integer(entry, "baudrate", where, 115200, minimum=1) or 115200,
                    bytesize=self.integer(entry, "bytesize", where, 8, minimum=5, maximum=8) or 8,
                    parity=parity,
                    stopbits=stopbits,
                    rtscts=self.boolean(entry, "rtscts", where, False),
                    xonxoff=self.boolean(entry, "xonxoff", where, False),
                    optional=self.boolean(entry, "optional", where, False),
                    journal=self.journal(entry, where, (SERIAL_FORMAT,)),
                )
            )
        return tuple(out)

    def devices(self, top: Mapping[str, Any]) -> tuple[DeviceConfig, ...]:
        out: list[DeviceConfig] = []
        common = {"name", "kind", "url", "map", "rate_hz", "timeout_s", "optional"}
        allowed = {
            "modbus": frozenset(common | {"unit"}),
            "scpi": frozenset(
                common | {"baudrate", "bytesize", "parity", "stopbits", "rtscts", "xonxoff"}
            ),
        }
        for i, item in enumerate(self.sequence(top, "devices", "")):
            where = f"devices[{i}]"
            if not isinstance(item, Mapping):
                raise self.error(f"must be a mapping, not {_kind(item)}", where)
            kind = item.get("kind")
            if kind not in DEVICE_KINDS:
                raise self.error(
                    f"must be one of {', '.join(DEVICE_KINDS)}, got {kind!r}", f"{where}.kind"
                )
            entry = self.mapping(item, where, allowed[kind])
            url = self.required_string(entry, "url", where)
            options: dict[str, Any] = {}
            if kind == "modbus":
                from daq_agent.readers.modbus import parse_modbus_url

                try:
                    parse_modbus_url(url)
                except ConfigError as exc:
                    raise self.error(exc.reason, f"{where}.url") from exc
            else:
                for key in ("baudrate", "bytesize"):
                    if key in entry:
                        options[key] = self.integer(entry, key, where, None, minimum=1)
                if "parity" in entry:
                    parity = (self.string(entry, "parity", where, "N") or "N").upper()[:1]
                    if parity not in _PARITIES:
                        raise self.error(
                            f"must be one of {', '.join(_PARITIES)}", f"{where}.parity"
                        )
                    options["parity"] = parity
                if "stopbits" in entry:
                    stopbits = self.number(entry, "stopbits", where, 1.0)
                    if stopbits not in (1.0, 1.5, 2.0):
                        raise self.error("must be 1, 1.5 or 2", f"{where}.stopbits")
                    options["stopbits"] = stopbits
                for key in ("rtscts", "xonxoff"):
                    if key in entry:
                        options[key] = self.boolean(entry, key, where, False)
            out.append(
                DeviceConfig(
                    name=self.name(entry, "name", where, None),
                    kind=kind,
                    url=url,
                    map=self.existing_file(entry.get("map"), f"{where}.map"),
                    rate_hz=self.number(entry, "rate_hz", where, 1.0),
                    timeout_s=self.number(entry, "timeout_s", where, 1.0),
                    unit=self.integer(entry, "unit", where, 1, minimum=0, maximum=247) or 0,
                    serial_options=options,
                    optional=self.boolean(entry, "optional", where, False),
                )
            )
        return tuple(out)

    def journal(
        self, raw: Mapping[str, Any], where: str, formats: tuple[str, ...]
    ) -> JournalSettings | None:
        if raw.get("journal") is None:
            return None
        at = f"{where}.journal"
        keys = frozenset(
            {
                "dir",
                "format",
                "rotate_mb",
                "rotate_s",
                "keep_files",
                "keep_days",
                "queue_size",
                "flush_interval_ms",
            }
        )
        journal = self.mapping(raw["journal"], at, keys)
        directory = self.required_string(journal, "dir", at)
        fmt = self.string(journal, "format", at, formats[0]) or formats[0]
        if fmt not in formats:
            raise self.error(f"must be one of {', '.join(formats)}, got {fmt!r}", f"{at}.format")
        defaults = JournalSettings(directory=Path())
        rotate_mb = journal.get("rotate_mb", 64)
        rotate_s = journal.get("rotate_s")
        keep_days = journal.get("keep_days")
        return JournalSettings(
            directory=self.path(directory),
            format=fmt,
            rotate_bytes=None
            if rotate_mb is None
            else max(1, int(self.number(journal, "rotate_mb", at, 64.0) * 2**20)),
            rotate_s=None if rotate_s is None else self.number(journal, "rotate_s", at, 1.0),
            keep_files=self.integer(journal, "keep_files", at, None, minimum=1),
            keep_s=None
            if keep_days is None
            else self.number(journal, "keep_days", at, 1.0) * 86400.0,
            queue_items=self.integer(journal, "queue_size", at, defaults.queue_items, minimum=1)
            or defaults.queue_items,
            flush_interval_s=(
                self.integer(journal, "flush_interval_ms", at, 1000, minimum=1) or 1000
            )
            / 1000.0,
        )

    def ring(self, top: Mapping[str, Any]) -> RingConfig:
        ring = self.mapping(top.get("ring"), "ring", frozenset({"capacity", "policy"}))
        policy = self.string(ring, "policy", "ring", "drop_oldest")
        if policy not in _POLICIES:
            raise self.error(
                f"must be one of {', '.join(_POLICIES)}, got {policy!r}", "ring.policy"
            )
        capacity = self.integer(ring, "capacity", "ring", _DEFAULT_RING_CAPACITY, minimum=1)
        assert capacity is not None
        return RingConfig(capacity=capacity, policy=policy)  # type: ignore[arg-type]  # checked above

    def flush(self, top: Mapping[str, Any]) -> FlushConfig:
        keys = frozenset(
            {
                "max_batch",
                "max_age_ms",
                "checkpoint_seconds",
                "checkpoint_records",
                "retry_initial_s",
                "retry_max_s",
                "checkpoint_timeout_s",
                "drain_timeout_s",
                "auth_retry_s",
            }
        )
        flush = self.mapping(top.get("flush"), "flush", keys)
        d = FlushConfig()
        retry_initial = self.number(flush, "retry_initial_s", "flush", d.retry_initial_s)
        retry_max = self.number(flush, "retry_max_s", "flush", d.retry_max_s)
        if retry_max < retry_initial:
            raise self.error("must be >= retry_initial_s", "flush.retry_max_s")
        return FlushConfig(
            max_batch=self.integer(flush, "max_batch", "flush", d.max_batch, minimum=1) or 1,
            max_age_ms=self.integer(flush, "max_age_ms", "flush", d.max_age_ms, minimum=1) or 1,
            checkpoint_seconds=self.number(
                flush, "checkpoint_seconds", "flush", d.checkpoint_seconds
            ),
            checkpoint_records=self.integer(
                flush, "checkpoint_records", "flush", d.checkpoint_records, minimum=1
            )
            or 1,
            retry_initial_s=retry_initial,
            retry_max_s=retry_max,
            checkpoint_timeout_s=self.number(
                flush, "checkpoint_timeout_s", "flush", d.checkpoint_timeout_s
            ),
            drain_timeout_s=self.number(flush, "drain_timeout_s", "flush", d.drain_timeout_s),
            auth_retry_s=self.number(flush, "auth_retry_s", "flush", d.auth_retry_s),
        )

    def spool(self, top: Mapping[str, Any], state_dir: Path) -> SpoolConfig:
        keys = frozenset({"enabled", "dir", "fsync_interval_ms", "quota_mb", "segment_mb"})
        raw = top.get("spool")
        if raw is False or raw is True:
            raw = {"enabled": raw}
        spool = self.mapping(raw, "spool", keys)
        directory = self.string(spool, "dir", "spool")
        quota = spool.get("quota_mb")
        return SpoolConfig(
            directory=self.path(directory) if directory else state_dir / "spool",
            enabled=self.boolean(spool, "enabled", "spool", True),
            fsync_interval_ms=self.integer(spool, "fsync_interval_ms", "spool", 100, minimum=0)
            or 0,
            quota_mb=None if quota is None else self.number(spool, "quota_mb", "spool", 0.0),
            segment_mb=self.number(spool, "segment_mb", "spool", 64.0),
        )

    def naming(self, top: Mapping[str, Any]) -> NamingConfig:
        naming = self.mapping(top.get("naming"), "naming", frozenset({"can_flow", "serial_flow"}))
        can_flow = self.string(naming, "can_flow", "naming", _DEFAULT_CAN_FLOW) or ""
        serial_flow = self.string(naming, "serial_flow", "naming", _DEFAULT_SERIAL_FLOW) or ""
        self.template(can_flow, "naming.can_flow", {"bus", "message", "frame_id"}, "message")
        self.template(serial_flow, "naming.serial_flow", {"device", "frame"}, "frame")
        return NamingConfig(can_flow=can_flow, serial_flow=serial_flow)

    def template(self, value: str, key: str, fields: set[str], required: str) -> None:
        found = set(re.findall(r"\{(\w*)[^}]*\}", value))
        unknown = found - fields
        if unknown:
            raise self.error(
                f"unknown placeholder {{{sorted(unknown)[0]}}} (known: "
                + ", ".join(f"{{{f}}}" for f in sorted(fields))
                + ")",
                key,
            )
        if required not in found:
            raise self.error(f"must contain {{{required}}} so flow names stay unique", key)


def _multicast_group_problem(channel: str) -> str:
    """Why ``channel`` cannot be a ``udp_multicast`` bus's group ("" when it can)."""
    try:
        address = ipaddress.ip_address(channel.strip("[]"))
    except ValueError:
        return (
            f"{channel!r} is not an IP address: a udp_multicast bus's channel is its multicast"
            " group, e.g. 239.74.163.2 (IPv4) or ff15:7079:7468:6f6e:6465:6d6f:6d63:6173 (IPv6)"
        )
    if not address.is_multicast:
        return (
            f"{channel} is not a multicast address (IPv4 224.0.0.0/4, IPv6 ff00::/8): a "
            "udp_multicast bus's channel is its multicast group, e.g. 239.74.163.2"
        )
    return ""


def _can_interfaces() -> frozenset[str]:
    """python-can's interface names, plugins registered by entry point included."""
    import can

    return frozenset(can.VALID_INTERFACES)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _kind(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a bool"}.get(
        type(value), type(value).__name__
    )
