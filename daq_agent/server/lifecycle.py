"""What the local server and its supervised process share about being started and stopped."""

from __future__ import annotations

import logging
from typing import Self

__all__ = ["StartStop"]


class StartStop:
    """A mix-in for an object with ``start()`` and an idempotent ``stop()``, that keeps
    ``_started`` and ``_stopped``: ``with`` starts it (unless started) and stops it, and one
    started and never stopped warns, on its class's module logger, when it is collected."""

    _started: bool
    _stopped: bool

    def start(self) -> None:
        """Start; subclasses implement it."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop (idempotent); subclasses implement it."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __del__(self) -> None:
        if getattr(self, "_started", False) and not getattr(self, "_stopped", True):
            logging.getLogger(type(self).__module__).warning("%r was not properly stopped", self)
