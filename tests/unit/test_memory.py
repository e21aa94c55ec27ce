"""daq_agent.core.memory: malloc_trim gives freed heap pages back to the kernel (glibc only)."""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

import pytest

from daq_agent.core import memory


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


libc = memory._glibc()
needs_glibc = pytest.mark.skipif(libc is None, reason="not glibc")


@needs_glibc
def test_trim_returns_freed_heap_pages_to_the_kernel() -> None:
    """64 MiB of 64 KiB blocks (below the mmap threshold: they live in the heap), freed under a
    pinned top chunk, stay resident until :func:`memory.trim`."""
    assert libc is not None
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, count = 64 * 1024, 1024
    blocks = [libc.malloc(size) for _ in range(count + 1)]
    assert all(blocks)
    for block in blocks:
        ctypes.memset(block, 1, size)  # resident
    pin = blocks.pop()  # the last one keeps the heap's top from shrinking by itself
    try:
        for block in blocks:
            libc.free(block)
        before = rss_kib()
        memory.trim()
        after = rss_kib()
        assert before - after > 32 * 1024, (before, after)
    finally:
        libc.free(pin)


@needs_glibc
def test_limit_arenas_is_applied() -> None:
    assert memory.limit_arenas() is True


def test_trimmer_trims_once_per_interval() -> None:
    trimmer = memory.Trimmer(interval=0.05)
    trimmer.tick()
    assert trimmer.trims == 0  # not before the first interval
    deadline = time.monotonic() + 5
    while trimmer.trims == 0 and time.monotonic() < deadline:
        trimmer.tick()
    assert trimmer.trims == 1
    trimmer.tick()
    assert trimmer.trims == 1
