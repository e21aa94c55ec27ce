"""Signal handling off the handler (daq_agent.core.signals), with real signals sent to a real
process: the callbacks run on the watcher thread, in order, and a handler that arrives while the
main thread holds the lock the callback needs cannot deadlock it."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from daq_agent.core.signals import handle_signals, stop_on_signals

REPO = Path(__file__).resolve().parents[2]


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_a_signal_while_the_main_thread_holds_the_events_lock_still_stops() -> None:
    """The deadlock this module exists for: the main thread is inside the event's condition lock
    (as on every ``Event.wait``) when SIGTERM's handler runs. A handler that called
    ``stop.set()`` itself would wait for that lock forever; here the watcher waits until the
    main thread lets go, then sets it."""
    script = textwrap.dedent(
        """
        import os, signal, sys, threading, time
        from daq_agent.core.signals import stop_on_signals

        stop = threading.Event()
        with stop_on_signals(stop):
            with stop._cond:  # what Event.wait holds for a moment, every time
                os.kill(os.getpid(), signal.SIGTERM)
                deadline = time.monotonic() + 0.5
                while time.monotonic() < deadline:  # bytecodes: the handler runs in here
                    pass
                held_while_set = stop.is_set()
            print("stopped" if stop.wait(10) else "not stopped", held_while_set, flush=True)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    # set after the lock was released, never inside it
    assert result.stdout.split() == ["stopped", "False"], result.stdout + result.stderr


def test_callbacks_run_on_the_watcher_in_order_and_survive_an_exception(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[tuple[str, str]] = []

    def record(sig: signal.Signals) -> None:
        seen.append((sig.name, threading.current_thread().name))
        if sig is signal.SIGUSR2 and len(seen) == 2:
            raise RuntimeError("a callback's bug")

    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2)}
    with (
        caplog.at_level(logging.ERROR, logger="daq_agent.core.signals"),
        handle_signals({signal.SIGUSR1: record, signal.SIGUSR2: record}, name="sig-test") as on,
    ):
        assert on
        for count, sig in enumerate((signal.SIGUSR1, signal.SIGUSR2, signal.SIGUSR1), 1):
            os.kill(os.getpid(), sig)
            assert wait_until(lambda n=count: len(seen) >= n), seen  # type: ignore[misc]
    assert seen == [
        ("SIGUSR1", "sig-test"),
        ("SIGUSR2", "sig-test"),
        ("SIGUSR1", "sig-test"),
    ]
    assert "handling SIGUSR2 failed" in caplog.text
    assert {s: signal.getsignal(s) for s in before} == before  # restored on leaving
    assert not any(t.name == "sig-test" for t in threading.enumerate())  # joined


def test_a_signal_just_before_leaving_is_still_handled() -> None:
    stop = threading.Event()
    with stop_on_signals(stop):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0)  # the handler runs; the watcher may not have read the pipe yet
    assert stop.is_set()


def test_off_the_main_thread_nothing_is_installed() -> None:
    result: list[bool] = []
    before = signal.getsignal(signal.SIGTERM)

    def off_main() -> None:
        with stop_on_signals(threading.Event()) as installed:
            result.append(installed)
            result.append(signal.getsignal(signal.SIGTERM) is before)

    thread = threading.Thread(target=off_main)
    thread.start()
    thread.join(5)
    assert result == [False, True]
