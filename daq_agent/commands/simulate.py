"""``daq-agent simulate``: generate CAN or serial traffic as its own process.

``simulate can --dbc FILE [--dbc FILE ...] --interface udp_multicast|virtual|... [--channel CH]
[--rate N | --cycle-times] [--duration S] [--count N] [--seed N]`` sends periodic frames generated
from the databases (see :mod:`daq_agent.sim.can`) and prints how many frames of each message it sent
when it stops (duration, count, SIGINT or SIGTERM).

``simulate serial ...`` is delegated to ``daq_agent.sim.serial``; ``simulate modbus ...`` and
``simulate scpi ...`` to ``daq_agent.sim.modbus`` and ``daq_agent.sim.scpi`` (polled devices).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import threading
from pathlib import Path
from typing import Any

from daq_agent.commands._options import parse_bus_options
from daq_agent.core.errors import ConfigError, ReaderError
from daq_agent.core.signals import stop_on_signals

log = logging.getLogger(__name__)

EXIT_UNAVAILABLE = 3


def add_subparser(subparsers: Any) -> None:
    """Register ``simulate`` with its ``can`` and ``serial`` subcommands."""
    parser = subparsers.add_parser(
        "simulate",
        help="generate CAN or serial traffic (runs until stopped)",
        description="Generate realistic CAN or serial traffic as its own process.",
    )
    kinds = parser.add_subparsers(dest="sim_kind", metavar="KIND")
    parser.set_defaults(func=_do_missing_kind)

    can_parser = kinds.add_parser(
        "can",
        help="send frames generated from DBC (or KCD, ARXML, SYM) databases",
        description="Send periodic frames whose signals follow waveforms within their ranges.",
    )
    can_parser.add_argument(
        "--dbc", action="append", required=True, type=Path, metavar="FILE", help="database file"
    )
    can_parser.add_argument(
        "--interface", default="udp_multicast", help="python-can interface (udp_multicast)"
    )
    can_parser.add_argument(
        "--channel",
        default=None,
        help="channel (udp_multicast: a multicast group, default 239.74.163.2)",
    )
    can_parser.add_argument("--bitrate", type=int, default=None, help="nominal bit rate")
    can_parser.add_argument(
        "--bus-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra python-can bus option, value as JSON if it parses (repeatable)",
    )
    pace = can_parser.add_mutually_exclusive_group()
    pace.add_argument(
        "--rate", type=float, default=None, metavar="N", help="total frames/s over all messages"
    )
    pace.add_argument(
        "--cycle-times",
        action="store_true",
        help="each message at its GenMsgCycleTime (default)",
    )
    can_parser.add_argument(
        "--default-cycle-ms",
        type=float,
        default=100.0,
        help="period of messages without a cycle time (100)",
    )
    can_parser.add_argument("--duration", type=float, default=None, metavar="S", help="seconds")
    can_parser.add_argument("--count", type=int, default=None, metavar="N", help="frames in all")
    can_parser.add_argument("--seed", type=int, default=0, help="waveform seed (0)")
    can_parser.add_argument(
        "--message", action="append", default=None, metavar="NAME", help="only these messages"
    )
    can_parser.add_argument(
        "--j1939",
        action="store_true",
        help="every 29-bit message is J1939 (default: those of a DBC marked J1939); longer than "
        "8 bytes: sent as a BAM",
    )
    can_parser.add_argument(
        "--dm1",
        action="append",
        default=None,
        metavar="SPN:FMI[:OC]",
        help="send a DM1 every second with this active DTC (repeatable; 'none': no DTC)",
    )
    can_parser.add_argument(
        "--dm1-source", type=lambda v: int(v, 0), default=0, help="DM1 source address (0)"
    )
    can_parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    can_parser.set_defaults(func=_do_simulate_can)

    try:
        serial_sim = importlib.import_module("daq_agent.sim.serial")
    except ImportError as exc:
        # Accept (and ignore) any arguments so the user gets the real reason, not a usage error.
        unavailable = kinds.add_parser(
            "serial", help="(unavailable) send serial frames", prefix_chars="\x00", add_help=False
        )
        unavailable.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
        unavailable.set_defaults(func=_serial_unavailable(exc))
    else:
        serial_parser = kinds.add_parser(
            "serial",
            help="send serial frames from frame definitions",
            description="Send serial frames generated from frame definitions.",
        )
        serial_sim.add_arguments(serial_parser)
        serial_parser.set_defaults(func=serial_sim.run)

    # polled devices: the simulators (and pymodbus) are imported only when run
    modbus = kinds.add_parser(
        "modbus",
        help="serve a Modbus register map (pymodbus server on TCP)",
        description="Serve a register map with values that change over time; prints its URL.",
    )
    modbus.add_argument("--map", required=True, type=Path, help="register map YAML")
    modbus.add_argument("--host", default="127.0.0.1", help="listen address (127.0.0.1)")
    modbus.add_argument("--port", type=int, default=5020, help="TCP port (5020; 0: any)")
    modbus.add_argument("--unit", type=int, default=1, help="unit id answered (1; 0: any)")
    modbus.add_argument(
        "--framer", choices=("socket", "rtu"), default="socket", help="Modbus TCP or RTU over TCP"
    )
    modbus.add_argument("--duration", type=float, default=None, metavar="S", help="seconds")
    modbus.add_argument(
        "--pin",
        action="append",
        default=[],
        metavar="POINT=VALUE",
        help="hold a point at a value (repeatable)",
    )
    modbus.set_defaults(func=_run_polled("modbus"))
    scpi = kinds.add_parser(
        "scpi",
        help="answer the queries of a query file (SCPI) on a pty",
        description="Answer line queries on a pseudo-terminal; prints its path.",
    )
    scpi.add_argument("--queries", required=True, type=Path, help="query file YAML")
    scpi.add_argument("--duration", type=float, default=None, metavar="S", help="seconds")
    scpi.add_argument("--seed", type=int, default=0, help="waveform seed (0)")
    scpi.add_argument(
        "--link",
        type=Path,
        default=None,
        metavar="PATH",
        help="also make PATH a symlink to the pty",
    )
    scpi.set_defaults(func=_run_polled("scpi"))


def _run_polled(kind: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            module = importlib.import_module(f"daq_agent.sim.{kind}")
        except ImportError as exc:
            return int(_serial_unavailable(exc)(args))
        try:
            return int(module.run(args))
        except (ConfigError, ReaderError) as exc:
            print(f"daq-agent simulate {kind}: {exc}", file=sys.stderr)
            return 2

    return run


def _do_missing_kind(_args: argparse.Namespace) -> int:
    print("daq-agent simulate: choose a kind: can or serial", file=sys.stderr)
    return 2


def _serial_unavailable(exc: ImportError) -> Any:
    def run(_args: argparse.Namespace) -> int:
        print(f"daq-agent simulate serial: serial simulation unavailable ({exc})", file=sys.stderr)
        return EXIT_UNAVAILABLE

    return run


def _parse_dtcs(texts: list[str] | None) -> list[Any] | None:
    """``--dm1 SPN:FMI[:OC]`` values as DTCs (None when no --dm1 was given)."""
    if texts is None:
        return None
    from daq_agent.decode.j1939 import DtcCode

    out = []
    for text in texts:
        if text.lower() == "none":
            continue
        parts = text.split(":")
        try:
            numbers = [int(p, 0) for p in parts]
        except ValueError:
            numbers = []
        if len(numbers) not in (2, 3):
            raise ConfigError(f"--dm1 {text!r}: expected SPN:FMI or SPN:FMI:OC")
        spn, fmi, oc = (*numbers, 1) if len(numbers) == 2 else numbers
        if not (0 <= spn < 1 << 19 and 0 <= fmi < 32 and 0 <= oc < 128):
            raise ConfigError(f"--dm1 {text!r}: SPN 0..524287, FMI 0..31, OC 0..127")
        out.append(DtcCode(spn, fmi, oc))
    return out


def _load_databases(paths: list[Path]) -> list[Any]:
    from daq_agent.decode.dbc import load_database

    return [load_database(path) for path in paths]


def _do_simulate_can(args: argparse.Namespace) -> int:
    import can

    from daq_agent.sim.can import CanSimulator

    if args.count is not None and args.count < 0:
        raise ConfigError(f"--count must be >= 0, got {args.count}")
    if args.duration is not None and args.duration < 0:
        raise ConfigError(f"--duration must be >= 0, got {args.duration}")
    databases = _load_databases(args.dbc)
    bus_kwargs: dict[str, Any] = {"interface": args.interface}
    if args.channel is not None:
        bus_kwargs["channel"] = args.channel
    elif args.interface == "udp_multicast":
        bus_kwargs["channel"] = "239.74.163.2"
    if args.bitrate is not None:
        bus_kwargs["bitrate"] = args.bitrate
    bus_kwargs.update(parse_bus_options(args.bus_option))
    simulator = CanSimulator(
        databases,
        rate=args.rate,
        default_cycle_s=args.default_cycle_ms / 1000.0,
        seed=args.seed,
        messages=args.message,
        j1939=True if args.j1939 else None,
        dm1=_parse_dtcs(args.dm1),
        dm1_source=args.dm1_source,
    )
    try:
        bus = can.Bus(**bus_kwargs)
    except (can.CanError, OSError, ValueError, TypeError) as exc:
        raise ReaderError(f"cannot open {bus_kwargs}: {exc}") from exc
    stop = threading.Event()
    log.info(
        "simulate: %d messages, %.0f frames/s nominal on %s",
        len(simulator.plans),
        simulator.frames_per_second,
        bus_kwargs,
    )
    try:
        simulator.bus = bus
        with stop_on_signals(stop):
            summary = simulator.run(duration=args.duration, count=args.count, stop=stop)
    finally:
        bus.shutdown()
    if args.json:
        print(
            json.dumps(
                {
                    "frames": summary.frames,
                    "errors": summary.errors,
                    "elapsed_s": round(summary.elapsed_s, 3),
                    "per_message": summary.per_message,
                }
            )
        )
    else:
        print(summary.render())
    sys.stdout.flush()
    return 0
