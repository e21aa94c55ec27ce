"""RingBuffer: bounds, overflow policies and exact accounting under concurrent producers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from daq_agent.core.errors import ConfigError
from daq_agent.pipeline.ring_buffer import RingBuffer


def _run_threads(targets: list[Callable[[], None]], prefix: str) -> None:
    threads = [
        threading.Thread(target=t, name=f"{prefix}-{i}", daemon=True) for i, t in enumerate(targets)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive(), f"{thread.name} did not finish"


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def test_fifo_order_and_batch_limit() -> None:
    """Items come out oldest first, at most max_items per batch."""
    ring: RingBuffer[int] = RingBuffer(10)
    for i in range(7):
        assert ring.put(i)
    assert ring.get_batch(3, timeout=0) == [0, 1, 2]
    assert ring.get_batch(10, timeout=0) == [3, 4, 5, 6]
    assert ring.get_batch(10, timeout=0) == []
    assert ring.high_water == 7
    assert ring.depth == 0


def test_drop_oldest_keeps_newest_and_counts() -> None:
    """A full drop_oldest buffer discards the oldest items and counts each one."""
    ring: RingBuffer[int] = RingBuffer(3, "drop_oldest")
    for i in range(10):
        assert ring.put(i)
    assert ring.dropped == 7
    assert ring.high_water == 3
    assert ring.get_batch(10, timeout=0) == [7, 8, 9]


def test_put_many_drop_oldest_larger_than_capacity() -> None:
    """put_many keeps the newest items when the batch overflows, counting the rest."""
    ring: RingBuffer[int] = RingBuffer(4, "drop_oldest")
    ring.put_many([100, 101])
    assert ring.put_many(range(6)) == 4
    assert ring.dropped == 4
    assert ring.get_batch(10, timeout=0) == [2, 3, 4, 5]
    stats = ring.stats()
    assert stats.put_count == stats.got + stats.dropped + stats.depth


def test_block_policy_times_out_and_counts_the_new_item() -> None:
    """A full block buffer waits block_timeout, then drops the new item, not an old one."""
    ring: RingBuffer[int] = RingBuffer(2, "block", block_timeout=0.05)
    assert ring.put(1)
    assert ring.put(2)
    assert not ring.put(3)
    assert ring.dropped == 1
    assert ring.get_batch(5, timeout=0) == [1, 2]


def test_block_policy_waits_for_a_consumer() -> None:
    """A blocked producer resumes as soon as a consumer makes room, losing nothing."""
    ring: RingBuffer[int] = RingBuffer(1, "block")
    ring.put(0)
    done = threading.Event()

    def produce() -> None:
        ring.put(1)
        done.set()

    thread = threading.Thread(target=produce, name="test-blocked-producer", daemon=True)
    thread.start()
    assert not done.wait(0.05)  # it is blocked on a full buffer
    assert ring.get_batch(1, timeout=1) == [0]
    assert done.wait(5)
    thread.join(5)
    assert ring.get_batch(1, timeout=1) == [1]
    assert ring.dropped == 0


def test_waiting_put_many_never_drops_and_keeps_order() -> None:
    """put_many(block=True) on a full drop_oldest ring waits for room, in parts: nothing dropped."""
    ring: RingBuffer[int] = RingBuffer(4, "drop_oldest")
    ring.put_many(range(4))
    results: list[int] = []
    producer = threading.Thread(
        target=lambda: results.append(ring.put_many(range(4, 14), block=True)),
        name="test-waiting-producer",
        daemon=True,
    )
    producer.start()
    received: list[int] = []
    while len(received) < 14:
        batch = ring.get_batch(3, timeout=5)
        assert batch, "the waiting producer made no progress"
        received.extend(batch)
    producer.join(5)
    assert not producer.is_alive()
    assert results == [10]
    assert received == list(range(14))
    stats = ring.stats()
    assert stats.dropped == 0
    assert stats.high_water == 4
    assert stats.put_count == stats.got == 14


def test_waiting_put_many_timeout_leaves_the_rest_unoffered() -> None:
    """A waiting put that times out enqueues what fits; the rest is left uncounted to the caller."""
    ring: RingBuffer[str] = RingBuffer(3)
    ring.put_many(["a", "b"])
    batch = ["c", "d", "e"]
    started = time.monotonic()
    n = ring.put_many(batch, block=True, timeout=0.05)
    assert time.monotonic() - started >= 0.05
    assert n == 1
    stats = ring.stats()
    assert (stats.put_count, stats.dropped, stats.depth) == (3, 0, 3)
    assert ring.get_batch(2, timeout=0) == ["a", "b"]
    assert ring.put_many(batch[n:], block=True, timeout=0) == 2  # room now: no wait
    assert ring.get_batch(5, timeout=0) == ["c", "d", "e"]
    stats = ring.stats()
    assert stats.put_count == stats.got + stats.dropped + stats.depth == 5


def test_waiting_put_many_waits_on_a_condition_and_returns_on_close() -> None:
    """A producer waiting on a full ring uses no CPU; close() wakes it and it enqueued nothing."""
    ring: RingBuffer[int] = RingBuffer(2, "block", block_timeout=0.0)
    ring.put_many([1, 2])
    results: list[tuple[int, float]] = []
    waiting = threading.Event()

    def produce() -> None:
        cpu = time.thread_time()
        waiting.set()
        n = ring.put_many([3, 4, 5], block=True)  # no timeout: until room or close
        results.append((n, time.thread_time() - cpu))

    producer = threading.Thread(target=produce, name="test-waiting-producer", daemon=True)
    producer.start()
    assert waiting.wait(5)
    assert wait_until(lambda: ring._waiting_producers == 1)
    time.sleep(0.3)  # let a busy loop, if there were one, burn CPU
    assert producer.is_alive()
    ring.close()
    producer.join(5)
    assert not producer.is_alive()
    [(n, cpu_s)] = results
    assert n == 0
    assert cpu_s < 0.1, f"the waiting producer used {cpu_s:.3f} s of CPU in 0.3 s"
    stats = ring.stats()
    assert (stats.put_count, stats.dropped, stats.dropped_closed) == (2, 0, 0)
    assert ring.put_many([6], block=True) == 0  # closed: returns at once


def test_get_batch_waits_for_first_item() -> None:
    """get_batch returns as soon as an item arrives from another thread."""
    ring: RingBuffer[str] = RingBuffer(4)
    timer = threading.Timer(0.05, ring.put, args=("x",))
    timer.name = "test-late-put"
    timer.start()
    try:
        assert ring.get_batch(4, timeout=10) == ["x"]
    finally:
        timer.join(5)


def test_close_wakes_waiters_and_drains() -> None:
    """close() wakes a waiting consumer and a blocked producer; the rest drains, then []."""
    ring: RingBuffer[int] = RingBuffer(1, "block")
    ring.put(1)
    results: list[object] = []
    producer = threading.Thread(
        target=lambda: results.append(ring.put(2)), name="test-close-producer", daemon=True
    )
    producer.start()
    assert not ring.closed
    ring.close()
    producer.join(5)
    assert results == [False]
    assert ring.put(3) is False
    assert ring.get_batch(10, timeout=5) == [1]
    assert ring.get_batch(10, timeout=5) == []
    stats = ring.stats()
    assert stats.dropped == 2
    assert stats.dropped_closed == 2
    assert stats.put_count == stats.got + stats.dropped


def test_close_wakes_waiting_consumer() -> None:
    """A consumer waiting forever on an empty buffer returns [] when it is closed."""
    ring: RingBuffer[int] = RingBuffer(4)
    results: list[list[int]] = []
    consumer = threading.Thread(
        target=lambda: results.append(ring.get_batch(4, timeout=None)),
        name="test-close-consumer",
        daemon=True,
    )
    consumer.start()
    ring.close()
    consumer.join(5)
    assert not consumer.is_alive()
    assert results == [[]]


@pytest.mark.parametrize(
    ("policy", "capacity", "block_timeout"),
    [("drop_oldest", 64, None), ("block", 64, None), ("block", 8, 0.0)],
)
def test_concurrent_producers_exact_accounting(
    policy: str, capacity: int, block_timeout: float | None
) -> None:
    """Several producers and one consumer: put == got + dropped, every kept item exactly once."""
    producers, per_producer = 6, 5000
    ring: RingBuffer[tuple[int, int]] = RingBuffer(capacity, policy, block_timeout)  # type: ignore[arg-type]
    received: list[tuple[int, int]] = []
    finished = threading.Event()

    def consume() -> None:
        while True:
            batch = ring.get_batch(100, timeout=0.5)
            received.extend(batch)
            if not batch and finished.is_set() and ring.depth == 0:
                return

    def make_producer(pid: int) -> Callable[[], None]:
        def produce() -> None:
            for seq in range(per_producer):
                if seq % 50 == 0:
                    ring.put_many([(pid, seq)])
                else:
                    ring.put((pid, seq))

        return produce

    consumer = threading.Thread(target=consume, name="test-consumer", daemon=True)
    consumer.start()
    _run_threads([make_producer(p) for p in range(producers)], "test-producer")
    finished.set()
    consumer.join(30)
    assert not consumer.is_alive()
    stats = ring.stats()
    total = producers * per_producer
    assert stats.put_count == total
    assert stats.got == len(received)
    assert stats.put_count == stats.got + stats.dropped
    assert len(set(received)) == len(received), "an item came out twice"
    assert stats.high_water <= capacity
    # each producer's items come out in the order it put them
    for pid in range(producers):
        seqs = [seq for p, seq in received if p == pid]
        assert seqs == sorted(seqs)
    if policy == "block" and block_timeout is None:
        assert stats.dropped == 0
        assert len(received) == total


def test_invalid_arguments() -> None:
    """Bad capacity, policy or timeout is a ConfigError."""
    with pytest.raises(ConfigError, match="capacity"):
        RingBuffer(0)
    with pytest.raises(ConfigError, match="policy"):
        RingBuffer(4, "drop_newest")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="block_timeout"):
        RingBuffer(4, "block", block_timeout=-1)
