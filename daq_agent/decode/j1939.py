"""SAE J1939 on a CAN bus: PGN matching, transport-protocol reassembly and DM1 trouble codes.

A 29-bit J1939 identifier is ``priority (3) | EDP (1) | DP (1) | PF (8) | PS (8) | SA (8)``. The
parameter group number (PGN) is ``EDP | DP | PF | PS``, except for PDU1 formats (PF < 240), whose
PS byte is the destination address and not part of the PGN. A J1939 message of a database is
matched by its PGN, whatever the priority and the source address of the frame (a message the
database defines for one source address is preferred for that address); the source address is a
channel of the flow (see ``docs/j1939.md`` for why a channel rather than one flow per address).

Messages longer than 8 bytes travel in the transport protocol of J1939-21 (PGN 0xEC00 TP.CM and
0xEB00 TP.DT): broadcast (BAM) or connection mode (RTS/CTS/EOM ACK, Connection Abort). The agent is
a passive monitor: it never sends a CTS, it follows the sender's and the receiver's frames and
reassembles the packets. A transfer that stalls longer than the J1939-21 timeouts (T1 750 ms
between packets, T2 1250 ms after a CTS, T3 1250 ms for a CTS or EOM, T4 1050 ms after a hold CTS;
measured on the frames' own timestamps, checked as frames arrive) is lost and counted
(``tp_timeouts``), as is an aborted one (``tp_aborts``: a Connection Abort, or a new BAM/RTS that
replaces an unfinished one), each also per PGN (``tp_error_pgns``).

DM1 (PGN 0xFECA, active diagnostic trouble codes) is decoded into the flow ``{bus}.DM1`` whatever
the databases say (a DBC can describe only a fixed number of DTCs): the four lamps, the number of
active DTCs, and SPN/FMI/OC/CM of the first :data:`DEFAULT_DM1_DTCS` (see ``docs/j1939.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from daq_agent.core.errors import DecodeError
from daq_agent.core.model import ChannelConfig, ChannelDataType, ChannelEnumType, FlowConfig
from daq_agent.core.sample import Sample

__all__ = [
    "DEFAULT_DM1_DTCS",
    "DM1_PGN",
    "T1_NS",
    "T2_NS",
    "T3_NS",
    "T4_NS",
    "TP_CM_PGN",
    "TP_DT_PGN",
    "Dm1Decoder",
    "DtcCode",
    "database_is_j1939",
    "dm1_payload",
    "message_is_j1939",
    "pgn_of",
    "transport_frames",
]

TP_CM_PGN: Final = 0xEC00
"""Transport protocol, connection management (RTS, CTS, EOM ACK, BAM, Abort)."""
TP_DT_PGN: Final = 0xEB00
"""Transport protocol, data transfer (a sequence number and 7 bytes)."""
DM1_PGN: Final = 0xFECA
"""DM1: active diagnostic trouble codes."""
DEFAULT_DM1_DTCS: Final = 8
"""How many DTCs of a DM1 get their own channels (``spn_0`` … ``spn_7``)."""

T1_NS: Final = 750_000_000
"""J1939-21 T1: the longest gap between two data packets."""
T2_NS: Final = 1_250_000_000
"""J1939-21 T2: the longest wait for data after a CTS."""
T3_NS: Final = 1_250_000_000
"""J1939-21 T3: the longest wait for a CTS (after an RTS or a window) or the EOM ACK."""
T4_NS: Final = 1_050_000_000
"""J1939-21 T4: the longest hold (a CTS asking for 0 packets) before the next CTS."""

_RTS, _CTS, _EOM, _BAM, _ABORT = 16, 17, 19, 32, 255
_MAX_SIZE = 1785  # 255 packets of 7 bytes
_GLOBAL = 0xFF
_LAMPS = ("mil", "rsl", "awl", "pl")  # byte 1: bits 8-7, 6-5, 4-3, 2-1
_LAMP_STATES = (
    ChannelEnumType("Off", 0),
    ChannelEnumType("On", 1),
    ChannelEnumType("Error", 2),
    ChannelEnumType("NotAvailable", 3),
)
_LAMP_TEXT = {
    "mil": "malfunction indicator lamp",
    "rsl": "red stop lamp",
    "awl": "amber warning lamp",
    "pl": "protect lamp",
}


def pgn_of(frame_id: int) -> int:
    """The PGN of a 29-bit J1939 identifier (PDU1: without the destination address)."""
    if (frame_id >> 16) & 0xFF < 240:
        return (frame_id >> 8) & 0x3FF00
    return (frame_id >> 8) & 0x3FFFF


def database_is_j1939(database: Any) -> bool:
    """A DBC whose ``ProtocolType`` attribute is ``J1939``."""
    dbc = getattr(database, "dbc", None)
    attributes = getattr(dbc, "attributes", None) or {}
    protocol = attributes.get("ProtocolType")
    value = getattr(protocol, "value", None)
    return isinstance(value, str) and value.strip().upper() == "J1939"


def message_is_j1939(message: Any, database_j1939: bool) -> bool:
    """A 29-bit message of a J1939 database, or one whose ``VFrameFormat`` is ``J1939PG``."""
    if not message.is_extended_frame:
        return False
    return database_j1939 or getattr(message, "protocol", None) == "j1939"


@dataclass(frozen=True, slots=True)
class DtcCode:
    """One diagnostic trouble code of a DM1: SPN (19 bits), FMI (5), occurrence count (7), CM."""

    spn: int
    fmi: int
    oc: int = 1
    cm: bool = False


def dm1_payload(
    dtcs: list[DtcCode] | tuple[DtcCode, ...], lamps: tuple[int, int, int, int] = (0, 0, 0, 0)
) -> bytes:
    """The DM1 payload of ``dtcs`` with lamp states ``(mil, rsl, awl, pl)`` (flash: off).

    No DTC gives the 8-byte "no active DTC" form (SPN 0, FMI 0, then 0xFF). One DTC fits one
    frame (padded with 0xFF); more need the transport protocol.
    """
    mil, rsl, awl, pl = lamps
    out = bytearray([(mil << 6) | (rsl << 4) | (awl << 2) | pl, 0xFF])
    if not dtcs:
        return bytes(out) + b"\x00\x00\x00\x00\xff\xff"
    for dtc in dtcs:
        out += bytes(
            [
                dtc.spn & 0xFF,
                (dtc.spn >> 8) & 0xFF,
                ((dtc.spn >> 16) & 0x07) << 5 | (dtc.fmi & 0x1F),
                (0x80 if dtc.cm else 0) | (dtc.oc & 0x7F),
            ]
        )
    if len(out) < 8:
        out += b"\xff" * (8 - len(out))
    return bytes(out)


class Dm1Decoder:
    """DM1 payloads into samples of one flow.

    Channels: ``mil``, ``rsl``, ``awl``, ``pl`` (lamp status, enum Off/On/Error/NotAvailable),
    ``count`` (active DTCs in the message), then ``spn_i``, ``fmi_i``, ``oc_i``, ``cm_i`` for the
    first ``dtcs`` DTCs (empty when the message has fewer), then ``source_address``.
    """

    __slots__ = ("dtcs", "flow")

    def __init__(self, flow_name: str, dtcs: int = DEFAULT_DM1_DTCS) -> None:
        self.dtcs = dtcs
        u32 = ChannelDataType.UINT_32
        channels = [
            ChannelConfig(
                name, ChannelDataType.ENUM, _LAMP_TEXT[name], enum_types=list(_LAMP_STATES)
            )
            for name in _LAMPS
        ]
        channels.append(ChannelConfig("count", u32, "active DTCs in the message"))
        for i in range(dtcs):
            channels += [
                ChannelConfig(f"spn_{i}", u32, f"DTC {i}: suspect parameter number"),
                ChannelConfig(f"fmi_{i}", u32, f"DTC {i}: failure mode identifier"),
                ChannelConfig(f"oc_{i}", u32, f"DTC {i}: occurrence count"),
                ChannelConfig(f"cm_{i}", ChannelDataType.BOOL, f"DTC {i}: SPN conversion method"),
            ]
        channels.append(ChannelConfig("source_address", u32, "J1939 source address"))
        self.flow = FlowConfig(flow_name, channels)

    def decode(self, data: bytes, timestamp_ns: int, source_address: int) -> Sample:
        """One DM1 payload (8 bytes or a reassembled longer one).

        Raises:
            DecodeError: the payload is shorter than the lamp bytes and one DTC.
        """
        if len(data) < 6:
            raise DecodeError(f"DM1: {len(data)} bytes, expected at least 6")
        lamp = data[0]
        values: list[Any] = [(lamp >> 6) & 3, (lamp >> 4) & 3, (lamp >> 2) & 3, lamp & 3]
        codes: list[tuple[int, int, int, bool]] = []
        for at in range(2, len(data) - 3, 4):
            b0, b1, b2, b3 = data[at], data[at + 1], data[at + 2], data[at + 3]
            if (b0 | b1 | b2 | b3) == 0 or (b0 & b1 & b2 & b3) == 0xFF:
                continue  # "no active DTC" or padding
            codes.append((b0 | b1 << 8 | (b2 >> 5) << 16, b2 & 0x1F, b3 & 0x7F, bool(b3 & 0x80)))
        values.append(len(codes))
        for i in range(self.dtcs):
            if i < len(codes):
                values.extend(codes[i])
            else:
                values.extend((None, None, None, None))
        values.append(source_address)
        return Sample(self.flow.name, timestamp_ns, tuple(values))


def transport_frames(
    pgn: int, payload: bytes, source: int, destination: int = _GLOBAL, priority: int = 7
) -> list[tuple[int, bytes]]:
    """The ``(29-bit id, data)`` frames that broadcast ``payload`` with BAM (TP.CM + TP.DT).

    Raises:
        ValueError: the payload is not 9..1785 bytes, or the PGN or an address is out of range.
    """
    if not 9 <= len(payload) <= _MAX_SIZE:
        raise ValueError(f"a BAM carries 9..{_MAX_SIZE} bytes, not {len(payload)}")
    if not 0 <= pgn <= 0x3FFFF or not 0 <= source <= 0xFF:
        raise ValueError("PGN or source address out of range")
    packets = (len(payload) + 6) // 7
    head = priority << 26
    cm = bytes([_BAM, len(payload) & 0xFF, len(payload) >> 8, packets, 0xFF]) + pgn.to_bytes(
        3, "little"
    )
    frames = [(head | TP_CM_PGN << 8 | destination << 8 | source, cm)]
    for number in range(packets):
        chunk = payload[7 * number : 7 * number + 7]
        data = bytes([number + 1]) + chunk + b"\xff" * (7 - len(chunk))
        frames.append((head | TP_DT_PGN << 8 | destination << 8 | source, data))
    return frames


# --- the transport-protocol session of one reader -------------------------------------------


@dataclass(slots=True)
class _Transfer:
    pgn: int
    size: int
    packets: int
    source: int
    destination: int
    broadcast: bool
    deadline_ns: int
    chunks: dict[int, bytes] = field(default_factory=dict)
    window_end: int = 0  # CMDT: the last packet number the latest CTS asked for


Deliver = Callable[[int, int, int, bytes, int], "Sample | None"]
"""``deliver(pgn, source, destination, payload, timestamp_ns)``: decode a complete message."""


class TransportSession:
    """Follows J1939-21 transfers on one bus and reassembles their messages.

    Args:
        deliver: decodes a complete message (may raise DecodeError).
        counters: ``add(name, n)`` and ``add_key(name, key, n)`` (a reader's counters).

    Attributes:
        open: the transfers in progress, by ``(source, destination)`` (BAM: destination 0xFF).
    """

    __slots__ = ("_counters", "_deliver", "next_deadline_ns", "open")

    def __init__(self, deliver: Deliver, counters: Any) -> None:
        self._deliver = deliver
        self._counters = counters
        self.open: dict[tuple[int, int], _Transfer] = {}
        self.next_deadline_ns = 1 << 62

    def expire(self, now_ns: int) -> None:
        """Drop (and count) the transfers whose deadline is before ``now_ns``."""
        for key, transfer in list(self.open.items()):
            if transfer.deadline_ns < now_ns:
                del self.open[key]
                self._lost("tp_timeouts", transfer)
        self._reschedule()

    def _reschedule(self) -> None:
        self.next_deadline_ns = min((t.deadline_ns for t in self.open.values()), default=1 << 62)

    def _lost(self, counter: str, transfer: _Transfer) -> None:
        self._counters.add(counter)
        self._counters.add_key("tp_error_pgns", f"{transfer.pgn:05X}")

    def _set_deadline(self, transfer: _Transfer, deadline_ns: int) -> None:
        transfer.deadline_ns = deadline_ns
        if deadline_ns < self.next_deadline_ns:
            self.next_deadline_ns = deadline_ns

    def connection(self, source: int, destination: int, data: bytes, now_ns: int) -> None:
        """A TP.CM frame from ``source`` to ``destination``.

        Raises:
            DecodeError: the frame is not a valid TP.CM message.
        """
        if len(data) < 8:
            raise DecodeError(f"TP.CM from 0x{source:02X}: {len(data)} bytes, expected 8")
        control = data[0]
        pgn = data[5] | data[6] << 8 | data[7] << 16
        if control in (_BAM, _RTS):
            size = data[1] | data[2] << 8
            packets = data[3]
            if not 9 <= size <= _MAX_SIZE or packets != (size + 6) // 7:
                raise DecodeError(
                    f"TP.CM from 0x{source:02X}: {size} bytes in {packets} packets is not a "
                    "valid transfer"
                )
            broadcast = control == _BAM
            if broadcast and destination != _GLOBAL:
                raise DecodeError(f"TP.CM BAM from 0x{source:02X} not sent to global (0xFF)")
            key = (source, _GLOBAL if broadcast else destination)
            previous = self.open.pop(key, None)
            if previous is not None:
                self._lost("tp_aborts", previous)  # a new transfer replaces an unfinished one
            transfer = _Transfer(
                pgn,
                size,
                packets,
                source,
                key[1],
                broadcast,
                now_ns + (T1_NS if broadcast else T3_NS),
            )
            self.open[key] = transfer
            self._set_deadline(transfer, transfer.deadline_ns)
            return
        if control == _CTS:  # from the receiver (source) to the sender (destination)
            waiting = self.open.get((destination, source))
            if waiting is None or waiting.broadcast:
                raise DecodeError(
                    f"TP.CM CTS from 0x{source:02X} to 0x{destination:02X} without an RTS"
                )
            count, first = data[1], data[2]
            if count == 0:
                self._set_deadline(waiting, now_ns + T4_NS)  # hold the connection open
            else:
                if first < 1 or first + count - 1 > waiting.packets:
                    raise DecodeError(
                        f"TP.CM CTS from 0x{source:02X}: packets {first}..{first + count - 1} "
                        f"of {waiting.packets}"
                    )
                waiting.window_end = first + count - 1
                self._set_deadline(waiting, now_ns + T2_NS)
            return
        if control == _EOM:  # the message was delivered when its last packet came
            return
        if control == _ABORT:
            for key in ((source, destination), (destination, source)):
                aborted = self.open.get(key)
                if aborted is not None and not aborted.broadcast:
                    del self.open[key]
                    self._lost("tp_aborts", aborted)
                    self._reschedule()
                    return
            return  # an abort of a transfer we never saw start
        raise DecodeError(f"TP.CM from 0x{source:02X}: unknown control byte {control}")

    def packet(
        self, source: int, destination: int, data: bytes, now_ns: int
    ) -> tuple[bool, Sample | None]:
        """A TP.DT frame: ``(False, None)`` while the transfer goes on, ``(True, sample)`` when
        it completes (the sample None when no database knows the PGN).

        Raises:
            DecodeError: no transfer was announced, the sequence number is out of range, or the
                complete message does not decode.
        """
        key = (source, _GLOBAL if destination == _GLOBAL else destination)
        transfer = self.open.get(key)
        if transfer is None or len(data) < 2:
            raise DecodeError(
                f"TP.DT from 0x{source:02X} to 0x{destination:02X} without an announced transfer"
            )
        number = data[0]
        if number < 1 or number > transfer.packets:
            raise DecodeError(f"TP.DT from 0x{source:02X}: packet {number} of {transfer.packets}")
        transfer.chunks[number] = bytes(data[1:8])
        if len(transfer.chunks) < transfer.packets:
            if transfer.broadcast or number < transfer.window_end:
                self._set_deadline(transfer, now_ns + T1_NS)
            else:  # the window is done: the receiver sends the next CTS
                self._set_deadline(transfer, now_ns + T3_NS)
            return False, None
        del self.open[key]
        self._reschedule()
        payload = b"".join(transfer.chunks[n] for n in range(1, transfer.packets + 1))
        return True, self._deliver(
            transfer.pgn, source, transfer.destination, payload[: transfer.size], now_ns
        )
