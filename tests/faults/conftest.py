"""Fixtures of the fault-injection suite (the harness itself is in ``faultkit.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from faultkit import ServeProcess, serving


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    """An API key file (any key: the server without --api-key accepts every caller)."""
    path = tmp_path / "api.key"
    path.write_text("faults-key\n")
    return path


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServeProcess]:
    """``daq-agent serve`` as a subprocess (no key) with its store in tmp_path."""
    with serving(tmp_path / "store.sqlite", tmp_path) as proc:
        yield proc
