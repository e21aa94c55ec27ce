"""gRPC-over-HTTP/2 framing shared by the client and the server."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Sequence
from urllib.parse import unquote

import grpc

PREFIX = struct.Struct(">BI")
"""The 5-byte prefix of every gRPC message: compressed flag, big-endian length."""

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
"""gRPC's default limit for one received message."""

STATUS_BY_CODE: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}

_PACK = PREFIX.pack


class FramingError(Exception):
    """The byte stream is not a valid sequence of gRPC messages.

    Attributes:
        code: the gRPC status to answer with.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def frame(payloads: Sequence[bytes]) -> bytes:
    """Concatenate serialized messages, each behind its 5-byte prefix (uncompressed)."""
    parts: list[bytes] = []
    append = parts.append
    for payload in payloads:
        append(_PACK(0, len(payload)))
        append(payload)
    return b"".join(parts)


class MessageReader:
    """Incremental parser: feed it DATA frame payloads, get complete messages back."""

    __slots__ = ("_buffer", "_encoding", "_max")

    def __init__(
        self, *, encoding: str = "identity", max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    ) -> None:
        self._buffer = b""
        self._encoding = encoding
        self._max = max_message_bytes

    @property
    def pending(self) -> int:
        """Bytes received that do not form a complete message yet."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """Append ``data`` and return every message it completes, in order.

        Raises:
            FramingError: a message is larger than the limit, or compressed without an encoding.
        """
        buffer = self._buffer + data if self._buffer else data
        size = len(buffer)
        offset = 0
        messages: list[bytes] = []
        append = messages.append
        unpack = PREFIX.unpack_from
        limit = self._max
        while size - offset >= 5:
            flag, length = unpack(buffer, offset)
            if length > limit:
                raise FramingError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"received message larger than max ({length} vs. {limit})",
                )
            end = offset + 5 + length
            if end > size:
                break
            payload = buffer[offset + 5 : end]
            if flag:
                payload = self._decompress(payload)
            append(payload)
            offset = end
        self._buffer = buffer[offset:] if offset < size else b""
        return messages

    def _decompress(self, payload: bytes) -> bytes:
        if self._encoding == "gzip":
            try:
                return zlib.decompress(payload, wbits=31)
            except zlib.error as exc:
                raise FramingError(grpc.StatusCode.INTERNAL, f"bad gzip message: {exc}") from exc
        if self._encoding == "deflate":
            try:
                return zlib.decompress(payload)
            except zlib.error as exc:
                raise FramingError(grpc.StatusCode.INTERNAL, f"bad deflate message: {exc}") from exc
        raise FramingError(
            grpc.StatusCode.INTERNAL, "compressed message without a grpc-encoding header"
        )


def encode_grpc_message(text: str) -> str:
    """Percent-encode a status message for the ``grpc-message`` trailer (gRPC's rules)."""
    return "".join(
        chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in text.encode()
    )


def decode_grpc_message(text: str) -> str:
    """Undo :func:`encode_grpc_message`."""
    return unquote(text, errors="replace")


def status_from_headers(headers: Iterable[tuple[str, str]]) -> tuple[grpc.StatusCode, str] | None:
    """The (code, message) carried by trailers or a trailers-only response; None if absent."""
    status: grpc.StatusCode | None = None
    message = ""
    for name, value in headers:
        if name == "grpc-status":
            try:
                status = STATUS_BY_CODE.get(int(value), grpc.StatusCode.UNKNOWN)
            except ValueError:
                status = grpc.StatusCode.UNKNOWN
        elif name == "grpc-message":
            message = decode_grpc_message(value)
    return None if status is None else (status, message)
