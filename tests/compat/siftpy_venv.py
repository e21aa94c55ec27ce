"""A virtual environment with Sift's Python client (sift_py), created once and reused.

sift_py installs top-level ``sift.*`` protobuf modules that clash with ours (same proto package
names registered twice in one process), so it runs in its own environment, as a subprocess.

The environment lives at ``<tmp>/daq-agent-sift-py-venv-<hash>``, the hash covering the pinned
requirements and the Python version, so a change of pin makes a new one. Creation is guarded by a
file lock (parallel test sessions wait for one another) and completed by a stamp file, so an
interrupted install is redone rather than trusted.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["SIFT_PY_REQUIREMENTS", "ensure_sift_py_venv", "sift_py_venv_path"]

SIFT_PY_REQUIREMENTS = ("sift-stack-py==0.25.0",)
"""What the environment holds (sift_py pulls in its own grpcio and protobuf)."""

_STAMP = ".daq-agent-complete"


def sift_py_venv_path(requirements: tuple[str, ...] = SIFT_PY_REQUIREMENTS) -> Path:
    """Where the environment for ``requirements`` lives."""
    key = "\n".join([sys.version.split()[0], *requirements]).encode()
    digest = hashlib.sha256(key).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"daq-agent-sift-py-venv-{digest}"


def ensure_sift_py_venv(
    requirements: tuple[str, ...] = SIFT_PY_REQUIREMENTS, *, timeout: float = 600.0
) -> tuple[Path, float]:
    """The environment's python, creating the environment if needed.

    Returns:
        (path of its ``bin/python``, seconds spent creating it; 0.0 when it was reused).

    Raises:
        RuntimeError: ``venv`` or ``pip install`` failed (the output is in the message).
    """
    venv = sift_py_venv_path(requirements)
    python = venv / "bin" / "python"
    lock_path = venv.with_name(venv.name + ".lock")
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / _STAMP).is_file() and python.is_file():
            return python, 0.0
        started = time.monotonic()
        shutil.rmtree(venv, ignore_errors=True)
        for command in (
            [sys.executable, "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             *requirements],
        ):  # fmt: skip
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, check=False
            )
            if done.returncode != 0:
                raise RuntimeError(
                    f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
                )
        (venv / _STAMP).write_text("\n".join(requirements) + "\n")
        return python, time.monotonic() - started
