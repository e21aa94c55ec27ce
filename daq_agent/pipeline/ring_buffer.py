"""The bounded, thread-safe queue between the reader threads and the flusher.

Readers ``put`` samples; the flusher takes them with ``get_batch``. When the buffer is full the
overflow policy decides, and both policies are counted so that every item is accounted for::

    put_count == got + dropped + depth

* ``"drop_oldest"``: the new item goes in, the oldest one is discarded and counted in ``dropped``.
  A reader never waits, so a slow network never stalls a bus.
* ``"block"``: the producer waits for space, up to ``block_timeout`` seconds (None: until there is
  space or the buffer is closed); if the wait runs out the *new* item is counted in ``dropped``.

A producer that can wait (a recorded log) bypasses the policy with ``put_many(items,
block=True)``: the items go in, in order, as the consumer makes room, and none is ever dropped.
It returns once every item is in, the buffer is closed, or its ``timeout`` has passed; the items
it did not enqueue were not offered (not counted anywhere: the caller still holds them), so a
producer can wait in slices and notice its own stop in between.

After :meth:`RingBuffer.close`, puts are refused and counted in ``dropped`` (and in
``dropped_closed``); gets drain what is left and then return ``[]`` at once.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Final, Generic, Literal, TypeVar, get_args

from daq_agent.core.errors import ConfigError

__all__ = ["OverflowPolicy", "RingBuffer", "RingBufferStats"]

T = TypeVar("T")

OverflowPolicy = Literal["drop_oldest", "block"]
_POLICIES: Final = get_args(OverflowPolicy)


class RingBufferStats:
    """A snapshot of a ring buffer's counters.

    Attributes:
        capacity: the most items the buffer holds.
        depth: items held now.
        high_water: the largest depth seen.
        put_count: items offered with put/put_many (a waiting put_many offers only what it
            enqueued).
        got: items handed out by get_batch.
        dropped: items discarded (overflow or closed).
        dropped_closed: of those, items refused because the buffer was closed.
    """

    __slots__ = (
        "capacity",
        "depth",
        "dropped",
        "dropped_closed",
        "got",
        "high_water",
        "put_count",
    )

    def __init__(
        self,
        capacity: int,
        depth: int,
        high_water: int,
        put_count: int,
        got: int,
        dropped: int,
        dropped_closed: int,
    ) -> None:
        self.capacity = capacity
        self.depth = depth
        self.high_water = high_water
        self.put_count = put_count
        self.got = got
        self.dropped = dropped
        self.dropped_closed = dropped_closed

    def as_dict(self) -> dict[str, int]:
        """The counters as a dict."""
        return {name: getattr(self, name) for name in self.__slots__}

    def __repr__(self) -> str:
        return f"RingBufferStats({self.as_dict()!r})"


class RingBuffer(Generic[T]):
    """A bounded FIFO with an explicit overflow policy, safe for many producers and consumers.

    Args:
        capacity: the most items held (>= 1).
        policy: ``"drop_oldest"`` or ``"block"`` (see the module docstring).
        block_timeout: with ``"block"``, the longest a put waits for space, seconds
            (None: until there is space or the buffer is closed).

    Raises:
        ConfigError: an argument is invalid.
    """

    __slots__ = (
        "_closed",
        "_dropped",
        "_dropped_closed",
        "_got",
        "_high_water",
        "_items",
        "_lock",
        "_not_empty",
        "_not_full",
        "_put",
        "_waiting_consumers",
        "_waiting_producers",
        "block_timeout",
        "capacity",
        "policy",
    )

    def __init__(
        self,
        capacity: int,
        policy: OverflowPolicy = "drop_oldest",
        block_timeout: float | None = None,
    ) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ConfigError(f"ring buffer capacity must be an integer >= 1, got {capacity!r}")
        if policy not in _POLICIES:
            raise ConfigError(
                f"unknown overflow policy {policy!r} (expected one of {', '.join(_POLICIES)})"
            )
        if block_timeout is not None and block_timeout < 0:
            raise ConfigError(f"block_timeout must be >= 0, got {block_timeout}")
        self.capacity = capacity
        self.policy: OverflowPolicy = policy
        self.block_timeout = block_timeout
        self._items: deque[T] = deque()
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._closed = False
        self._put = 0
        self._got = 0
        self._dropped = 0
        self._dropped_closed = 0
        self._high_water = 0
        # notify() only when someone waits: a Condition.notify costs as much as the put itself
        self._waiting_consumers = 0
        self._waiting_producers = 0

    # -- producers ----------------------------------------------------------------------------

    def put(self, item: T) -> bool:
        """Add one item, applying the overflow policy when full.

        Returns:
            True if the item was enqueued (with ``"drop_oldest"`` possibly displacing the oldest),
            False if it was dropped (``"block"`` timed out, or the buffer is closed).
        """
        with self._lock:
            self._put += 1
            if self._closed:
                self._dropped += 1
                self._dropped_closed += 1
                return False
            items = self._items
            if len(items) >= self.capacity:
                if self.policy == "drop_oldest":
                    items.popleft()
                    self._dropped += 1
                else:
                    space = self._wait_for_space(1)
                    if not space:
                        self._dropped += 1
                        if space is None:
                            self._dropped_closed += 1
                        return False
            items.append(item)
            depth = len(items)
            if depth > self._high_water:
                self._high_water = depth
            if self._waiting_consumers:
                self._not_empty.notify()
            return True

    def put_many(
        self, items: Iterable[T], *, block: bool = False, timeout: float | None = None
    ) -> int:
        """Add several items in order.

        Args:
            items: the items, oldest first.
            block: wait for room instead of applying the overflow policy: the items go in as the
                consumer makes room (a batch larger than the capacity goes in in parts), and none
                is dropped.
            timeout: with ``block``, the longest wait, seconds (None: until every item is in or
                the buffer is closed).

        Returns:
            How many were enqueued. With ``block``, fewer than offered only if the buffer was
            closed or the timeout passed first: the items from that index on were not offered
            (not counted in ``put_count`` nor ``dropped``) and are still the caller's.
        """
        batch = list(items)
        if not batch:
            return 0
        if block:
            return self._put_waiting(batch, timeout)
        if self.policy == "block":
            return self._put_many_blocking(batch)
        with self._lock:
            self._put += len(batch)
            if self._closed:
                self._dropped += len(batch)
                self._dropped_closed += len(batch)
                return 0
            queue = self._items
            overflow = len(queue) + len(batch) - self.capacity
            if overflow > 0:
                from_queue = min(overflow, len(queue))
                for _ in range(from_queue):
                    queue.popleft()
                # a batch larger than the capacity keeps only its newest items
                skip = overflow - from_queue
                batch = batch[skip:]
                self._dropped += overflow
            queue.extend(batch)
            depth = len(queue)
            if depth > self._high_water:
                self._high_water = depth
            if self._waiting_consumers:
                self._not_empty.notify_all()
            return len(batch)

    def _put_waiting(self, batch: list[T], timeout: float | None) -> int:
        """``put_many(block=True)``: enqueue as room is made; how many went in."""
        deadline = None if timeout is None else time.monotonic() + timeout
        total = len(batch)
        done = 0
        queue = self._items
        with self._lock:
            while not self._closed:
                room = self.capacity - len(queue)
                if room > 0:
                    part = batch if done == 0 and room >= total else batch[done : done + room]
                    queue.extend(part)
                    done += len(part)
                    self._put += len(part)
                    depth = len(queue)
                    if depth > self._high_water:
                        self._high_water = depth
                    if self._waiting_consumers:
                        self._not_empty.notify_all()
                    if done == total:
                        break
                if deadline is None:
                    remaining = None
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                self._waiting_producers += 1
                try:
                    self._not_full.wait(remaining)
                finally:
                    self._waiting_producers -= 1
        return done

    def _put_many_blocking(self, batch: list[T]) -> int:
        """``put`` of each item in turn (the same waits, drops and counts), one lock for all:
        what fits goes in at once; when full, wait for one slot as ``put`` does."""
        queue = self._items
        enqueued = 0
        i = 0
        n = len(batch)
        with self._lock:
            while i < n:
                if self._closed:
                    rest = n - i
                    self._put += rest
                    self._dropped += rest
                    self._dropped_closed += rest
                    break
                room = self.capacity - len(queue)
                if room > 0:
                    chunk = batch[i : i + room] if i or room < n else batch
                    queue.extend(chunk)
                    taken = len(chunk)
                    self._put += taken
                    enqueued += taken
                    i += taken
                    depth = len(queue)
                    if depth > self._high_water:
                        self._high_water = depth
                    if self._waiting_consumers:
                        self._not_empty.notify_all()
                    continue
                space = self._wait_for_space(1)
                if not space:
                    self._put += 1
                    self._dropped += 1
                    if space is None:
                        self._dropped_closed += 1
                    i += 1
        return enqueued

    def _wait_for_space(self, n: int) -> bool | None:
        """With the lock held: wait until ``n`` items fit; False on timeout, None on close."""
        timeout = self.block_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(self._items) + n > self.capacity:
            if self._closed:
                return None
            if deadline is None:
                remaining = None
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
            self._waiting_producers += 1
            try:
                self._not_full.wait(remaining)
            finally:
                self._waiting_producers -= 1
        return None if self._closed else True

    # -- consumers ----------------------------------------------------------------------------

    def get_batch(self, max_items: int, timeout: float | None = None) -> list[T]:
        """Take up to ``max_items`` items, oldest first.

        Waits up to ``timeout`` seconds (None: forever) for at least one item; once the buffer is
        closed it never waits: it returns what is left, then ``[]``.

        Raises:
            ValueError: ``max_items`` < 1.
        """
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        with self._lock:
            items = self._items
            if not items and not self._closed and (timeout is None or timeout > 0):
                deadline = None if timeout is None else time.monotonic() + timeout
                self._waiting_consumers += 1
                try:
                    while not items and not self._closed:
                        if deadline is None:
                            self._not_empty.wait()
                            continue
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._not_empty.wait(remaining)
                finally:
                    self._waiting_consumers -= 1
            n = min(max_items, len(items))
            if n == 0:
                return []
            if n == len(items):
                out = list(items)
                items.clear()
            else:
                popleft = items.popleft
                out = [popleft() for _ in range(n)]
            self._got += n
            if self._waiting_producers:
                self._not_full.notify(n)
            return out

    def close(self) -> None:
        """Refuse further puts and wake every waiting producer and consumer; idempotent."""
        with self._lock:
            self._closed = True
            self._not_empty.notify_all()
            self._not_full.notify_all()

    # -- state --------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    @property
    def depth(self) -> int:
        """Items held now."""
        return len(self._items)

    @property
    def high_water(self) -> int:
        """The largest depth seen."""
        return self._high_water

    @property
    def dropped(self) -> int:
        """Items discarded (overflow, block timeout, or offered after close)."""
        return self._dropped

    @property
    def put_count(self) -> int:
        """Items offered."""
        return self._put

    @property
    def got(self) -> int:
        """Items handed out."""
        return self._got

    def stats(self) -> RingBufferStats:
        """A consistent snapshot of every counter."""
        with self._lock:
            return RingBufferStats(
                capacity=self.capacity,
                depth=len(self._items),
                high_water=self._high_water,
                put_count=self._put,
                got=self._got,
                dropped=self._dropped,
                dropped_closed=self._dropped_closed,
            )

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return (
            f"RingBuffer(capacity={self.capacity}, policy={self.policy!r}, depth={self.depth}, "
            f"dropped={self._dropped})"
        )
