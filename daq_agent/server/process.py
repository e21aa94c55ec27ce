"""The local ingestion server in a child process of its own, supervised by the agent.

The server (``daq-agent serve``) runs in a separate Python process, so it has a core and a GIL of
its own instead of competing with the readers and the sender. :class:`LocalServerProcess` starts
it, learns its port, restarts it when it dies and stops it::

    LocalServerProcess(db)    nothing started yet
      .start(timeout)         spawns ``python -m daq_agent serve --port P --control-fd N`` and
                              returns once the child has written its bound port on the control
                              socket; raises DaqError (the reason and the log) if the child exits
                              first or stays silent; then starts the thread daq-server-supervisor
      (supervisor)            blocks until the child's end of the control socket closes (it died),
                              logs the exit status and the tail of its log once, and starts it
                              again on the same port after a capped, jittered back-off; a busy port
                              is one more failed attempt; ``restarts`` counts the restarts
      .stop(timeout)          SIGTERM, up to ``timeout`` s for the child to commit and exit, then
                              SIGKILL; the supervisor is joined. Call it last at shutdown, once
                              nothing sends to the server any more.

The control socket (a socket pair; the child's end is passed with ``--control-fd``) carries one
line from the child, its port, once it listens (:class:`ParentLink` is the child's side). The child
also watches it: end of file means the parent is gone (even after ``kill -9``), and the child stops
by itself, committing its store, so no orphan keeps the SQLite file and the port. Unlike
``PR_SET_PDEATHSIG`` this works on macOS too, and does not depend on which thread spawned the child.

The child runs in a session of its own, so a Ctrl-C at the terminal reaches only the agent, which
drains first and stops the server last. Its stdout and stderr go to ``log_path`` (default: beside
the database, ``<db stem>-server.log``); each start moves the previous log to ``<log>.1``, so at
most two lifetimes are kept. The API key goes in the child's environment, never on its command line.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from daq_agent.core.backoff import Backoff, RetryPolicy
from daq_agent.core.errors import DaqError
from daq_agent.server.lifecycle import StartStop

__all__ = ["DEFAULT_RESTART_POLICY", "LocalServerProcess", "ParentLink"]

log = logging.getLogger(__name__)

# `daq-agent serve` reads its key from this variable (daq_agent.commands.serve.API_KEY_ENV, a layer
# above this one).
_API_KEY_ENV = "DAQ_AGENT_API_KEY"
_REAP_TIMEOUT_S = 5.0
_PORT_POLL_S = 0.1
_TAIL_BYTES = 4096
_TAIL_LINES = 12

DEFAULT_RESTART_POLICY = RetryPolicy(initial_s=0.5, max_s=30.0)
"""Restart delays: the first within 0.5 s, then doubling up to 30 s while restarts fail."""


class _Stopped(Exception):
    """stop() was called while a child was being started (internal)."""


class _Child:
    """One server process and the parent's end of its control socket."""

    __slots__ = ("control", "port", "proc", "started_at")

    def __init__(self, proc: subprocess.Popen[bytes], control: socket.socket) -> None:
        self.proc = proc
        self.control = control
        self.port = 0
        self.started_at = time.monotonic()

    def reap(self, timeout: float) -> int | None:
        """Wait for a child that is exiting (SIGKILL after ``timeout``); its exit status."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        try:
            return self.proc.wait(_REAP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.error("local server (pid %d) did not exit after SIGKILL", self.proc.pid)
            return None

    def terminate(self, timeout: float) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning(
                    "local server (pid %d) did not stop within %g s: killing it",
                    self.proc.pid,
                    timeout,
                )
            return self.reap(0)
        return self.proc.returncode

    def close(self) -> None:
        self.control.close()


class LocalServerProcess(StartStop):
    """``daq-agent serve`` in a supervised child process (see the module docstring).

    Args:
        db_path: the SQLite file (created if missing).
        host: the address to listen on (plain text: keep it on loopback).
        port: the port of the first start, 0 for any free one; every restart reuses the bound port.
        api_key: when set, every call must carry ``authorization: Bearer <api_key>``. Passed in the
            child's environment; an inherited ``DAQ_AGENT_API_KEY`` is never passed on.
        log_path: the child's stdout and stderr (default ``<db dir>/<db stem>-server.log``).
        python: the interpreter to run ``-m daq_agent`` with.
        extra_args: more ``daq-agent serve`` options, appended to the command line.
        restart_policy: the delays between restart attempts.
        start_timeout: how long a restart may take before it counts as failed.

    Attributes:
        db_path: the SQLite file.
        host: the address listened on.
        log_path: the child's log.
    """

    def __init__(
        self,
        db_path: str | Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        log_path: str | Path | None = None,
        python: str = sys.executable,
        extra_args: Sequence[str] = (),
        restart_policy: RetryPolicy | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self.db_path = Path(db_path)
        self.host = host
        self.log_path = (
            Path(log_path)
            if log_path is not None
            else self.db_path.with_name(f"{self.db_path.stem}-server.log")
        )
        self._python = python
        self._extra_args = tuple(extra_args)
        self._api_key = api_key or None
        self._policy = restart_policy or DEFAULT_RESTART_POLICY
        self._start_timeout = start_timeout
        self._port = port
        self._lock = threading.Lock()
        self._child: _Child | None = None
        self._restarts = 0
        self._stopping = threading.Event()
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._started = False
        self._stopped = False

    # -- state ---------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port once started (the configured one before); the same across restarts."""
        return self._port

    @property
    def uri(self) -> str:
        """``host:port`` for a client (loopback when listening on every address)."""
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"[{host}]:{self._port}" if ":" in host else f"{host}:{self._port}"

    @property
    def pid(self) -> int | None:
        """The current child's process id; None when none runs (stopped, or between restarts)."""
        with self._lock:
            child = self._child
        return child.proc.pid if child is not None and child.proc.returncode is None else None

    @property
    def alive(self) -> bool:
        """True while a child that reported its port is running."""
        with self._lock:
            child = self._child
        return child is not None and child.proc.poll() is None

    @property
    def restarts(self) -> int:
        """How many times the child was started again after it died."""
        return self._restarts

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start the child and the supervisor; returns once the child listens.

        With a fixed port that is still in use (say, by a previous server that is stopping), waits
        for it within ``timeout``.

        Raises:
            DaqError: the child exited before listening, did not report its port within
                ``timeout`` seconds, the port stayed in use, or the log cannot be written. The
                message names the reason and the log.
            RuntimeError: already started or stopped.
        """
        with self._lock:
            if self._started or self._stopped:
                raise RuntimeError("the local server process was already started or stopped")
            self._started = True
        self._wake_r, self._wake_w = socket.socketpair()
        try:
            child = self._start_child(time.monotonic() + timeout, wait_for_port=True)
        except _Stopped:
            self._close_wake()
            raise DaqError("the local server was stopped while it was starting") from None
        except BaseException:
            with self._lock:
                self._stopped = True
            self._close_wake()
            raise
        with self._lock:
            self._child = child
        log.info(
            "local server process %d listening on %s (db %s, log %s)",
            child.proc.pid,
            self.uri,
            self.db_path,
            self.log_path,
        )
        self._thread = threading.Thread(target=self._supervise, name="daq-server-supervisor")
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop supervising and stop the child: SIGTERM, then SIGKILL after ``timeout`` s.

        Idempotent; joins the supervisor thread.
        """
        with self._lock:
            if self._stopped or not self._started:
                self._stopped = True
                return
            self._stopped = True
        self._stopping.set()
        self._wake()
        thread = self._thread
        if thread is not None:
            thread.join(timeout + _REAP_TIMEOUT_S)
            if thread.is_alive():
                log.error("the local server's supervisor did not stop; leaving it")
                return
        with self._lock:
            child, self._child = self._child, None
        if child is not None:
            code = child.terminate(timeout)
            child.close()
            log.info("local server process %d stopped (%s)", child.proc.pid, _describe(code))
        self._close_wake()

    def __repr__(self) -> str:
        return f"LocalServerProcess({self.uri}, db={str(self.db_path)!r}, pid={self.pid})"

    # -- the child -----------------------------------------------------------------------------

    def _start_child(self, deadline: float, *, wait_for_port: bool) -> _Child:
        """Spawn a child on ``self._port`` and wait until it reports its port.

        Raises:
            DaqError: it could not be started (the message names the reason and the log).
            _Stopped: stop() was called meanwhile.
        """
        if self._port and not _port_free(self.host, self._port):
            if not wait_for_port:
                raise DaqError(f"{self.host}:{self._port} is in use by another process")
            while not _port_free(self.host, self._port):
                if time.monotonic() >= deadline:
                    raise DaqError(
                        f"cannot start the local server: {self.host}:{self._port} is in use by "
                        "another process"
                    )
                if self._stopping.wait(_PORT_POLL_S):
                    raise _Stopped
        child = self._spawn()
        try:
            child.port = self._await_port(child, deadline)
        except BaseException:
            child.terminate(_REAP_TIMEOUT_S)
            child.close()
            raise
        self._port = child.port
        return child

    def _spawn(self) -> _Child:
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            if self.log_path.exists():
                os.replace(self.log_path, self.log_path.with_name(self.log_path.name + ".1"))
            log_file = self.log_path.open("wb")
        except OSError as exc:
            raise DaqError(
                f"cannot write the local server's log {self.log_path}: {exc.strerror or exc}"
            ) from exc
        env = dict(os.environ)
        env.pop(_API_KEY_ENV, None)
        if self._api_key is not None:
            env[_API_KEY_ENV] = self._api_key
        parent_end, child_end = socket.socketpair()
        argv = [
            self._python,
            "-m",
            "daq_agent",
            "serve",
            "--db",
            str(self.db_path),
            "--host",
            self.host,
            "--port",
            str(self._port),
            "--control-fd",
            str(child_end.fileno()),
            *self._extra_args,
        ]
        try:
            with log_file:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    pass_fds=(child_end.fileno(),),
                    env=env,
                    start_new_session=True,  # terminal signals (Ctrl-C) go to the agent only
                )
        except OSError as exc:
            parent_end.close()
            raise DaqError(
                f"cannot start the local server with {self._python}: {exc.strerror or exc}"
            ) from exc
        finally:
            child_end.close()
        return _Child(proc, parent_end)

    def _await_port(self, child: _Child, deadline: float) -> int:
        """Read the port line from the control socket.

        Raises:
            DaqError: the child exited first, wrote something else, or stayed silent.
            _Stopped: stop() was called meanwhile.
        """
        assert self._wake_r is not None
        started = time.monotonic()
        buffer = b""
        while b"\n" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._start_error(
                    child,
                    f"it did not report a listening port within {deadline - started:.1f} s",
                )
            readable, _, _ = select.select([child.control, self._wake_r], [], [], remaining)
            if self._stopping.is_set():
                raise _Stopped
            if child.control in readable:
                data = _recv(child.control)
                if not data:
                    code = child.reap(_REAP_TIMEOUT_S)
                    raise self._start_error(child, f"it exited with {_describe(code)}")
                buffer += data
        line = buffer.partition(b"\n")[0]
        try:
            port = int(line)
        except ValueError:
            raise self._start_error(child, f"it reported {line!r} instead of its port") from None
        if self._port and port != self._port:
            raise self._start_error(child, f"it listens on port {port} instead of {self._port}")
        return port

    def _start_error(self, child: _Child, reason: str) -> DaqError:
        tail = _tail(self.log_path, 1)
        last = f"its log {self.log_path} ends with: {tail[0]}" if tail else f"log: {self.log_path}"
        return DaqError(
            f"the local server (pid {child.proc.pid}) did not start listening: {reason}; {last}"
        )

    # -- the supervisor ------------------------------------------------------------------------

    def _supervise(self) -> None:
        backoff = Backoff(self._policy)
        with self._lock:
            child = self._child
        try:
            while child is not None and self._wait_for_exit(child):
                code = child.reap(_REAP_TIMEOUT_S)
                child.close()
                lived = time.monotonic() - child.started_at
                with self._lock:
                    self._child = None
                log.warning(
                    "local server process %d exited with %s after %.1f s; restarting it on %s. "
                    "Its log %s ends with:\n%s",
                    child.proc.pid,
                    _describe(code),
                    lived,
                    self.uri,
                    self.log_path,
                    "\n".join(_tail(self.log_path, _TAIL_LINES)) or "(nothing)",
                )
                if lived >= self._policy.max_s:
                    backoff.reset()  # it ran for a while: not a crash loop
                child = self._restart(backoff)
        except Exception:
            log.exception("the local server's supervisor failed: the server is no longer watched")

    def _wait_for_exit(self, child: _Child) -> bool:
        """Block until the child's end of the control socket closes (True) or stop() (False)."""
        assert self._wake_r is not None
        while True:
            readable, _, _ = select.select([child.control, self._wake_r], [], [])
            if self._stopping.is_set():
                return False
            if child.control in readable and not _recv(child.control):
                return True

    def _restart(self, backoff: Backoff) -> _Child | None:
        """Start a new child after a back-off, until one listens; None once stop() is called."""
        attempts = 0
        while True:
            attempts += 1
            if self._stopping.wait(backoff.failure()):
                return None
            try:
                child = self._start_child(
                    time.monotonic() + self._start_timeout, wait_for_port=False
                )
            except _Stopped:
                return None
            except DaqError as exc:
                if attempts == 1:
                    log.warning("cannot restart the local server (trying again): %s", exc)
                else:
                    log.debug("restart attempt %d of the local server failed: %s", attempts, exc)
                continue
            with self._lock:
                self._child = child
                self._restarts += 1
            log.info(
                "local server restarted as process %d on %s (%d attempt%s)",
                child.proc.pid,
                self.uri,
                attempts,
                "" if attempts == 1 else "s",
            )
            return child

    def _wake(self) -> None:
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass  # a byte is already waiting

    def _close_wake(self) -> None:
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._wake_r = self._wake_w = None


class ParentLink:
    """The server's end of the control socket (``daq-agent serve --control-fd N``).

    The server reports its port with :meth:`report_listening` and polls :meth:`parent_gone`,
    which turns true when the process that started it has closed its end or died.

    Args:
        fd: the inherited socket's file descriptor (owned from now on).

    Raises:
        DaqError: ``fd`` is not an open socket.
    """

    __slots__ = ("_sock",)

    def __init__(self, fd: int) -> None:
        try:
            self._sock = socket.socket(fileno=fd)
        except OSError as exc:
            reason = exc.strerror or exc
            raise DaqError(f"--control-fd {fd}: not an open socket ({reason})") from exc

    def report_listening(self, port: int) -> None:
        """Write ``port`` and a newline (if the parent is already gone, parent_gone() says so)."""
        try:
            self._sock.sendall(b"%d\n" % port)
        except OSError:
            pass

    def parent_gone(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s; True once the parent's end is closed."""
        try:
            readable, _, _ = select.select([self._sock], [], [], timeout)
        except (OSError, ValueError):
            return True
        return bool(readable) and not _recv(self._sock)

    def close(self) -> None:
        """Close the socket (idempotent)."""
        self._sock.close()


def _recv(sock: socket.socket) -> bytes:
    """What is readable on ``sock``; b"" at end of file (or a reset: the peer is gone too)."""
    try:
        return sock.recv(256)
    except OSError:
        return b""


def _port_free(host: str, port: int) -> bool:
    """Whether a listener may bind ``host:port`` now (TIME_WAIT does not count: SO_REUSEADDR)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.errno != errno.EADDRINUSE  # anything else: the server will report it
    return True


def _describe(code: int | None) -> str:
    if code is None:
        return "an unknown status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def _tail(path: Path, lines: int) -> list[str]:
    """The last ``lines`` non-empty lines of ``path`` (at most its last few KiB)."""
    try:
        with path.open("rb") as file:
            size = file.seek(0, os.SEEK_END)
            file.seek(max(0, size - _TAIL_BYTES))
            text = file.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]
