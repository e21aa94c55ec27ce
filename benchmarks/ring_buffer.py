"""RingBuffer throughput: producers putting samples, one consumer taking batches.

Run: ``python benchmarks/ring_buffer.py [--producers 4] [--items 200000] [--batched-items 4000000]
[--capacity 65536] [--batch 256] [--rounds 5] [--modes put,put_many,wait]``.

Modes (each under both overflow policies, except ``wait``, which bypasses the policy):

* ``put``: one ``put`` per sample;
* ``put_many``: batches of ``--batch`` samples with ``put_many``, as a live reader hands each
  read's samples over (the overflow policy applies);
* ``wait``: batches with ``put_many(block=True, timeout=0.1)``, as a replay does (it waits for
  room, never drops).

Configurations run in interleaved rounds (the order rotates each round); each line gives the
median items/s of the put phase over the rounds, and the drops of the last round (drop_oldest
drops when the consumer falls behind; block and wait never drop).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from daq_agent.core.sample import Sample
from daq_agent.pipeline.ring_buffer import OverflowPolicy, RingBuffer, RingBufferStats

MODES = ("put", "put_many", "wait")


def measure(
    mode: str, policy: OverflowPolicy, producers: int, items: int, capacity: int, batch: int
) -> tuple[float, RingBufferStats]:
    """Run one configuration once; the put phase's items/s and the ring's final counters."""
    ring: RingBuffer[Sample] = RingBuffer(capacity, policy)
    sample = Sample("bench.flow", 1_700_000_000_000_000_000, (1.0, 2, True))
    per_producer = items // producers // batch * batch
    chunk = [sample] * batch
    done = threading.Event()

    def consume() -> None:
        while True:
            got = ring.get_batch(4096, timeout=0.05)
            if not got and done.is_set():
                return

    def produce() -> None:
        if mode == "put":
            put = ring.put
            for _ in range(per_producer):
                put(sample)
            return
        put_many = ring.put_many
        if mode == "put_many":
            for _ in range(per_producer // batch):
                put_many(chunk)
            return
        for _ in range(per_producer // batch):
            rest = chunk
            while rest:
                rest = rest[put_many(rest, block=True, timeout=0.1) :]

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
    assert stats.put_count == stats.got + stats.dropped
    if mode == "wait":
        assert stats.dropped == 0
        assert stats.got == per_producer * producers
    return per_producer * producers / elapsed_put, stats


def main() -> None:
    """Parse arguments, run the interleaved rounds and print one line per configuration."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--producers", type=int, default=4)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument(
        "--batched-items", type=int, default=4_000_000, help="items per run of the batched modes"
    )
    parser.add_argument("--capacity", type=int, default=65_536)
    parser.add_argument("--batch", type=int, default=256, help="samples per put_many")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated: put,put_many,wait"
    )
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes: {', '.join(sorted(unknown))}")
    configs: list[tuple[str, OverflowPolicy]] = []
    for mode in modes:
        policies: tuple[OverflowPolicy, ...] = (
            ("drop_oldest",)
            if mode == "wait"
            else (
                "drop_oldest",
                "block",
            )
        )
        configs.extend((mode, policy) for policy in policies)
    rates: dict[tuple[str, str], list[float]] = {c: [] for c in configs}
    last: dict[tuple[str, str], RingBufferStats] = {}
    for r in range(args.rounds):
        shift = r % len(configs)
        for mode, policy in configs[shift:] + configs[:shift]:
            single = mode == "put" or policy == "block"  # put_many under "block" is put per item
            batch = 1 if mode == "put" else args.batch
            items = args.items if single else args.batched_items
            rate, stats = measure(mode, policy, args.producers, items, args.capacity, batch)
            rates[(mode, policy)].append(rate)
            last[(mode, policy)] = stats
    for mode, policy in configs:
        values = rates[(mode, policy)]
        stats = last[(mode, policy)]
        rounds = " ".join(f"{v / 1e6:.2f}" for v in values)
        print(
            f"{mode:<8} {policy:<11} producers={args.producers} put "
            f"{statistics.median(values):>11,.0f} items/s (median; rounds M/s: {rounds})  "
            f"dropped={stats.dropped} high_water={stats.high_water}"
        )


if __name__ == "__main__":
    main()
