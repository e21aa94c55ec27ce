"""The seam between the pipeline and a transport: where delivered samples go.

The flusher knows nothing of gRPC, Sift or any client library. It talks to a :class:`Sink`::

    sink.open()           → SinkStream     a window: connect and register the config (if needed)
    stream.send(rows, run)                 queue samples of a run on the window (flows registered
                                           and the run found or created as they first appear)
    stream.commit(timeout)                 returns only once the server has *committed* every row
                                           sent on the window (the spool is acknowledged after it)
    stream.cancel()                        abandon the window; what it carried is sent again

Every failure a sink raises is a :class:`~daq_agent.core.errors.SinkError` whose ``kind`` says
what it means for the data (retry later, refused for good, or authentication); a sink maps its
transport's errors to those in one place. A sink must tolerate ``open`` being called again after
any failure, and must be usable from one thread (the flusher's sender) at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from daq_agent.pipeline.batch import Row, RunRef

__all__ = ["Sink", "SinkStream"]


class SinkStream(Protocol):
    """One window of a sink: rows sent on it are committed (or fail) together."""

    def send(self, rows: Sequence[Row], run: RunRef | None) -> None:
        """Queue rows (in order) of ``run`` (None: no run) on the window.

        Raises:
            SinkError: the window failed (``kind`` says whether to retry, bisect, or wait).
        """

    def commit(self, timeout: float) -> None:
        """Wait until the server committed every row sent on this window.

        Raises:
            SinkError: it did not (an error, or no answer within ``timeout``: ``timed_out``).
        """

    def cancel(self) -> None:
        """Abandon the window without waiting (never raises)."""


class Sink(Protocol):
    """Where the flusher delivers samples."""

    def open(self) -> SinkStream:
        """Open a window.

        Raises:
            SinkError: the target cannot be reached, refuses the key, or refuses the config.
        """
        ...

    def metrics(self) -> Mapping[str, float]:
        """The transport's own counters (messages sent, retries, checkpoints, queue depths)."""
        ...

    def close(self) -> None:
        """Release the transport (after the flusher stopped)."""
