"""``daq-agent decode``: decode a candump log (or a serial capture) with the agent's decoder.

``decode --dbc FILE [--dbc FILE ...] [--bus NAME] [--json] [--no-choices] [FILE|-]`` (or, as
``cantools decode`` has it, ``decode DATABASE [FILE|-]``) reads candump lines, in the log format
(``(1700000000.123456) can0 1F0#0102030405060708``, FD as ``##``) or the plain output of
``candump can0`` (``  can0  1F0   [8]  01 02 ...``, with or without ``-t`` timestamps), so
``candump can0 | daq-agent decode bench.dbc`` works, and prints one decoded frame per line.
Enum signals print their label (``ContactorState=Closed``) when the value table names the value,
as cantools does; ``--no-choices`` (cantools' ``-c``/``--no-decode-choices``) prints numbers. A
signed value table shows its signed number (``Gear=-1``), never the 32-bit wire key.
With ``--json`` each line is ``{"bus", "message", "frame_id", "timestamp_ns", "flow",
"signals": {"<DBC signal name>": value}}``: values scaled (enum labels as strings unless
``--no-choices``), absent multiplexed signals left out (a NaN or infinite float is written as the
string ``"nan"``, ``"inf"``, ``"-inf"``). Unknown ids, bad lines and undecodable frames go to
stderr, then a count summary. Exit status: 0, or 1 when a line or frame could not be decoded
(unknown ids do not count).

AUTOSAR container frames print one line per contained PDU (``Container.PDU``; JSON: a
``"container"`` key). J1939 (a DBC marked J1939, or ``--j1939``): messages match by PGN, the
source address is printed as ``source_address``, transport-protocol messages are printed once
reassembled, DM1 as its lamps and DTCs (``docs/j1939.md``); the summary counts the TP frames.

``decode --defs FILE [--json] [FILE|-]`` decodes a serial capture with frame definitions instead
(``daq_agent.serialdefs``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from daq_agent.core.errors import ConfigError, DecodeError
from daq_agent.core.model import FlowConfig
from daq_agent.core.sample import Sample
from daq_agent.decode.can_decoder import (
    DEFAULT_FLOW_NAME_TEMPLATE,
    CanDecoder,
    CompiledMessage,
    Container,
    FrameDecoder,
    Tally,
    enum_labels,
    frame_key,
)
from daq_agent.decode.candump import CandumpParser
from daq_agent.decode.dbc import load_database

__all__ = ["DecodeSummary", "add_subparser", "decode_candump"]

EXIT_UNAVAILABLE = 3
_REPORT_LIMIT = 20


def add_subparser(subparsers: Any) -> None:
    """Register ``decode``."""
    parser = subparsers.add_parser(
        "decode",
        help="decode a candump log (or a serial capture) and print the frames",
        description="Decode candump log lines with CAN databases (--dbc), or a serial capture "
        "with frame definitions (--defs), using the agent's own decoder.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--dbc", action="append", type=Path, metavar="FILE", help="CAN database (repeatable)"
    )
    source.add_argument("--defs", type=Path, metavar="FILE", help="serial frame definitions (YAML)")
    parser.add_argument(
        "--bus", default=None, help="bus alias for flow names (default: the interface of each line)"
    )
    parser.add_argument(
        "--flow-name-template",
        default=DEFAULT_FLOW_NAME_TEMPLATE,
        metavar="T",
        help="flow names from {bus}, {message}, {frame_id} (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per frame")
    parser.add_argument(
        "-c",
        "--no-choices",
        "--no-decode-choices",
        dest="no_choices",
        action="store_true",
        help="print enum signals as numbers, not their value-table labels",
    )
    parser.add_argument(
        "--j1939",
        action="store_true",
        help="every 29-bit message is J1939 (match by PGN, TP reassembly, DM1); a DBC marked "
        "J1939 always is",
    )
    parser.add_argument(
        "paths",
        nargs="*",
        metavar="[DATABASE] INPUT",
        help="log file, or - for stdin (default); without --dbc/--defs the first is the CAN "
        "database, as for `cantools decode DATABASE`",
    )
    parser.set_defaults(func=_do_decode)


@dataclass(slots=True)
class DecodeSummary:
    """What ``decode`` saw.

    Attributes:
        lines: input lines.
        decoded: frames decoded and printed.
        unknown: frames whose id no database defines, by ``(bus, frame key)``.
        errors: frames that could not be decoded (short payload, undefined multiplexer value).
        bad_lines: lines that are not candump log lines.
        remote: remote frames (not decoded).
        error_frames: error frames (not decoded).
        transport: J1939 TP frames taken into a multi-packet message.
        tp_timeouts: J1939 TP messages lost to a timeout.
        tp_aborts: J1939 TP messages aborted.
    """

    lines: int = 0
    decoded: int = 0
    unknown: Counter[tuple[str, int]] = field(default_factory=Counter)
    errors: int = 0
    bad_lines: int = 0
    remote: int = 0
    error_frames: int = 0
    transport: int = 0
    tp_timeouts: int = 0
    tp_aborts: int = 0

    def render(self) -> str:
        """One line for stderr."""
        unknown = sum(self.unknown.values())
        text = (
            f"{self.lines} lines: {self.decoded} decoded, {unknown} unknown id, "
            f"{self.errors} decode errors, {self.bad_lines} bad lines, {self.remote} remote, "
            f"{self.error_frames} error frames"
        )
        if self.transport or self.tp_timeouts or self.tp_aborts:
            text += (
                f", {self.transport} J1939 transport frames ({self.tp_timeouts} TP timeouts, "
                f"{self.tp_aborts} TP aborts)"
            )
        if self.unknown:
            top = ", ".join(
                f"{bus} {_id_text(key)} x{count}"
                for (bus, key), count in self.unknown.most_common(5)
            )
            text += f" (unknown: {top})"
        return text


def _id_text(key: int) -> str:
    if key & 0x80000000:
        return f"0x{key & 0x1FFFFFFF:08X}"
    return f"0x{key:03X}"


def decode_candump(
    databases: Sequence[Any],
    lines: Iterable[str | bytes],
    out: TextIO,
    err: TextIO,
    *,
    as_json: bool = False,
    bus: str | None = None,
    flow_name_template: str = DEFAULT_FLOW_NAME_TEMPLATE,
    choices: bool = True,
    protocol: str | None = None,
) -> DecodeSummary:
    """Decode candump lines and print one frame per line to ``out``; problems go to ``err``.

    Args:
        databases: cantools databases.
        lines: candump log lines.
        out: where the frames are printed.
        err: where unknown ids, bad lines and decode errors are reported (the first few of each).
        as_json: print JSON objects instead of text.
        bus: the bus alias for every frame; by default the interface named on each line.
        flow_name_template: as for the agent.
        choices: print an enum signal's label when its value table names the value.
        protocol: ``"j1939"``: every 29-bit message is J1939 (a DBC marked J1939 always is);
            J1939 messages match by PGN, transport-protocol messages are reassembled, DM1 is
            decoded, and the source address is printed as ``source_address``.

    Returns:
        The counts; the caller prints :meth:`DecodeSummary.render`.

    Raises:
        ConfigError: the flow name template is invalid.
    """
    summary = DecodeSummary()
    parser = CandumpParser()
    tables: dict[str, dict[int, CompiledMessage]] = {}
    containers: dict[str, dict[int, Container]] = {}
    j1939_sessions: dict[str, tuple[FrameDecoder, dict[str, FlowConfig]]] = {}
    tally = Tally()
    reported: Counter[str] = Counter()

    def report(kind: str, text: str) -> None:
        reported[kind] += 1
        if reported[kind] <= _REPORT_LIMIT:
            err.write(text + "\n")
        elif reported[kind] == _REPORT_LIMIT + 1:
            err.write(f"(further {kind} messages suppressed)\n")

    def bad_line(number: int, reason: str) -> None:
        report("bad line", f"line {number}: {reason}")

    for number, frame in parser.parse(lines, bad_line):
        name = bus or frame.channel
        if frame.is_remote:
            summary.remote += 1
            continue
        if frame.is_error:
            summary.error_frames += 1
            continue
        table = tables.get(name)
        if table is None:
            decoder = CanDecoder(
                name, databases, flow_name_template=flow_name_template, protocol=protocol
            )
            table = tables[name] = decoder.lookup_table()
            containers[name] = decoder.containers
            if decoder.j1939:
                j1939_sessions[name] = (decoder.session(tally), {f.name: f for f in decoder.flows})
        j1939_session = j1939_sessions.get(name)
        if j1939_session is not None and frame.is_extended:
            session, flows = j1939_session
            try:
                result = session.decode(frame.frame_id, True, frame.data, frame.timestamp_ns)
            except DecodeError as exc:
                summary.errors += 1
                report("decode error", f"line {number}: {exc}")
                continue
            if result is None:
                key = frame_key(frame.frame_id, True)
                summary.unknown[name, key] += 1
                report("unknown id", f"line {number}: unknown PGN of {_id_text(key)} on {name}")
                continue
            if result == ():
                summary.transport += 1
                continue
            summary.decoded += 1
            for one in result if isinstance(result, tuple) else (result,):
                flow = flows[one.flow]
                values = _sample_values(flow, one, choices)
                short = flow.name.removeprefix(f"{name}.")
                _print_values(out, name, short, None, flow, one.timestamp_ns, values, as_json)
            continue
        key = frame_key(frame.frame_id, frame.is_extended)
        message = table.get(key)
        container = containers[name].get(key) if message is None else None
        if message is None and container is None:
            summary.unknown[name, key] += 1
            report("unknown id", f"line {number}: unknown id {_id_text(key)} on {name}")
            continue
        try:
            if message is not None:
                parts = [(message, message.signals(frame.data, choices=choices))]
            else:
                assert container is not None
                parts = []
                for target, payload in container.split(frame.data):
                    if isinstance(target, int):
                        report(
                            "unknown PDU",
                            f"line {number}: {container.name}: unknown PDU header 0x{target:06X}",
                        )
                        continue
                    parts.append((target, target.signals(payload, choices=choices)))
        except DecodeError as exc:
            summary.errors += 1
            report("decode error", f"line {number}: {exc}")
            continue
        summary.decoded += 1
        for part, values in parts:
            _print_frame(out, name, part, frame.timestamp_ns, values, as_json, container)
    summary.lines = parser.lines
    summary.tp_timeouts = tally.values.get("tp_timeouts", 0)
    summary.tp_aborts = tally.values.get("tp_aborts", 0)
    summary.bad_lines = parser.bad
    return summary


def _print_frame(
    out: TextIO,
    bus: str,
    message: CompiledMessage,
    timestamp_ns: int,
    values: dict[str, Any],
    as_json: bool,
    container: Container | None,
) -> None:
    _print_values(
        out,
        bus,
        message.name,
        message.frame_id,
        message.flow,
        timestamp_ns,
        values,
        as_json,
        container,
    )


def _sample_values(flow: FlowConfig, sample: Sample, choices: bool) -> dict[str, Any]:
    """A sample's values by channel name, enum labels (or signed keys) as a person reads them."""
    out: dict[str, Any] = {}
    for channel, value in zip(flow.channels, sample.values, strict=True):
        if value is None:
            continue
        labels = enum_labels(channel)
        if labels is not None and isinstance(value, int):
            if choices and value in labels:
                value = labels[value]
            elif value & 0x80000000 and any(e.is_signed for e in channel.enum_types):
                value -= 1 << 32
        out[channel.name] = value
    return out


def _print_values(
    out: TextIO,
    bus: str,
    message: str,
    frame_id: int | None,
    flow: FlowConfig,
    timestamp_ns: int,
    values: dict[str, Any],
    as_json: bool,
    container: Container | None = None,
) -> None:
    if as_json:
        record: dict[str, Any] = {
            "bus": bus,
            "message": message,
            "frame_id": frame_id,
            "timestamp_ns": timestamp_ns,
            "flow": flow.name,
            "signals": {k: _json_value(v) for k, v in values.items()},
        }
        if frame_id is None:
            del record["frame_id"]
        if container is not None:
            record["container"] = container.name
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        return
    units = {c.name: c.unit or "" for c in flow.channels}
    seconds, nanos = divmod(timestamp_ns, 1_000_000_000)
    text = " ".join(
        f"{k}={_text_value(v)}{(' ' + units[k]) if units[k] else ''}" for k, v in values.items()
    )
    name = message if container is None else f"{container.name}.{message}"
    out.write(f"({seconds}.{nanos:09d}) {bus} {name} {text}\n")


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _text_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.10g}"
    return str(value)


def _do_decode(args: argparse.Namespace) -> int:
    try:
        return _decode(args)
    except BrokenPipeError:  # `daq-agent decode ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _decode(args: argparse.Namespace) -> int:
    paths = list(args.paths)
    if args.defs is None and not args.dbc:
        if not paths:
            raise ConfigError("decode needs a CAN database (DATABASE or --dbc) or --defs")
        args.dbc = [Path(paths.pop(0))]
    if len(paths) > 1:
        raise ConfigError(f"decode reads one input, got {len(paths)}: {' '.join(paths)}")
    args.input = paths[0] if paths else "-"
    if args.defs is not None:
        return _decode_serial(args)
    databases = [load_database(path) for path in args.dbc]
    if args.input == "-":
        summary = _run(databases, sys.stdin, args)
    else:
        try:
            handle = open(args.input, encoding="utf-8", errors="replace")  # noqa: SIM115
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc.strerror}", source=args.input) from exc
        with handle:
            summary = _run(databases, handle, args)
    sys.stderr.write(f"daq-agent decode: {summary.render()}\n")
    return 1 if summary.errors or summary.bad_lines else 0


def _run(databases: Sequence[Any], lines: Iterable[str], args: argparse.Namespace) -> DecodeSummary:
    return decode_candump(
        databases,
        lines,
        sys.stdout,
        sys.stderr,
        as_json=args.json,
        bus=args.bus,
        flow_name_template=args.flow_name_template,
        choices=not args.no_choices,
        protocol="j1939" if args.j1939 else None,
    )


def _decode_serial(args: argparse.Namespace) -> int:
    try:
        serial_cli = importlib.import_module("daq_agent.serialdefs.cli")
        decode_stream = serial_cli.decode_stream
    except (ImportError, AttributeError) as exc:
        print(f"daq-agent decode: serial decoding unavailable: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if args.input == "-":
        code: int = decode_stream(str(args.defs), sys.stdin.buffer, sys.stdout, args.json)
        return code
    try:
        handle = open(args.input, "rb")  # noqa: SIM115
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", source=args.input) from exc
    with handle:
        code = decode_stream(str(args.defs), handle, sys.stdout, args.json)
    return code
