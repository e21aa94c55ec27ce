"""The fault-injection harness: a counter-carrying generator, the server and agent as processes, a
TCP proxy that cuts connections, and the oracle that counts missing and duplicate samples.

Every frame of the generator is a ``Counter`` message (``counter.dbc``) whose ``seq`` signal is
its sequence number, so the oracle reads the SQLite store read-only and knows exactly which frames
arrived, which are missing and which were stored twice.

Durations are the issue's, scaled by ``DAQ_FAULTS_SCALE`` (default 1.0 = the scaled-down values
documented in each test; raise it to lengthen every outage and run).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import can
import grpc

from daq_agent.server.store import Store

HERE = Path(__file__).resolve().parent
COUNTER_DBC = HERE / "counter.dbc"
COUNTER_ID = 0x100
FLOW = "gen.Counter"
DAQ_AGENT = Path(sys.executable).parent / "daq-agent"


def scale() -> float:
    """The duration multiplier (``DAQ_FAULTS_SCALE``, default 1.0)."""
    return float(os.environ.get("DAQ_FAULTS_SCALE", "1.0"))


def scaled(seconds: float) -> float:
    """``seconds`` times :func:`scale`."""
    return seconds * scale()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait until ``predicate()`` holds; raise AssertionError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(0.02)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def counter_frame(seq: int, timestamp: float) -> can.Message:
    """The generator's frame number ``seq``."""
    data = seq.to_bytes(4, "little") + (seq * 7 & 0xFFFFFFFF).to_bytes(4, "little")
    return can.Message(
        arbitration_id=COUNTER_ID, data=data, is_extended_id=False, timestamp=timestamp
    )


def write_counter_log(path: Path, count: int, rate: float, start: float | None = None) -> None:
    """A recorded log (by suffix: .asc, .blf…) of ``count`` counter frames at ``rate`` per second.

    Timestamps are absolute (epoch seconds), so they are stored as recorded: a re-sent sample
    has the same timestamp and the store keeps it once.
    """
    start = time.time() if start is None else start
    with can.Logger(str(path)) as writer:
        for seq in range(count):
            writer.on_message_received(counter_frame(seq, start + seq / rate))


# -- processes ------------------------------------------------------------------------------------


def _listening(port: int) -> bool:
    """True if something accepts TCP connections on 127.0.0.1:``port``.

    A connect to a port of the ephemeral range where nothing listens can succeed by itself:
    when the kernel picks that same port as the source, the socket connects to itself (TCP
    simultaneous open). Probing a restarting server many times makes that likely enough to
    have let tests go on before their server listened; such a connection is not counted."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            return sock.getsockname() != sock.getpeername()
    except OSError:
        return False


class ServeProcess:
    """``daq-agent serve`` as a subprocess on a fixed port, so it can be killed and restarted."""

    def __init__(self, db: Path, port: int, log_path: Path, api_key: str | None = None) -> None:
        self.db = db
        self.port = port
        self.api_key = api_key
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, api_key: str | None = None) -> None:
        """Start it (optionally with a new key) and wait until it accepts connections."""
        if api_key is not None:
            self.api_key = api_key
        args = [str(DAQ_AGENT), "serve", "--db", str(self.db), "--port", str(self.port)]
        env = dict(os.environ)
        env.pop("DAQ_AGENT_API_KEY", None)
        if self.api_key:
            env["DAQ_AGENT_API_KEY"] = self.api_key
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}: {self.log_text()}")
            if _listening(self.port):
                return
            if time.monotonic() > deadline:
                raise AssertionError("serve did not listen within 20 s")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL it and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: it hangs (connections stay open, nothing is answered)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM (after SIGCONT, in case it is stopped) and reap; SIGKILL if it lingers."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def log_text(self) -> str:
        """What it logged."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class AgentProcess:
    """``daq-agent run CONFIG`` as a subprocess (kill -9, SIGTERM), output kept in files."""

    def __init__(self, config: Path, workdir: Path, name: str) -> None:
        self.config = config
        self.out = workdir / f"{name}.out"
        self.err = workdir / f"{name}.err"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_at = 0.0

    def start(self, ready_timeout: float = 30.0) -> None:
        """Start it and wait for its start banner (the sources are listening then)."""
        args = [str(DAQ_AGENT), "run", str(self.config), "--no-live", "--log-interval", "1"]
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(args, stdout=out, stderr=err)
        deadline = time.monotonic() + ready_timeout
        while "daq-agent: asset" not in self.stdout():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"agent exited {self.proc.returncode}:\n{self.stdout()}\n{self.stderr()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"agent not ready in {ready_timeout} s:\n{self.stderr()}")
            time.sleep(0.02)
        self.ready_at = time.time()

    def kill9(self) -> float:
        """SIGKILL it; returns the wall-clock time of the kill."""
        assert self.proc is not None
        at = time.time()
        self.proc.kill()
        self.proc.wait(10)
        return at

    def terminate(self) -> float:
        """SIGTERM it; returns the wall-clock time of the signal."""
        assert self.proc is not None
        at = time.time()
        self.proc.terminate()
        return at

    def wait(self, timeout: float) -> int:
        """Wait for it to exit; its exit code."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def ensure_dead(self) -> None:
        """Kill it if it still runs (cleanup)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stdout(self) -> str:
        """Its standard output so far."""
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def stderr(self) -> str:
        """Its standard error (the log) so far."""
        return self.err.read_text(errors="replace") if self.err.exists() else ""


# -- the generator over udp_multicast --------------------------------------------------------------


class UdpGenerator:
    """Sends counter frames on a python-can ``udp_multicast`` bus at a steady rate, in a thread.

    ``sent`` counts the frames sent; ``sent_at[seq]`` is the wall-clock time frame ``seq`` was sent
    (kept only with ``keep_times``: a long soak would hold gigabytes of them).
    """

    def __init__(
        self, port: int, rate: float, group: str = "239.74.163.2", *, keep_times: bool = True
    ) -> None:
        self.port = port
        self.rate = rate
        self.group = group
        self.keep_times = keep_times
        self.sent = 0
        self.sent_at: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="faults-generator", daemon=True)

    def start(self) -> None:
        """Start sending."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sending and join."""
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        bus = can.Bus(interface="udp_multicast", channel=self.group, port=self.port)
        try:
            start = time.monotonic()
            seq = 0
            while not self._stop.is_set():
                due = start + seq / self.rate
                delay = due - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
                    continue
                bus.send(counter_frame(seq, time.time()))
                if self.keep_times:
                    self.sent_at.append(time.time())
                seq += 1
                self.sent = seq
        finally:
            bus.shutdown()

    def sent_between(self, start: float, end: float) -> set[int]:
        """The seqs sent in ``[start, end]`` (wall clock)."""
        return {seq for seq, at in enumerate(self.sent_at) if start <= at <= end}


# -- a TCP proxy that cuts or stalls connections ---------------------------------------------------


class _Link:
    """One proxied connection: its two sockets and what the proxy does to it."""

    __slots__ = ("client", "cut", "dead", "moved", "server")

    def __init__(self, client: socket.socket, server: socket.socket, dead: bool) -> None:
        self.client = client
        self.server = server
        self.cut = False  # reset it at the next turn of its pipe
        self.dead = dead  # never forward a byte again (kept open: a black hole)
        self.moved = 0  # bytes forwarded


class CuttingProxy:
    """Forwards 127.0.0.1:``port`` to the server; cuts connections, or stalls the path.

    Cutting: while ``cutting`` is set, at random moments ``min_life``-``max_life`` seconds apart,
    every open connection is reset (RST: the client sees the connection lost, UNAVAILABLE);
    ``cuts`` counts the connections reset. (Moments, not connection ages: sift_stream opens a
    connection per window, most of which live less than a second.)

    Stalling: :meth:`stall` turns every open connection, and every one accepted until
    :meth:`unstall`, into a black hole: kept open, nothing forwarded, ever (as after a NAT or
    firewall lost its state). Only connections made after :meth:`unstall` forward again, so a
    client recovers only by noticing and reconnecting. ``connections`` counts every connection
    accepted, ``stalled_connections`` the black holes.
    """

    def __init__(
        self,
        upstream: int,
        *,
        min_life: float = 1.0,
        max_life: float = 2.0,
        cut: bool = True,
        seed: int = 5,
    ) -> None:
        self.upstream = upstream
        self.min_life = min_life
        self.max_life = max_life
        self.cutting = threading.Event()
        if cut:
            self.cutting.set()
        self.cuts = 0
        self.connections = 0
        self.stalled_connections = 0
        self._stalled = False
        self._links: list[_Link] = []
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._accept_loop, name="faults-proxy", daemon=True)
        self._cutter = threading.Thread(target=self._cut_loop, name="faults-cutter", daemon=True)

    def __enter__(self) -> CuttingProxy:
        self._accept.start()
        self._cutter.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._listener.close()
        self._accept.join(5)
        self._cutter.join(5)
        for thread in self._threads:
            thread.join(5)

    def stall(self) -> None:
        """From now on nothing is forwarded on any open or new connection."""
        with self._lock:
            self._stalled = True
            for link in self._links:
                if not link.dead:
                    link.dead = True
                    self.stalled_connections += 1

    def unstall(self) -> None:
        """Connections accepted from now on forward again (the stalled ones stay dead)."""
        with self._lock:
            self._stalled = False

    def _cut_loop(self) -> None:
        while not self._stop.wait(self._rng.uniform(self.min_life, self.max_life)):
            if not self.cutting.is_set():
                continue
            with self._lock:
                for link in self._links:
                    if not link.dead and link.moved:
                        link.cut = True

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._listener], [], [], 0.1)
            if not ready:
                continue
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
                link = _Link(client, server, dead=self._stalled)
                self.stalled_connections += int(link.dead)
                self._links.append(link)
            thread = threading.Thread(
                target=self._pipe, args=(link,), name="faults-pipe", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def _pipe(self, link: _Link) -> None:
        client, server = link.client, link.server
        peers = {client: server, server: client}
        try:
            while not self._stop.is_set():
                if link.cut:
                    with self._lock:
                        self.cuts += 1
                    for sock in (client, server):  # RST, not FIN: a broken connection
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                        )
                    return
                if link.dead:
                    self._stop.wait(0.05)  # read nothing: the peers' buffers fill, then block
                    continue
                ready, _, _ = select.select(list(peers), [], [], 0.05)
                for sock in ready:
                    if link.dead:
                        break
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
                    link.moved += len(data)
        except OSError:
            return
        finally:
            with self._lock:
                self._links.remove(link)
            client.close()
            server.close()


# -- a grpcio server in front of the server: GOAWAY ------------------------------------------------

_PROTO_MODULES = (
    "daq_agent._proto.sift.assets.v1.assets_pb2",
    "daq_agent._proto.sift.ingest.v1.ingest_pb2",
    "daq_agent._proto.sift.ingestion_configs.v2.ingestion_configs_pb2",
    "daq_agent._proto.sift.metadata.v1.metadata_pb2",
    "daq_agent._proto.sift.ping.v1.ping_pb2",
    "daq_agent._proto.sift.runs.v2.runs_pb2",
)
_HOP_HEADERS = ("user-agent", "content-type", "te", "host")


def _methods() -> dict[str, bool]:
    """Every RPC of the project's protos: its path and whether the client streams."""
    out: dict[str, bool] = {}
    for name in _PROTO_MODULES:
        module = importlib.import_module(name)
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                assert not method.server_streaming, f"{method.full_name}: not forwarded"
                out[f"/{service.full_name}/{method.name}"] = method.client_streaming
    return out


@dataclass
class StreamRecord:
    """One forwarded client stream: its connection (the peer's address), when, how it ended."""

    peer: str
    started: float
    ended: float = 0.0
    broken: bool = False  # the client's side failed before it half-closed (GOAWAY, reset)


class GoawayProxy:
    """A grpcio server on 127.0.0.1 forwarding every RPC of the project's protos to ``upstream``
    (bytes as they are, with the caller's metadata), that sends HTTP/2 GOAWAY.

    ``grpc.max_connection_age_ms`` makes it send GOAWAY to every connection ``max_age_ms`` after
    it opened; streams still open ``grace_ms`` later are cancelled. :meth:`restart` starts a new
    server on the same port (SO_REUSEPORT: the port never stops listening) and stops the old one
    gracefully (GOAWAY now, in-flight streams cancelled after ``restart_grace_s``), as a rolling
    restart behind a load balancer does.

    A client stream is forwarded once the client half-closed it, whole: a server may keep or lose
    what a broken stream carried (``daq-agent serve`` commits as it goes), this one always loses
    it, so a sender that does not re-send a broken stream's data loses it in the store.
    """

    def __init__(self, upstream: int, *, max_age_ms: int, grace_ms: int) -> None:
        self.upstream = upstream
        self.max_age_ms = max_age_ms
        self.grace_ms = grace_ms
        self.port = 0
        self.restarts = 0
        self.streams: list[StreamRecord] = []
        self.conn_first_seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._channel = grpc.insecure_channel(f"127.0.0.1:{upstream}")
        self._handlers = {
            path: (
                grpc.stream_unary_rpc_method_handler(self._forward_stream(path))
                if streaming
                else grpc.unary_unary_rpc_method_handler(self._forward_unary(path))
            )
            for path, streaming in _methods().items()
        }
        self._server: grpc.Server | None = None
        self._pools: list[futures.ThreadPoolExecutor] = []

    def __enter__(self) -> GoawayProxy:
        self._server = self._new_server()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.stop(0).wait(10)
        for pool in self._pools:
            pool.shutdown(wait=True)
        self._channel.close()

    def restart(self, grace_s: float) -> None:
        """A graceful restart: the new server listens, then the old one stops (GOAWAY)."""
        old = self._server
        self._server = self._new_server()
        assert old is not None
        old.stop(grace_s)  # GOAWAY now; streams still open after grace_s are cancelled
        self.restarts += 1

    def broken_streams(self) -> int:
        """Client streams whose client side failed before half-closing."""
        with self._lock:
            return sum(1 for s in self.streams if s.broken)

    def streams_past_goaway(self) -> int:
        """Client streams that ended well after their connection's maximum age: they went on
        after the connection's GOAWAY (grpcio jitters the age by up to 10 %)."""
        age = self.max_age_ms / 1000 * 1.1 + 0.05
        with self._lock:
            return sum(
                1
                for s in self.streams
                if s.ended and not s.broken and s.ended - self.conn_first_seen[s.peer] > age
            )

    def _new_server(self) -> grpc.Server:
        pool = futures.ThreadPoolExecutor(16, thread_name_prefix="faults-grpc-proxy")
        self._pools.append(pool)
        server = grpc.server(
            pool,
            options=[
                ("grpc.max_connection_age_ms", self.max_age_ms),
                ("grpc.max_connection_age_grace_ms", self.grace_ms),
                ("grpc.so_reuseport", 1),
            ],
        )
        server.add_generic_rpc_handlers([_PathHandler(self._handlers)])
        port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        assert port, "the proxy cannot listen"
        self.port = port
        server.start()
        return server

    def _metadata(self, context: grpc.ServicerContext) -> list[tuple[str, str | bytes]]:
        peer = context.peer()
        with self._lock:
            self.conn_first_seen.setdefault(peer, time.monotonic())
        return [
            (k, v)
            for k, v in context.invocation_metadata()
            if not k.startswith((":", "grpc-")) and k not in _HOP_HEADERS
        ]

    def _forward_unary(self, path: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        call = self._channel.unary_unary(path)

        def forward(request: bytes, context: grpc.ServicerContext) -> bytes:
            try:
                response: bytes = call(request, metadata=self._metadata(context), timeout=30)
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details() or "")
            return response

        return forward

    def _forward_stream(
        self, path: str
    ) -> Callable[[Iterator[bytes], grpc.ServicerContext], bytes]:
        call = self._channel.stream_unary(path)

        def forward(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
            metadata = self._metadata(context)
            record = StreamRecord(context.peer(), time.monotonic())
            with self._lock:
                self.streams.append(record)
            try:
                # the whole stream, then upstream: a broken stream leaves nothing behind
                carried = list(requests)
            except grpc.RpcError:
                record.broken = True
                record.ended = time.monotonic()
                context.abort(grpc.StatusCode.CANCELLED, "the client's stream broke")
            try:
                response: bytes = call(iter(carried), metadata=metadata, timeout=30)
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details() or "")
            finally:
                record.ended = time.monotonic()
            return response

        return forward


class _PathHandler(grpc.GenericRpcHandler):
    def __init__(self, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self._handlers = handlers

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        return self._handlers.get(handler_call_details.method)


# -- configs and the oracle ------------------------------------------------------------------------


def agent_config(
    path: Path,
    *,
    state_dir: Path,
    server_port: int,
    key_file: Path,
    source: str,
    flush: str = "",
    spool: str = "",
    run_name: str = "faults",
) -> Path:
    """Write an agent config: a Sift target at 127.0.0.1:``server_port`` (plain text), a fixed
    run name (a restarted agent reuses the run, so a re-sent sample is the same sample)."""
    path.write_text(
        "asset: faults\n"
        f"state_dir: {state_dir}\n"
        "target:\n"
        "  sift:\n"
        f"    uri: 127.0.0.1:{server_port}\n"
        f"    api_key_file: {key_file}\n"
        "    use_ssl: false\n"
        f"run: {{name: {run_name}}}\n"
        f"{source}"
        f"flush: {{max_batch: 500, max_age_ms: 20, {flush}}}\n"
        f"spool: {{{spool}}}\n"
    )
    return path


def udp_source(port: int, group: str = "239.74.163.2") -> str:
    """The config of a udp_multicast bus named ``gen`` carrying the counter."""
    return (
        "buses:\n"
        "  - name: gen\n"
        "    interface: udp_multicast\n"
        f"    channel: '{group}'\n"
        f"    options: {{port: {port}}}\n"
        f"    databases: [{COUNTER_DBC}]\n"
    )


def replay_source(log_path: Path, realtime: bool = True) -> str:
    """The config of a recorded counter log played as bus ``gen``."""
    return (
        "replay:\n"
        f"  - {{path: {log_path}, bus: gen, realtime: {str(realtime).lower()}, "
        f"databases: [{COUNTER_DBC}]}}\n"
    )


@dataclass(frozen=True)
class Verdict:
    """What the oracle found.

    Attributes:
        stored: samples of the counter flow in the store.
        missing: expected seqs not stored.
        duplicates: seqs stored more than once (extra copies).
        unexpected: stored seqs that were not expected.
    """

    stored: int
    missing: frozenset[int]
    duplicates: int
    unexpected: frozenset[int]


def stored_seqs(db: Path, run_name: str = "faults") -> Tally[int]:
    """How many times each counter seq is stored (read-only; sees committed data)."""
    with Store.open(db, readonly=True) as store:
        return Tally(
            int(sample.values["seq"])  # type: ignore[arg-type]
            for sample in store.iter_samples(run_name=run_name, flows=[FLOW])
        )


def judge(db: Path, expected: Iterable[int], run_name: str = "faults") -> Verdict:
    """Count missing and duplicate samples against the expected seqs."""
    tally = stored_seqs(db, run_name)
    want = frozenset(expected)
    return Verdict(
        stored=sum(tally.values()),
        missing=want - tally.keys(),
        duplicates=sum(n - 1 for n in tally.values() if n > 1),
        unexpected=frozenset(tally.keys() - want),
    )


def count_stored(db: Path, run_name: str = "faults") -> int:
    """Counter samples stored so far (0 when the store does not exist yet)."""
    if not db.exists():
        return 0
    try:
        with Store.open(db, readonly=True) as store:
            return sum(1 for _ in store.iter_samples(run_name=run_name, flows=[FLOW]))
    except Exception:
        return 0


@contextlib.contextmanager
def serving(db: Path, tmp: Path, api_key: str | None = None) -> Iterator[ServeProcess]:
    """A started ``daq-agent serve`` subprocess on a free port, stopped at the end."""
    server = ServeProcess(db, free_port(), tmp / "serve.log", api_key)
    server.start()
    try:
        yield server
    finally:
        server.stop()
