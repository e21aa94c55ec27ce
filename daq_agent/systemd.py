"""systemd integration: the sd_notify protocol and a health-gated watchdog.

The protocol is a datagram of ``KEY=VALUE`` lines sent to the ``AF_UNIX`` socket named by
``$NOTIFY_SOCKET`` (a name starting with ``@`` is in the abstract namespace). It is a few lines,
so no library is needed. Without ``$NOTIFY_SOCKET`` (not started by systemd, or ``Type=simple``)
every call is a no-op.

``$WATCHDOG_USEC`` (set by ``WatchdogSec=``) is the interval within which systemd expects
``WATCHDOG=1``; ``$WATCHDOG_PID``, when set, names the one process it is meant for. The
:class:`Watchdog` sends ``WATCHDOG=1`` every half interval, but only while its health check
passes: a hung or broken agent stops petting the watchdog and systemd restarts it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping
from types import TracebackType

__all__ = ["Notifier", "Watchdog", "notify_address", "watchdog_interval"]

log = logging.getLogger(__name__)

#: How often the watchdog thread sends ``STATUS=`` (seconds), unless told otherwise.
DEFAULT_STATUS_INTERVAL_S = 5.0
_SEND_TIMEOUT_S = 1.0


def notify_address(env: Mapping[str, str]) -> str | bytes | None:
    """The socket address named by ``$NOTIFY_SOCKET``, or None when unset or unsupported.

    Args:
        env: the environment to read.

    Returns:
        A filesystem path (``str``), an abstract name (``bytes`` starting with NUL), or None.
    """
    value = env.get("NOTIFY_SOCKET", "")
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    log.warning("NOTIFY_SOCKET=%r is not a unix socket path; systemd notifications are off", value)
    return None


def watchdog_interval(env: Mapping[str, str], pid: int | None = None) -> float | None:
    """The watchdog interval in seconds from ``$WATCHDOG_USEC``, or None when it is off.

    It is off when ``$WATCHDOG_USEC`` is unset, not a positive integer, or when
    ``$WATCHDOG_PID`` names another process than ``pid`` (default: this one).

    Args:
        env: the environment to read.
        pid: the process the watchdog must be meant for (default ``os.getpid()``).
    """
    usec = env.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not an integer; the watchdog is off", usec)
        return None
    if value <= 0:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner:
        try:
            owner_pid = int(owner)
        except ValueError:
            log.warning("WATCHDOG_PID=%r is not an integer; the watchdog is off", owner)
            return None
        if owner_pid != (os.getpid() if pid is None else pid):
            return None
    return value / 1_000_000


class Notifier:
    """Sends sd_notify messages to systemd; every method is a no-op without ``$NOTIFY_SOCKET``.

    A send that fails (systemd gone, socket full) is logged once and never raises.

    Args:
        env: the environment to read (default ``os.environ``).
    """

    __slots__ = ("_address", "_failed", "_lock", "_sock")

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._address = notify_address(os.environ if env is None else env)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._failed = False

    @property
    def enabled(self) -> bool:
        """Whether there is a socket to notify."""
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram.

        Returns:
            True when sent, False when notifications are off or the send failed.
        """
        if self._address is None or not assignments:
            return False
        message = "\n".join(assignments).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    # A full socket must not hang the caller (the run loop, the drain).
                    self._sock.settimeout(_SEND_TIMEOUT_S)
                self._sock.sendto(message, self._address)
            except OSError as exc:
                if not self._failed:
                    log.warning("systemd notification failed: %s", exc)
                    self._failed = True
                return False
        self._failed = False
        return True

    def ready(self) -> bool:
        """Tell systemd the service is up (``READY=1``)."""
        return self.notify("READY=1")

    def status(self, text: str) -> bool:
        """Set the one-line status ``systemctl status`` shows (``STATUS=``)."""
        return self.notify("STATUS=" + " ".join(text.split()))

    def stopping(self) -> bool:
        """Tell systemd the service is shutting down (``STOPPING=1``)."""
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        """Pet the watchdog (``WATCHDOG=1``); prefer :class:`Watchdog`, which checks health."""
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        """Close the socket (idempotent); a later send opens a new one."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Watchdog:
    """A named thread that sends ``WATCHDOG=1`` while ``health()`` passes, and ``STATUS=``.

    Every half watchdog interval it calls ``health()``: None means healthy and ``WATCHDOG=1`` is
    sent; a string is the reason it is not, and nothing is sent, so systemd restarts the service
    when it stays unhealthy for the whole ``WatchdogSec=``. A change of health is logged once
    (with the reason), as is the recovery. Every ``status_interval_s`` it sends ``STATUS=`` with
    ``status()``. An exception from either callable counts as unhealthy / is logged once; it
    never ends the thread.

    Without ``$NOTIFY_SOCKET`` :meth:`start` starts nothing.

    Args:
        notifier: where to send.
        health: returns None when healthy, else the reason.
        status: returns the short status line (optional).
        env: the environment for ``$WATCHDOG_USEC``/``$WATCHDOG_PID`` (default ``os.environ``).
        status_interval_s: how often to send ``STATUS=``.
    """

    def __init__(
        self,
        notifier: Notifier,
        health: Callable[[], str | None],
        status: Callable[[], str] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        status_interval_s: float = DEFAULT_STATUS_INTERVAL_S,
    ) -> None:
        if status_interval_s <= 0:
            raise ValueError(f"status_interval_s must be > 0, got {status_interval_s}")
        self._notifier = notifier
        self._health = health
        self._status = status
        interval = watchdog_interval(os.environ if env is None else env)
        self.interval_s = interval
        self._status_interval_s = status_interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reason: str | None = None
        self._status_failed = False
        self.pets = 0

    @property
    def healthy(self) -> bool:
        """Whether the last health check passed."""
        return self._reason is None

    def start(self) -> None:
        """Start the thread (once), when there is something to send."""
        if self._thread is not None or not self._notifier.enabled:
            return
        if self.interval_s is None and self._status is None:
            return
        self._thread = threading.Thread(target=self._run, name="daq-watchdog", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop and join the thread (idempotent)."""
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("watchdog thread did not stop within %.1f s", timeout)

    def __enter__(self) -> Watchdog:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        period = self._status_interval_s
        if self.interval_s is not None:
            period = min(period, self.interval_s / 2)
        next_status = 0.0
        elapsed = 0.0
        while True:
            if self.interval_s is not None:
                self._check()
            if self._status is not None and elapsed >= next_status:
                self._send_status()
                next_status = elapsed + self._status_interval_s
            if self._stop.wait(period):
                return
            elapsed += period

    def _check(self) -> None:
        try:
            reason = self._health()
        except Exception as exc:  # a broken check is a failed one, never a dead thread
            reason = f"health check raised {type(exc).__name__}: {exc}"
        if reason != self._reason:
            if reason is None:
                log.warning("healthy again; the systemd watchdog is being notified")
            else:
                log.warning("unhealthy, not notifying the systemd watchdog: %s", reason)
            self._reason = reason
        if reason is None and self._notifier.watchdog():
            self.pets += 1

    def _send_status(self) -> None:
        assert self._status is not None
        try:
            text = self._status()
        except Exception as exc:  # the status line is cosmetic; never end the thread for it
            if not self._status_failed:
                log.warning("status line for systemd failed: %s: %s", type(exc).__name__, exc)
                self._status_failed = True
            return
        self._status_failed = False
        self._notifier.status(text)
