"""Signal handling that never takes a lock inside the handler.

A Python signal handler runs on the main thread between two bytecodes, possibly while that thread
holds a lock the handler then waits for forever. ``threading.Event.set()`` is such a handler: it
takes the event's condition lock, which the main thread holds for a moment at the start and end
of every ``Event.wait()``. A run loop that waits on an event in short slices, stopped by a
handler that sets that event, hangs now and then: CI saw ``daq-agent run`` ignore a SIGTERM for
30 s while its watchdog thread went on petting.

:func:`handle_signals` installs handlers that only write the signal's number to a pipe
(``os.write``: no Python lock). A watcher thread reads the pipe and calls the callbacks as ordinary
code, which waits for a lock like any other thread does.

    with handle_signals({signal.SIGTERM: lambda sig: stop.set()}):
        while not stop.wait(0.5):
            ...
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import FrameType

__all__ = ["dump_stacks_on", "handle_signals", "stop_on_signals"]

log = logging.getLogger(__name__)

_CLOSE = 0  # no signal has number 0: the byte that ends the watcher
_JOIN_TIMEOUT_S = 5.0


@contextmanager
def handle_signals(
    callbacks: Mapping[signal.Signals, Callable[[signal.Signals], object]],
    *,
    name: str = "daq-signals",
) -> Iterator[bool]:
    """While inside, each signal in ``callbacks`` calls its callback on a watcher thread.

    Callbacks run one at a time, in the order the signals arrived; an exception from one is
    logged and the watcher goes on. On leaving, the previous handlers are restored, signals that
    already arrived are still handled, and the watcher is joined.

    Only the main thread can install handlers: elsewhere nothing is installed and the context
    yields False (True otherwise).
    """
    if threading.current_thread() is not threading.main_thread() or not callbacks:
        yield False
        return
    read_fd, write_fd = os.pipe()
    watcher: threading.Thread | None = None
    previous = {}
    try:
        os.set_blocking(write_fd, False)

        def handler(signum: int, _frame: FrameType | None) -> None:
            try:
                os.write(write_fd, bytes((signum,)))
            except OSError:  # a full pipe (thousands of signals unread) already wakes the watcher
                pass

        watcher = threading.Thread(target=_watch, args=(read_fd, callbacks), name=name, daemon=True)
        watcher.start()
        for sig in callbacks:
            previous[sig] = signal.signal(sig, handler)
        yield True
    finally:
        try:
            for sig, old in previous.items():
                signal.signal(sig, old)
        finally:  # even if a restored handler raised (KeyboardInterrupt) right away
            _close_watcher(watcher, read_fd, write_fd)


def _close_watcher(watcher: threading.Thread | None, read_fd: int, write_fd: int) -> None:
    """Tell the watcher to end after what it already read, join it, close the pipe."""
    if watcher is not None:
        try:
            os.write(write_fd, bytes((_CLOSE,)))
        except BlockingIOError:  # absurdly many unread signals: the join below times out
            pass
        watcher.join(_JOIN_TIMEOUT_S)
    os.close(write_fd)
    if watcher is not None and watcher.is_alive():  # a callback still waits: leave it its pipe
        log.warning("signal watcher still busy after %.0f s; leaving it", _JOIN_TIMEOUT_S)
    else:
        os.close(read_fd)


def _watch(
    read_fd: int, callbacks: Mapping[signal.Signals, Callable[[signal.Signals], object]]
) -> None:
    while True:
        data = os.read(read_fd, 64)
        for number in data:
            if number == _CLOSE:
                return
            sig = signal.Signals(number)
            try:
                callbacks[sig](sig)
            except Exception:  # a callback's bug must not end signal handling
                log.exception("handling %s failed", sig.name)
        if not data:
            return


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[bool]:
    """Set ``stop`` on SIGINT/SIGTERM while inside (logged at INFO), as :func:`handle_signals`."""

    def on_signal(sig: signal.Signals) -> None:
        log.info("%s received, stopping", sig.name)
        stop.set()

    with handle_signals({signal.SIGINT: on_signal, signal.SIGTERM: on_signal}) as installed:
        yield installed


@contextmanager
def dump_stacks_on(sig: signal.Signals = signal.SIGUSR1) -> Iterator[bool]:
    """While inside, ``sig`` writes every thread's stack to stderr (``faulthandler``) and the
    process goes on: for one that seems stuck. Yields False (nothing registered) when stderr
    has no file descriptor, as under some test runners."""
    try:
        faulthandler.register(sig, all_threads=True)
    except (RuntimeError, ValueError, AttributeError, OSError) as exc:
        # io.UnsupportedOperation is an OSError and a ValueError
        log.debug("no stack dumps on %s: %s", sig.name, exc)
        yield False
        return
    try:
        yield True
    finally:
        faulthandler.unregister(sig)
