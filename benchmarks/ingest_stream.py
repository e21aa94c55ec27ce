"""Benchmark: requests/s of 8 doubles stored in the local server, sift_stream against grpcio.

Two sides, measured in the same run, interleaved in rounds (this machine's speed drifts, phases up
to ~2x apart), each into the same ``daq-agent serve`` in its own process (SQLite store); a side's
figure counts only what the server stored (counted back from the store after every round):

- ``sift_stream``: Sift's own streaming client (``sift-stream-bindings``, Rust), the way the
  agent's sink drives it: :class:`daq_agent.ingestion.sift_stream.Window` (a live-only stream
  built per window, ``send_requests`` of ``IngestWithConfigDataStreamRequestPy`` objects made by
  :class:`~daq_agent.ingestion.sift_stream.RequestBuilder`, ``finish`` waits for the server's
  status, given after it committed);
- ``grpcio``: the plain grpcio client-streaming call (``channel.stream_unary``) with protobuf
  ``IngestWithConfigDataStreamRequest`` messages, the way Sift's Python client (sift_py) streams.

The timed part of a round is everything a sender does: build the request objects from Python
values, send them, and wait for the server's answer (a window's build and finish included). The
build alone is timed too and printed as µs per request.

Usage::

    .venv/bin/python benchmarks/ingest_stream.py [--requests 200000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from benchlib import Rounds, Server, cpu_seconds, machine, stored_samples

from daq_agent import methods
from daq_agent._proto.sift.ingest.v1.ingest_pb2 import (
    IngestWithConfigDataChannelValue,
    IngestWithConfigDataStreamRequest,
)
from daq_agent.core.model import ChannelConfig, ChannelDataType, FlowConfig, TelemetryConfig
from daq_agent.ingestion import IngestionService, use_sift_channel
from daq_agent.ingestion.sift_stream import RequestBuilder, StreamLoop, StreamSettings, Window
from daq_agent.pipeline.batch import Row

CHANNELS = 8
FLOW = "bench"
CLIENT_KEY = "bench-ingest-key"


def rows(count: int, base_ns: int) -> list[Row]:
    """``count`` samples of 8 doubles (flow, timestamp, values), timestamps from ``base_ns``."""
    return [
        (FLOW, base_ns + i * 1000, tuple(float(i + c) for c in range(CHANNELS)))
        for i in range(count)
    ]


def sift_stream_side(
    loop: StreamLoop, settings: StreamSettings, key: str, config_id: str, chunk: int
) -> Any:
    builder = RequestBuilder(
        [
            FlowConfig(
                FLOW, [ChannelConfig(f"c{i}", ChannelDataType.DOUBLE) for i in range(CHANNELS)]
            )
        ]
    )

    def run(samples: list[Row]) -> float:
        """Build, send and finish one window; returns the seconds spent building."""
        window = Window(loop, settings, key)
        build = 0.0
        for start in range(0, len(samples), chunk):
            t0 = time.perf_counter()
            requests = builder.build(samples[start : start + chunk], config_id, "")
            build += time.perf_counter() - t0
            window.send(requests)
        window.finish()
        return build

    return run


def grpcio_side(channel: grpc.Channel, key: str, config_id: str, chunk: int) -> Any:
    call = channel.stream_unary(
        methods.INGEST_WITH_CONFIG_DATA_STREAM,
        request_serializer=IngestWithConfigDataStreamRequest.SerializeToString,
        response_deserializer=None,
    )
    metadata = [("authorization", f"Bearer {key}")]

    def run(samples: list[Row]) -> float:
        """One client stream per ``chunk`` requests (as sift_py's buffered ingestion does)."""
        build = 0.0
        for start in range(0, len(samples), chunk):
            t0 = time.perf_counter()
            requests = []
            for flow, ts, values in samples[start : start + chunk]:
                request = IngestWithConfigDataStreamRequest(
                    ingestion_config_id=config_id,
                    flow=flow,
                    channel_values=[IngestWithConfigDataChannelValue(double=v) for v in values],
                )
                request.timestamp.FromNanoseconds(ts)
                requests.append(request)
            build += time.perf_counter() - t0
            call(iter(requests), metadata=metadata)
        return build

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--requests", type=int, default=200_000, help="sift_stream requests per round"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--grpcio-share",
        type=float,
        default=0.1,
        help="grpcio gets this fraction of the requests (it is ~10x slower; rounds stay short)",
    )
    parser.add_argument("--chunk", type=int, default=5000, help="requests per send / per stream")
    args = parser.parse_args(argv)

    counts = {
        "sift_stream": args.requests,
        "grpcio": max(1000, int(args.requests * args.grpcio_share)),
    }
    rates = Rounds(["sift_stream", "grpcio"])
    builds = Rounds(["sift_stream", "grpcio"])
    client = Rounds(["sift_stream", "grpcio"])
    serving = Rounds(["sift_stream", "grpcio"])
    with tempfile.TemporaryDirectory(prefix="daq-bench-ingest-") as tmp:
        db = Path(tmp) / "bench.sqlite"
        with Server(db) as server:
            flow = FlowConfig(
                FLOW, [ChannelConfig(f"c{i}", ChannelDataType.DOUBLE) for i in range(CHANNELS)]
            )
            # the config and its flow, created once with unary calls (as the agent's sink does)
            unary = use_sift_channel(
                {"uri": server.uri, "apikey": server.api_key, "use_ssl": False}
            )
            service = IngestionService(
                unary, TelemetryConfig("bench-asset", CLIENT_KEY, flows=[flow])
            )
            config_id = service.ingestion_config.ingestion_config_id
            loop = StreamLoop("bench-sift-stream")
            settings = StreamSettings(server.uri, False, "bench-asset", CLIENT_KEY)
            plain = grpc.insecure_channel(server.uri)
            sides = {
                "sift_stream": sift_stream_side(
                    loop, settings, server.api_key, config_id, args.chunk
                ),
                "grpcio": grpcio_side(plain, server.api_key, config_id, args.chunk),
            }
            try:
                base = 1_700_000_000_000_000_000
                for index in range(args.rounds):
                    for name in rates.order(index):
                        base += 10**15  # timestamps unique to this round and side
                        samples = rows(counts[name], base)
                        before = stored_samples(db)
                        cpu0 = cpu_seconds(), cpu_seconds(server.pid)
                        started = time.perf_counter()
                        build = sides[name](samples)
                        elapsed = time.perf_counter() - started
                        cpu1 = cpu_seconds(), cpu_seconds(server.pid)
                        got = stored_samples(db) - before
                        if got != len(samples):
                            raise SystemExit(f"{name}: sent {len(samples)}, stored {got}")
                        client_us = (cpu1[0] - cpu0[0]) / got * 1e6
                        server_us = (cpu1[1] - cpu0[1]) / got * 1e6
                        rates.add(name, got / elapsed)
                        builds.add(name, build / got * 1e6)
                        client.add(name, client_us)
                        serving.add(name, server_us)
                        print(
                            f"round {index + 1} {name:>11}: {got / elapsed:>9,.0f} requests/s "
                            f"stored ({got:,} in {elapsed:.2f} s); per request: build "
                            f"{build / got * 1e6:.2f} µs, CPU client {client_us:.1f} µs "
                            f"(all threads), server {server_us:.1f} µs",
                            flush=True,
                        )
            finally:
                plain.close()
                unary.close()
                loop.close()

    ours, theirs = rates.median("sift_stream"), rates.median("grpcio")
    print()
    print(f"requests of {CHANNELS} doubles, stored and counted back (median of {args.rounds})")
    for name, label in (("sift_stream", "sift_stream (Window)"), ("grpcio", "grpcio streaming")):
        print(
            f"  {label:<21} {rates.median(name):>9,.0f} requests/s (rounds {rates.spread(name)}); "
            f"per request: build {builds.median(name):.2f} µs, CPU client "
            f"{client.median(name):.1f} µs, server {serving.median(name):.1f} µs"
        )
    print(
        f"  ratio {ours / theirs:.1f}x (target >= 15x); sift_stream "
        f"{'meets' if ours >= 100_000 else 'misses'} the 100,000 requests/s target"
    )
    bound = 1e6 / max(client.median("sift_stream"), serving.median("sift_stream"))
    print(
        f"  sift_stream CPU bound with a free core each for client and server: {bound:,.0f} "
        "requests/s"
    )
    print(f"  {machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
