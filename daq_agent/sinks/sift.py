"""The Sift sink: windows of samples on Sift's own streaming client, committed or re-sent.

Set-up (unary calls, grpcio): the ingestion config is fetched by its client key or created, with
its flows (or, when they do not fit one message, each flow is registered the first time it is
sent). It happens at the first :meth:`SiftSink.open` and again after an authentication failure
or a new key, never in the agent's start: an agent whose API is down or refuses its key still
acquires and spools, and this sink connects in the background with the flusher's back-off.

Each window is one sift_stream stream (:class:`~daq_agent.ingestion.sift_stream.Window`): built,
sent, finished; committed only when the server's status is OK and the stream never failed and
reconnected during the window. Runs are found or created by their client key the first time a
window carries their samples (one per run, cached), so a backlog spooled under an earlier run
still lands in that run.

Every failure is mapped to a :class:`~daq_agent.core.errors.SinkError` here, in :func:`sink_error`,
and nowhere else: the flusher only sees transient, auth or rejected.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import sift_stream_bindings as ssb

from daq_agent.core.errors import (
    ConfigError,
    DaqError,
    FailureKind,
    IngestionValidationError,
    RpcStatusError,
    SinkError,
)
from daq_agent.core.model import FlowConfig, TelemetryConfig
from daq_agent.ingestion.errors import stream_error
from daq_agent.ingestion.service import IngestionService
from daq_agent.ingestion.sift_stream import (
    DEFAULT_CAPACITY,
    RequestBuilder,
    StreamFailed,
    StreamLoop,
    StreamSettings,
    StreamTimeout,
    Window,
)
from daq_agent.ingestion.transport import SiftChannel, use_sift_channel
from daq_agent.pipeline.batch import Row, RunRef

__all__ = ["RunDetails", "SiftSink", "sink_error"]

log = logging.getLogger(__name__)

_AUTH_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
_AUTH_NUMBERS = frozenset(code.value[0] for code in _AUTH_CODES)
_INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
_TOO_LARGE_HINTS = ("larger than", "too large", "exceeds maximum", "message length")


def sink_error(exc: BaseException, secret: str = "") -> SinkError:
    """The one mapping of a transport failure to what it means for the data.

    * UNAUTHENTICATED, PERMISSION_DENIED: ``AUTH`` (retried slowly: a person must fix the key);
    * INVALID_ARGUMENT, a message too large, a sample that does not fit its flow: ``REJECTED``
      (the flusher isolates it and dead-letters it);
    * everything else, a refused connection, a GOAWAY, a timeout: ``TRANSIENT``.

    sift_stream's own errors get their status from
    :func:`daq_agent.ingestion.errors.stream_error` (the library API's mapping). A window whose
    stream failed inside it counts as auth or refused if *any* stream ended so. The message never
    holds ``secret``.
    """
    if isinstance(exc, SinkError):
        return exc
    if isinstance(exc, StreamFailed):
        codes = set(exc.codes)
        if codes & _AUTH_NUMBERS:
            kind = FailureKind.AUTH
        elif _INVALID_ARGUMENT in codes:
            kind = FailureKind.REJECTED
        else:
            return SinkError(str(exc), FailureKind.TRANSIENT)
        # the server ended a stream before the window's finish: sift_stream counts the status
        # but does not pass on the server's message, so say what is known
        names = ", ".join(_status_name(c) for c in sorted(codes) if c)
        return SinkError(
            f"the server ended the stream with {names} (sift_stream does not pass on the "
            f"server's message)",
            kind,
        )
    timed_out = isinstance(exc, StreamTimeout)
    error = stream_error(exc, secret=secret) if isinstance(exc, RuntimeError) else exc
    text = str(error).replace(secret, "<redacted>") if secret else str(error)
    kind = FailureKind.TRANSIENT
    if isinstance(error, IngestionValidationError):
        kind = FailureKind.REJECTED
    elif isinstance(error, RpcStatusError):
        if error.status_code in _AUTH_CODES:
            kind = FailureKind.AUTH
        elif error.status_code is grpc.StatusCode.INVALID_ARGUMENT or (
            error.status_code is grpc.StatusCode.RESOURCE_EXHAUSTED
            and any(h in str(error.status_details).lower() for h in _TOO_LARGE_HINTS)
        ):
            kind = FailureKind.REJECTED
    return SinkError(text, kind, timed_out=timed_out)


def _status_name(number: int) -> str:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return str(code.name)
    return f"status {number}"


@dataclass(frozen=True, slots=True)
class RunDetails:
    """What a run is created with, besides its name and client key."""

    description: str = ""
    tags: tuple[str, ...] = ()
    metadata: Mapping[str, str | float | bool] = field(default_factory=dict)


def _run_form(run: RunRef, details: RunDetails | None) -> Any:
    details = details or RunDetails()
    metadata = [
        ssb.MetadataPy(key, ssb.MetadataValuePy(value)) for key, value in details.metadata.items()
    ]
    return ssb.RunFormPy(
        run.name or run.client_key,
        run.client_key,
        details.description or None,
        list(details.tags) or None,
        metadata or None,
    )


class _SiftWindow:
    """A :class:`~daq_agent.pipeline.sink.SinkStream` on one sift_stream window."""

    def __init__(self, sink: SiftSink, window: Window, secret: str) -> None:
        self._sink = sink
        self._window = window
        self._secret = secret

    def send(self, rows: Sequence[Row], run: RunRef | None) -> None:
        try:
            self._sink._send(self._window, rows, run)
        except (DaqError, RuntimeError) as exc:
            error = sink_error(exc, self._secret)
            self._sink._note_failure(error, exc, window=False)
            raise error from exc

    def commit(self, timeout: float) -> None:
        try:
            snapshot = self._window.finish(timeout)
        except (DaqError, RuntimeError) as exc:
            error = sink_error(exc, self._secret)
            self._sink._note_failure(error, exc)
            raise error from exc
        self._sink._note_window(snapshot, self._window.sent)

    def cancel(self) -> None:
        self._window.cancel()


class SiftSink:
    """Delivers samples to a Sift-compatible API through sift_stream.

    Args:
        uri: ``host:port`` of the API.
        use_tls: TLS (plain text is refused for a host that is not loopback).
        api_key: returns the current key (read again after each authentication failure, so a
            rotated key is picked up without a restart).
        telemetry: the asset, the config's client key and the flows.
        runs: the details of runs to create, by run client key.
        timeout_s: the longest a build, a send or a commit may take.
        force_lazy_flow_creation: register each flow when first sent, whatever the size.
        window_requests: the most requests one window carries (its stream's queue holds them
            all, so a send never waits on it).
    """

    def __init__(
        self,
        *,
        uri: str,
        use_tls: bool,
        api_key: Callable[[], str],
        telemetry: TelemetryConfig,
        runs: Mapping[str, RunDetails] | None = None,
        timeout_s: float = 30.0,
        force_lazy_flow_creation: bool = False,
        window_requests: int = 0,
    ) -> None:
        if not telemetry.ingestion_client_key:
            raise ConfigError("the sink needs an ingestion client key")
        self._uri = uri
        self._use_tls = use_tls
        self._api_key = api_key
        self._telemetry = telemetry
        self._runs = dict(runs or {})
        self._timeout = timeout_s
        self._force_lazy = force_lazy_flow_creation
        self._builder = RequestBuilder(telemetry.flows)
        self._settings = StreamSettings(
            uri,
            use_tls,
            telemetry.asset_name,
            telemetry.ingestion_client_key,
            capacity=max(DEFAULT_CAPACITY, window_requests),
            timeout_s=timeout_s,
        )
        self._loop: StreamLoop | None = None
        self._channel: SiftChannel | None = None
        self._service: IngestionService | None = None
        self._key = ""
        self._lazy = False
        self._unregistered: frozenset[str] = frozenset()  # flows added live, not yet registered
        self._conflicts: dict[str, str] = {}  # flows added live that the API cannot take: why
        self._run_ids: dict[str, str] = {}
        self._lock = threading.Lock()
        self._totals: dict[str, float] = {
            "windows": 0,
            "windows_failed": 0,
            "messages_sent": 0,
            "stream_retries": 0,
            "lazy_flows": 0,
            "added_flows": 0,
        }
        self._last: dict[str, float] = {}

    # -- the Sink protocol ---------------------------------------------------------------------

    def open(self) -> _SiftWindow:
        """Set up (first time, or after the key changed) and build a window.

        Raises:
            SinkError: the API cannot be reached, refuses the key, or refuses the config.
        """
        key = ""
        try:
            key = self._api_key()
            if self._service is None or key != self._key:
                self._setup(key)
            if self._loop is None:
                self._loop = StreamLoop()
            window = Window(self._loop, self._settings, key)
        except (DaqError, RuntimeError) as exc:
            error = sink_error(exc, key)
            self._note_failure(error, exc)
            if isinstance(exc, RpcStatusError) and exc.status_code in _AUTH_CODES:
                self._service = None  # set up again (with the key read again) next time
            raise error from exc
        return _SiftWindow(self, window, key)

    @property
    def lazy_flow_creation(self) -> bool:
        """Whether flows are registered when first sent (known once set up)."""
        return self._lazy

    def add_flows(self, flows: Sequence[FlowConfig]) -> list[str]:
        """Learn flows added while running (a reload); the names of those that are new.

        Nothing is sent here. The next send (on the sender's thread) registers them with the
        API in one call before it builds its requests, and a set-up after a reconnect or a new
        key creates them with the ingestion config. A flow the API already has under that name
        with other channels is not registered: its samples are refused (and dead-lettered)
        rather than read against the API's channels.
        """
        known = self._builder.flows
        new = [flow for flow in flows if flow.name not in known]
        if not new:
            return []
        with self._lock:
            telemetry = replace(self._telemetry, flows=[*self._telemetry.flows, *new])
            self._telemetry = telemetry
            # one assignment each: the sender sees the old builder or the new one
            self._builder = RequestBuilder(telemetry.flows)
            self._unregistered = self._unregistered | {flow.name for flow in new}
        return [flow.name for flow in new]

    def run_id(self, run: RunRef) -> str:
        """The API's id of ``run`` ("" until a window found or created it)."""
        return run.run_id or self._run_ids.get(run.client_key, "")

    def stop_run(self, run: RunRef) -> None:
        """Mark ``run`` stopped (best effort: logged, never raised)."""
        run_id = self.run_id(run)
        if not run_id or self._service is None:
            return
        try:
            self._service.stop_run(run_id)
        except DaqError as exc:
            log.warning("could not stop run %r: %s", run.name, sink_error(exc, self._key))

    def metrics(self) -> dict[str, float]:
        """Totals over the windows (requests committed, windows committed and failed, the
        stream's retries, flows registered lazily) and the last window's queue depths."""
        with self._lock:
            return {**self._totals, **self._last}

    def close(self) -> None:
        """Close the unary channel and stop the loop thread."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        self._service = None
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    def __repr__(self) -> str:
        return f"SiftSink(uri={self._uri!r}, use_tls={self._use_tls})"

    # -- internals -----------------------------------------------------------------------------

    def _setup(self, key: str) -> None:
        """Get or create the ingestion config with its flows (unary calls)."""
        old = self._channel
        self._channel = use_sift_channel(
            {"uri": self._uri, "apikey": key, "use_ssl": self._use_tls}
        )
        if old is not None:
            old.close()
        self._service = IngestionService(
            self._channel,
            self._telemetry,
            force_lazy_flow_creation=self._force_lazy,
            unary_timeout_s=self._timeout,
        )
        if self._key and key != self._key:
            log.warning("the API key changed: connecting with the new key")
        self._key = key
        self._lazy = self._service.lazy_flow_creation
        if self._lazy:
            log.info(
                "%d flows do not fit one message: each is registered when first sent",
                len(self._telemetry.flows),
            )

    def _run_id(self, window: Window, run: RunRef | None) -> str:
        if run is None:
            return ""
        if run.run_id:
            return run.run_id
        run_id = self._run_ids.get(run.client_key)
        if run_id is None:
            run_id = window.attach_run(_run_form(run, self._runs.get(run.client_key)))
            if not run_id:
                raise SinkError(f"the API gave no id for run {run.name!r}", FailureKind.TRANSIENT)
            self._run_ids[run.client_key] = run_id
            log.info("run %r (%s)", run.name, run_id)
        return run_id

    def _send(self, window: Window, rows: Sequence[Row], run: RunRef | None) -> None:
        service = self._service
        assert service is not None
        if self._unregistered:
            self._register_added(service)
        builder = self._builder
        conflicts = self._conflicts
        if conflicts:
            for name, _, _ in rows:
                if name in conflicts:
                    raise IngestionValidationError(conflicts[name])
        if service.lazy_flow_creation:
            flows = builder.flows
            new = {name for name, _, _ in rows} - service.registered_flows
            if new:
                todo = [flows[name] for name in sorted(new) if name in flows]
                service.register_flows(todo)
                with self._lock:
                    self._totals["lazy_flows"] += len(todo)
        requests = builder.build(
            rows, service.ingestion_config.ingestion_config_id, self._run_id(window, run)
        )
        window.send(requests)

    def _register_added(self, service: IngestionService) -> None:
        """Register the flows :meth:`add_flows` learned (sender thread; unary calls).

        A transport failure is raised (the window is retried, the flows stay to register); a
        flow the API refuses, or has with other channels, is given up: its samples are refused.
        """
        names = self._unregistered
        flows = self._builder.flows
        todo = [flows[name] for name in sorted(names) if name in flows]
        conflicts = service.conflicting_flows(todo)
        todo = [flow for flow in todo if flow.name not in conflicts]
        try:
            service.register_flows(todo)
        except (IngestionValidationError, RpcStatusError) as exc:
            error = sink_error(exc, self._key)
            if error.kind is not FailureKind.REJECTED:
                raise error from exc
            conflicts |= {
                flow.name: f"the API refused flow {flow.name!r}: {error}" for flow in todo
            }
            todo = []
        for reason in conflicts.values():
            log.error("%s", reason)
        with self._lock:
            self._unregistered = self._unregistered - names
            self._conflicts = {**self._conflicts, **conflicts}
            self._totals["added_flows"] += len(todo)

    def _note_window(self, snapshot: Any, sent: int) -> None:
        """A window committed: ``sent`` requests, ``snapshot`` the metrics before its finish."""
        with self._lock:
            totals = self._totals
            totals["windows"] += 1
            totals["messages_sent"] += sent
            self._last = {
                "ingestion_channel_depth": snapshot.ingestion_channel_depth,
                "backup_channel_depth": snapshot.backup_channel_depth,
                "message_rate": snapshot.message_rate,
            }

    def _note_failure(self, error: SinkError, cause: BaseException, *, window: bool = True) -> None:
        if error.timed_out or (
            isinstance(cause, RpcStatusError)
            and cause.status_code is grpc.StatusCode.DEADLINE_EXCEEDED
        ):
            # no answer in time: the path may be dead, and grpcio never retires a connection
            # for a deadline; set up again on a fresh channel, so the unary calls (flows, runs,
            # stopping the run at shutdown) do not wait on a black hole
            self._service = None
        with self._lock:
            if window:
                self._totals["windows_failed"] += 1
            if isinstance(cause, StreamFailed):  # sift_stream reconnected inside the window
                self._totals["stream_retries"] += max(cause.retries, 1)
