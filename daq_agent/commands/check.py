"""``daq-agent check CONFIG``: validate a config and load its databases without starting anything.

Prints the asset, the target, each source with its flows (``--flows`` lists them by name), the
derived ingestion client key and every warning. Exit code 0 when the config is usable, 2 when it
is not (one line naming the file, line and key).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from daq_agent.agent import plan_agent
from daq_agent.config import LocalTarget, SiftTarget, load_config

__all__ = ["add_subparser"]


def add_subparser(subparsers: Any) -> None:
    """Register ``check``."""
    parser = subparsers.add_parser(
        "check",
        help="validate an agent config and its databases without starting",
        description="Validate an agent config, load its databases and print the derived flows.",
    )
    parser.add_argument("config", type=Path, metavar="CONFIG", help="agent config (YAML)")
    parser.add_argument("--flows", action="store_true", help="list every flow by name")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=_do_check)


def _do_check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    plan = plan_agent(config)
    target = config.target
    if isinstance(target, SiftTarget):
        target.api_key()  # ConfigError (exit 2) now, as run would: an unset or unreadable key
    target_text = (
        f"local server, store {target.db_path}"
        if isinstance(target, LocalTarget)
        else f"sift {target.uri} (key from "
        + (f"${target.api_key_env}" if target.api_key_env else str(target.api_key_file))
        + ")"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "config": str(config.source),
                    "asset": config.asset,
                    "target": target_text,
                    "client_key": plan.client_key,
                    "fingerprint": plan.fingerprint,
                    "sources": [
                        {
                            "name": s.name,
                            "kind": s.kind,
                            "bus": s.bus,
                            "databases": [str(p) for p in s.databases],
                            "flows": [f.name for f in s.flows],
                            "journal": None
                            if s.journal is None
                            else {"dir": str(s.journal.directory), "format": s.journal.format},
                        }
                        for s in plan.sources
                    ],
                    "flows": len(plan.flows),
                    "channels": sum(len(f.channels) for f in plan.flows),
                    "warnings": list(plan.warnings),
                },
                indent=2,
            )
        )
        return 0
    print(f"config  {config.source}")
    print(f"asset   {config.asset}")
    print(f"target  {target_text}")
    run = config.run.render_name(config.asset) if config.run is not None else "(none)"
    print(f"run     {run}")
    for source in plan.sources:
        flows = source.flows
        channels = sum(len(f.channels) for f in flows)
        databases = ", ".join(p.name for p in source.databases)
        print(
            f"{source.kind:<7} {source.name}: {len(flows)} flows, {channels} channels ({databases})"
        )
        if source.journal is not None:
            print(f"          journal {source.journal.directory} ({source.journal.format})")
        if args.flows:
            for flow in flows:
                print(f"          {flow.name} ({len(flow.channels)} channels)")
    print(
        f"flows   {len(plan.flows)} in total; ingestion client key {plan.client_key}"
        + (" (from the config)" if config.ingestion_client_key else " (derived)")
    )
    for warning in plan.warnings:
        print(f"warning: {warning}")
    print("ok")
    return 0
