"""Keeping a long-running process's memory flat under glibc's malloc.

The agent's native threads (sift_stream's runtime, grpcio's pollers, the readers) each get a
malloc arena of their own, and freed memory stays in them: over a soak with server restarts (each
leaves a backlog to drain), the resident size climbed by about 70 MB/h while Python's own
allocations (tracemalloc) stayed flat at 2 MB. Two knobs of glibc fix that:

- :func:`limit_arenas`: at most a few arenas (``mallopt(M_ARENA_MAX)``; the unit also sets
  ``MALLOC_ARENA_MAX`` so the limit holds from the first allocation);
- :class:`Trimmer`: ``malloc_trim(0)`` now and then, which hands the free pages of every arena
  back to the kernel.

``benchmarks/soak.py`` measures the effect. Neither is an error where the C library is not glibc
(musl, macOS): both then do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from functools import cache

__all__ = ["DEFAULT_ARENAS", "DEFAULT_TRIM_INTERVAL_S", "Trimmer", "limit_arenas", "trim"]

log = logging.getLogger(__name__)

DEFAULT_ARENAS = 2
DEFAULT_TRIM_INTERVAL_S = 30.0
_M_ARENA_MAX = -8  # glibc's malloc.h


@cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not hasattr(libc, "malloc_trim") or not hasattr(libc, "mallopt"):
        return None  # not glibc
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def limit_arenas(arenas: int = DEFAULT_ARENAS) -> bool:
    """Cap the number of malloc arenas (for threads started from now on). True if applied."""
    libc = _glibc()
    return libc is not None and libc.mallopt(_M_ARENA_MAX, arenas) == 1


def trim() -> bool:
    """Return free heap pages to the kernel. True if some memory was released."""
    libc = _glibc()
    return libc is not None and libc.malloc_trim(0) == 1


class Trimmer:
    """Calls :func:`trim` at most every ``interval`` seconds, from whatever loop ticks it."""

    def __init__(self, interval: float = DEFAULT_TRIM_INTERVAL_S) -> None:
        self.interval = interval
        self._next = time.monotonic() + interval
        self.trims = 0

    def tick(self) -> None:
        """Trim if the interval has passed since the last trim."""
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.interval
        trim()
        self.trims += 1
