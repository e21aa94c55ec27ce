"""Shared by the store-browsing commands (``runs``, ``channels``, ``export``, ``plot``)."""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.table import Table

from daq_agent.server.browse import StoreBrowser, iso_timestamp
from daq_agent.server.store import Store

__all__ = ["browse", "print_table", "time_text"]

_PIPE_WIDTH = 100_000


@contextlib.contextmanager
def browse(path: Path) -> Iterator[StoreBrowser]:
    """A browser over the store at ``path``, opened read-only.

    Raises:
        DaqError: the file is missing or is not a daq-agent store (the message names it).
    """
    with Store.open(path, readonly=True) as store:
        yield StoreBrowser(store)


def time_text(timestamp_ns: int | None) -> str:
    """ISO 8601 UTC, or "" for None."""
    return "" if timestamp_ns is None else iso_timestamp(timestamp_ns)


def print_table(
    title: str,
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    right: Sequence[str] = (),
    out: TextIO | None = None,
) -> None:
    """A Rich table on ``out`` (stdout): styled on a terminal (cells fold at its width), plain
    unwrapped lines when piped (one line per row, for grep)."""
    stream = out or sys.stdout
    tty = stream.isatty()
    width = shutil.get_terminal_size((200, 24)).columns if tty else _PIPE_WIDTH
    console = Console(file=stream, width=width, highlight=False, soft_wrap=False)
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for header in headers:
        table.add_column(
            header,
            justify="right" if header in right else "left",
            overflow="fold",
            no_wrap=not tty,
        )
    for row in rows:
        table.add_row(*row)
    console.print(table)
