"""Benchmark: requests/s from the client into the local server, stored and counted back.

Two sides, measured in the same run, interleaved in rounds (this machine's speed drifts):

- ``daq-agent``: ``IngestionService.ingest`` on a ``use_sift_channel`` channel (the HTTP/2
  coalescing stream);
- ``grpcio``: the plain grpcio client-streaming call (``channel.stream_unary``) with the same
  pre-built requests, the way Sift's Python client streams.

Each request carries 8 double channels. The local server runs in its own process
(``daq-agent serve``), as it does beside a real agent; a side's figure counts only what the
server stored in SQLite (its sample count is read back after every round).

Usage::

    .venv/bin/python benchmarks/ingest_stream.py [--requests 200000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from can_pipeline import start_server  # the local server in its own process

from daq_agent import methods
from daq_agent._proto.sift.ingest.v1.ingest_pb2 import IngestWithConfigDataStreamRequest
from daq_agent.ingestion import (
    ChannelConfig,
    ChannelDataType,
    FlowConfig,
    IngestionService,
    TelemetryConfig,
    double_value,
    use_sift_channel,
)
from daq_agent.server.store import Store

CHANNELS = 8


def stored(db: Path) -> int:
    """Samples in the server's SQLite file (read-only, beside the running server)."""
    store = Store.open(db, readonly=True)
    try:
        return store.count_samples()
    finally:
        store.close()


def build_requests(
    service: IngestionService, count: int, round_index: int, side: int
) -> list[IngestWithConfigDataStreamRequest]:
    """``count`` requests with timestamps unique to this round and side."""
    base = 1_700_000_000_000_000_000 + (round_index * 2 + side) * 10_000_000_000_000
    values = [double_value(float(i)) for i in range(CHANNELS)]
    return [
        service.create_ingestion_request("bench", base + i * 1000, values) for i in range(count)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000, help="requests per side and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=5_000, help="requests per ingest() call")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="daq-bench-") as tmp:
        db = Path(tmp) / "bench.sqlite"
        server, port = start_server(db)
        try:
            channel = use_sift_channel(
                {"uri": f"127.0.0.1:{port}", "apikey": "bench", "use_ssl": False}
            )
            flow = FlowConfig(
                "bench", [ChannelConfig(f"c{i}", ChannelDataType.DOUBLE) for i in range(CHANNELS)]
            )
            service = IngestionService(
                channel, TelemetryConfig("bench-asset", "bench-key", flows=[flow])
            )
            plain = grpc.insecure_channel(f"127.0.0.1:{port}")
            grpcio_call = plain.stream_unary(
                methods.INGEST_WITH_CONFIG_DATA_STREAM,
                request_serializer=IngestWithConfigDataStreamRequest.SerializeToString,
                response_deserializer=None,
            )

            def ours(requests: list[IngestWithConfigDataStreamRequest]) -> None:
                for start in range(0, len(requests), args.batch):
                    service.ingest(*requests[start : start + args.batch])

            def grpcio_path(requests: list[IngestWithConfigDataStreamRequest]) -> None:
                for start in range(0, len(requests), args.batch):
                    grpcio_call(
                        iter(requests[start : start + args.batch]),
                        metadata=[("authorization", "Bearer bench")],
                    )

            sides: dict[str, Callable[[list[IngestWithConfigDataStreamRequest]], None]] = {
                "daq-agent": ours,
                "grpcio": grpcio_path,
            }
            # grpcio is ~10x slower: give it fewer requests so a round stays short.
            counts = {"daq-agent": args.requests, "grpcio": max(args.requests // 10, 1000)}
            rates: dict[str, list[float]] = {name: [] for name in sides}
            for round_index in range(args.rounds):
                order = list(sides) if round_index % 2 == 0 else list(reversed(sides))
                for name in order:
                    side = list(sides).index(name)
                    requests = build_requests(service, counts[name], round_index, side)
                    before = stored(db)
                    start = time.perf_counter()
                    sides[name](requests)
                    elapsed = time.perf_counter() - start
                    got = stored(db) - before
                    if got != len(requests):
                        raise SystemExit(f"{name}: sent {len(requests)}, stored {got}")
                    rates[name].append(got / elapsed)
                    print(f"round {round_index + 1} {name:>9}: {got / elapsed:>10,.0f} requests/s")
            plain.close()
            channel.close()
        finally:
            server.terminate()
            server.wait(timeout=30)

    ours_median = statistics.median(rates["daq-agent"])
    grpcio_median = statistics.median(rates["grpcio"])
    print()
    print(
        f"requests of {CHANNELS} double channels, stored and counted back (median of {args.rounds})"
    )
    print(f"  daq-agent (h2 coalescing stream): {ours_median:>10,.0f} requests/s")
    print(f"  grpcio client streaming:          {grpcio_median:>10,.0f} requests/s")
    print(f"  ratio: {ours_median / grpcio_median:.1f}x  (target >= 50,000 requests/s and >= 5x)")
    print(f"  cpu count {os.cpu_count()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
