"""Benchmark: frames/s of the compiled CAN decoder versus cantools' ``Database.decode_message``.

Both sides decode the same pre-generated frames of ``dbc/bench.dbc`` (every message, classic,
multiplexed, 29-bit and CAN FD alike, in a shuffled mix), in interleaved rounds because this
machine's speed drifts:

- ``daq-agent``: ``CanDecoder.decode(frame_id, is_extended, data, timestamp_ns)``, which returns a
  :class:`~daq_agent.core.sample.Sample` (lookup, decode, typed values in flow order);
- ``cantools``: ``Database.decode_message(frame_id, data, decode_choices=False, scaling=True,
  force_extended_id=...)``, which returns a dict of scaled values.

Before timing, every frame is checked to decode to the same values on both sides.

Usage::

    .venv/bin/python benchmarks/decode_dbc.py [--frames 50000] [--rounds 7] [--dbc FILE]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from daq_agent.decode.can_decoder import CanDecoder
from daq_agent.decode.dbc import load_database

ROOT = Path(__file__).resolve().parents[1]


def make_frames(database: Any, count: int, seed: int) -> list[tuple[int, bool, bytes, int]]:
    """Random payloads for every message, with multiplexer values the database defines."""
    rnd = random.Random(seed)
    frames = []
    messages = list(database.messages)
    for index in range(count):
        message = messages[index % len(messages)]
        values: dict[str, int | float] = {}
        for signal in message.signals:
            if signal.is_multiplexer:
                ids = sorted(
                    {i for s in message.signals for i in (s.multiplexer_ids or [])}
                    | set((signal.conversion.choices or {}).keys())
                )
                values[signal.name] = rnd.choice(ids)
        mux = dict(values)
        for signal in message.signals:
            if signal.name in values:
                continue
            if signal.multiplexer_signal and mux.get(signal.multiplexer_signal) not in (
                signal.multiplexer_ids or []
            ):
                continue
            if signal.is_float:
                values[signal.name] = rnd.uniform(-1000.0, 1000.0)
            elif signal.is_signed:
                values[signal.name] = rnd.randint(
                    -(1 << (signal.length - 1)), (1 << (signal.length - 1)) - 1
                )
            else:
                values[signal.name] = rnd.randint(0, (1 << signal.length) - 1)
        data = message.encode(values, scaling=False, strict=False)
        frames.append((message.frame_id, message.is_extended_frame, data, 1_700_000_000 + index))
    rnd.shuffle(frames)
    return frames


def check_equal(
    database: Any, decoder: CanDecoder, frames: list[tuple[int, bool, bytes, int]]
) -> None:
    """Fail loudly if any frame decodes differently (scaled values, by signal name)."""
    table = decoder.lookup_table()
    for frame_id, extended, data, _ in frames:
        expected = database.decode_message(
            frame_id, data, decode_choices=False, scaling=True, force_extended_id=extended
        )
        message = table[frame_id | 0x80000000 if extended else frame_id]
        got = message.signals(data)
        if got != expected:
            sys.exit(f"mismatch for {message.name}: {got} != {expected}")


def run_ours(decoder: CanDecoder, frames: list[tuple[int, bool, bytes, int]]) -> float:
    """Seconds to decode every frame with the compiled decoder."""
    decode = decoder.decode
    start = time.perf_counter()
    for frame_id, extended, data, timestamp in frames:
        decode(frame_id, extended, data, timestamp)
    return time.perf_counter() - start


def run_cantools(database: Any, frames: list[tuple[int, bool, bytes, int]]) -> float:
    """Seconds to decode every frame with ``Database.decode_message``."""
    decode = database.decode_message
    start = time.perf_counter()
    for frame_id, extended, data, _ in frames:
        decode(frame_id, data, decode_choices=False, scaling=True, force_extended_id=extended)
    return time.perf_counter() - start


def main() -> int:
    """Run the benchmark and print the medians and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dbc", type=Path, default=ROOT / "dbc" / "bench.dbc")
    args = parser.parse_args()
    database = load_database(args.dbc)
    decoder = CanDecoder("bench", [database])
    frames = make_frames(database, args.frames, args.seed)
    check_equal(database, decoder, frames)
    ours: list[float] = []
    theirs: list[float] = []
    for round_number in range(args.rounds):
        if round_number % 2:
            theirs.append(run_cantools(database, frames))
            ours.append(run_ours(decoder, frames))
        else:
            ours.append(run_ours(decoder, frames))
            theirs.append(run_cantools(database, frames))
    ours_rate = len(frames) / statistics.median(ours)
    theirs_rate = len(frames) / statistics.median(theirs)
    print(
        f"database: {args.dbc.name}, {len(database.messages)} messages; "
        f"{len(frames)} frames x {args.rounds} interleaved rounds"
    )
    print(
        f"daq-agent CanDecoder.decode    : {ours_rate:12,.0f} frames/s "
        f"({1e6 / ours_rate:.2f} us/frame, median)"
    )
    print(
        f"cantools Database.decode_message: {theirs_rate:12,.0f} frames/s "
        f"({1e6 / theirs_rate:.2f} us/frame, median)"
    )
    print(f"ratio: {ours_rate / theirs_rate:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
