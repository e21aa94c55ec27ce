"""RingBuffer throughput: producers putting samples, one consumer taking batches.

Run: ``python benchmarks/ring_buffer.py [--producers 4] [--items 200000] [--capacity 65536]``.
Prints items/s for each overflow policy, and the drops (drop_oldest can drop when the consumer
falls behind; block never drops).
"""

from __future__ import annotations

import argparse
import threading
import time

from daq_agent.core.sample import Sample
from daq_agent.pipeline.ring_buffer import OverflowPolicy, RingBuffer


def measure(policy: OverflowPolicy, producers: int, items: int, capacity: int) -> str:
    """Run one configuration; a line of results."""
    ring: RingBuffer[Sample] = RingBuffer(capacity, policy)
    sample = Sample("bench.flow", 1_700_000_000_000_000_000, (1.0, 2, True))
    per_producer = items // producers
    got = 0
    done = threading.Event()

    def consume() -> None:
        nonlocal got
        while True:
            batch = ring.get_batch(4096, timeout=0.05)
            got += len(batch)
            if not batch and done.is_set():
                return

    def produce() -> None:
        put = ring.put
        for _ in range(per_producer):
            put(sample)

    consumer = threading.Thread(target=consume, name="bench-consumer")
    threads = [
        threading.Thread(target=produce, name=f"bench-producer-{i}") for i in range(producers)
    ]
    start = time.perf_counter()
    consumer.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed_put = time.perf_counter() - start
    done.set()
    consumer.join()
    stats = ring.stats()
    total = per_producer * producers
    assert stats.put_count == stats.got + stats.dropped
    return (
        f"{policy:<11} producers={producers} put {total / elapsed_put:>10,.0f} items/s  "
        f"got={stats.got} dropped={stats.dropped} high_water={stats.high_water}"
    )


def main() -> None:
    """Parse arguments and print one line per policy."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--producers", type=int, default=4)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--capacity", type=int, default=65_536)
    args = parser.parse_args()
    for policy in ("drop_oldest", "block"):
        print(measure(policy, args.producers, args.items, args.capacity))


if __name__ == "__main__":
    main()
