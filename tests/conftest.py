"""Shared fixtures: the local ingestion server on 127.0.0.1 port 0, a grpcio channel to it, and a
guard that fails any test leaking a thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from daq_agent.server.local import LocalIngestServer, make_server

# grpcio starts threads of its own (channel spin, request-iterator consumers) and reaps them on
# its own schedule; they are not the test's to join.
_GRPC_THREAD_MARKERS = ("grpc", "channel_spin", "consume_request_iterator", "_poll_connectivity")


def _foreign(thread: threading.Thread) -> bool:
    target = getattr(getattr(thread, "_target", None), "__name__", "")
    return any(marker in thread.name or marker in target for marker in _GRPC_THREAD_MARKERS)


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail the test if it leaves a thread of its own running (after a short join wait)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 2.0
    while True:
        leaked = [
            t for t in threading.enumerate() if t not in before and t.is_alive() and not _foreign(t)
        ]
        if not leaked or time.monotonic() >= deadline:
            break
        for thread in leaked:
            thread.join(timeout=0.05)
    if leaked:
        pytest.fail(f"test leaked threads: {[t.name for t in leaked]}")


@pytest.fixture
def local_server(tmp_path: Path) -> Iterator[LocalIngestServer]:
    """A started local ingestion server on 127.0.0.1 port 0 with its db in tmp_path."""
    server = make_server(tmp_path / "local.sqlite", host="127.0.0.1", port=0)
    server.start()
    try:
        yield server
    finally:
        server.stop(grace=1.0)


@pytest.fixture
def grpc_channel(local_server: LocalIngestServer) -> Iterator[grpc.Channel]:
    """A grpcio insecure channel to ``local_server``."""
    channel = grpc.insecure_channel(f"127.0.0.1:{local_server.port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield channel
    finally:
        channel.close()
