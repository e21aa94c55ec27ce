"""``daq-agent flows``: print the flows derived from CAN databases.

``flows --dbc FILE [--dbc FILE ...] [--bus NAME] [--flow-name-template T] [--json]`` loads the
databases exactly as the agent does and prints one flow per message. With ``--json`` it prints a
list of ``{"name", "channels": [{"name", "data_type", "unit", "description", "enum_types":
[{"name", "key"}]}]}``; the database warnings go to stderr either way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from daq_agent.core.model import ChannelDataType, ChannelEnumType, FlowConfig
from daq_agent.decode.can_decoder import DEFAULT_FLOW_NAME_TEMPLATE, CanDecoder, enum_key
from daq_agent.decode.dbc import load_database

__all__ = ["add_subparser", "flows_as_json"]


def add_subparser(subparsers: Any) -> None:
    """Register ``flows``."""
    parser = subparsers.add_parser(
        "flows",
        help="print the flows derived from CAN databases",
        description="Print the flows (one per message) and channels (one per signal) the agent "
        "derives from DBC, KCD, ARXML or SYM databases.",
    )
    parser.add_argument(
        "--dbc",
        action="append",
        required=True,
        type=Path,
        metavar="FILE",
        help="database file (repeat for several)",
    )
    parser.add_argument("--bus", default="can0", help="bus alias used in flow names (can0)")
    parser.add_argument(
        "--flow-name-template",
        default=DEFAULT_FLOW_NAME_TEMPLATE,
        metavar="T",
        help="flow names from {bus}, {message}, {frame_id} (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=_do_flows)


def flows_as_json(flows: list[FlowConfig]) -> list[dict[str, Any]]:
    """The JSON shape of ``flows --json``."""
    return [
        {
            "name": flow.name,
            "channels": [
                {
                    "name": channel.name,
                    "data_type": channel.data_type.as_human_str(),
                    "unit": channel.unit or "",
                    "description": channel.description or "",
                    "enum_types": [_enum_json(e) for e in channel.enum_types],
                }
                for channel in flow.channels
            ],
        }
        for flow in flows
    ]


def _enum_json(enum_type: ChannelEnumType) -> dict[str, Any]:
    """``{"name", "key"}``: the key as the database has it (-1, not its 32-bit wire form)."""
    out: dict[str, Any] = {"name": enum_type.name, "key": enum_key(enum_type)}
    if enum_type.is_signed:
        out["is_signed"] = True
    return out


def _do_flows(args: argparse.Namespace) -> int:
    try:
        return _print_flows(args, sys.stdout)
    except BrokenPipeError:  # `daq-agent flows ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _print_flows(args: argparse.Namespace, out: TextIO) -> int:
    databases = [load_database(path) for path in args.dbc]
    decoder = CanDecoder(args.bus, databases, flow_name_template=args.flow_name_template)
    if args.json:
        json.dump(flows_as_json(decoder.flows), out, indent=2, ensure_ascii=False)
        out.write("\n")
        return 0
    for message in decoder.messages:
        kind = "FD " if message.is_fd else ""
        width = 8 if message.is_extended else 3
        ident = f"0x{message.frame_id:0{width}X}{' (extended)' if message.is_extended else ''}"
        out.write(f"{message.flow.name}  [{kind}{ident}, {message.length} bytes]\n")
        for channel in message.flow.channels:
            unit = f" [{channel.unit}]" if channel.unit else ""
            line = f"    {channel.name}: {channel.data_type.as_human_str()}{unit}"
            if channel.data_type is ChannelDataType.ENUM:
                keys = ", ".join(f"{enum_key(e)}={e.name}" for e in channel.enum_types)
                line += f" {{{keys}}}"
            out.write(line + "\n")
    listed = {message.flow.name for message in decoder.messages}
    for flow in decoder.flows:
        if flow.name in listed:
            continue
        out.write(f"{flow.name}  [built-in: J1939 DM1, PGN 0xFECA]\n")  # the only such flow
        for channel in flow.channels:
            line = f"    {channel.name}: {channel.data_type.as_human_str()}"
            if channel.data_type is ChannelDataType.ENUM:
                keys = ", ".join(f"{enum_key(e)}={e.name}" for e in channel.enum_types)
                line += f" {{{keys}}}"
            out.write(line + "\n")
    channels = sum(len(f.channels) for f in decoder.flows)
    out.write(f"{len(decoder.flows)} flows, {channels} channels\n")
    return 0
