"""Helpers for the polled-device tests: waiting on a condition, collecting samples."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from daq_agent.core.sample import Sample


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Return once ``condition()`` is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.005)


class Collected:
    """A thread-safe sample sink for a reader."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.samples: list[Sample] = []

    def __call__(self, sample: Sample) -> None:
        with self._lock:
            self.samples.append(sample)

    def of(self, flow: str) -> list[Sample]:
        """The samples of ``flow`` so far."""
        with self._lock:
            return [s for s in self.samples if s.flow == flow]
