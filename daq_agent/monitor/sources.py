"""Where the monitor's documents come from: a running agent, or readers of its own.

Both give documents of the shape of the agent's ``/status.json``
(:mod:`daq_agent.status_json`), without blocking the caller (the screen):

* :class:`AgentSource` polls ``URL/status.json`` on its own thread (``daq-monitor-poll``) and
  keeps the last answer, or why there is none;
* :class:`DirectSource` runs readers (a bus, a log) that feed a
  :class:`~daq_agent.pipeline.latest.LatestValues` tap directly: no ring, spool or stream.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Protocol

from daq_agent.core.errors import DaqError
from daq_agent.core.model import FlowConfig
from daq_agent.pipeline.latest import LatestValues
from daq_agent.pipeline.status import ERROR_KINDS

__all__ = [
    "AgentSource",
    "DirectSource",
    "MonitorSource",
    "MonitoredReader",
    "status_url",
]

log = logging.getLogger(__name__)

_VERSION = 1


class MonitorSource(Protocol):
    """What the screen reads from."""

    title: str

    def start(self) -> None:
        """Start (threads, readers)."""
        ...

    def stop(self) -> None:
        """Stop and join; idempotent."""
        ...

    def document(self) -> tuple[Mapping[str, Any] | None, str]:
        """The latest document (None: none yet) and why it is not fresh ("" when it is)."""
        ...


class _State(Protocol):
    @property
    def value(self) -> str: ...


class MonitoredReader(Protocol):
    """The part of a reader (:class:`~daq_agent.readers.base.ReaderABC`) the monitor uses."""

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def state(self) -> _State: ...

    @property
    def counters(self) -> Any: ...

    @property
    def live(self) -> bool: ...

    def start(self) -> None: ...

    def stop(self, timeout: float | None = 5.0) -> bool: ...


def status_url(agent: str) -> str:
    """The ``/status.json`` URL of an agent given as ``http://host:port``, ``host:port`` or a
    full URL.

    Raises:
        DaqError: not an http URL.
    """
    text = agent.strip()
    if "://" not in text:
        text = f"http://{text}"
    if not text.startswith(("http://", "https://")):
        raise DaqError(f"--agent {agent!r}: expected http://HOST:PORT")
    if text.endswith("/status.json"):
        return text
    return text.rstrip("/") + "/status.json"


class AgentSource:
    """Polls a running agent's ``/status.json`` (``run --metrics-port``).

    Args:
        agent: the agent's metrics address (see :func:`status_url`).
        interval_s: the polling period.
        timeout_s: the longest one request may take.

    Raises:
        DaqError: ``agent`` is not an http URL.
    """

    def __init__(self, agent: str, *, interval_s: float = 0.5, timeout_s: float = 2.0) -> None:
        self.url = status_url(agent)
        self.title = f"agent {self.url.removesuffix('/status.json')}"
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._document: Mapping[str, Any] | None = None
        self._error = "connecting"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the ``daq-monitor-poll`` thread (idempotent)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="daq-monitor-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling and join the thread; idempotent."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(self.timeout_s + 1.0)

    def document(self) -> tuple[Mapping[str, Any] | None, str]:
        """The last document the agent answered, and the error of the last poll ("" if none)."""
        with self._lock:
            return self._document, self._error

    def poll(self) -> None:
        """Fetch once (the thread's loop); the outcome is kept, never raised."""
        try:
            document = self._fetch()
        except DaqError as exc:
            with self._lock:
                self._error = str(exc)
            return
        with self._lock:
            self._document = document
            self._error = ""

    def _fetch(self) -> Mapping[str, Any]:
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout_s) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            exc.close()  # it holds the response
            hint = " (an agent without /status.json?)" if exc.code == 404 else ""
            raise DaqError(f"{self.url}: HTTP {exc.code}{hint}") from exc
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise DaqError(f"{self.url}: cannot reach the agent: {reason}") from exc
        try:
            document = json.loads(body)
        except ValueError as exc:
            raise DaqError(f"{self.url}: not JSON: {exc}") from exc
        if not isinstance(document, dict) or not isinstance(document.get("status"), dict):
            raise DaqError(f"{self.url}: not a status document")
        if document.get("version") != _VERSION:
            raise DaqError(f"{self.url}: status document version {document.get('version')!r}")
        return document

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> AgentSource:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


ReaderBuilder = Callable[[LatestValues], MonitoredReader]
"""Builds one reader that hands its samples to the tap."""


class DirectSource:
    """Readers of the monitor's own (a bus, a log) feeding a tap; nothing is stored or sent.

    Args:
        title: what the header says (``bus socketcan:can0``, ``log run.blf``).
        flows: the flows of the readers (names the values).
        builders: one per reader, called at :meth:`start` with the tap.
    """

    def __init__(
        self, title: str, flows: Iterable[FlowConfig], builders: Sequence[ReaderBuilder]
    ) -> None:
        self.title = title
        self.tap = LatestValues(flows)
        self._builders = list(builders)
        self.readers: list[MonitoredReader] = []
        self._started = False

    def start(self) -> None:
        """Build and start the readers (idempotent).

        Raises:
            DaqError: a reader cannot be built (the readers already started are stopped).
        """
        if self._started:
            return
        self._started = True
        try:
            for build in self._builders:
                self.readers.append(build(self.tap))
        except BaseException:
            self.readers.clear()
            raise
        for reader in self.readers:
            reader.start()

    def stop(self) -> None:
        """Stop and join every reader; idempotent."""
        readers, self.readers = self.readers, []
        for reader in readers:
            reader.stop()

    def document(self) -> tuple[Mapping[str, Any] | None, str]:
        """The readings of the tap and the readers' counters (a ``/status.json`` shape)."""
        sources = []
        for reader in self.readers:
            c = reader.counters
            by_kind = {kind: c.get(kind) for kind in ERROR_KINDS if c.get(kind)}
            sources.append(
                {
                    "name": reader.name,
                    "kind": reader.kind,
                    "state": reader.state.value,
                    "received": c.get("received"),
                    "decoded": c.get("decoded"),
                    "unknown": c.get("unknown"),
                    "errors": sum(by_kind.values()),
                    "errors_by_kind": by_kind,
                    "reopens": c.get("reopens"),
                    "live": reader.live,
                    "last_error": c.last_error,
                }
            )
        document = {
            "version": _VERSION,
            "mode": "direct",
            "time_ns": time.time_ns(),
            "status": {"sources": sources},
            "channels": self.tap.document(),
        }
        return document, ""

    def __enter__(self) -> DirectSource:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
