"""The agent's metrics over HTTP: a Prometheus ``/metrics``, ``/healthz`` and ``/readyz``.

:class:`MetricsServer` serves on its own named thread (``daq-metrics``). Nothing is counted
here: a scrape calls ``status()`` and renders that one snapshot (:class:`AgentStatus`), so the
metrics always equal the live status and the final summary. Counters of the snapshot become
Prometheus counters (``…_total``), levels become gauges.

The delivery latency (a sample's timestamp to its acknowledgement) is a histogram
(``daq_delivery_latency_seconds``, two observations per acknowledged batch: its oldest and its
newest sample), plus p50 and p99 gauges of the flusher's recent reservoir. Rates are Prometheus's
job: every count is a counter (``rate(daq_flow_samples_total[1m])`` is a flow's rate).

:func:`write_summary_json` writes the final snapshot for ``run --summary-json FILE``.

``alive`` and ``ready`` are callables returning True, or False / a non-empty string saying what
is wrong; the agent's ``health()`` and ``readiness()`` give them.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
)
from prometheus_client.registry import Collector

from daq_agent.core.errors import DaqError
from daq_agent.pipeline.status import LATENCY_BUCKETS_S, AgentStatus
from daq_agent.readers.base import ReaderState

__all__ = [
    "AgentStatusCollector",
    "Check",
    "MetricsServer",
    "write_summary_json",
]

log = logging.getLogger(__name__)

Check = Callable[[], "bool | str"]
"""A health check: True when healthy; False or a non-empty string (the reason) when not."""

_PREFIX = "daq"

# A reader counter that is a "frame error" of some kind, exported by reason.
_ERROR_REASONS = (
    "decode_errors",
    "error_frames",
    "remote_frames",
    "checksum_errors",
    "framing_errors",
    "unknown_frames",
    "timeouts",
    "exceptions",
)

# The sink's metrics (SiftSink.metrics()): key → (name, help, is a counter).
_STREAM_METRICS: dict[str, tuple[str, str, bool]] = {
    "windows": ("stream_windows_committed", "Stream windows the API committed.", True),
    "windows_failed": ("stream_windows_failed", "Stream windows that failed.", True),
    "messages_sent": ("stream_requests_committed", "Ingest requests in committed windows.", True),
    "stream_retries": ("stream_retries", "Reconnects of the stream inside windows.", True),
    "lazy_flows": ("stream_lazy_flows", "Flows registered when first seen.", True),
    "added_flows": ("stream_added_flows", "Flows added by a reload and registered live.", True),
    "ingestion_channel_depth": (
        "stream_ingestion_queue_depth",
        "The stream's ingestion queue depth at the last window.",
        False,
    ),
    "backup_channel_depth": (
        "stream_backup_queue_depth",
        "The stream's backup queue depth at the last window.",
        False,
    ),
    "message_rate": ("stream_message_rate", "The stream's message rate at the last window.", False),
}


class AgentStatusCollector(Collector):
    """Renders one :class:`AgentStatus` snapshot, taken at scrape time, as metric families."""

    def __init__(self, status: Callable[[], AgentStatus]) -> None:
        self._status = status

    def collect(self) -> Iterable[Metric]:
        """Every metric of a fresh snapshot."""
        return list(_families(self._status()))


def _name(suffix: str) -> str:
    return f"{_PREFIX}_{suffix}"


def _counter(suffix: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(_name(suffix), doc, value=value)


def _gauge(suffix: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(_name(suffix), doc, value=value)


def _families(st: AgentStatus) -> Iterator[Metric]:
    yield from _agent_families(st)
    yield from _source_families(st)
    yield from _ring_families(st)
    yield from _flusher_families(st)
    yield from _spool_families(st)
    yield from _stream_families(st)


def _agent_families(st: AgentStatus) -> Iterator[Metric]:
    info = InfoMetricFamily(_name("agent"), "The run and the target of the agent.")
    info.add_metric([], {"run": st.run_name, "target": st.target})
    yield info
    yield _gauge("agent_uptime_seconds", "Seconds since the agent started.", st.uptime_s)
    yield _gauge(
        "agent_balanced",
        "1 when every frame and sample is accounted in exactly one bucket.",
        1.0 if st.balanced else 0.0,
    )


def _source_families(st: AgentStatus) -> Iterator[Metric]:
    labels = ["source", "kind"]
    per_source = {
        "received": ("source_frames_received", "Frames read from the source."),
        "decoded": ("source_frames_decoded", "Frames decoded into samples."),
        "unknown": ("source_frames_unknown", "Frames no database knows."),
        "errors": ("source_frame_errors", "Frames that did not become a sample otherwise."),
        "reopens": ("source_reopens", "Times the source was reopened after a failure."),
        "unsent": ("source_samples_unsent", "Samples decoded but never offered to the ring."),
    }
    families = {
        key: CounterMetricFamily(_name(name), doc, labels=labels)
        for key, (name, doc) in per_source.items()
    }
    by_reason = CounterMetricFamily(
        _name("source_frame_errors_by_reason"),
        "Frames that did not become a sample, by reason.",
        labels=[*labels, "reason"],
    )
    live = GaugeMetricFamily(
        _name("source_live"),
        "1 for a live source (ring overflow policy applies), 0 for one that waits.",
        labels=labels,
    )
    states = [s.value for s in ReaderState]
    state = StateSetMetricFamily(_name("source_state"), "The reader's state.", labels=labels)
    for s in st.sources:
        values = [s.name, s.kind]
        for key, family in families.items():
            family.add_metric(values, float(getattr(s, key)))
        for reason in _ERROR_REASONS:
            count = s.counters.get(reason)
            if isinstance(count, int | float):
                by_reason.add_metric([*values, reason], float(count))
        live.add_metric(values, 1.0 if s.live else 0.0)
        known = s.state if s.state in states else None
        extra = [] if known is not None else [s.state]
        state.add_metric(values, {name: name == s.state for name in [*states, *extra]})
    yield from families.values()
    yield by_reason
    yield live
    yield state


def _ring_families(st: AgentStatus) -> Iterator[Metric]:
    r = st.ring
    yield _gauge("ring_capacity", "Samples the ring buffer holds.", r.capacity)
    yield _gauge("ring_depth", "Samples in the ring buffer.", r.depth)
    yield _gauge("ring_high_water", "The most samples the ring buffer held.", r.high_water)
    yield _counter("ring_put", "Samples put into the ring buffer.", r.put_count)
    yield _counter("ring_got", "Samples taken from the ring buffer.", r.got)
    yield _counter("ring_dropped", "Samples the ring buffer dropped on overflow.", r.dropped)


def _flusher_families(st: AgentStatus) -> Iterator[Metric]:
    f = st.flusher
    counters = (
        ("samples_taken", "Samples taken from the ring.", f.taken),
        ("samples_recovered", "Samples of an earlier run's backlog.", f.recovered),
        ("samples_delivered", "Samples the API acknowledged.", f.delivered),
        ("samples_rejected", "Samples that could not be encoded.", f.rejected),
        ("samples_abandoned", "Samples given up at shutdown, never acknowledged.", f.abandoned),
        ("samples_spooled", "Samples appended to the backlog.", f.spooled),
        ("samples_dropped", "Samples the spool quota dropped.", f.dropped),
        ("samples_corrupt", "Samples lost to corrupt spool records.", f.corrupt),
        ("samples_dead_lettered", "Samples moved to the dead-letter file.", f.dead_lettered),
        ("batches", "Batches sent.", f.batches),
        ("checkpoints", "Streams the API acknowledged.", f.checkpoints),
        ("failures", "Stream failures.", f.failures),
        ("retries", "Windows re-sent.", f.retries),
        ("auth_failures", "Stream failures for a refused API key.", f.auth_failures),
        ("checkpoint_timeouts", "Checkpoints with no answer in time.", f.checkpoint_timeouts),
    )
    for suffix, doc, value in counters:
        yield _counter(f"flusher_{suffix}", doc, value)
    per_flow = CounterMetricFamily(
        _name("flow_samples"), "Samples taken from the ring, per flow.", labels=["flow"]
    )
    for flow, count in sorted(f.per_flow.items()):
        per_flow.add_metric([flow], float(count))
    yield per_flow
    if f.latency_buckets:
        cumulative, buckets = 0, []
        for bound, count in zip([*LATENCY_BUCKETS_S, None], f.latency_buckets, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound is None else repr(bound), float(cumulative)))
        yield HistogramMetricFamily(
            _name("delivery_latency_seconds"),
            "Latency from a sample's timestamp to its acknowledgement (per batch: its oldest and"
            " its newest sample; live data only).",
            buckets=buckets,
            sum_value=f.latency_sum_s,
        )
    yield _gauge("flusher_samples_pending", "Samples sent, not yet acknowledged.", f.pending)
    yield _gauge("flusher_durable", "1 when the backlog is the on-disk spool.", float(f.durable))
    for quantile, value_ms in (("p50", f.latency_p50_ms), ("p99", f.latency_p99_ms)):
        if value_ms is not None:
            yield _gauge(
                f"delivery_latency_{quantile}_seconds",
                f"The {quantile} latency from a sample's timestamp to its acknowledgement.",
                value_ms / 1000.0,
            )


def _spool_families(st: AgentStatus) -> Iterator[Metric]:
    sp = st.spool
    if sp is None:
        return
    yield _gauge("spool_bytes", "Bytes in the spool's segment files.", sp.bytes_on_disk)
    yield _gauge("spool_segments", "Segment files of the spool.", sp.segments)
    yield _gauge("spool_pending_records", "Unacknowledged records.", sp.pending_records)
    yield _gauge("spool_pending_samples", "Samples in unacknowledged records.", sp.pending_samples)
    yield _gauge("spool_pending_bytes", "Bytes of unacknowledged records.", sp.pending_bytes)
    yield _gauge("spool_acked_seq", "The acknowledged sequence number.", sp.acked_seq)
    yield _gauge("spool_last_seq", "The last sequence number appended.", sp.last_seq)
    yield _counter("spool_records_appended", "Records appended since open.", sp.records_appended)
    yield _counter("spool_records_recovered", "Records found at open.", sp.recovered_records)
    yield _counter("spool_records_corrupt", "Records lost to corruption.", sp.corrupt_records)
    yield _counter("spool_records_dropped", "Records the quota deleted.", sp.dropped_records)
    yield _counter("spool_samples_dropped", "Samples the quota deleted.", sp.dropped_samples)
    yield _counter("spool_torn_bytes", "Bytes truncated from a torn tail at open.", sp.torn_bytes)
    yield _counter("spool_fsyncs", "fsync calls made.", sp.fsyncs)
    if sp.last_fsync_age is not None:
        yield _gauge(
            "spool_last_fsync_age_seconds",
            "Seconds since the last segment fsync.",
            sp.last_fsync_age,
        )
    yield _gauge(
        "spool_failed", "1 when the spool stopped trusting itself.", float(bool(sp.failed))
    )


def _stream_families(st: AgentStatus) -> Iterator[Metric]:
    for key, value in sorted(st.stream.items()):
        name, doc, counter = _STREAM_METRICS.get(
            key, (f"stream_{_sanitize(key)}", f"The sink's metric {key}.", False)
        )
        yield _counter(name, doc, value) if counter else _gauge(name, doc, value)


def _sanitize(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


def _verdict(check: Check) -> tuple[bool, str]:
    try:
        result = check()
    except Exception as exc:  # a failing check is an unhealthy agent, not a dead server
        return False, f"check failed: {type(exc).__name__}: {exc}"
    if result is True:
        return True, "ok"
    return False, result if isinstance(result, str) and result else "not ok"


_TEXT = "text/plain; charset=utf-8"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"  # one request per connection: nothing idles on a thread
    timeout = 5.0  # a client that connects and says nothing releases its thread
    error_content_type = "text/plain; charset=utf-8"
    error_message_format = "%(code)d %(message)s\n"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        owner = self.server.owner
        if path == "/metrics":
            try:
                body = generate_latest(owner.registry)
            except Exception as exc:
                log.warning("metrics scrape failed: %s: %s", type(exc).__name__, exc)
                self._send(500, f"scrape failed: {type(exc).__name__}\n".encode())
                return
            self._send(200, body, CONTENT_TYPE_LATEST)
        elif path in ("/healthz", "/readyz"):
            ok, reason = _verdict(owner.alive if path == "/healthz" else owner.ready)
            self._send(200 if ok else 503, f"{reason}\n".encode())
        elif path in owner.json_routes:
            self._send_json(owner.json_routes[path])
        else:
            self._send(404, b"not found\n")

    def _send_json(self, document: Callable[[], Any]) -> None:
        try:
            body = json.dumps(document(), separators=(",", ":")).encode()
        except Exception as exc:
            log.warning("%s failed: %s: %s", self.path, type(exc).__name__, exc)
            self._send(500, f"failed: {type(exc).__name__}\n".encode())
            return
        self._send(200, body, "application/json")

    def _send(
        self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8"
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("metrics request from %s: " + format, self.client_address[0], *args)


class _Server(http.server.HTTPServer):
    """An HTTP server handling each connection on a named thread, joined at close."""

    owner: MetricsServer

    def __init__(self, address: tuple[str, int]) -> None:
        self._requests: set[threading.Thread] = set()
        self._requests_lock = threading.Lock()
        super().__init__(address, _Handler)  # closes the socket itself if it cannot bind

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._handle, args=(request, client_address), name="daq-metrics-request"
        )
        with self._requests_lock:
            self._requests = {t for t in self._requests if t.is_alive()}
            self._requests.add(thread)
        thread.start()

    def _handle(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)

    def handle_error(self, request: object, client_address: object) -> None:
        exc = sys.exc_info()[1]  # called from the except clause of _handle
        log.debug("metrics request from %s failed: %r", client_address, exc)

    def server_close(self) -> None:
        super().server_close()
        with self._requests_lock:
            threads = list(self._requests)
            self._requests.clear()
        for thread in threads:
            thread.join(timeout=_Handler.timeout + 1.0)


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` (port 0: any free port).

    Args:
        status: returns a fresh snapshot; called at every scrape.
        ready: the readiness check (``/readyz``).
        alive: the liveness check (``/healthz``).
        host: the address to bind (127.0.0.1 by default: not exposed to the network).
        port: the port; 0 picks a free one, read it from :attr:`port` after :meth:`start`.
        json_routes: more paths, each served as the JSON of what its callable returns
            (``/status.json``: :func:`daq_agent.status_json.status_route`).
    """

    def __init__(
        self,
        status: Callable[[], AgentStatus],
        ready: Check,
        alive: Check,
        host: str = "127.0.0.1",
        port: int = 0,
        json_routes: Mapping[str, Callable[[], Any]] | None = None,
    ) -> None:
        self.ready = ready
        self.json_routes = dict(json_routes or {})
        self.alive = alive
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(AgentStatusCollector(status))
        self._host = host
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (the configured one until started)."""
        if self._server is not None:
            return int(self._server.server_address[1])
        return self._port

    @property
    def url(self) -> str:
        """``http://host:port``."""
        return f"http://{self._host}:{self.port}"

    def start(self) -> None:
        """Bind and serve on the ``daq-metrics`` thread.

        Raises:
            DaqError: the address cannot be bound.
        """
        if self._server is not None:
            return
        try:
            server = _Server((self._host, self._port))
        except OSError as exc:
            raise DaqError(
                f"metrics: cannot listen on {self._host}:{self._port}: {exc.strerror or exc}"
            ) from exc
        server.owner = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="daq-metrics",
            daemon=True,
        )
        self._thread.start()
        log.info("metrics on %s/metrics", self.url)

    def stop(self) -> None:
        """Stop serving, close the socket and join the thread. Idempotent."""
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5.0)
        self._server = None
        self._thread = None

    def __enter__(self) -> MetricsServer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def write_summary_json(path: str | os.PathLike[str], status: AgentStatus) -> None:
    """Write ``status.as_dict()`` to ``path`` atomically (a temporary file, then a rename).

    Raises:
        DaqError: the file cannot be written.
    """
    target = Path(path)
    text = json.dumps(status.as_dict(), indent=2, sort_keys=True) + "\n"
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or Path("."))
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise DaqError(f"{target}: cannot write the summary: {exc.strerror or exc}") from exc
