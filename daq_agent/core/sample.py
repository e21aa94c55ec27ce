"""The unit that travels from a reader to the flusher."""

from __future__ import annotations

from dataclasses import dataclass

Value = float | int | bool | str | bytes | None
"""One channel value; None means empty (a multiplexed signal absent from this frame)."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One decoded frame: the values of a flow's channels, in the flow's channel order.

    Attributes:
        flow: the flow name (unique per asset).
        timestamp_ns: nanoseconds since the Unix epoch, UTC.
        values: one value per channel of the flow, in channel order; enum channels carry the
            numeric key, bool channels a bool, absent values None.
    """

    flow: str
    timestamp_ns: int
    values: tuple[Value, ...]
