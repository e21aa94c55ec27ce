"""Generate a CAN database shaped like a real vehicle's, reproducibly (a fixed seed).

The bench database (``dbc/bench.dbc``, 17 messages, ~7 signals each) is small and regular; a
production powertrain/chassis DBC has a hundred-odd messages of about a dozen signals each, packed
tight into 8 bytes: status flags, 2- and 4-bit states with value tables, 8-16 bit scaled
quantities with offsets, alive counters and checksums, a few Motorola (big-endian) ECUs, a few
29-bit ids (J1939-style), some multiplexed messages (diagnostic pages, cell voltages), and a few
CAN FD messages of 64 bytes. This module builds such a database with cantools and dumps it to
DBC, so the benchmarks decode traffic of that shape without shipping a proprietary file.

The same ``seed`` and ``messages`` always give the same file (byte for byte).

Usage::

    .venv/bin/python benchmarks/vehicle_dbc.py OUT.dbc [--messages 113] [--seed 8]
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import cantools
from cantools.database.can import Database, Message, Node, Signal
from cantools.database.can.formats.dbc import DbcSpecifics
from cantools.database.can.formats.dbc.dbc_attribute import DbcAttribute
from cantools.database.can.formats.dbc.dbc_attribute_definition import DbcAttributeDefinition
from cantools.database.conversion import BaseConversion

__all__ = ["DEFAULT_MESSAGES", "DEFAULT_SEED", "build_database", "write_vehicle_dbc"]

DEFAULT_MESSAGES = 113
DEFAULT_SEED = 8

_ECUS = ("ECM", "TCM", "ABS", "EPS", "BCM", "VCU", "BMS", "INV", "HVAC", "ADAS", "IPC", "GW")
_QUANTITIES = (
    # name stem, unit, bit length, scale, offset, signed
    ("Speed", "km/h", 16, 0.01, 0.0, False),
    ("Rpm", "rpm", 16, 0.25, 0.0, False),
    ("Torque", "Nm", 16, 0.1, -1000.0, False),
    ("Temp", "degC", 8, 1.0, -40.0, False),
    ("Pressure", "kPa", 12, 0.5, 0.0, False),
    ("Current", "A", 16, 0.05, 0.0, True),
    ("Voltage", "V", 12, 0.01, 0.0, False),
    ("Angle", "deg", 16, 0.1, 0.0, True),
    ("Position", "%", 8, 0.4, 0.0, False),
    ("Flow", "g/s", 10, 0.1, 0.0, False),
    ("Accel", "m/s2", 12, 0.01, -20.48, False),
    ("Level", "%", 7, 1.0, 0.0, False),
    ("Ratio", "", 10, 0.01, 0.0, False),
    ("Power", "kW", 14, 0.1, -500.0, False),
)
_STATES = (
    ("Mode", ("Off", "Standby", "Active", "Fault")),
    ("Status", ("Init", "Ok", "Degraded", "Error")),
    ("Gear", ("P", "R", "N", "D", "S", "L", "M", "SNA")),
    ("Request", ("None", "Low", "Medium", "High")),
    ("State", ("Sleep", "Wake", "Run", "Crank", "Shutdown", "Reserved5", "Reserved6", "SNA")),
)
_FLAGS = ("Valid", "Fault", "Warning", "Enable", "Active", "Lamp", "Req", "Ack")


def _linear(scale: float, offset: float) -> BaseConversion:
    return BaseConversion.factory(scale=scale, offset=offset, is_float=False)


def _range(length: int, signed: bool, scale: float, offset: float) -> tuple[float, float]:
    lo, hi = (-(1 << (length - 1)), (1 << (length - 1)) - 1) if signed else (0, (1 << length) - 1)
    return round(lo * scale + offset, 6), round(hi * scale + offset, 6)


class _Packer:
    """Places signals one after another in a payload, Intel or Motorola bit numbering."""

    def __init__(self, length_bytes: int, big_endian: bool, start_bit: int = 0) -> None:
        self.bits = length_bytes * 8
        self.big_endian = big_endian
        self.pos = start_bit  # linear position: Intel LSB-first, Motorola MSB-first

    def room(self) -> int:
        return self.bits - self.pos

    def place(self, length: int) -> int:
        """The DBC start bit of the next ``length``-bit signal (cantools' numbering)."""
        p = self.pos
        self.pos += length
        if not self.big_endian:
            return p
        return (p // 8) * 8 + (7 - p % 8)  # the MSB's bit in sawtooth numbering


@dataclass(frozen=True)
class _Spec:
    name: str
    length: int
    scale: float = 1.0
    offset: float = 0.0
    signed: bool = False
    unit: str = ""
    choices: tuple[str, ...] = ()


def _signal_specs(rng: random.Random, prefix: str, budget: int, count: int) -> list[_Spec]:
    """About ``count`` signal specs fitting ``budget`` bits."""
    specs: list[_Spec] = []
    used = 0
    serial = 0
    while len(specs) < count and used < budget:
        serial += 1
        kind = rng.choices(("quantity", "state", "flag"), weights=(5, 2, 3))[0]
        if kind == "quantity":
            stem, unit, length, scale, offset, signed = rng.choice(_QUANTITIES)
            length = max(4, length - rng.choice((0, 0, 2, 4)))
            spec = _Spec(f"{prefix}{stem}{serial}", length, scale, offset, signed, unit)
        elif kind == "state":
            stem, names = rng.choice(_STATES)
            spec = _Spec(f"{prefix}{stem}{serial}", (len(names) - 1).bit_length(), choices=names)
        else:
            spec = _Spec(f"{prefix}{rng.choice(_FLAGS)}{serial}", 1)
        if used + spec.length > budget:  # fill what is left with a flag
            spec = _Spec(f"{prefix}{rng.choice(_FLAGS)}{serial}", 1)
        specs.append(spec)
        used += spec.length
    return specs


def _make_signal(
    spec: _Spec,
    start: int,
    big_endian: bool,
    receivers: list[str],
    multiplexer_ids: list[int] | None = None,
    multiplexer_signal: str | None = None,
) -> Signal:
    lo, hi = _range(spec.length, spec.signed, spec.scale, spec.offset)
    choices = None
    if spec.choices:
        choices = OrderedDict(enumerate(spec.choices))
        lo, hi = 0, len(spec.choices) - 1
    return Signal(
        name=spec.name,
        start=start,
        length=spec.length,
        byte_order="big_endian" if big_endian else "little_endian",
        is_signed=spec.signed,
        conversion=BaseConversion.factory(
            scale=spec.scale, offset=spec.offset, choices=choices, is_float=False
        ),
        minimum=lo,
        maximum=hi,
        unit=spec.unit or None,
        receivers=receivers,
        multiplexer_ids=multiplexer_ids,
        multiplexer_signal=multiplexer_signal,
    )


def _plain_message(
    rng: random.Random,
    frame_id: int,
    name: str,
    ecu: str,
    length: int,
    big_endian: bool,
    count: int,
    extended: bool,
    receivers: list[str],
) -> Message:
    packer = _Packer(length, big_endian)
    tail = 12 if length == 8 else 16  # alive counter (4) + checksum (8), or 8 + 8 on FD
    specs = _signal_specs(rng, "", packer.room() - tail, count - 2)
    signals = [_make_signal(s, packer.place(s.length), big_endian, receivers) for s in specs]
    packer.pos = packer.bits - tail
    counter = _Spec(f"{name}_Counter", tail - 8)
    signals.append(_make_signal(counter, packer.place(counter.length), big_endian, receivers))
    crc = _Spec(f"{name}_Crc", 8)
    signals.append(_make_signal(crc, packer.place(8), big_endian, receivers))
    return Message(
        frame_id=frame_id,
        name=name,
        length=length,
        signals=signals,
        senders=[ecu],
        cycle_time=rng.choice((10, 10, 20, 20, 50, 100, 100, 200, 500, 1000)),
        is_extended_frame=extended,
        is_fd=length > 8,
    )


def _mux_message(
    rng: random.Random, frame_id: int, name: str, ecu: str, extended: bool, receivers: list[str]
) -> Message:
    """An 8-byte message with an 8-bit multiplexer and 2-6 pages of signals."""
    pages = rng.randint(2, 6)
    selector = Signal(
        name=f"{name}_Page",
        start=0,
        length=8,
        is_multiplexer=True,
        conversion=_linear(1, 0),
        minimum=0,
        maximum=pages - 1,
        receivers=receivers,
    )
    signals = [selector]
    per_page = rng.randint(4, 8)
    for page in range(pages):
        packer = _Packer(8, False, start_bit=8)
        specs = _signal_specs(rng, f"P{page}", packer.room(), per_page)
        for spec in specs:
            signals.append(
                _make_signal(
                    spec,
                    packer.place(spec.length),
                    False,
                    receivers,
                    multiplexer_ids=[page],
                    multiplexer_signal=selector.name,
                )
            )
    return Message(
        frame_id=frame_id,
        name=name,
        length=8,
        signals=signals,
        senders=[ecu],
        cycle_time=rng.choice((20, 50, 100)),
        is_extended_frame=extended,
    )


def build_database(messages: int = DEFAULT_MESSAGES, seed: int = DEFAULT_SEED) -> Database:
    """A vehicle-shaped database: ``messages`` messages, ~12 signals each, a fixed ``seed``.

    About 1 in 10 messages is multiplexed, 1 in 5 Motorola, 1 in 12 has a 29-bit id and 1 in 16
    is a 64-byte CAN FD message (with ~24 signals).
    """
    rng = random.Random(seed)
    nodes = [Node(name=ecu, comment=None) for ecu in _ECUS]
    out: list[Message] = []
    used_ids: set[tuple[int, bool]] = set()
    topics = ("Status", "Data", "Ctrl", "Info", "Diag", "Sense", "Cmd", "Meas")
    for index in range(messages):
        ecu = _ECUS[index % len(_ECUS)]
        receivers = sorted(rng.sample([e for e in _ECUS if e != ecu], 2))
        extended = index % 12 == 7
        while True:
            frame_id = (
                0x18FF0000 | (rng.randrange(0x100) << 8) | _ECUS.index(ecu)
                if extended
                else rng.randrange(0x080, 0x700)
            )
            if (frame_id, extended) not in used_ids:
                used_ids.add((frame_id, extended))
                break
        name = f"{ecu}_{rng.choice(topics)}{index:03d}"
        if index % 10 == 3:
            out.append(_mux_message(rng, frame_id, name, ecu, extended, receivers))
        elif index % 16 == 9:
            out.append(_plain_message(rng, frame_id, name, ecu, 64, False, 24, extended, receivers))
        else:
            count = max(6, min(20, round(rng.gauss(12, 3))))
            big_endian = index % 5 == 1
            out.append(
                _plain_message(rng, frame_id, name, ecu, 8, big_endian, count, extended, receivers)
            )
    # a "BusType" of "CAN FD" makes cantools write the VFrameFormat (and cycle time) attributes
    bus_type = DbcAttributeDefinition("BusType", default_value="", type_name="STRING")
    dbc = DbcSpecifics(
        attributes=OrderedDict(BusType=DbcAttribute("CAN FD", bus_type)),
        attribute_definitions=OrderedDict(BusType=bus_type),
    )
    return Database(
        messages=out,
        nodes=nodes,
        version=f"daq-agent vehicle bench (seed {seed})",
        dbc_specifics=dbc,
    )


def write_vehicle_dbc(
    path: Path, messages: int = DEFAULT_MESSAGES, seed: int = DEFAULT_SEED
) -> Path:
    """Write the database to ``path`` as DBC, check that it loads back the same; returns path."""
    db = build_database(messages, seed)
    path.write_text(db.as_dbc_string(), encoding="ascii")
    back = cantools.database.load_file(str(path), strict=True)
    if len(back.messages) != messages:
        raise RuntimeError(f"{path}: {len(back.messages)} messages loaded back, not {messages}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--messages", type=int, default=DEFAULT_MESSAGES)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    write_vehicle_dbc(args.out, args.messages, args.seed)
    db = cantools.database.load_file(str(args.out))
    signals = [len(m.signals) for m in db.messages]
    print(
        f"{args.out}: {len(db.messages)} messages, {sum(signals)} signals "
        f"({sum(signals) / len(signals):.1f} per message), "
        f"{sum(1 for m in db.messages if m.is_multiplexed())} multiplexed, "
        f"{sum(1 for m in db.messages if m.is_extended_frame)} 29-bit, "
        f"{sum(1 for m in db.messages if m.is_fd)} CAN FD, "
        f"{sum(1 for m in db.messages for s in m.signals if s.choices)} signals with value tables"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
