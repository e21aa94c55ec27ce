"""SerialReader: a serial device (any pyserial URL) framed and decoded by its frame definitions.

The port is opened with :func:`serial.serial_for_url`, so ``/dev/ttyUSB0``,
``/dev/serial/by-id/…``, ``socket://host:port``, ``rfc2217://host:port`` and ``loop://`` all work,
with the line settings of the agent config (baud rate, data bits, parity, stop bits, RTS/CTS and
XON/XOFF flow control). The reader thread (``daq-reader[<name>]``, owned by
:class:`~daq_agent.readers.base.ReaderABC`) reads whatever the port has, cuts frames with the
definitions' framer (resynchronising after garbage, never holding more than one partial frame of
at most ``max_length`` bytes), decodes them with the compiled codec and hands each sample to the
sink. When the port fails (a USB adapter unplugged, a TCP peer gone) the reader reports it, backs
off and reopens it; the agent keeps running.

Building one from the agent config::

    reader = SerialReader(
        name=device.name,
        url=device.port,
        serial_options={"baudrate": device.baudrate, "bytesize": device.bytesize,
                        "parity": device.parity, "stopbits": device.stopbits,
                        "rtscts": device.rtscts, "xonxoff": device.xonxoff},
        defs=load_definitions(device.defs),
        sink=ring.put,
        flow_name_template=config.naming.serial_flow,
    )
    flows = reader.flows          # register these with the ingestion API
    reader.start(); ...; reader.stop()

Counters (``reader.counters``), named like the CAN reader's where they mean the same:
``received`` (= ``decoded`` + ``unknown`` + ``checksum_errors`` + ``framing_errors`` +
``decode_errors``; a framing error is one run of bytes that was not a frame), ``decoded``,
``unknown`` (frame types no definition knows; per id in the bounded map ``unknown_ids``),
``bytes``, ``dropped_bytes``, ``missing_checksums`` (of ``decode_errors``, the NMEA sentences
without a checksum), ``unmatched_values`` (text outside a value table: the sample is kept with
that channel empty), plus the base reader's ``opens``, ``reopens``, ``failures`` and
``sink_errors``.
"""

from __future__ import annotations

import logging
import os
import random
import select
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Final

import serial

from daq_agent.core.backoff import RetryPolicy
from daq_agent.core.clock import host_clock
from daq_agent.core.errors import ConfigError, ReaderError
from daq_agent.core.model import FlowConfig
from daq_agent.readers.base import ErrorCallback, ReaderABC, Sink
from daq_agent.readers.journal import SerialJournal
from daq_agent.serialdefs.codec import DEFAULT_FLOW_NAME_TEMPLATE, FrameFault, SerialCodec
from daq_agent.serialdefs.loader import load_definitions
from daq_agent.serialdefs.model import SerialDefinitions
from daq_agent.serialdefs.stream import COUNTER_NAMES, FrameStream

__all__ = ["SERIAL_OPTIONS", "SerialReader", "normalize_serial_options"]

try:
    import termios

    _TERMIOS_ERRORS: tuple[type[Exception], ...] = (termios.error,)
except ImportError:  # not POSIX
    _TERMIOS_ERRORS = ()
_PORT_ERRORS: tuple[type[Exception], ...] = (serial.SerialException, OSError, *_TERMIOS_ERRORS)
"""What pyserial raises when a port fails (termios.error is not an OSError)."""
_READ_ERRORS: tuple[type[Exception], ...] = (*_PORT_ERRORS, ValueError)
"""Also ValueError: pyserial's read on a port closed under it."""

SERIAL_OPTIONS: Final = frozenset(
    {"baudrate", "bytesize", "parity", "stopbits", "rtscts", "xonxoff", "dsrdtr", "exclusive"}
)
"""The line settings a serial device may set (pyserial's keyword arguments)."""

_PARITIES: Final = {
    "N": serial.PARITY_NONE,
    "NONE": serial.PARITY_NONE,
    "E": serial.PARITY_EVEN,
    "EVEN": serial.PARITY_EVEN,
    "O": serial.PARITY_ODD,
    "ODD": serial.PARITY_ODD,
    "M": serial.PARITY_MARK,
    "MARK": serial.PARITY_MARK,
    "S": serial.PARITY_SPACE,
    "SPACE": serial.PARITY_SPACE,
}
_STOPBITS: Final = {
    1.0: serial.STOPBITS_ONE,
    1.5: serial.STOPBITS_ONE_POINT_FIVE,
    2.0: serial.STOPBITS_TWO,
}
log = logging.getLogger(__name__)

_MAX_READ: Final = 65536
_READER_COUNTER: Final = {name: name for name in COUNTER_NAMES} | {
    "frames": "decoded",
    "unknown_types": "unknown",
}
"""FrameStream counter → reader counter."""
_FRAME_OUTCOMES: Final = frozenset(
    {"frames", "unknown_types", "checksum_errors", "framing_errors", "decode_errors"}
)
"""The stream counters that together make ``received``."""


class _FaultLog:
    """A budget of log lines: at most ``per_second`` a second."""

    __slots__ = ("_budget", "_second", "_skipped", "per_second")

    def __init__(self, per_second: int = 20) -> None:
        self.per_second = per_second
        self._second = 0
        self._budget = per_second
        self._skipped = 0

    def take(self) -> int | None:
        """None if over budget; else the lines skipped since the last one shown."""
        second = int(time.monotonic())
        if second != self._second:
            self._second, self._budget = second, self.per_second
        if self._budget <= 0:
            self._skipped += 1
            return None
        self._budget -= 1
        skipped, self._skipped = self._skipped, 0
        return skipped


def normalize_serial_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate line settings and convert them to pyserial's values.

    Args:
        options: ``baudrate`` (int), ``bytesize`` (5 to 8), ``parity`` (``N``, ``E``, ``O``,
            ``M``, ``S`` or ``none``, ``even``…), ``stopbits`` (1, 1.5, 2), ``rtscts``, ``xonxoff``,
            ``dsrdtr``, ``exclusive`` (bools).

    Returns:
        Keyword arguments for :func:`serial.serial_for_url`.

    Raises:
        ConfigError: an unknown key or an invalid value (the key is named).
    """
    out: dict[str, Any] = {}
    for key, value in (options or {}).items():
        where = f"serial_options.{key}"
        if key not in SERIAL_OPTIONS:
            known = ", ".join(sorted(SERIAL_OPTIONS))
            raise ConfigError(f"unknown serial option (known: {known})", key=where)
        if value is None:
            continue
        if key == "baudrate":
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"must be a positive integer, got {value!r}", key=where)
        elif key == "bytesize":
            if value not in (5, 6, 7, 8) or isinstance(value, bool):
                raise ConfigError(f"must be 5, 6, 7 or 8, got {value!r}", key=where)
        elif key == "parity":
            parity = _PARITIES.get(str(value).upper())
            if parity is None:
                raise ConfigError(f"must be N, E, O, M or S, got {value!r}", key=where)
            value = parity
        elif key == "stopbits":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"must be 1, 1.5 or 2, got {value!r}", key=where)
            stop = _STOPBITS.get(float(value))
            if stop is None:
                raise ConfigError(f"must be 1, 1.5 or 2, got {value!r}", key=where)
            value = stop
        elif not isinstance(value, bool):
            raise ConfigError(f"must be true or false, got {value!r}", key=where)
        out[key] = value
    return out


def _char_time_ns(options: Mapping[str, Any]) -> int:
    """The time one character takes on the line (start + data + parity + stop bits)."""
    baud = int(options.get("baudrate", 9600))
    bits = 1 + int(options.get("bytesize", 8)) + float(options.get("stopbits", 1))
    if options.get("parity", serial.PARITY_NONE) != serial.PARITY_NONE:
        bits += 1
    return round(bits * 1_000_000_000 / baud)


class SerialReader(ReaderABC):
    """Reads a serial device, frames and decodes it, and hands samples to a sink.

    Args:
        name: the device alias (``{device}`` in flow names; thread ``daq-reader[<name>]``).
        url: a pyserial URL or device path.
        serial_options: line settings, see :func:`normalize_serial_options`.
        defs: the frame definitions (loaded, or the path of the YAML file).
        sink: receives every sample, on the reader thread (in practice ``RingBuffer.put``).
        flow_name_template: flow names from ``{device}`` and ``{frame}``.
        byte_time_ns: the time of one character on the line, used to date each frame by its
            first byte inside a chunk read at once (never before the previous read, nor before
            the port opened); None: computed from the line settings for a local device path
            (not a pty, even behind a symlink: a pty has no line rate and delivers a burst at
            once), 0 (no interpolation: frames of one read get its time, 1 ns apart) for
            network URLs and ptys.
        clock: host time in ns (default: the process's monotonic-anchored host clock).
        on_error: called on the reader thread with (reader, error) when the port fails.
        retry: delays between reopen attempts (default: the readers' ``READER_RETRY``).
        rng: the random source of the back-off's jitter.
        poll_interval: the longest one read waits, seconds (bounds stop latency).
        key_limit: distinct unknown frame ids counted separately.
        journal: records every chunk read, with its read timestamp, on its own thread
            (:mod:`daq_agent.readers.journal`); started and closed with the reader.

    Raises:
        ConfigError: invalid options, definitions or flow name template.
    """

    kind: ClassVar[str] = "serial"
    COUNTERS: ClassVar[tuple[str, ...]] = (
        *ReaderABC.COUNTERS,
        "received",
        "decoded",
        "unknown",
        "checksum_errors",
        "framing_errors",
        "decode_errors",
        "bytes",
        "dropped_bytes",
        "missing_checksums",
        "unmatched_values",
    )
    """``received = decoded + unknown + checksum_errors + framing_errors + decode_errors``
    (a framing error is one run of bytes that was not a frame); the names match the CAN reader's
    where they mean the same."""
    KEYED_COUNTERS: ClassVar[tuple[str, ...]] = ("unknown_ids",)

    def __init__(
        self,
        name: str,
        url: str,
        serial_options: Mapping[str, Any] | None,
        defs: SerialDefinitions | str | Path,
        sink: Sink,
        *,
        flow_name_template: str = DEFAULT_FLOW_NAME_TEMPLATE,
        byte_time_ns: int | None = None,
        clock: Callable[[], int] | None = None,
        on_error: ErrorCallback | None = None,
        retry: RetryPolicy | None = None,
        rng: random.Random | None = None,
        poll_interval: float = 0.1,
        key_limit: int = 1024,
        journal: SerialJournal | None = None,
    ) -> None:
        super().__init__(
            name,
            sink,
            on_error=on_error,
            retry=retry,
            rng=rng,
            poll_interval=poll_interval,
            key_limit=key_limit,
        )
        self.journal = journal
        if journal is not None:
            journal.attach(self.counters)
        if not url:
            raise ConfigError("a serial device needs a port", key="port")
        self.url = url
        self.options = normalize_serial_options(serial_options)
        if not isinstance(defs, SerialDefinitions):
            defs = load_definitions(defs)
        self.defs = defs
        self._codec = SerialCodec(defs, device=name, flow_name_template=flow_name_template)
        if byte_time_ns is None:
            local = "://" not in url and not os.path.realpath(url).startswith("/dev/pts/")
            byte_time_ns = _char_time_ns(self.options) if local else 0
        self.byte_time_ns = byte_time_ns
        self._fault_budget = _FaultLog()
        self._stream = FrameStream(
            self._codec,
            byte_ns=byte_time_ns,
            unknown_limit=key_limit,
            on_fault=self._log_fault if log.isEnabledFor(logging.DEBUG) else None,
        )
        self._clock = clock or host_clock().now_ns
        self._port: serial.SerialBase | None = None
        self._fd: int | None = None
        self._seen: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self._seen_unknown: dict[object, int] = {}

    @classmethod
    def from_config(
        cls,
        device: Any,
        sink: Sink,
        *,
        flow_name_template: str = DEFAULT_FLOW_NAME_TEMPLATE,
        **kwargs: Any,
    ) -> SerialReader:
        """Build a reader from an agent-config serial device (``daq_agent.config.SerialConfig``).

        Args:
            device: has ``name``, ``port``, ``defs`` and the line settings ``baudrate``,
                ``bytesize``, ``parity``, ``stopbits``, ``rtscts``, ``xonxoff``.
            sink: receives every sample.
            flow_name_template: the config's ``naming.serial_flow``.
            **kwargs: further :class:`SerialReader` keyword arguments (``on_error``, ``retry``…).

        Returns:
            The reader, not started.

        Raises:
            ConfigError: invalid line settings, definitions or template (naming the device).
        """
        options = {
            key: getattr(device, key) for key in sorted(SERIAL_OPTIONS) if hasattr(device, key)
        }
        try:
            return cls(
                name=device.name,
                url=device.port,
                serial_options=options,
                defs=device.defs,
                sink=sink,
                flow_name_template=flow_name_template,
                **kwargs,
            )
        except ConfigError as exc:
            if exc.source is not None:
                raise
            key = f"serial[{device.name}].{exc.key}" if exc.key else f"serial[{device.name}]"
            raise ConfigError(exc.reason, key=key) from exc

    @property
    def codec(self) -> SerialCodec:
        """The compiled frame definitions."""
        return self._codec

    @property
    def flows(self) -> list[FlowConfig]:
        """One flow per frame type of this device."""
        return self._codec.flows

    def start(self) -> None:
        """Start the journal (if any), then the reader thread."""
        if self.journal is not None and not self.stopping:
            self.journal.start()
        super().start()

    def stop(self, timeout: float | None = 5.0) -> bool:
        """Stop the reader thread, then write out and close the journal (if any)."""
        stopped = super().stop(timeout)
        if self.journal is not None:
            self.journal.close()
        return stopped

    def __repr__(self) -> str:
        return f"SerialReader({self.name!r}, {self.url!r}, state={self.state.value})"

    # -- hooks ---------------------------------------------------------------------------------

    def _open(self) -> None:
        # A device path or socket:// has a descriptor: wait for data with select() and read
        # what has arrived without blocking (timeout 0), one read per burst whatever the
        # handler's in_waiting says (socket:// reports 0 or 1). Other handlers (loop://,
        # rfc2217://…) block in read() for up to the poll interval.
        selectable = os.name == "posix" and (
            "://" not in self.url or self.url.startswith("socket://")
        )
        timeout = 0 if selectable else self.poll_interval
        try:
            port = serial.serial_for_url(self.url, timeout=timeout, **self.options)
        except ValueError as exc:  # pyserial: unknown URL scheme or invalid line settings
            raise ConfigError(f"cannot open {self.url!r}: {exc}", key="port") from exc
        except _PORT_ERRORS as exc:
            raise ReaderError(f"cannot open {self.url!r}: {exc}") from exc
        fd = None
        if selectable:
            try:
                fd = port.fileno()
            except (OSError, AttributeError, ValueError):
                fd = None
            if not isinstance(fd, int) or fd < 0:
                port.close()
                raise ReaderError(f"{self.url!r} has no file descriptor to wait on")
        self._port = port
        self._fd = fd
        self._stream.reset(self._clock())  # no frame is dated before the port opened

    def _read(self, timeout: float) -> bool:
        port = self._port
        if port is None:
            raise ReaderError(f"{self.url!r} is not open")
        try:
            fd = self._fd
            if fd is not None:
                ready, _, _ = select.select([fd], [], [], timeout)
                if not ready:
                    return True
                data = port.read(_MAX_READ)  # non-blocking: what has arrived
                if not data:
                    return True
            else:
                if port.timeout != timeout:
                    port.timeout = timeout
                # every pyserial backend has in_waiting; the stubs' SerialBase does not declare it
                waiting: int = port.in_waiting  # type: ignore[attr-defined]
                data = port.read(min(waiting, _MAX_READ) if waiting > 0 else 1)
        except _READ_ERRORS as exc:
            raise ReaderError(f"{self.url!r}: {exc}") from exc
        if data:
            now = self._clock()
            if self.journal is not None:
                self.journal.submit(((now, data),))
            for sample in self._stream.feed(data, now):
                self._emit(sample)
            self._sync_counters()
        return True

    def _close(self) -> None:
        port, self._port = self._port, None
        self._fd = None
        if port is not None:
            try:
                port.close()
            except (serial.SerialException, OSError):
                pass  # the device is already gone

    def _log_fault(self, frame: bytes, fault: FrameFault) -> None:
        """At DEBUG (``-vv``): each refused frame as text, at most 20 a second (and how many were
        not shown); the counters have them all."""
        shown = self._fault_budget.take()
        if shown is None:
            return
        skipped = f" ({shown} more not shown)" if shown else ""
        log.debug("serial %s: %s%s", self.name, self._codec.describe_fault(frame, fault), skipped)

    def _wake(self) -> None:
        port = self._port
        cancel = getattr(port, "cancel_read", None)
        if cancel is not None:
            try:
                cancel()
            except (OSError, ValueError, TypeError):
                pass  # closing concurrently; the poll interval bounds the wait anyway

    # -- counters ------------------------------------------------------------------------------

    def _sync_counters(self) -> None:
        stream = self._stream
        seen = self._seen
        counters = self.counters
        received = 0
        for name in COUNTER_NAMES:
            value = getattr(stream, name)
            delta = value - seen[name]
            if delta:
                counters.add(_READER_COUNTER[name], delta)
                seen[name] = value
                if name in _FRAME_OUTCOMES:
                    received += delta
        if received:
            counters.add("received", received)
        if stream.unknown_ids != self._seen_unknown:
            for key, count in stream.unknown_ids.items():
                delta = count - self._seen_unknown.get(key, 0)
                if delta:
                    counters.add_key("unknown_ids", key, delta)
            self._seen_unknown = dict(stream.unknown_ids)
