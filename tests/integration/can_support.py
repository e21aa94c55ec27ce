"""Shared pieces of the CAN reader, replay and simulator tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from daq_agent.core.errors import DecodeError
from daq_agent.core.sample import Sample


class CantoolsDecoder:
    """A minimal decoder with the CanDecoder interface, built on cantools (reference values)."""

    def __init__(self, db: Any) -> None:
        self.by_id = {(m.frame_id, bool(m.is_extended_frame)): m for m in db.messages}

    def decode(
        self, frame_id: int, is_extended: bool, data: bytes, timestamp_ns: int
    ) -> Sample | None:
        """Decode with cantools; None for an unknown id, DecodeError for a bad frame."""
        message = self.by_id.get((frame_id, is_extended))
        if message is None:
            return None
        try:
            values = message.decode(data, decode_choices=False)
        except Exception as exc:
            raise DecodeError(f"{message.name}: {exc}") from exc
        ordered = tuple(values.get(s.name) for s in message.signals)
        return Sample(message.name, timestamp_ns, ordered)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.002)
    return predicate()
