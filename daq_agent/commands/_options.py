"""Command-line option parsing shared by more than one command."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from daq_agent.core.errors import ConfigError


def parse_bus_options(items: Sequence[str]) -> dict[str, Any]:
    """``--bus-option KEY=VALUE`` items as python-can Bus keyword arguments (a value is read as
    JSON when it parses, else kept as text)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--bus-option {item!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(raw)
        except ValueError:
            options[key] = raw
    return options
