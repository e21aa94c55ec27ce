"""The agent's metrics: one consistent snapshot of every counter, and the one-line live status.

Every frame a reader receives lands in exactly one bucket, and every sample in exactly one::

    received  = decoded + unknown + errors + transport_frames    (per source; errors: every
                                                                  other reason a frame is not a
                                                                  sample: error/remote frames,
                                                                  wrong length, decode failure;
                                                                  transport_frames: J1939 TP
                                                                  frames whose message's sample
                                                                  comes with its last frame)
    decoded + extra_samples = ring.put_count + unsent            (each decoded frame is offered,
                                                                  a container frame's PDUs each,
                                                                  but what a source that waits
                                                                  still held when it was stopped)
    put_count = ring.got + ring.dropped + ring.depth
    taken + recovered = delivered + pending + rejected + abandoned
                        + dropped + corrupt + dead_lettered     (flusher; pending: in the spool,
                                                                  recovered: an earlier run's)

:class:`AgentStatus` holds those numbers; :meth:`AgentStatus.line` renders the live status and
:meth:`AgentStatus.summary` the final report.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from daq_agent.pipeline.spool import SpoolStats

__all__ = ["AgentStatus", "FlusherStats", "RingStats", "SourceStats", "format_count"]


LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds of the delivery latency histogram, seconds (a last bucket, +Inf, follows)."""

ERROR_KINDS: tuple[str, ...] = (
    "decode_errors",  # CAN: a known id whose data does not decode
    "error_frames",  # CAN: error frames on the bus
    "remote_frames",  # CAN: remote frames (no data to decode)
    "checksum_errors",  # serial: a frame whose checksum does not match
    "framing_errors",  # serial: bytes that do not frame (garbage, a truncated frame)
    "unknown_frames",  # serial: a frame type the definitions do not know
    "timeouts",  # polled device: no complete reply in time
    "exceptions",  # polled device: a Modbus exception response
    "tp_timeouts",  # J1939: transport-protocol messages lost to a timeout (T1..T4)
    "tp_aborts",  # J1939: transport-protocol messages aborted (Connection Abort)
    "unknown_pdus",  # AUTOSAR containers: contained PDUs with a header no database defines
    "pdu_errors",  # AUTOSAR containers: contained PDUs that did not decode
)
"""The reader counters that make up a source's ``errors``, by kind. The last four count messages
(a J1939 TP message, a contained PDU), not frames: they show in the split but do not enter the
frame balance (a TP message's frames are ``transport_frames``, a container frame is decoded)."""


@dataclass(frozen=True, slots=True)
class SourceStats:
    """The counters of one source (a bus, a recorded log, a serial device).

    Attributes:
        name: the source's name.
        kind: ``can``, ``replay``, ``serial``.
        state: the reader's state (``running``, ``backoff``, ``ended``…).
        received: frames read from the source.
        decoded: frames decoded into samples.
        unknown: frames whose id/type no database knows.
        errors: every other frame that did not become a sample.
        reopens: times the source was reopened after a failure.
        last_error: the most recent source failure, "" if none.
        counters: every raw counter of the reader.
        live: False for a source that waits on a full ring and is never dropped (a recorded
            log); True for one whose samples go in under the ring's overflow policy.
    """

    name: str
    kind: str
    state: str
    received: int
    decoded: int
    unknown: int
    errors: int
    reopens: int = 0
    last_error: str = ""
    counters: Mapping[str, Any] = field(default_factory=dict, compare=False)
    live: bool = True

    @property
    def unsent(self) -> int:
        """Samples decoded but never offered to the ring: a source that waits was stopped (or the
        ring closed) while the ring was full."""
        return int(self.counters.get("unsent", 0))

    @property
    def errors_by_kind(self) -> dict[str, int]:
        """The source's errors split by kind (the nonzero ones of :data:`ERROR_KINDS`)."""
        counters = self.counters
        return {kind: int(counters[kind]) for kind in ERROR_KINDS if counters.get(kind)}

    @property
    def error_detail(self) -> str:
        """`` (checksum_errors 3, framing_errors 2)`` for the summary; "" without errors."""
        kinds = self.errors_by_kind
        return f" ({', '.join(f'{k} {n}' for k, n in kinds.items())})" if kinds else ""

    @property
    def transport_frames(self) -> int:
        """J1939 transport-protocol frames taken into a multi-packet message (no sample each)."""
        return int(self.counters.get("transport_frames", 0))

    @property
    def extra_samples(self) -> int:
        """Samples beyond one per decoded frame (the PDUs of container frames)."""
        return int(self.counters.get("extra_samples", 0))

    @property
    def balanced(self) -> bool:
        """True when received = decoded + unknown + errors + transport_frames."""
        return self.received == self.decoded + self.unknown + self.errors + self.transport_frames


@dataclass(frozen=True, slots=True)
class RingStats:
    """The ring buffer's counters (see :mod:`daq_agent.pipeline.ring_buffer`)."""

    capacity: int
    depth: int
    high_water: int
    put_count: int
    got: int
    dropped: int


@dataclass(frozen=True, slots=True)
class FlusherStats:
    """The flusher's counters.

    Attributes:
        taken: samples taken from the ring.
        recovered: samples already in the window when the flusher started (a durable spool's
            backlog from an earlier run), delivered like the others.
        delivered: samples in streams the server acknowledged (committed).
        pending: samples sent or being sent, not yet acknowledged.
        rejected: samples that could not be encoded (unknown flow, wrong values).
        abandoned: samples given up at shutdown because the server never acknowledged them.
        batches: batches sent.
        checkpoints: streams acknowledged.
        failures: stream failures (each followed by a retry of the window).
        retries: windows re-sent.
        last_error: the most recent transport failure, "" if none.
        latency_p50_ms: median latency from a sample's timestamp to its acknowledgement, ms.
        latency_p99_ms: 99th percentile of that latency, ms.
        latency_buckets: the delivery latency histogram: how many latencies fell in each bucket
            of :data:`LATENCY_BUCKETS_S` (upper bounds, seconds), and last, above them all. Two
            latencies are observed per acknowledged batch, of its oldest and its newest sample;
            recorded (replayed) data is left out.
        latency_sum_s: the sum of the latencies in the histogram, seconds.
        per_flow: samples taken from the ring, per flow.
        spooled: samples appended to the backlog (the spool) in this run.
        dropped: samples the spool quota dropped before they were delivered.
        corrupt: samples lost to spool records found corrupt when read back.
        dead_lettered: samples the API can never accept, moved to the dead-letter file.
        auth_failures: stream failures for a refused API key.
        checkpoint_timeouts: checkpoints with no answer within the timeout (a hung server).
        durable: True when the backlog is the on-disk spool.
    """

    taken: int = 0
    recovered: int = 0
    delivered: int = 0
    pending: int = 0
    rejected: int = 0
    abandoned: int = 0
    batches: int = 0
    checkpoints: int = 0
    failures: int = 0
    retries: int = 0
    last_error: str = ""
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    latency_buckets: tuple[int, ...] = ()
    latency_sum_s: float = 0.0
    per_flow: Mapping[str, int] = field(default_factory=dict, compare=False)
    spooled: int = 0
    dropped: int = 0
    corrupt: int = 0
    dead_lettered: int = 0
    auth_failures: int = 0
    checkpoint_timeouts: int = 0
    durable: bool = False

    @property
    def balanced(self) -> bool:
        """True when every taken or recovered sample is in exactly one bucket."""
        return self.taken + self.recovered == (
            self.delivered
            + self.pending
            + self.rejected
            + self.abandoned
            + self.dropped
            + self.corrupt
            + self.dead_lettered
        )


@dataclass(frozen=True, slots=True)
class AgentStatus:
    """A snapshot of the whole agent.

    Attributes:
        time_s: ``time.monotonic()`` when taken.
        uptime_s: seconds since the agent started.
        sources: per-source counters.
        ring: the ring buffer.
        flusher: the flusher.
        run_name: the run the data goes to, "" if none.
        target: where the data goes (``local:/path/to.sqlite``, ``sift:host:port``).
        spool: the durable spool's counters (None: no spool).
        stream: the transport's own counters (the sink's: windows committed and failed,
            requests committed, the stream's reconnects, flows registered lazily, queue
            depths).
    """

    time_s: float
    uptime_s: float
    sources: tuple[SourceStats, ...]
    ring: RingStats
    flusher: FlusherStats
    run_name: str = ""
    target: str = ""
    spool: SpoolStats | None = None
    stream: Mapping[str, float] = field(default_factory=dict)

    @property
    def received(self) -> int:
        """Frames received over every source."""
        return sum(s.received for s in self.sources)

    @property
    def decoded(self) -> int:
        """Frames decoded over every source."""
        return sum(s.decoded for s in self.sources)

    @property
    def unknown(self) -> int:
        """Frames with an unknown id over every source."""
        return sum(s.unknown for s in self.sources)

    @property
    def errors(self) -> int:
        """Frames not decoded for any other reason, over every source."""
        return sum(s.errors for s in self.sources)

    @property
    def unsent(self) -> int:
        """Samples decoded but never offered to the ring, over every source."""
        return sum(s.unsent for s in self.sources)

    @property
    def dropped(self) -> int:
        """Samples discarded for lack of room: ring overflow (live sources only) plus the spool
        quota. A run with any is incomplete."""
        return self.ring.dropped + self.flusher.dropped

    @property
    def queued(self) -> int:
        """Samples waiting: in the ring plus sent but not acknowledged."""
        return self.ring.depth + self.flusher.pending

    @property
    def balanced(self) -> bool:
        """True when every frame and every sample is in exactly one bucket."""
        ring = self.ring
        return (
            all(s.balanced for s in self.sources)
            and self.decoded + sum(s.extra_samples for s in self.sources)
            == ring.put_count + self.unsent
            and ring.put_count == ring.got + ring.dropped + ring.depth
            and self.flusher.taken == ring.got
            and self.flusher.balanced
        )

    @property
    def lost(self) -> str:
        """What was lost, by reason (``""`` when nothing): the exit status of a run says so."""
        f = self.flusher
        live = ", ".join(s.name for s in self.sources if s.live) or "none"
        reasons = (
            (self.ring.dropped, f"dropped by the ring (live sources: {live})"),
            (f.abandoned, "abandoned (never acknowledged, no spool)"),
            (f.dropped, "dropped by the spool quota"),
            (f.corrupt, "corrupt in the spool"),
            (f.dead_lettered, "refused by the API (in the dead-letter file)"),
        )
        return ", ".join(f"{n} {why}" for n, why in reasons if n)

    def line(self, previous: AgentStatus | None = None) -> str:
        """The one-line live status; rates are computed against ``previous`` when given."""
        if previous is not None and self.time_s > previous.time_s:
            rate = (self.received - previous.received) / (self.time_s - previous.time_s)
        else:
            rate = self.received / self.uptime_s if self.uptime_s > 0 else 0.0
        parts = [
            f"{_fmt_duration(self.uptime_s)}",
            f"in {format_count(rate)}/s",
            f"rx {format_count(self.received)}",
            f"dec {format_count(self.decoded)}",
            f"unk {format_count(self.unknown)}",
        ]
        if self.errors:
            parts.append(f"err {format_count(self.errors)}")
        parts.append(f"queued {format_count(self.queued)}")
        if self.dropped:
            parts.append(f"dropped {format_count(self.dropped)}")
        parts.append(f"delivered {format_count(self.flusher.delivered)}")
        if self.spool is not None and self.spool.pending_bytes:
            parts.append(f"spool {format_count(self.spool.pending_bytes / 1e6)}MB")
        lost = self.flusher.dropped + self.flusher.corrupt + self.flusher.dead_lettered
        if lost:
            parts.append(f"lost {format_count(lost)}")
        if self.flusher.failures:
            parts.append(f"retries {self.flusher.retries}")
        if self.stream.get("windows_failed"):
            parts.append(f"stream failures {self.stream['windows_failed']:.0f}")
        down = [s.name for s in self.sources if s.state in ("backoff", "opening", "failed")]
        if down:
            parts.append("down: " + ",".join(down))
        return "  ".join(parts)

    def summary(self) -> list[str]:
        """The final report, one line per fact."""
        f = self.flusher
        lines = [
            f"run: {self.run_name or '(none)'}   target: {self.target}",
            (
                f"frames received {self.received}, decoded {self.decoded}, "
                f"unknown {self.unknown}, errors {self.errors}"
            ),
        ]
        for s in self.sources:
            lines.append(
                f"  {s.kind} {s.name} [{s.state}]: received {s.received}, decoded {s.decoded}, "
                f"unknown {s.unknown}, errors {s.errors}{s.error_detail}, reopens {s.reopens}"
                + (f", unsent {s.unsent} (stopped while waiting for room)" if s.unsent else "")
                + (f", last error: {s.last_error}" if s.last_error else "")
            )
            c = s.counters
            if "journal_written" in c:
                lines.append(
                    f"    journal: written {c['journal_written']}, dropped (queue full) "
                    f"{c.get('journal_dropped', 0)}, lost (write errors) "
                    f"{c.get('journal_lost', 0)}, errors {c.get('journal_errors', 0)}, "
                    f"files {c.get('journal_files', 0)}"
                )
        lines.append(
            f"ring: depth {self.ring.depth}, high-water {self.ring.high_water}/"
            f"{self.ring.capacity}, dropped {self.ring.dropped}"
        )
        latency = ""
        if f.latency_p50_ms is not None and f.latency_p99_ms is not None:
            latency = f", latency p50 {f.latency_p50_ms:.1f} ms p99 {f.latency_p99_ms:.1f} ms"
        lines.append(
            (f"recovered {f.recovered}, " if f.recovered else "")
            + f"delivered {f.delivered}, pending {f.pending}, rejected {f.rejected}, "
            f"abandoned {f.abandoned}; checkpoints {f.checkpoints}, failures {f.failures}, "
            f"retries {f.retries}{latency}"
        )
        st = self.stream
        if st:
            lines.append(
                f"stream: {st.get('windows', 0):.0f} windows committed, "
                f"{st.get('windows_failed', 0):.0f} failed; requests committed "
                f"{st.get('messages_sent', 0):.0f}, "
                f"stream retries {st.get('stream_retries', 0):.0f}, lazy flows "
                f"{st.get('lazy_flows', 0):.0f}, queue depths "
                f"{st.get('ingestion_channel_depth', 0):.0f} (ingestion) "
                f"{st.get('backup_channel_depth', 0):.0f} (backup)"
            )
        if f.durable or f.dropped or f.corrupt or f.dead_lettered:
            lines.append(
                f"spooled {f.spooled}, left in the spool {f.pending if f.durable else 0}, "
                f"dropped (spool quota) {f.dropped}, corrupt {f.corrupt}, "
                f"dead-lettered {f.dead_lettered}; auth failures {f.auth_failures}, "
                f"checkpoint timeouts {f.checkpoint_timeouts}"
            )
        sp = self.spool
        if sp is not None:
            lines.append(
                f"spool: {sp.bytes_on_disk} bytes in {sp.segments} segments, "
                f"{sp.pending_records} records pending, acked seq {sp.acked_seq}/{sp.last_seq}, "
                f"recovered {sp.recovered_records} records, corrupt {sp.corrupt_records}, "
                f"dropped {sp.dropped_records}, torn bytes {sp.torn_bytes}, "
                f"cursor {sp.cursor_state}" + (f", FAILED: {sp.failed}" if sp.failed else "")
            )
        if f.last_error:
            lines.append(f"last transport error: {f.last_error}")
        lines.append("lost: " + (self.lost or "nothing"))
        lines.append("accounting: " + ("balanced" if self.balanced else "NOT BALANCED"))
        return lines

    def as_dict(self) -> dict[str, Any]:
        """Every number as plain values (JSON-serialisable)."""
        return {
            "uptime_s": round(self.uptime_s, 3),
            "run": self.run_name,
            "target": self.target,
            "received": self.received,
            "decoded": self.decoded,
            "unknown": self.unknown,
            "errors": self.errors,
            "dropped": self.dropped,
            "unsent": self.unsent,
            "sources": [
                {
                    "name": s.name,
                    "kind": s.kind,
                    "state": s.state,
                    "received": s.received,
                    "decoded": s.decoded,
                    "unknown": s.unknown,
                    "errors": s.errors,
                    "errors_by_kind": s.errors_by_kind,
                    "reopens": s.reopens,
                    "live": s.live,
                    "unsent": s.unsent,
                    "last_error": s.last_error,
                }
                for s in self.sources
            ],
            "ring": {
                "capacity": self.ring.capacity,
                "depth": self.ring.depth,
                "high_water": self.ring.high_water,
                "put": self.ring.put_count,
                "got": self.ring.got,
                "dropped": self.ring.dropped,
            },
            "flusher": {
                "taken": self.flusher.taken,
                "recovered": self.flusher.recovered,
                "delivered": self.flusher.delivered,
                "pending": self.flusher.pending,
                "rejected": self.flusher.rejected,
                "abandoned": self.flusher.abandoned,
                "batches": self.flusher.batches,
                "checkpoints": self.flusher.checkpoints,
                "failures": self.flusher.failures,
                "retries": self.flusher.retries,
                "latency_p50_ms": self.flusher.latency_p50_ms,
                "latency_p99_ms": self.flusher.latency_p99_ms,
                "latency_histogram": {
                    "le_s": [*LATENCY_BUCKETS_S, None],
                    "counts": list(self.flusher.latency_buckets),
                    "sum_s": self.flusher.latency_sum_s,
                },
                "per_flow": dict(sorted(self.flusher.per_flow.items())),
                "spooled": self.flusher.spooled,
                "dropped": self.flusher.dropped,
                "corrupt": self.flusher.corrupt,
                "dead_lettered": self.flusher.dead_lettered,
                "auth_failures": self.flusher.auth_failures,
                "checkpoint_timeouts": self.flusher.checkpoint_timeouts,
            },
            "spool": None
            if self.spool is None
            else {
                "bytes": self.spool.bytes_on_disk,
                "segments": self.spool.segments,
                "pending_records": self.spool.pending_records,
                "pending_samples": self.spool.pending_samples,
                "acked_seq": self.spool.acked_seq,
                "last_seq": self.spool.last_seq,
                "recovered_records": self.spool.recovered_records,
                "corrupt_records": self.spool.corrupt_records,
                "dropped_records": self.spool.dropped_records,
                "dropped_samples": self.spool.dropped_samples,
                "torn_bytes": self.spool.torn_bytes,
                "cursor_state": self.spool.cursor_state,
                "fsyncs": self.spool.fsyncs,
                "failed": self.spool.failed,
            },
            "stream": dict(self.stream),
            "balanced": self.balanced,
        }


def format_count(value: float) -> str:
    """A count or rate in 4 significant characters: ``987``, ``12.3k``, ``4.56M``."""
    if value < 1000:
        return f"{value:.0f}"
    if value < 1_000_000:
        return f"{value / 1000:.1f}k"
    return f"{value / 1_000_000:.2f}M"


def _fmt_duration(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 3600:d}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def monotonic() -> float:
    """The clock of :attr:`AgentStatus.time_s`."""
    return time.monotonic()
