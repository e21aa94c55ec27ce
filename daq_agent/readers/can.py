"""CanReader: one python-can bus, decoded frame by frame into samples.

Every received frame is accounted for::

    received == decoded + unknown + decode_errors + error_frames + remote_frames

* error frames feed the bus-health counters (``error_frames`` and the ``error_classes`` map, keyed
  by the SocketCAN error class bits in the arbitration id) and are never decoded as data;
* remote frames carry no data: counted (``remote_frames``, per id) and never decoded;
* unknown ids, wrong lengths and undecodable frames are counted per id in bounded maps
  (``unknown_ids``, ``decode_error_ids``), never raised.

Timestamps are the driver's (``Message.timestamp``, float seconds, converted to ns at the
interface's resolution); an interface that gives none (0) gets the host clock.

When the interface fails (``can.CanError`` or ``OSError`` from ``recv``) or is shut down under the
reader, :class:`~daq_agent.readers.base.ReaderABC` reports it, backs off and reopens the bus.
"""

from __future__ import annotations

import logging
import os
import random
import socket
from collections.abc import Mapping
from typing import Any, ClassVar, Final, Protocol

import can

from daq_agent.core.backoff import RetryPolicy
from daq_agent.core.clock import HostClock, host_clock, seconds_to_ns
from daq_agent.core.errors import ConfigError, DecodeError
from daq_agent.core.sample import Sample
from daq_agent.readers.base import ErrorCallback, ReaderABC, Sink
from daq_agent.readers.journal import CanJournal

__all__ = ["ERROR_CLASSES", "CanReader", "FrameDecoder", "MessageProcessor", "frame_key"]

log = logging.getLogger(__name__)

ERROR_CLASSES: Final = {
    0x001: "tx_timeout",
    0x002: "lost_arbitration",
    0x004: "controller",
    0x008: "protocol_violation",
    0x010: "transceiver",
    0x020: "no_ack",
    0x040: "bus_off",
    0x080: "bus_error",
    0x100: "restarted",
}
"""SocketCAN error classes (``CAN_ERR_*``, ``linux/can/error.h``) found in an error frame's id."""

_MAX_BURST: Final = 1024
"""Frames handled per ``_read`` call before the loop checks for a stop request again."""
RECEIVE_BUFFER_BYTES: Final = 4 * 2**20
"""The receive buffer asked for on a socket-based bus (SocketCAN, udp_multicast): the kernel's
default (~208 KiB, some 250 frames) overflows after a few tens of ms without a read, and a frame
the kernel drops never reaches the reader. The kernel caps it at ``net.core.rmem_max``."""


def enlarge_receive_buffer(bus: can.BusABC, size: int = RECEIVE_BUFFER_BYTES) -> int | None:
    """Ask for a receive buffer of at least ``size`` bytes on the bus's socket, never shrinking it.

    Returns:
        The buffer size the kernel reports afterwards, or None when the bus has no socket.
    """
    try:
        fd = bus.fileno()
    except (NotImplementedError, AttributeError, OSError, ValueError):
        return None
    if not isinstance(fd, int) or fd < 0:
        return None
    try:
        sock = socket.socket(fileno=os.dup(fd))  # a duplicate: closing it leaves the bus's own
    except OSError:
        return None  # not a socket
    try:
        current = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        if current < size:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
    except OSError:
        return None
    finally:
        sock.close()


class FrameDecoder(Protocol):
    """What a CAN reader needs from a decoder (``daq_agent.decode.CanDecoder``).

    A decoder may also have ``session(counters) -> FrameDecoder``: the reader then decodes with
    the session, which holds per-reader state (J1939 transport sessions) and counts into the
    reader's counters (unknown PDUs of a container, transport timeouts and aborts).
    """

    def decode(
        self, frame_id: int, is_extended: bool, data: bytes, timestamp_ns: int
    ) -> Sample | tuple[Sample, ...] | None:
        """The sample for one frame; None if the id is unknown. A tuple: the samples of a
        container frame, or ``()`` for a frame taken into a J1939 transport-protocol message
        (counted ``transport_frames``; the message's sample comes with its last frame).

        Raises:
            DecodeError: the frame has the wrong length or cannot be decoded.
        """
        ...


def frame_key(frame_id: int, is_extended: bool) -> str:
    """A readable per-id counter key: ``"1F0"`` for a standard id, ``"18FF0001x"`` extended."""
    return f"{frame_id:08X}x" if is_extended else f"{frame_id:03X}"


class MessageProcessor:
    """Turns ``can.Message`` objects into samples and counts every one (shared by CAN readers).

    Args:
        reader: the reader whose counters and sink are used.
        decoder: the frame decoder.
        clock: the host clock for frames without a driver timestamp.
        timestamp_resolution_ns: the driver timestamps' resolution, ns.
    """

    __slots__ = ("_clock", "_counters", "_decoder", "_emit", "_resolution_ns", "last_decode_error")

    def __init__(
        self,
        reader: ReaderABC,
        decoder: FrameDecoder,
        clock: HostClock,
        timestamp_resolution_ns: int,
    ) -> None:
        self._counters = reader.counters
        for name in ("received", "decoded", "unknown", "decode_errors"):
            reader.counters.values.setdefault(name, 0)
        self._emit = reader._emit
        session = getattr(decoder, "session", None)
        self._decoder: FrameDecoder = session(reader.counters) if callable(session) else decoder
        self._clock = clock
        self._resolution_ns = timestamp_resolution_ns
        self.last_decode_error = ""

    def timestamp_ns(self, msg: can.Message) -> int:
        """The frame's timestamp in ns: the driver's, or the host clock's when it gave none."""
        ts = msg.timestamp
        if ts:
            try:
                return seconds_to_ns(ts, self._resolution_ns)
            except (ValueError, TypeError):
                pass
        return self._clock.now_ns()

    def process(self, msg: can.Message, timestamp_ns: int | None = None) -> None:
        """Count, decode and emit one frame; never raises for a bad frame."""
        counters = self._counters
        values = counters.values
        values["received"] += 1
        if msg.is_error_frame:
            counters.add("error_frames")
            classes = msg.arbitration_id & 0x1FF
            if not classes:
                counters.add_key("error_classes", "unspecified")
            else:
                for bit, name in ERROR_CLASSES.items():
                    if classes & bit:
                        counters.add_key("error_classes", name)
            return
        frame_id = msg.arbitration_id
        extended = msg.is_extended_id
        if msg.is_remote_frame:
            counters.add("remote_frames")
            counters.add_key("remote_ids", frame_key(frame_id, extended))
            return
        if timestamp_ns is None:
            timestamp_ns = self.timestamp_ns(msg)
        try:
            sample = self._decoder.decode(frame_id, extended, bytes(msg.data), timestamp_ns)
        except DecodeError as exc:
            counters.add("decode_errors")
            counters.add_key("decode_error_ids", frame_key(frame_id, extended))
            self.last_decode_error = f"{frame_key(frame_id, extended)}: {exc}"
            return
        except Exception as exc:  # a decoder bug must not kill the bus; count it as a failure
            counters.add("decode_errors")
            counters.add_key("decode_error_ids", frame_key(frame_id, extended))
            self.last_decode_error = f"{frame_key(frame_id, extended)}: {type(exc).__name__}: {exc}"
            if counters.get("decoder_bugs") == 0:
                log.exception("decoder raised %s (not a DecodeError)", type(exc).__name__)
            counters.add("decoder_bugs")
            return
        if sample is None:
            counters.add("unknown")
            counters.add_key("unknown_ids", frame_key(frame_id, extended))
            return
        if type(sample) is tuple:  # a container's PDUs, or a J1939 transport frame
            if not sample:
                counters.add("transport_frames")
                return
            values["decoded"] += 1
            if len(sample) > 1:
                counters.add("extra_samples", len(sample) - 1)
            for one in sample:
                self._emit(one)
            return
        values["decoded"] += 1
        self._emit(sample)  # type: ignore[arg-type]


class CanReader(ReaderABC):
    """Reads one CAN bus through python-can, decodes each frame and hands samples to a sink.

    Args:
        name: the bus alias; the thread is ``daq-reader[<name>]``.
        bus_kwargs: keyword arguments for ``can.Bus``: ``interface``, ``channel``, ``bitrate``,
            ``fd``, ``data_bitrate``, ``receive_own_messages``, ``can_filters`` and any
            interface-specific option.
        decoder: decodes a frame into a sample (None for an unknown id).
        sink: receives every sample, on the reader thread.
        on_error: called with (reader, error) whenever the bus fails.
        retry: delays between reopen attempts (default: the readers' ``READER_RETRY``).
        rng: the random source of the back-off's jitter.
        poll_interval: the longest one ``recv`` waits, seconds (bounds the stop latency).
        timestamp_resolution_ns: resolution of the driver's timestamps (1000: microseconds).
        clock: host clock for frames without a driver timestamp (default: the process clock).
        key_limit: the most distinct ids held in each per-id map.
        journal: records every received frame (error and remote frames included) on its own
            thread (:mod:`daq_agent.readers.journal`); started and closed with the reader.

    Raises:
        ConfigError: an argument is invalid.

    Counters: ``received``, ``decoded``, ``unknown``, ``decode_errors``, ``error_frames``,
    ``remote_frames``, ``opens``, ``reopens``, ``failures``, ``sink_errors``; per-id maps
    ``unknown_ids``, ``decode_error_ids``, ``remote_ids``, ``error_classes``; ``last_error``.
    Container messages add ``extra_samples`` (samples beyond one per decoded frame),
    ``unknown_pdus`` and ``pdu_errors``; J1939 buses add ``transport_frames`` (TP.CM/TP.DT frames
    taken into a multi-packet message), ``tp_timeouts``, ``tp_aborts`` (messages lost) and the
    per-PGN maps ``unknown_pgns`` and ``tp_error_pgns``.
    ``unknown_ids``, ``decode_error_ids``, ``remote_ids``, ``error_classes``; ``last_error``;
    with a journal, its ``journal_*`` counters.
    """

    kind: ClassVar[str] = "can"
    COUNTERS: ClassVar[tuple[str, ...]] = (
        *ReaderABC.COUNTERS,
        "received",
        "decoded",
        "unknown",
        "decode_errors",
        "error_frames",
        "remote_frames",
    )
    KEYED_COUNTERS: ClassVar[tuple[str, ...]] = (
        "unknown_ids",
        "decode_error_ids",
        "remote_ids",
        "error_classes",
        "unknown_pgns",
        "tp_error_pgns",
    )

    def __init__(
        self,
        name: str,
        bus_kwargs: Mapping[str, Any],
        decoder: FrameDecoder,
        sink: Sink,
        *,
        on_error: ErrorCallback | None = None,
        retry: RetryPolicy | None = None,
        rng: random.Random | None = None,
        poll_interval: float = 0.1,
        timestamp_resolution_ns: int = 1000,
        clock: HostClock | None = None,
        key_limit: int = 1024,
        journal: CanJournal | None = None,
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
        if not isinstance(bus_kwargs, Mapping):
            raise ConfigError(f"bus {name!r}: bus options must be a mapping")
        if timestamp_resolution_ns < 1:
            raise ConfigError(
                f"timestamp_resolution_ns must be >= 1, got {timestamp_resolution_ns}"
            )
        self.bus_kwargs: dict[str, Any] = dict(bus_kwargs)
        self._bus: can.BusABC | None = None
        self._processor = MessageProcessor(
            self, decoder, clock or host_clock(), timestamp_resolution_ns
        )

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

    @property
    def bus(self) -> can.BusABC | None:
        """The open python-can bus, or None between opens."""
        return self._bus

    @property
    def last_decode_error(self) -> str:
        """The text of the most recent decode failure ("" if none)."""
        return self._processor.last_decode_error

    def _open(self) -> None:
        try:
            self._bus = can.Bus(**self.bus_kwargs)
        except can.CanInterfaceNotImplementedError as exc:
            raise ConfigError(f"bus {self.name!r}: {exc}") from exc
        except TypeError as exc:
            raise ConfigError(f"bus {self.name!r}: invalid bus options: {exc}") from exc
        buffer = enlarge_receive_buffer(self._bus)
        log.info(
            "reader %s: opened %s%s",
            self.name,
            self._describe_bus(),
            "" if buffer is None else f" (receive buffer {buffer // 1024} KiB)",
        )

    def _read(self, timeout: float) -> bool:
        bus = self._bus
        if bus is None:  # closed under us
            raise can.CanOperationError("bus is closed")
        msg = bus.recv(timeout)
        if msg is None:
            return True
        process = self._processor.process
        journal = self.journal
        if journal is None:
            process(msg)
            for _ in range(_MAX_BURST):
                msg = bus.recv(0.0)
                if msg is None:
                    break
                process(msg)
            return True
        frames = [msg]  # handed to the journal's thread in one piece per burst
        try:
            process(msg)
            for _ in range(_MAX_BURST):
                msg = bus.recv(0.0)
                if msg is None:
                    break
                frames.append(msg)
                process(msg)
        finally:
            journal.submit(frames)
        return True

    def _close(self) -> None:
        bus, self._bus = self._bus, None
        if bus is not None:
            bus.shutdown()

    def _describe_bus(self) -> str:
        kw = self.bus_kwargs
        parts = [str(kw.get("interface", "?")), str(kw.get("channel", ""))]
        if kw.get("fd"):
            parts.append("fd")
        return " ".join(p for p in parts if p)
