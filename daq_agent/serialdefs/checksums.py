"""Checksums over a configurable span of a binary frame.

CRCs come from crcmod (C extension): its predefined catalogue, or any CRC of width 8, 16, 24,
32 or 64 from its parameters; XOR, the 8-bit sum and UBX's 8-bit Fletcher are a few lines each.
:class:`FrameChecksum` is compiled once from a :class:`ChecksumDef`: it knows where the
checksum sits in a frame of any length, which bytes it covers, and how it is stored.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Final, Literal

import crcmod
import crcmod.predefined

from daq_agent.serialdefs.model import ChecksumDef, ChecksumKind

__all__ = ["FrameChecksum", "checksum_function", "custom_crc"]

_CRCMOD_NAMES: Final = {
    ChecksumKind.CRC8: "crc-8",
    ChecksumKind.CRC16_CCITT_FALSE: "crc-ccitt-false",
    ChecksumKind.CRC16_MODBUS: "modbus",
    ChecksumKind.CRC16_XMODEM: "xmodem",
    ChecksumKind.CRC32: "crc-32",
}


def _xor8(data: bytes) -> int:
    return functools.reduce(operator.xor, data, 0)


def _sum8(data: bytes) -> int:
    return sum(data) & 0xFF


def _fletcher8(data: bytes) -> int:
    """The 8-bit Fletcher checksum of u-blox UBX: CK_A in the high byte, CK_B in the low."""
    a = b = 0
    for byte in data:
        a += byte
        b += a
    return ((a & 0xFF) << 8) | (b & 0xFF)


def _reflect(value: int, width: int) -> int:
    return int(f"{value:0{width}b}"[::-1], 2)


def custom_crc(poly: int, init: int, reflect: bool, xorout: int) -> Callable[[bytes], int]:
    """A CRC from its catalogue parameters (as the CRC RevEng catalogue lists them).

    Args:
        poly: the generator polynomial including its top bit (``0x104C11DB7`` for CRC-32).
        init: the register's initial value, unreflected.
        reflect: reflected input and output (``refin = refout``).
        xorout: XORed with the final value.

    Raises:
        ValueError: crcmod refuses the polynomial (its width must be 8, 16, 24, 32 or 64 bits).
    """
    width = poly.bit_length() - 1
    start = (_reflect(init, width) if reflect else init) ^ xorout  # crcmod's initCrc
    function: Callable[[bytes], int] = crcmod.mkCrcFun(
        poly, initCrc=start, rev=reflect, xorOut=xorout
    )
    return function


def checksum_function(
    kind: ChecksumKind, spec: ChecksumDef | None = None
) -> Callable[[bytes], int]:
    """The function computing ``kind`` over some bytes.

    Args:
        kind: the checksum kind.
        spec: the definition (a custom ``crc`` takes its parameters from it).

    Returns:
        A function from bytes to the checksum as an unsigned integer.
    """
    if kind is ChecksumKind.XOR8:
        return _xor8
    if kind is ChecksumKind.SUM8:
        return _sum8
    if kind is ChecksumKind.FLETCHER8:
        return _fletcher8
    if kind is ChecksumKind.CRC:
        if spec is None:
            raise ValueError("a custom crc needs its parameters")
        return custom_crc(spec.poly, spec.init, spec.reflect, spec.xorout)
    function: Callable[[bytes], int] = crcmod.predefined.mkPredefinedCrcFun(_CRCMOD_NAMES[kind])
    return function


class FrameChecksum:
    """A compiled checksum: verify a whole frame, or fill in the checksum of a frame.

    Offsets are relative to the start of the frame as the framer delivers it (sync bytes
    included; for COBS and SLIP, the decoded payload); negative offsets count from its end.
    """

    __slots__ = ("_at", "_end", "_function", "_order", "_start", "size", "verify")

    def __init__(self, spec: ChecksumDef) -> None:
        self._function = checksum_function(spec.kind, spec)
        self.size = spec.size
        self._at = spec.at if spec.at is not None else -self.size
        self._start = spec.start
        self._end = spec.end
        self._order: Final[Literal["little", "big"]] = (
            "little" if spec.byte_order.value == "little" else "big"
        )
        self.verify: Callable[[bytes], bool] = self._verify
        """True if a frame carries the right checksum (False if too short to hold one)."""
        if self._at == -self.size and self._start == 0 and self._end is None:
            self.verify = self._trailing_verifier()

    def _trailing_verifier(self) -> Callable[[bytes], bool]:
        """The common case: the checksum ends the frame and covers everything before it."""
        function, size, order = self._function, self.size, self._order
        from_bytes = int.from_bytes

        def verify(frame: bytes) -> bool:
            return len(frame) >= size and function(frame[:-size]) == from_bytes(
                frame[-size:], order
            )

        return verify

    def _bounds(self, length: int) -> tuple[int, int, int] | None:
        at = self._at if self._at >= 0 else length + self._at
        start = self._start if self._start >= 0 else length + self._start
        end = at if self._end is None else self._end if self._end >= 0 else length + self._end
        if at < 0 or at + self.size > length or start < 0 or end > length or start > end:
            return None
        return at, start, end

    def _verify(self, frame: bytes) -> bool:
        bounds = self._bounds(len(frame))
        if bounds is None:
            return False
        at, start, end = bounds
        stored = int.from_bytes(frame[at : at + self.size], self._order)
        return self._function(frame[start:end]) == stored

    def apply(self, frame: bytearray) -> None:
        """Write the checksum into its place in ``frame`` (the frame has room for it).

        Raises:
            ValueError: the frame is too short to hold the checksum or its span.
        """
        bounds = self._bounds(len(frame))
        if bounds is None:
            raise ValueError(f"a {len(frame)}-byte frame cannot hold this checksum")
        at, start, end = bounds
        value = self._function(bytes(frame[start:end]))
        frame[at : at + self.size] = value.to_bytes(self.size, self._order)
