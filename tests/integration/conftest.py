"""Fixtures of the integration tests: a python-can virtual bus of a test's own."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import can
import pytest


@pytest.fixture
def channel() -> str:
    """A virtual bus channel no other test uses."""
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def sender(channel: str) -> Iterator[can.BusABC]:
    """A virtual bus on ``channel`` that keeps the timestamps of the frames it sends."""
    with can.Bus(channel, interface="virtual", preserve_timestamps=True) as bus:
        yield bus
