"""The ``daq-agent`` command line.

Each subcommand lives in ``daq_agent.commands.<name>`` and exposes ``add_subparser(subparsers)``,
which registers its parser with ``set_defaults(func=<callable(args) -> int>)``. A subcommand whose
module cannot be imported (an optional dependency missing) reports that and never breaks the others.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from daq_agent import __version__
from daq_agent.core.errors import DaqError

COMMANDS = (
    "run",
    "check",
    "demo",
    "serve",
    "simulate",
    "flows",
    "decode",
    "export",
    "errors",
    "runs",
    "channels",
    "plot",
    "monitor",
    "replay",
    "service",
)

log = logging.getLogger("daq_agent")


def build_parser() -> argparse.ArgumentParser:
    """The parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="daq-agent",
        description="Decode CAN and serial frames and stream them to Sift or a local server.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"daq_agent.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("daq_agent.commands"):
                continue  # not built yet
            broken = subparsers.add_parser(name, help=f"(unavailable: {exc})")
            broken.set_defaults(func=_unavailable(name, exc))
            continue
        module.add_subparser(subparsers)
    return parser


def _unavailable(name: str, exc: Exception) -> object:
    def run(_args: argparse.Namespace) -> int:
        print(f"daq-agent {name}: unavailable: {exc}", file=sys.stderr)
        return 3

    return run


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    # under systemd (JOURNAL_STREAM set) the journal stamps each line itself
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    logging.basicConfig(
        level=level,
        format=stamp + "%(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # hpack logs every decoded header at DEBUG, the authorization header (the API key) included.
    for noisy in ("hpack", "h2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for bad usage or config)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _configure_logging(args.verbose, args.quiet)
    try:
        code: int = args.func(args)
    except DaqError as exc:
        print(f"daq-agent {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `daq-agent export … | head`: stop quietly, as Python's docs advise
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
