"""Fixtures of the Sift-client compatibility tests: the sift_py environment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from siftpy_venv import ensure_sift_py_venv, sift_py_venv_path

_CREATED: list[float] = []


@pytest.fixture(scope="session")
def sift_py_python() -> Path:
    """The python of a virtual environment holding sift-stack-py (created on first use)."""
    python, seconds = ensure_sift_py_venv()
    if seconds:
        _CREATED.append(seconds)
    return python


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say when this session had to create the sift_py environment, and how long it took."""
    for seconds in _CREATED:
        terminalreporter.write_line(
            f"created {sift_py_venv_path()} (sift-stack-py) in {seconds:.1f} s; later runs reuse it"
        )
