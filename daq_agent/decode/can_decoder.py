"""CAN databases → flows, and the decoder compiled once per message.

:class:`CanDecoder` turns the messages of one bus's databases into flows (one per message, one
channel per signal) and compiles, for every message, a small Python function that decodes a payload
with integer operations on ``int.from_bytes`` of the payload. Decoding a frame costs one dict lookup
(keyed by ``(is_extended, frame_id)`` folded into one int) and one call; cantools is not called per
frame. The values equal cantools' ``decode_message(..., decode_choices=False, scaling=True)``.

Channel types follow the signal definition:

* float signals, and scaled signals whose scale or offset is not an integer → ``DOUBLE``;
* signals with a value table (choices, ≤ 32 bits) → ``ENUM``; a negative key is sent as its 32-bit
  two's complement with ``is_signed`` set, and the sample carries that same key;
* 1-bit signals without a value table or scaling → ``BOOL``;
* other integers → ``UINT_32``/``UINT_64`` when the scaled raw range is non-negative, else
  ``INT_32``/``INT_64``; a range no integer type holds → ``DOUBLE``.

Multiplexed messages are one flow with every signal; a signal absent from a frame is ``None``. A
signal name used in several branches of one multiplexer (KCD's ``StationId7``) is one channel when
the branches agree on its type, unit and enum (else the later one is numbered, ``Station_2``).

AUTOSAR container messages decode their contained PDUs into the contained messages' flows; J1939
messages match by PGN (:mod:`daq_agent.decode.j1939`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import struct
import threading
import types
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from daq_agent.core.errors import ConfigError, DecodeError
from daq_agent.core.model import (
    ChannelConfig,
    ChannelDataType,
    ChannelEnumType,
    FlowConfig,
)
from daq_agent.core.sample import Sample
from daq_agent.decode import j1939

__all__ = [
    "DEFAULT_FLOW_NAME_TEMPLATE",
    "CanDecoder",
    "CompiledMessage",
    "Container",
    "Counters",
    "FrameDecoder",
    "J1939Session",
    "Tally",
    "derive_flows",
    "derive_flows_fingerprint",
    "enum_key",
    "enum_labels",
    "frame_key",
]

log = logging.getLogger("daq_agent.decode")

DEFAULT_FLOW_NAME_TEMPLATE = "{bus}.{message}"
"""Flow names know ``{bus}``, ``{message}`` and ``{frame_id}`` (an int: ``{frame_id:X}``)."""

_EXTENDED_FLAG = 0x80000000
_U32 = 0xFFFFFFFF
_FLOAT_FORMATS = {16: ">e", 32: ">f", 64: ">d"}

DecodeFunction = Callable[[bytes, int], Sample]


def _fast_sample_setters() -> dict[str, Any] | None:
    """Slot setters that build a Sample without the frozen dataclass ``__init__`` (2x faster).

    The hot path fills the three slots directly; the result equals ``Sample(...)``. If Sample ever
    stops being a slotted class with exactly these fields, the decoder calls the constructor.
    """
    names = [f.name for f in dataclasses.fields(Sample)]
    descriptors = [Sample.__dict__.get(name) for name in names]
    if names != ["flow", "timestamp_ns", "values"] or not all(
        isinstance(d, types.MemberDescriptorType) for d in descriptors
    ):
        return None
    return {
        "_new": object.__new__,
        "_set_flow": descriptors[0].__set__,  # type: ignore[union-attr]
        "_set_timestamp": descriptors[1].__set__,  # type: ignore[union-attr]
        "_set_values": descriptors[2].__set__,  # type: ignore[union-attr]
    }


_FAST_SAMPLE = _fast_sample_setters()
ValuesFunction = Callable[[bytes], tuple[Any, ...]]


def enum_key(enum_type: ChannelEnumType) -> int:
    """The key of an enum value as a person reads it: ``-1`` for a signed key sent as 0xFFFFFFFF.

    On the wire (and in a sample) a negative key is its 32-bit two's complement with
    ``is_signed`` set; this turns it back into the signed number of the database's value table.
    """
    key = enum_type.key
    if enum_type.is_signed and key & 0x80000000:
        return key - (1 << 32)
    return key


def enum_labels(channel: ChannelConfig) -> dict[int, str] | None:
    """``{sample value: label}`` of an enum channel (keys as samples carry them), else None."""
    if channel.data_type is not ChannelDataType.ENUM or not channel.enum_types:
        return None
    return {e.key: e.name for e in channel.enum_types}


def frame_key(frame_id: int, is_extended: bool) -> int:
    """The lookup key of a frame: the id, with bit 31 set for 29-bit ids."""
    return frame_id | _EXTENDED_FLAG if is_extended else frame_id


@dataclass(frozen=True, slots=True)
class CompiledMessage:
    """One message compiled for decoding.

    Attributes:
        name: the message name in its database.
        frame_id: the CAN id (without the extended flag).
        is_extended: True for a 29-bit id.
        is_fd: True for a CAN FD message.
        length: the payload length in bytes the database declares.
        flow: the flow config derived from the message.
        signal_names: the database's signal names, in flow channel order (one per channel; a
            name shared by multiplexer branches once).
        header_id: for a PDU contained in an AUTOSAR container message, its header id (then
            :attr:`frame_id` is the header id too); else None.

    The decoding functions (:attr:`decode`, :attr:`values`) are generated and compiled on first
    use, once: a database of thousands of messages costs nothing for the messages never seen.
    """

    name: str
    frame_id: int
    is_extended: bool
    is_fd: bool
    length: int
    flow: FlowConfig
    signal_names: tuple[str, ...]
    _unit: _CodeUnit = dataclasses.field(repr=False, compare=False)
    header_id: int | None = None

    @property
    def channel_names(self) -> tuple[str, ...]:
        """The flow's channel names, in order (unique, unlike signal names in a messy DBC)."""
        return tuple(channel.name for channel in self.flow.channels)

    @property
    def decode(self) -> DecodeFunction:
        """``decode(data, timestamp_ns) -> Sample`` (raises DecodeError)."""
        return self._unit.decode or self._unit.build()[0]

    @property
    def values(self) -> ValuesFunction:
        """``values(data) -> tuple`` of cantools-equal scaled values per signal.

        Enum signals are numeric, absent multiplexed signals None; the function raises
        DecodeError like :attr:`decode`.
        """
        return self._unit.values or self._unit.build()[1]

    @property
    def source(self) -> str:
        """The generated Python source, for inspection."""
        self._unit.build()
        return self._unit.source

    def signals(self, data: bytes, *, choices: bool = False) -> dict[str, Any]:
        """The scaled values of the signals present in ``data``, by channel name.

        The channel name is the database's signal name, numbered (``Speed_2``) only when a
        message defines a signal name twice.

        Args:
            data: the payload.
            choices: give an enum signal's label (``"Closed"``) instead of its number when the
                value table names the raw value, as cantools' ``decode_choices=True`` does.

        Raises:
            DecodeError: the payload is too short or its multiplexer value is not defined.
        """
        values = self.values(data)
        if choices and any(c.data_type is ChannelDataType.ENUM for c in self.flow.channels):
            raw = self.decode(data, 0).values
            labelled = list(values)
            for i, channel in enumerate(self.flow.channels):
                labels = enum_labels(channel)
                key = raw[i]
                if labels is not None and isinstance(key, int):
                    labelled[i] = labels.get(key, values[i])
            values = tuple(labelled)
        return {
            name: value
            for name, value in zip(self.channel_names, values, strict=False)
            if value is not None
        }


class CanDecoder:
    """Decodes the frames of one bus with its databases.

    Args:
        bus: the bus alias, part of every flow name.
        databases: cantools databases (see :func:`daq_agent.decode.dbc.load_database`). When two
            messages share ``(is_extended, frame_id)``, the last one wins, as in cantools.
        flow_name_template: how flow names are built (``{bus}``, ``{message}``, ``{frame_id}``).
        protocol: ``"j1939"``: every 29-bit message is J1939; None or ``"can"``: only those of a
            DBC marked J1939 (``ProtocolType``) or whose ``VFrameFormat`` is ``J1939PG``.
        dm1_dtcs: on a J1939 bus, how many DTCs of a DM1 get channels.

    Attributes:
        bus: the bus alias.
        flows: one flow per message, in database order (a container's PDUs where the container
            is; on a J1939 bus the built-in DM1 flow last).
        messages: the compiled messages, in database order (contained PDUs included).
        containers: the AUTOSAR container messages, by frame key.
        j1939: whether the bus has J1939 messages (then :meth:`session` follows transports).
        dm1: the built-in DM1 decoder of a J1939 bus, else None.
        warnings: what was worked around while compiling (also logged).

    Raises:
        ConfigError: the flow name template, the protocol or ``dm1_dtcs`` is invalid.
    """

    __slots__ = (
        "_by_key",
        "_own_session",
        "_pgn",
        "_pgn_sa",
        "_table",
        "bus",
        "containers",
        "dm1",
        "flows",
        "j1939",
        "messages",
        "warnings",
    )

    def __init__(
        self,
        bus: str,
        databases: Sequence[Any],
        *,
        flow_name_template: str = DEFAULT_FLOW_NAME_TEMPLATE,
        protocol: str | None = None,
        dm1_dtcs: int = j1939.DEFAULT_DM1_DTCS,
    ) -> None:
        if protocol not in (None, "can", "j1939"):
            raise ConfigError(f"unknown protocol {protocol!r} (known: can, j1939)", key="protocol")
        if dm1_dtcs < 0:
            raise ConfigError(f"dm1_dtcs must be >= 0, got {dm1_dtcs}")
        self.bus = bus
        self.warnings: list[str] = []
        by_key: dict[int, Any] = {}
        j1939_keys: set[int] = set()
        for database in databases:
            database_j1939 = protocol == "j1939" or j1939.database_is_j1939(database)
            for message in database.messages:
                key = frame_key(message.frame_id, message.is_extended_frame)
                if j1939.message_is_j1939(message, database_j1939):
                    j1939_keys.add(key)
                else:
                    j1939_keys.discard(key)
                previous = by_key.pop(key, None)
                if previous is not None:
                    self._warn(
                        f"messages {previous.name!r} and {message.name!r} share frame id "
                        f"{_id_text(message.frame_id, message.is_extended_frame)}; "
                        f"{message.name!r} is used"
                    )
                by_key[key] = message
        compiled: list[CompiledMessage] = []
        used_names: set[str] = set()
        self._by_key: dict[int, CompiledMessage] = {}
        self.containers: dict[int, Container] = {}
        self.j1939 = protocol == "j1939" or bool(j1939_keys)
        self._pgn: dict[int, J1939Entry] = {}
        self._pgn_sa: dict[int, J1939Entry] = {}
        pgn_names: dict[int, str] = {}
        for key, message in by_key.items():
            if key in j1939_keys:
                pgn = j1939.pgn_of(message.frame_id)
                if pgn == j1939.DM1_PGN:
                    self._warn(
                        f"message {message.name!r} is DM1 (PGN 0xFECA); the built-in DM1 "
                        "decoder (every DTC) is used instead"
                    )
                    continue
                pdu1 = (message.frame_id >> 16) & 0xFF < 240
                extra = [_SOURCE_ADDRESS, *([_DESTINATION_ADDRESS] if pdu1 else [])]
                flow_name = self._unique_flow(flow_name_template, message, used_names)
                made = _compile(message, flow_name, self._warn, extra_channels=extra)
                compiled.append(made)
                entry = _j1939_entry(made, pdu1)
                self._pgn_sa[pgn << 8 | (message.frame_id & 0xFF)] = entry
                if pgn in pgn_names:
                    self._warn(
                        f"messages {pgn_names[pgn]!r} and {message.name!r} share PGN 0x{pgn:05X}; "
                        f"each is used for its own source address, {message.name!r} for others"
                    )
                pgn_names[pgn] = message.name
                self._pgn[pgn] = entry
                continue
            if not getattr(message, "is_container", False):
                flow_name = self._unique_flow(flow_name_template, message, used_names)
                made = _compile(message, flow_name, self._warn)
                compiled.append(made)
                self._by_key[key] = made
                continue
            contained: dict[int, CompiledMessage] = {}
            for part in message.contained_messages or ():
                header = int(part.header_id)
                flow_name = self._unique_flow(flow_name_template, part, used_names, frame_id=header)
                made = _compile(part, flow_name, self._warn, header_id=header)
                compiled.append(made)
                contained[header] = made
            self.containers[key] = Container(message, contained)
        self.messages = compiled
        self.flows = [c.flow for c in compiled]
        self.dm1: j1939.Dm1Decoder | None = None
        if self.j1939:
            dm1_flow = _flow_name(flow_name_template, bus=bus, name="DM1", frame_id=0x18FECA00)
            if dm1_flow in used_names:
                dm1_flow += "_builtin"
                self._warn(f"flow name of DM1 is taken; the built-in DM1 flow is {dm1_flow!r}")
            self.dm1 = j1939.Dm1Decoder(dm1_flow, dm1_dtcs)
            self.flows.append(self.dm1.flow)
            self._pgn[j1939.DM1_PGN] = _dm1_entry(self.dm1)
        self._own_session: J1939Session | None = None
        self._table: dict[int, DecodeFunction] = {
            key: self._first_use(c) for key, c in self._by_key.items()
        }
        for key, container in self.containers.items():
            self._table[key] = container.decode  # type: ignore[assignment]

    def _unique_flow(
        self, template: str, message: Any, used_names: set[str], *, frame_id: int | None = None
    ) -> str:
        ident = int(message.frame_id) if frame_id is None else frame_id
        extended = bool(message.is_extended_frame) and frame_id is None
        flow_name = _flow_name(template, bus=self.bus, name=message.name, frame_id=ident)
        if flow_name in used_names:
            width = 8 if extended else 3
            base = f"{flow_name}_0x{ident:0{width}X}"
            unique, number = base, 2
            while unique in used_names:
                unique, number = f"{base}_{number}", number + 1
            self._warn(
                f"flow name {flow_name!r} is taken; message {message.name!r} "
                f"({_id_text(ident, extended)}) becomes {unique!r}"
            )
            flow_name = unique
        used_names.add(flow_name)
        return flow_name

    def session(self, counters: Counters) -> FrameDecoder:
        """The decoder one reader uses, counting into its ``counters``.

        Without container messages this is the decoder itself (no cost per frame). With them,
        a copy of the lookup table whose containers count the PDUs they cannot decode
        (``unknown_pdus``, ``pdu_errors``).
        """
        if self.j1939:
            return J1939Session(self, counters)
        if not self.containers:
            return self
        return _CountingSession(self, counters)

    def _first_use(self, message: CompiledMessage) -> DecodeFunction:
        """A table entry that compiles the message, replaces itself, and decodes."""
        key = frame_key(message.frame_id, message.is_extended)

        def decode_first(data: bytes, timestamp_ns: int) -> Sample:
            function = message.decode
            self._table[key] = function
            return function(data, timestamp_ns)

        return decode_first

    def compile_all(self) -> None:
        """Compile every message now rather than on its first frame."""
        for key, message in self._by_key.items():
            self._table[key] = message.decode
        for message in self.messages:
            message.decode  # noqa: B018 (contained PDUs: compiled by the property)

    def _warn(self, text: str) -> None:
        self.warnings.append(text)
        log.warning("bus %s: %s", self.bus, text)

    def decode(
        self, frame_id: int, is_extended: bool, data: bytes, timestamp_ns: int
    ) -> Sample | tuple[Sample, ...] | None:
        """Decode one frame into a sample of its flow (a container: a sample per known PDU).

        Args:
            frame_id: the CAN id.
            is_extended: True for a 29-bit id (an extended id ≤ 0x7FF is a different frame than
                the standard id of the same number).
            data: the payload; longer than the message is accepted (the excess ignored).
            timestamp_ns: the frame's time, nanoseconds since the Unix epoch.

        Returns:
            The sample, or None when no database defines the id. A container message gives a
            tuple of samples, one per contained PDU it knows, into the contained messages' flows
            (None when it knows none of them). On a J1939 bus, J1939 messages match by PGN and a
            transport-protocol frame gives ``()`` until its message is complete (this decoder
            keeps one transport session for these calls: a reader uses :meth:`session`).

        Raises:
            DecodeError: the payload is shorter than the message, or a multiplexer value is not
                defined by the database.
        """
        function = self._table.get(frame_id | _EXTENDED_FLAG if is_extended else frame_id)
        if function is None:
            if self.j1939:  # by PGN, with this decoder's own transport session (one thread)
                session = self._own_session
                if session is None:
                    session = self._own_session = J1939Session(self, Tally())
                return session.decode(frame_id, is_extended, data, timestamp_ns)
            return None
        return function(data, timestamp_ns)

    def message(self, frame_id: int, is_extended: bool) -> CompiledMessage | None:
        """The compiled message for an id, or None (also for a container message)."""
        return self._by_key.get(frame_key(frame_id, is_extended))

    def container(self, frame_id: int, is_extended: bool) -> Container | None:
        """The container message of an id, or None."""
        return self.containers.get(frame_key(frame_id, is_extended))

    def lookup_table(self) -> dict[int, CompiledMessage]:
        """A fresh ``frame_key → CompiledMessage`` map (for tools that need names per frame).

        It holds the messages matched by exact id: not container messages (:attr:`containers`)
        nor J1939 messages, which match by PGN through :meth:`session`.
        """
        return dict(self._by_key)


class Counters(Protocol):
    """Where a session counts (a reader's :class:`~daq_agent.readers.base.ReaderCounters`)."""

    def add(self, name: str, n: int = 1) -> None:
        """Count ``n`` more under ``name``."""
        ...

    def add_key(self, name: str, key: object, n: int = 1) -> None:
        """Count ``n`` more for ``key`` in the per-key map ``name``."""
        ...


class FrameDecoder(Protocol):
    """What a reader calls per frame (a :class:`CanDecoder` or one of its sessions)."""

    def decode(
        self, frame_id: int, is_extended: bool, data: bytes, timestamp_ns: int
    ) -> Sample | tuple[Sample, ...] | None:
        """A sample, several (a container), none yet (``()``: taken by a transport protocol),
        or None for an unknown id; raises DecodeError."""
        ...


class Container:
    """An AUTOSAR container message: a frame that carries several PDUs, each with a header.

    The headers are read by cantools' ``Message.unpack_container`` (as its
    ``decode_message(..., decode_containers=True)`` does); each known PDU is decoded by its own
    compiled message into its own flow.

    Attributes:
        name: the container's name.
        contained: the compiled contained messages, by header id.
    """

    __slots__ = ("_message", "contained", "name")

    def __init__(self, message: Any, contained: dict[int, CompiledMessage]) -> None:
        self._message = message
        self.name: str = message.name
        self.contained = contained

    def split(self, data: bytes) -> list[tuple[CompiledMessage | int, bytes]]:
        """The PDUs of a frame: ``(compiled message, payload)``, or ``(header id, payload)`` for
        a header the database does not define.

        Raises:
            DecodeError: the frame is longer than the container or a PDU runs past its end.
        """
        try:
            parts = self._message.unpack_container(bytes(data), allow_truncated=False)
        except Exception as exc:  # cantools' DecodeError, or a malformed header
            raise DecodeError(f"{self.name}: {exc}") from exc
        out: list[tuple[CompiledMessage | int, bytes]] = []
        for target, payload in parts:
            if isinstance(target, int):
                out.append((target, bytes(payload)))
            else:
                out.append((self.contained[int(target.header_id)], bytes(payload)))
        return out

    def decode(
        self, data: bytes, timestamp_ns: int, counters: Counters | None = None
    ) -> tuple[Sample, ...] | None:
        """One sample per known PDU; None when there is none.

        A PDU that does not decode (or an unknown header) is left out and counted in
        ``counters`` (``pdu_errors``, ``unknown_pdus``); when no PDU decodes and one failed, the
        frame fails.

        Raises:
            DecodeError: the container does not unpack, or every PDU failed.
        """
        samples: list[Sample] = []
        unknown = failed = 0
        error: DecodeError | None = None
        for target, payload in self.split(data):
            if isinstance(target, int):
                unknown += 1
                continue
            try:
                samples.append(target.decode(payload, timestamp_ns))
            except DecodeError as exc:
                failed += 1
                error = exc
        if counters is not None:
            if unknown:
                counters.add("unknown_pdus", unknown)
            if failed and samples:
                counters.add("pdu_errors", failed)
        if not samples:
            if error is not None:
                raise error
            return None
        return tuple(samples)


_SOURCE_ADDRESS = ChannelConfig(
    "source_address", ChannelDataType.UINT_32, "J1939 source address of the sender"
)
_DESTINATION_ADDRESS = ChannelConfig(
    "destination_address", ChannelDataType.UINT_32, "J1939 destination address (PDU1)"
)

J1939Entry = Callable[[bytes, int, int, int], Sample]
"""``entry(data, timestamp_ns, source_address, destination_address) -> Sample``."""


def _j1939_entry(message: CompiledMessage, pdu1: bool) -> J1939Entry:
    if pdu1:

        def pdu1_entry(data: bytes, timestamp_ns: int, source: int, destination: int) -> Sample:
            function: Any = message.decode
            sample: Sample = function(data, timestamp_ns, source, destination)
            return sample

        return pdu1_entry

    def pdu2_entry(data: bytes, timestamp_ns: int, source: int, destination: int) -> Sample:
        function: Any = message.decode
        sample: Sample = function(data, timestamp_ns, source)
        return sample

    return pdu2_entry


def _dm1_entry(dm1: j1939.Dm1Decoder) -> J1939Entry:
    def dm1_entry(data: bytes, timestamp_ns: int, source: int, destination: int) -> Sample:
        return dm1.decode(data, timestamp_ns, source)

    return dm1_entry


class Tally:
    """Counters for a decoder used without a reader (``CanDecoder.decode`` on a J1939 bus, the
    ``decode`` command): ``values`` by name, ``keyed`` maps by name."""

    __slots__ = ("keyed", "values")

    def __init__(self) -> None:
        self.values: dict[str, int] = {}
        self.keyed: dict[str, dict[object, int]] = {}

    def add(self, name: str, n: int = 1) -> None:
        self.values[name] = self.values.get(name, 0) + n

    def add_key(self, name: str, key: object, n: int = 1) -> None:
        counts = self.keyed.setdefault(name, {})
        counts[key] = counts.get(key, 0) + n


class J1939Session:
    """The decoder of one reader on a J1939 bus: PGN matching and transport reassembly.

    Frames whose exact id a non-J1939 message defines decode as on any bus. Other 29-bit frames
    match by PGN (a message defined for the frame's source address first, else the PGN's);
    TP.CM/TP.DT frames go to the :class:`~daq_agent.decode.j1939.TransportSession`; DM1 to the
    built-in decoder. An unknown PGN is counted per PGN (``unknown_pgns``).
    """

    __slots__ = ("_counters", "_pgn", "_pgn_sa", "_table", "transport")

    def __init__(self, decoder: CanDecoder, counters: Counters) -> None:
        table: dict[int, Callable[[bytes, int], Any]] = dict(decoder._table)
        for key, container in decoder.containers.items():
            table[key] = functools.partial(container.decode, counters=counters)
        self._table = table
        self._pgn = decoder._pgn
        self._pgn_sa = decoder._pgn_sa
        self._counters = counters
        self.transport = j1939.TransportSession(self._deliver, counters)

    def _deliver(
        self, pgn: int, source: int, destination: int, data: bytes, timestamp_ns: int
    ) -> Sample | None:
        entry = self._pgn_sa.get(pgn << 8 | source) or self._pgn.get(pgn)
        if entry is None:
            self._counters.add_key("unknown_pgns", f"{pgn:05X}")
            return None
        return entry(data, timestamp_ns, source, destination)

    def decode(
        self, frame_id: int, is_extended: bool, data: bytes, timestamp_ns: int
    ) -> Sample | tuple[Sample, ...] | None:
        function = self._table.get(frame_id | _EXTENDED_FLAG if is_extended else frame_id)
        if function is not None:
            result: Sample | tuple[Sample, ...] | None = function(data, timestamp_ns)
            return result
        if not is_extended:
            return None
        transport = self.transport
        if timestamp_ns > transport.next_deadline_ns:
            transport.expire(timestamp_ns)
        source = frame_id & 0xFF
        if (frame_id >> 16) & 0xFF < 240:  # PDU1: the PS byte is the destination address
            destination = (frame_id >> 8) & 0xFF
            pgn = (frame_id >> 8) & 0x3FF00
            if pgn == j1939.TP_CM_PGN:
                transport.connection(source, destination, data, timestamp_ns)
                return ()
            if pgn == j1939.TP_DT_PGN:
                done, sample = transport.packet(source, destination, data, timestamp_ns)
                return sample if done else ()
        else:
            destination = 0xFF
            pgn = (frame_id >> 8) & 0x3FFFF
        return self._deliver(pgn, source, destination, data, timestamp_ns)


class _CountingSession:
    """A decoder's table for one reader, whose containers count into the reader's counters."""

    __slots__ = ("_table",)

    def __init__(self, decoder: CanDecoder, counters: Counters) -> None:
        table: dict[int, Callable[[bytes, int], Any]] = dict(decoder._table)
        for key, container in decoder.containers.items():
            table[key] = functools.partial(container.decode, counters=counters)
        self._table = table

    def decode(
        self, frame_id: int, is_extended: bool, data: bytes, timestamp_ns: int
    ) -> Sample | tuple[Sample, ...] | None:
        function = self._table.get(frame_id | _EXTENDED_FLAG if is_extended else frame_id)
        if function is None:
            return None
        result: Sample | tuple[Sample, ...] | None = function(data, timestamp_ns)
        return result


def derive_flows(
    bus: str,
    databases: Sequence[Any],
    *,
    flow_name_template: str = DEFAULT_FLOW_NAME_TEMPLATE,
    protocol: str | None = None,
) -> list[FlowConfig]:
    """The flows of one bus (as :attr:`CanDecoder.flows`).

    Raises:
        ConfigError: the flow name template or the protocol is invalid.
    """
    return CanDecoder(
        bus, databases, flow_name_template=flow_name_template, protocol=protocol
    ).flows


def derive_flows_fingerprint(flows: Iterable[FlowConfig]) -> str:
    """A stable hash (64 hex digits) of flow and channel names, types, units and enum keys.

    Independent of the order of the flows; channel order counts (it is the order of the values).
    Descriptions do not count, so editing a comment keeps the ingestion client key.
    """
    canonical = sorted(
        [
            flow.name,
            [
                [
                    channel.name,
                    int(channel.data_type),
                    channel.unit or "",
                    [[e.name, e.key, e.is_signed] for e in channel.enum_types],
                    [[b.name, b.index, b.bit_count] for b in channel.bit_field_elements],
                ]
                for channel in flow.channels
            ],
        ]
        for flow in flows
    )
    text = json.dumps(canonical, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


# --- compilation ---------------------------------------------------------------------------


def _id_text(frame_id: int, is_extended: bool) -> str:
    return f"0x{frame_id:08X} (extended)" if is_extended else f"0x{frame_id:03X}"


def _flow_name(template: str, *, bus: str, name: str, frame_id: int) -> str:
    try:
        return template.format(bus=bus, message=name, frame_id=frame_id)
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise ConfigError(
            f"invalid flow name template {template!r}: {exc!r} "
            "(known fields: {bus}, {message}, {frame_id})",
            key="flow_name_template",
        ) from exc


@dataclass(frozen=True, slots=True)
class _Layout:
    """Where a signal's raw bits are, and how to turn them into values."""

    name: str
    source: str  # "v" (little-endian int of the payload) or "b" (big-endian int)
    shift: int
    length: int
    is_signed: bool
    is_float: bool
    scale: Any
    offset: Any
    identity: bool
    fits: bool
    byte_offset: int | None = None  # set when struct can read the signal (byte-aligned 8..64 bits)
    struct_code: str = ""


def _is_integral(value: Any) -> bool:
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _layout(signal: Any, message_length: int) -> _Layout:
    total_bits = 8 * message_length
    length = int(signal.length)
    if signal.byte_order == "big_endian":
        msb = 8 * (signal.start // 8) + (7 - signal.start % 8)
        shift = total_bits - msb - length
        source = "b"
        fits = shift >= 0 and msb >= 0
    else:
        shift = int(signal.start)
        source = "v"
        fits = shift + length <= total_bits
    conversion = signal.conversion
    scale = conversion.scale
    offset = conversion.offset
    is_float = bool(conversion.is_float)
    is_signed = bool(signal.is_signed)
    fits = fits and length > 0
    byte_offset: int | None = None
    code = ""
    if fits and length in (8, 16, 32, 64) and (not is_float or length in _FLOAT_FORMATS):
        # a big-endian signal starts at its MSB: bit 7 of its first byte when aligned
        if signal.start % 8 == (7 if signal.byte_order == "big_endian" else 0):
            byte_offset = signal.start // 8
        if is_float:
            code = {16: "e", 32: "f", 64: "d"}[length]
        else:
            code = {8: "b", 16: "h", 32: "i", 64: "q"}[length]
            code = code if is_signed else code.upper()
    return _Layout(
        name=signal.name,
        source=source,
        shift=shift,
        length=length,
        is_signed=is_signed,
        is_float=is_float,
        scale=scale,
        offset=offset,
        identity=scale == 1 and offset == 0,
        fits=fits,
        byte_offset=byte_offset,
        struct_code=code,
    )


def _channel(signal: Any, layout: _Layout, name: str) -> tuple[ChannelConfig, str]:
    """The channel of a signal and the kind of its sample value: double, int, bool or enum."""
    description = signal.comment if isinstance(signal.comment, str) and signal.comment else None
    unit = signal.unit or None
    choices = signal.conversion.choices
    if layout.is_float:
        return ChannelConfig(name, ChannelDataType.DOUBLE, description, unit), "double"
    if choices and layout.length <= 32:
        enum_types = [
            ChannelEnumType(str(text), int(key) & _U32, is_signed=int(key) < 0)
            for key, text in sorted(choices.items(), key=lambda item: int(item[0]))
        ]
        return (
            ChannelConfig(name, ChannelDataType.ENUM, description, unit, enum_types=enum_types),
            "enum",
        )
    if layout.length == 1 and layout.identity:
        return ChannelConfig(name, ChannelDataType.BOOL, description, unit), "bool"
    if not (_is_integral(layout.scale) and _is_integral(layout.offset)):
        return ChannelConfig(name, ChannelDataType.DOUBLE, description, unit), "double"
    if layout.is_signed:
        low, high = -(1 << (layout.length - 1)), (1 << (layout.length - 1)) - 1
    else:
        low, high = 0, (1 << layout.length) - 1
    scale, offset = int(layout.scale), int(layout.offset)
    ends = (low * scale + offset, high * scale + offset)
    lowest, highest = min(ends), max(ends)
    if lowest >= 0:
        if highest <= _U32:
            data_type = ChannelDataType.UINT_32
        elif highest < 1 << 64:
            data_type = ChannelDataType.UINT_64
        else:
            data_type = ChannelDataType.DOUBLE
    elif lowest >= -(1 << 31) and highest < 1 << 31:
        data_type = ChannelDataType.INT_32
    elif lowest >= -(1 << 63) and highest < 1 << 63:
        data_type = ChannelDataType.INT_64
    else:
        data_type = ChannelDataType.DOUBLE
    kind = "double_int" if data_type is ChannelDataType.DOUBLE else "int"
    return ChannelConfig(name, data_type, description, unit), kind


def _literal(value: Any, constants: dict[str, Any]) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        name = f"_k{len(constants)}"
        constants[name] = value
        return name
    if isinstance(value, float) and not math.isfinite(value):
        name = f"_k{len(constants)}"
        constants[name] = value
        return name
    return f"({value!r})"


def _disjoint_branches(a: Any, b: Any) -> bool:
    """Two signals of one multiplexer that are never in the same frame."""
    return (
        a.multiplexer_signal is not None
        and a.multiplexer_signal == b.multiplexer_signal
        and not set(a.multiplexer_ids or ()) & set(b.multiplexer_ids or ())
    )


def _compile(
    message: Any,
    flow_name: str,
    warn: Callable[[str], None],
    *,
    extra_channels: Sequence[ChannelConfig] = (),
    header_id: int | None = None,
) -> CompiledMessage:
    """Derive the flow of a message now; its decoding functions are generated on first use.

    A signal name used in several branches of one multiplexer (never two in one frame) is one
    channel when the branches give it the same type, unit and enum: the value of whichever
    branch the frame carries. ``extra_channels`` are appended after the signals; their values are
    extra arguments of ``decode`` (the J1939 source address).
    """
    length = int(message.length)
    signals = list(message.signals)
    channels: list[ChannelConfig] = []
    kinds: list[str] = []
    layouts: list[_Layout] = []
    groups: list[list[int]] = []
    seen: dict[str, int] = {}
    for index, signal in enumerate(signals):
        layout = _layout(signal, length)
        if not layout.fits:
            warn(
                f"signal {signal.name!r} of message {message.name!r} lies outside its "
                f"{length}-byte payload; it is always empty"
            )
        if layout.is_float and layout.length not in _FLOAT_FORMATS:
            warn(
                f"float signal {signal.name!r} of message {message.name!r} has "
                f"{layout.length} bits; it is always empty"
            )
            layout = _replace_fits(layout)
        name = signal.name
        channel, kind = _channel(signal, layout, name)
        kinds.append(kind)
        layouts.append(layout)
        shared = seen.get(name)
        if shared is not None:
            first = groups[shared]
            if (
                channels[shared] == channel
                and all(kinds[j] == kind for j in first)
                and all(_disjoint_branches(signals[j], signal) for j in first)
            ):
                first.append(index)  # the same name in another branch: the same channel
                continue
            number = 2
            while f"{name}_{number}" in seen:
                number += 1
            warn(
                f"message {message.name!r} has two signals named {name!r}; "
                f"the second is channel {name}_{number}"
            )
            name = f"{name}_{number}"
            channel = dataclasses.replace(channel, name=name)
        seen[name] = len(channels)
        channels.append(channel)
        groups.append([index])

    multiplexers = {signal.name for signal in signals if signal.is_multiplexer}
    for signal in signals:
        if signal.multiplexer_signal is not None and signal.multiplexer_signal not in multiplexers:
            warn(
                f"signal {signal.name!r} of message {message.name!r} is multiplexed by "
                f"{signal.multiplexer_signal!r}, which is not a multiplexer of the message; "
                "it is always empty"
            )
    for one, other in _overlaps(signals, layouts, length):
        warn(
            f"signals {one!r} and {other!r} of message {message.name!r} overlap; each is "
            "decoded from its own bits (cantools cannot unpack such a message)"
        )
    extra = tuple(channel.name for channel in extra_channels)
    unit = _CodeUnit(message, flow_name, signals, layouts, kinds, groups, extra)
    return CompiledMessage(
        name=message.name,
        frame_id=int(message.frame_id) if header_id is None else header_id,
        is_extended=bool(message.is_extended_frame) if header_id is None else False,
        is_fd=bool(getattr(message, "is_fd", False)),
        length=length,
        flow=FlowConfig(flow_name, [*channels, *extra_channels]),
        signal_names=tuple(signals[group[0]].name for group in groups),
        _unit=unit,
        header_id=header_id,
    )


def _bits(layout: _Layout, length: int) -> int:
    """The payload bits of a signal as a mask over the little-endian integer of the payload."""
    mask = (1 << layout.length) - 1
    if layout.source == "v":
        return mask << layout.shift
    # big-endian: the signal is a contiguous run in the big-endian integer; map its bytes back
    big = (mask << layout.shift).to_bytes(length, "big")
    return int.from_bytes(big, "little")


def _overlaps(signals: list[Any], layouts: list[_Layout], length: int) -> list[tuple[str, str]]:
    """Pairs of signals that share bits and can be present in the same frame."""
    if len(signals) < 2:
        return []
    masks = [_bits(lay, length) if lay.fits else 0 for lay in layouts]
    found = []
    for i in range(len(signals)):
        for j in range(i + 1, len(signals)):
            if not masks[i] & masks[j]:
                continue
            a, b = signals[i], signals[j]
            if a.multiplexer_signal or b.multiplexer_signal:
                if a.multiplexer_signal != b.multiplexer_signal:
                    continue  # a selector and its branch, or different selectors: not judged here
                if not set(a.multiplexer_ids or ()) & set(b.multiplexer_ids or ()):
                    continue  # different branches of one multiplexer may share bits
            found.append((a.name, b.name))
    return found


class _CodeUnit:
    """The generated decoding functions of one message, built once, on first use."""

    __slots__ = ("_args", "_lock", "decode", "source", "values")

    def __init__(
        self,
        message: Any,
        flow_name: str,
        signals: list[Any],
        layouts: list[_Layout],
        kinds: list[str],
        groups: list[list[int]],
        extra: tuple[str, ...],
    ) -> None:
        self._args = (message, flow_name, signals, layouts, kinds, groups, extra)
        self._lock = threading.Lock()
        self.source = ""
        self.decode: DecodeFunction | None = None
        self.values: ValuesFunction | None = None

    def build(self) -> tuple[DecodeFunction, ValuesFunction]:
        """Generate and compile the functions (once; later calls return them)."""
        with self._lock:
            decode, values = self.decode, self.values
            if decode is None or values is None:
                source, namespace = _generate(*self._args)
                decode, values = namespace["decode"], namespace["values"]
                self.source, self.decode, self.values = source, decode, values
            return decode, values


def _generate(
    message: Any,
    flow_name: str,
    signals: list[Any],
    layouts: list[_Layout],
    kinds: list[str],
    groups: list[list[int]],
    extra: tuple[str, ...],
) -> tuple[str, dict[str, Any]]:
    """The source of ``decode`` and ``values`` for one message, and its executed namespace.

    ``groups`` lists, per channel, the signals that fill it (several: one name in several
    multiplexer branches); ``extra`` names the arguments appended to each sample's values.
    """
    length = int(message.length)
    constants: dict[str, Any] = {
        "_from_bytes": int.from_bytes,
        "_Sample": Sample,
        "_DecodeError": DecodeError,
        "_flow": flow_name,
    }
    if _FAST_SAMPLE is not None:
        constants.update(_FAST_SAMPLE)
    mux_valid: dict[str, set[int]] = {}
    for signal in signals:
        if signal.is_multiplexer:
            ids: set[int] = set()
            for child in signals:
                if child.multiplexer_signal == signal.name and child.multiplexer_ids:
                    ids.update(int(i) for i in child.multiplexer_ids)
            if signal.conversion.choices:
                ids.update(int(k) for k in signal.conversion.choices)
            mux_valid[signal.name] = ids

    lines: list[str] = []
    emit = lines.append
    if length:
        emit(f"    if len(data) != {length}:")
        emit(f"        if len(data) < {length}:")
        emit(
            f"            raise _DecodeError({message.name!r} + ': ' + str(len(data)) + "
            f"' bytes, expected {length}')"
        )
        emit(f"        data = data[:{length}]")
    by_struct: set[int] = set()
    for number, (fmt, members) in enumerate(_struct_plan(layouts).items()):
        unpack = f"_struct{number}"
        constants[unpack] = struct.Struct(fmt).unpack_from
        targets = "".join(f"r{i}, " for i in members)
        emit(f"    {targets}= {unpack}(data)")
        by_struct.update(members)
    shifted = [lay for i, lay in enumerate(layouts) if lay.fits and i not in by_struct]
    if any(lay.source == "v" for lay in shifted):
        emit("    v = _from_bytes(data, 'little')")
    if any(lay.source == "b" for lay in shifted):
        emit("    b = _from_bytes(data, 'big')")

    done: set[int] = set()

    def emit_signal(i: int, indent: str) -> None:
        layout = layouts[i]
        raw = f"r{i}"
        if not layout.fits:
            emit(f"{indent}{raw} = s{i} = None")
            return
        if i not in by_struct:
            mask = (1 << layout.length) - 1
            expr = f"{layout.source} >> {layout.shift}" if layout.shift else layout.source
            emit(f"{indent}{raw} = ({expr}) & 0x{mask:X}")
            if layout.is_float:
                unpack = f"_unpack{layout.length}"
                constants[unpack] = struct.Struct(_FLOAT_FORMATS[layout.length]).unpack
                emit(f"{indent}{raw} = {unpack}({raw}.to_bytes({layout.length // 8}, 'big'))[0]")
            elif layout.is_signed:
                sign = 1 << (layout.length - 1)
                emit(f"{indent}{raw} = ({raw} ^ 0x{sign:X}) - 0x{sign:X}")
        if layout.identity:
            emit(f"{indent}s{i} = {raw}")
        elif (
            layout.offset == 0
            and not layout.is_float
            and isinstance(layout.scale, int | float)
            and layout.scale > 0
        ):
            # raw * scale is never -0.0 here, so dropping "+ 0" keeps cantools' exact value
            emit(f"{indent}s{i} = {raw} * {_literal(layout.scale, constants)}")
        else:
            scale = _literal(layout.scale, constants)
            offset = _literal(layout.offset, constants)
            emit(f"{indent}s{i} = {raw} * {scale} + {offset}")

    def emit_absent(i: int, indent: str) -> None:
        emit(f"{indent}r{i} = s{i} = None")
        if signals[i].is_multiplexer:
            for j, child in enumerate(signals):
                if child.multiplexer_signal == signals[i].name and j != i:
                    emit_absent(j, indent)

    def emit_group(parent: str | None, indent: str) -> None:
        for i, signal in enumerate(signals):
            if i in done or signal.multiplexer_signal != parent:
                continue
            done.add(i)
            emit_signal(i, indent)
            if signal.is_multiplexer:
                emit_mux(i, indent)

    def emit_mux(i: int, indent: str) -> None:
        name = signals[i].name
        selector = f"m{i}"
        if layouts[i].identity and not layouts[i].is_float:
            emit(f"{indent}{selector} = s{i}")
        else:
            emit(f"{indent}{selector} = int(s{i})")
        valid = sorted(mux_valid.get(name, set()))
        valid_name = f"_valid{i}"
        constants[valid_name] = frozenset(valid)
        emit(f"{indent}if {selector} not in {valid_name}:")
        prefix = f"{message.name}: multiplexer {name} = "
        emit(f"{indent}    raise _DecodeError({prefix!r} + str({selector}) + ' is not defined')")
        for j, child in enumerate(signals):
            if child.multiplexer_signal != name or j in done:
                continue
            done.add(j)
            ids = sorted(int(x) for x in (child.multiplexer_ids or []))
            ids_name = f"_ids{j}"
            constants[ids_name] = frozenset(ids)
            emit(f"{indent}if {selector} in {ids_name}:")
            emit_signal(j, indent + "    ")
            if child.is_multiplexer:
                emit_mux(j, indent + "    ")
            emit(f"{indent}else:")
            emit_absent(j, indent + "    ")

    emit_group(None, "    ")
    for i in range(len(signals)):
        if i not in done:  # multiplexed by a signal that is not a multiplexer (warned about)
            done.add(i)
            emit(f"    r{i} = s{i} = None")

    def sample_value(i: int) -> str:
        kind = kinds[i]
        if kind == "enum":
            expr = f"r{i} & 0x{_U32:X}" if layouts[i].is_signed else f"r{i}"
        elif kind == "bool":
            expr = f"r{i} != 0"
        elif kind == "double_int":
            expr = f"float(s{i})"
        else:
            return f"s{i}"  # None when absent already
        always = not signals[i].multiplexer_signal and layouts[i].fits
        return expr if always else f"(None if r{i} is None else {expr})"

    def first_present(group: list[int], value: Callable[[int], str]) -> str:
        expr = value(group[-1])
        for i in reversed(group[:-1]):  # branches are exclusive: at most one is not None
            expr = f"({value(i)} if r{i} is not None else {expr})"
        return expr

    sample_values = [first_present(group, sample_value) for group in groups]
    sample_values.extend(extra)
    body = "\n".join(lines)
    samples = f"({', '.join(sample_values)},)" if sample_values else "()"
    scaled_values = [first_present(group, lambda i: f"s{i}") for group in groups]
    scaled = f"({', '.join(scaled_values)},)" if scaled_values else "()"
    defaults = ", ".join(f"{k}={k}" for k in constants)
    arguments = "".join(f"{name}, " for name in extra)
    if _FAST_SAMPLE is not None:
        make_sample = (
            "    sample = _new(_Sample)\n"
            "    _set_flow(sample, _flow)\n"
            "    _set_timestamp(sample, timestamp_ns)\n"
            f"    _set_values(sample, {samples})\n"
            "    return sample\n"
        )
    else:
        make_sample = f"    return _Sample(_flow, timestamp_ns, {samples})\n"
    source = (
        f"def decode(data, timestamp_ns, {arguments}{defaults}):\n{body}\n{make_sample}\n"
        f"def values(data, {defaults}):\n{body}\n"
        f"    return {scaled}\n"
    )
    namespace: dict[str, Any] = dict(constants)
    code = compile(source, f"<daq_agent.decode {flow_name}>", "exec")
    exec(code, namespace)  # our own source, built from numbers and repr()-quoted names
    return source, namespace


def _replace_fits(layout: _Layout) -> _Layout:
    return dataclasses.replace(layout, fits=False, byte_offset=None)


def _struct_plan(layouts: list[_Layout]) -> dict[str, list[int]]:
    """Group byte-aligned signals into one struct format per byte order, without overlaps.

    Returns ``{format: [signal index, ...]}`` (at most one little- and one big-endian format).
    """
    plans: dict[str, list[int]] = {}
    for order in ("<", ">"):
        chosen: list[tuple[int, int]] = []
        candidates = sorted(
            (lay.byte_offset, i)
            for i, lay in enumerate(layouts)
            if lay.byte_offset is not None
            # one byte has no byte order: every 8-bit field goes in the little-endian format
            and ("<" if lay.length == 8 or lay.source == "v" else ">") == order
        )
        end = 0
        fmt = order
        for byte_offset, i in candidates:
            if byte_offset < end:
                continue  # overlaps a chosen field: read by shifts instead
            fmt += "x" * (byte_offset - end) + layouts[i].struct_code
            end = byte_offset + layouts[i].length // 8
            chosen.append((byte_offset, i))
        if chosen:
            plans[fmt] = [i for _, i in chosen]
    return plans
