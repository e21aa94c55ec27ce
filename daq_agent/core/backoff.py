"""Back-off between attempts: one implementation for every retry loop of the agent.

Failures are sorted into a :class:`FailureKind` by whoever knows the transport (the sink); the
pipeline and the readers only see the kind. :class:`Backoff` turns "n failures in a row" into a
delay: capped exponential with full jitter (uniform in ``[0, cap]``), so many agents restarting
together do not retry in step; authentication failures wait between half and all of
``auth_max_s`` (only a person can fix a key: never a tight loop).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from daq_agent.core.errors import ConfigError, FailureKind

__all__ = ["Backoff", "FailureKind", "RetryPolicy"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long to wait between attempts.

    Attributes:
        initial_s: the cap of the first delay.
        max_s: the cap of every delay for transient failures.
        auth_max_s: the delay for authentication failures (the key is wrong: retry slowly).
        multiplier: the cap grows by this factor per failure in a row.

    Raises:
        ConfigError: a value is not positive, or ``max_s < initial_s``.
    """

    initial_s: float = 0.2
    max_s: float = 10.0
    auth_max_s: float = 30.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if min(self.initial_s, self.max_s, self.auth_max_s) <= 0 or self.multiplier < 1:
            raise ConfigError("retry delays must be > 0 and the multiplier >= 1")
        if self.max_s < self.initial_s:
            raise ConfigError("retry max_s must be >= initial_s")


class Backoff:
    """Capped exponential back-off with full jitter, for one sender.

    ``delay()`` after the n-th failure in a row is uniform in ``[0, min(max_s, initial_s *
    multiplier**(n-1))]`` (full jitter: many agents restarting together do not retry in step).
    Authentication failures wait between half and all of ``auth_max_s``: never a tight loop.
    :meth:`reset` after a success starts over.

    Args:
        policy: the delays.
        rng: the random source (seed it for reproducible tests).
    """

    __slots__ = ("_rng", "attempts", "policy")

    def __init__(self, policy: RetryPolicy | None = None, rng: random.Random | None = None) -> None:
        self.policy = policy or RetryPolicy()
        self._rng = rng or random.Random()
        self.attempts = 0

    def cap(self, kind: FailureKind = FailureKind.TRANSIENT) -> float:
        """The upper bound of the next delay (after ``attempts`` failures in a row)."""
        p = self.policy
        if kind is FailureKind.AUTH:
            return p.auth_max_s
        exponent = min(max(self.attempts - 1, 0), 60)
        return min(p.max_s, p.initial_s * p.multiplier**exponent)

    def failure(self, kind: FailureKind = FailureKind.TRANSIENT) -> float:
        """Record one more failure in a row; the seconds to wait before the next attempt."""
        self.attempts += 1
        cap = self.cap(kind)
        if kind is FailureKind.AUTH:
            return self._rng.uniform(cap / 2, cap)
        return self._rng.uniform(0.0, cap)

    def reset(self) -> None:
        """A success: the next failure starts from ``initial_s`` again."""
        self.attempts = 0
