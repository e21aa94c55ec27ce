"""``daq-agent monitor``: a live terminal view of decoded signals and the pipeline's health.

Three ways in::

    daq-agent monitor --agent http://127.0.0.1:9100            a running agent (run --metrics-port)
    daq-agent monitor --bus socketcan:can0 --dbc bench.dbc     a bus, read directly
    daq-agent monitor --interface udp_multicast --channel 239.74.163.2 --dbc bench.dbc
    daq-agent monitor --log run.blf --dbc bench.dbc [--fast]   a log (BLF, ASC, candump -L, …)
    daq-agent monitor --config agent.yaml                      the config's sources, read directly

With ``--config``, ``--bus``/``--interface`` and ``--log`` take the databases (and the alias) of
the config's bus named ``--name`` (default: its first bus) unless ``--dbc`` is given. Read
directly, nothing is stored or sent (the bus is only listened to).

Keys: ``q`` quits, ``p`` pauses, ``s`` cycles the order (name, rate, age), ``/`` types a filter
(a part of ``flow.signal``, or a glob such as ``*Volt*``), ``Enter``/``Esc`` back to the table.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from daq_agent.commands._options import parse_bus_options
from daq_agent.core.errors import ConfigError
from daq_agent.core.model import FlowConfig

__all__ = ["add_subparser"]

DEFAULT_ALIAS = "can0"


def add_subparser(subparsers: Any) -> None:
    """Register ``monitor``."""
    parser = subparsers.add_parser(
        "monitor",
        help="live view of decoded signals and the pipeline's health (a terminal UI)",
        description="Watch decoded values (value, unit, enum label, rate, age) and the health "
        "of the sources, ring, spool and stream: of a running agent (--agent), or read "
        "directly from a bus or a log.",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--agent",
        metavar="URL",
        help="a running agent's metrics address (run --metrics-port): http://127.0.0.1:PORT",
    )
    where.add_argument(
        "--bus", metavar="INTERFACE:CHANNEL", help="read this bus directly (socketcan:can0)"
    )
    where.add_argument("--interface", help="read a python-can interface directly")
    where.add_argument(
        "--log", type=Path, metavar="FILE", help="play a log (BLF, ASC, candump -L, TRC, …)"
    )
    parser.add_argument("--channel", default=None, help="the channel of --interface")
    parser.add_argument("--bitrate", type=int, default=None, help="nominal bit rate")
    parser.add_argument(
        "--bus-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra python-can bus option, value as JSON if it parses (repeatable)",
    )
    parser.add_argument(
        "--dbc", action="append", type=Path, metavar="FILE", help="CAN database (repeatable)"
    )
    parser.add_argument(
        "--config", type=Path, metavar="C", help="take buses and databases from an agent config"
    )
    parser.add_argument(
        "--name",
        default=None,
        help=f"the bus alias in flow names (default {DEFAULT_ALIAS}; with --config: the bus "
        "whose databases are used)",
    )
    parser.add_argument("--fast", action="store_true", help="play --log as fast as possible")
    parser.add_argument("--speed", type=float, default=1.0, help="--log pace multiplier (1)")
    parser.add_argument("--filter", default="", metavar="TEXT", help="start with this filter")
    parser.add_argument(
        "--refresh", type=float, default=0.5, metavar="S", help="screen refresh period (0.5)"
    )
    parser.set_defaults(func=_do_monitor)


def _do_monitor(args: argparse.Namespace) -> int:
    if args.refresh <= 0:
        raise ConfigError(f"--refresh must be > 0, got {args.refresh}")
    source = _source(args)
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise ConfigError("monitor needs a terminal (stdin and stdout)")
    from daq_agent.monitor.app import MonitorApp

    app = MonitorApp(source, refresh_s=args.refresh, initial_filter=args.filter)
    with _quiet_logging():
        try:
            source.start()
            app.run()
        finally:
            source.stop()
    return app.return_code or 0  # 1 when the app failed (Textual printed why)


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    """While the screen is drawn, log records would tear it: keep only errors, after it."""
    root = logging.getLogger()
    kept: list[logging.LogRecord] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR and len(kept) < 100:
                kept.append(record)

    handlers = root.handlers[:]
    keeper = _Keep()
    root.handlers = [keeper]
    try:
        yield
    finally:
        root.handlers = handlers
        for record in kept:
            root.handle(record)


def _source(args: argparse.Namespace) -> Any:
    from daq_agent.monitor.sources import AgentSource

    if args.agent is not None:
        if args.dbc or args.config:
            raise ConfigError("--agent takes no --dbc or --config: the agent names its values")
        return AgentSource(args.agent, interval_s=min(args.refresh, 1.0))
    if args.bus is not None or args.interface is not None:
        return _bus_source(args)
    if args.log is not None:
        return _log_source(args)
    if args.config is not None:
        return _config_source(args)
    raise ConfigError("say what to watch: --agent URL, --bus IF:CH, --log FILE or --config C")


def _databases(args: argparse.Namespace) -> tuple[str, tuple[Path, ...], Any]:
    """The bus alias, the database files and the config's plan (None without --config)."""
    if args.dbc:
        return args.name or DEFAULT_ALIAS, tuple(args.dbc), None
    if args.config is None:
        raise ConfigError("--dbc FILE (or --config C) is needed to decode")
    from daq_agent.agent import plan_agent
    from daq_agent.config import load_config

    plan = plan_agent(load_config(args.config))
    buses = [s for s in plan.sources if s.kind in ("can", "replay")]
    if not buses:
        raise ConfigError("has no CAN bus whose databases could be used", source=str(args.config))
    chosen = buses[0]
    if args.name is not None:
        named = [s for s in buses if s.name == args.name or s.bus == args.name]
        if not named:
            known = ", ".join(s.name for s in buses)
            raise ConfigError(f"no bus {args.name!r} (buses: {known})", source=str(args.config))
        chosen = named[0]
    return chosen.bus, chosen.databases, plan


def _decoder(alias: str, paths: Sequence[Path], plan: Any) -> Any:
    from daq_agent.decode.can_decoder import CanDecoder
    from daq_agent.decode.dbc import load_database

    template = plan.config.naming.can_flow if plan is not None else None
    databases = [load_database(path) for path in paths]
    if template is None:
        return CanDecoder(alias, databases)
    return CanDecoder(alias, databases, flow_name_template=template)


def _bus_source(args: argparse.Namespace) -> Any:
    from daq_agent.monitor.sources import DirectSource
    from daq_agent.readers.can import CanReader

    kwargs: dict[str, Any] = {}
    if args.bus is not None:
        interface, sep, channel = args.bus.partition(":")
        if not sep or not interface or not channel:
            raise ConfigError(f"--bus {args.bus!r}: expected INTERFACE:CHANNEL (socketcan:can0)")
        kwargs.update(interface=interface, channel=channel)
    else:
        kwargs["interface"] = args.interface
        if args.channel is not None:
            kwargs["channel"] = args.channel
        elif args.interface == "udp_multicast":
            kwargs["channel"] = "239.74.163.2"
    if args.bitrate is not None:
        kwargs["bitrate"] = args.bitrate
    kwargs.update(parse_bus_options(args.bus_option))
    alias, paths, plan = _databases(args)
    decoder = _decoder(alias, paths, plan)
    where = f"{kwargs['interface']}:{kwargs.get('channel', '')}"
    return DirectSource(
        f"bus {where} as {alias}",
        decoder.flows,
        [lambda tap: CanReader(alias, kwargs, decoder, tap)],
    )


def _log_source(args: argparse.Namespace) -> Any:
    from daq_agent.monitor.sources import DirectSource
    from daq_agent.readers.replay import ReplayReader

    if args.speed <= 0:
        raise ConfigError(f"--speed must be > 0, got {args.speed}")
    if not args.log.is_file():
        raise ConfigError("no such file", source=str(args.log))
    alias, paths, plan = _databases(args)
    decoder = _decoder(alias, paths, plan)
    path = args.log

    def build(tap: Any) -> Any:
        # "now": the first frame is stamped with the time playing starts, so ages read true
        return ReplayReader(
            alias,
            path,
            decoder,
            tap,
            realtime=not args.fast,
            speed=args.speed,
            time_base="now",
        )

    return DirectSource(f"log {path.name} as {alias}", decoder.flows, [build])


def _config_source(args: argparse.Namespace) -> Any:
    from daq_agent.agent import plan_agent
    from daq_agent.config import load_config
    from daq_agent.monitor.sources import DirectSource

    if args.dbc:
        raise ConfigError("--config alone reads the config's sources; --dbc needs --bus or --log")
    config = load_config(args.config)
    plan = plan_agent(config)
    builders = [_builder(source, config) for source in plan.sources]
    if not builders:
        raise ConfigError("has no sources", source=str(args.config))
    flows: list[FlowConfig] = list(plan.flows)
    return DirectSource(f"config {args.config.name}", flows, builders)


def _builder(source: Any, config: Any) -> Any:
    """A reader of one of the config's sources feeding the tap (as the agent builds it)."""
    if source.kind == "serial":
        from daq_agent.readers.serial import SerialReader

        options = dict(source.options)
        port = options.pop("port")
        template = config.naming.serial_flow
        return lambda tap: SerialReader(
            source.name, port, options, source.definitions, tap, flow_name_template=template
        )
    if source.kind == "replay":
        from daq_agent.readers.replay import ReplayReader

        return lambda tap: ReplayReader(
            source.name,
            source.options["path"],
            source.decoder,
            tap,
            realtime=bool(source.options["realtime"]),
            time_base="now",
        )
    from daq_agent.readers.can import CanReader

    return lambda tap: CanReader(source.name, source.options, source.decoder, tap)
