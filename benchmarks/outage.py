"""Benchmark: the agent through a server outage on a live ``udp_multicast`` bus, then the drain.

A generator process (``steady.py``'s, or ``daq-agent simulate can`` with ``--simulator``) sends
``--rate`` frames/s (5k) of the database on a ``udp_multicast`` bus. The agent (in this process,
a real CAN reader on that bus, the spool on, a Sift target at ``daq-agent serve`` in its own
process) delivers them. After ``--warmup`` seconds the server is killed (SIGKILL) for
``--outage`` seconds (60): the backlog goes to the spool on disk, and this process's RSS is
sampled every second (the figure: its spread through the outage). The server is then restarted
on the same port and the drain is timed, from the restart until less than a second of input is
left undelivered, while frames keep arriving; then ``--tail`` seconds more at the steady rate.

All along, the kernel's drop counter of the agent's UDP socket (``/proc/net/udp``, the ``drops``
column, matched by the inodes of this process's sockets in ``/proc/self/fd``) is read: a datagram
the kernel discarded because the reader did not empty its socket in time is lost before the agent
ever sees it (target: 0, above all during the drain, when the sender works hardest). At the end,
what the server stored is counted back from its SQLite store and compared with what the agent
received.

``--scale`` multiplies the warm-up, the outage and the tail (``--scale 0.25``: a 15 s outage).

Usage::

    .venv/bin/python benchmarks/outage.py [--rate 5000] [--outage 60] [--scale 1] [--dbc vehicle]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import Server, free_port, machine, resolve_dbc, rss_mb, stored_samples, udp_drops
from steady import generator_command

from daq_agent.agent import Agent
from daq_agent.config import parse_config
from daq_agent.readers.base import ReaderState

GROUP = "239.74.163.23"


def total_drops() -> int:
    return sum(drops for _port, drops in udp_drops().values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=5_000.0, help="frames/s sent")
    parser.add_argument("--outage", type=float, default=60.0, help="seconds without a server")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--tail", type=float, default=5.0, help="steady seconds after the drain")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies warmup/outage/tail")
    parser.add_argument("--drain-limit", type=float, default=300.0, help="give up after (s)")
    parser.add_argument("--dbc", default="vehicle", help="bench, vehicle (generated) or a file")
    parser.add_argument("--udp-port", type=int, default=43_223)
    parser.add_argument("--simulator", action="store_true", help="generate with daq-agent simulate")
    parser.add_argument(
        "--checkpoint-records", type=int, default=None, help="flush.checkpoint_records (200000)"
    )
    args = parser.parse_args(argv)
    warmup, outage, tail = (x * args.scale for x in (args.warmup, args.outage, args.tail))

    with tempfile.TemporaryDirectory(prefix="daq-bench-outage-") as tmp_name:
        tmp = Path(tmp_name)
        dbc = resolve_dbc(args.dbc, tmp)
        db = tmp / "store.sqlite"
        server = Server(db, port=free_port()).start()
        config = parse_config(
            {
                "asset": "bench-outage",
                "state_dir": str(tmp / "state"),
                "target": {
                    "sift": {"uri": server.uri, "api_key_env": "BENCH_KEY", "use_ssl": False}
                },
                "run": {"name": "outage"},
                "flush": {}
                if args.checkpoint_records is None
                else {"checkpoint_records": args.checkpoint_records},
                "buses": [
                    {
                        "name": "can0",
                        "interface": "udp_multicast",
                        "channel": GROUP,
                        "options": {"port": args.udp_port},
                        "databases": [str(dbc)],
                    }
                ],
            },
            base_dir=tmp,
            env={},
        )
        agent = Agent(config, env={"BENCH_KEY": server.api_key})
        agent.start()
        flusher = agent.flusher
        assert flusher is not None
        if not agent.readers[0].wait_state(ReaderState.RUNNING, timeout=10):
            raise SystemExit(f"the bus did not open: {agent.readers[0].counters.last_error}")
        command = generator_command(dbc, args.rate, 86_400.0, args.udp_port, GROUP, args.simulator)
        generator = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        drops = {"start": total_drops()}
        rss: dict[str, list[float]] = {"outage": [], "drain": []}
        try:
            time.sleep(warmup)
            drops["warm-up"] = total_drops()
            rss_before = rss_mb()
            server.kill()
            killed = time.monotonic()
            while time.monotonic() - killed < outage:
                time.sleep(1.0)
                rss["outage"].append(rss_mb())
            drops["outage"] = total_drops()
            live = agent.status()
            backlog = live.flusher.pending
            spool_mb = live.spool.bytes_on_disk / 1e6 if live.spool else 0.0
            server.start()
            restarted = time.monotonic()
            delivered_at = flusher.delivered
            received_at = live.received
            last_sample = restarted
            while flusher.pending > args.rate:  # more than a second of input left
                if time.monotonic() - restarted > args.drain_limit:
                    raise SystemExit(f"not drained after {args.drain_limit:.0f} s")
                time.sleep(0.05)
                if time.monotonic() - last_sample >= 1.0:
                    rss["drain"].append(rss_mb())
                    last_sample = time.monotonic()
            drained = time.monotonic() - restarted
            drain_rate = (flusher.delivered - delivered_at) / drained
            ingest = (agent.status().received - received_at) / drained
            drops["drain"] = total_drops()
            time.sleep(tail)
            drops["tail"] = total_drops()
        finally:
            generator.terminate()
            gen_out, _ = generator.communicate(timeout=30)
            time.sleep(0.5)  # the last datagrams in flight
            final = agent.stop()
            if server.process is not None and server.process.poll() is None:
                stored = stored_samples(db, "outage")
            else:
                stored = -1
            server.stop()
    sent = json.loads(gen_out.strip().splitlines()[-1]) if gen_out.strip() else {}
    during = rss["outage"]
    print(
        f"{dbc.name} at {args.rate:,.0f} frames/s on udp_multicast; outage {outage:.0f} s: backlog "
        f"{backlog:,} samples ({spool_mb:.1f} MB spooled); RSS {rss_before:.1f} MB before, "
        f"{min(during):.1f}-{max(during):.1f} MB during (spread {max(during) - min(during):.1f} "
        f"MB), {max(rss['drain'] or [0.0]):.1f} MB peak in the drain"
    )
    print(
        f"drain: {drained:.1f} s, {drain_rate:,.0f} samples/s delivered while {ingest:,.0f} "
        f"frames/s kept arriving ({drain_rate / max(ingest, 1.0):.1f}x the ingest rate)"
    )
    steps = list(drops.items())
    print(
        "kernel drops on the agent's UDP socket (/proc/net/udp, cumulative): "
        + ", ".join(f"{name} {value}" for name, value in steps)
        + f"; during the drain {drops['drain'] - drops['outage']} (target 0)"
    )
    print(
        f"generator sent {sent.get('frames', -1):,} (errors {sent.get('errors', -1)}); agent "
        f"received {final.received:,}, ring dropped {final.ring.dropped}, delivered "
        f"{final.flusher.delivered:,}; server stored {stored:,}; balanced {final.balanced}"
    )
    print(machine())
    return 0


if __name__ == "__main__":
    sys.exit(main())
