"""gRPC-over-HTTP/2 framing shared by the client and the server."""

from __future__ import annotations

import logging
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

# hpack logs every header it encodes or decodes at DEBUG (and its header table's evictions), the
# authorization header, that is the API key, included. Nothing else in those loggers is worth
# a key in a log file.
_HEADER_LOGGERS = ("hpack.hpack", "hpack.table")


class _BelowWarning(logging.Filter):
    """Drops the records of a logger below WARNING, whatever the logger's level says."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def silence_header_logging() -> None:
    """Keep the HPACK codec's DEBUG records (which show header values) out of every log.

    A filter on the codec's own loggers, so it holds even when an application sets every
    logger to DEBUG. Idempotent.
    """
    for name in _HEADER_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _BelowWarning) for f in logger.filters):
            logger.addFilter(_BelowWarning())


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
    """Incremental parser: feed it DATA frame payloads, get complete messages back.

    Linear in the bytes fed: a message split over many frames is kept as a list of chunks and
    joined once, when it is complete. Every message, compressed or not, is at most
    ``max_message_bytes`` once decompressed; a compressed message is inflated only up to that
    limit (a small gzip bomb never grows into memory).
    """

    __slots__ = ("_chunks", "_encoding", "_have", "_max", "_need")

    def __init__(
        self, *, encoding: str = "identity", max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    ) -> None:
        self._chunks: list[bytes] = []  # the incomplete tail, in arrival order
        self._have = 0  # bytes in _chunks
        self._need = 0  # bytes _chunks must hold before parsing can progress
        self._encoding = encoding
        self._max = max_message_bytes

    @property
    def pending(self) -> int:
        """Bytes received that do not form a complete message yet."""
        return self._have

    def feed(self, data: bytes) -> list[bytes]:
        """Append ``data`` and return every message it completes, in order.

        Raises:
            FramingError: a message is larger than the limit (compressed or decompressed), or
                compressed without an encoding, or its compression is corrupt.
        """
        if self._chunks:
            self._chunks.append(data)
            self._have += len(data)
            if self._have < self._need:
                return []
            buffer = b"".join(self._chunks)
            self._chunks = []
            self._have = 0
        else:
            buffer = data
        size = len(buffer)
        offset = 0
        messages: list[bytes] = []
        append = messages.append
        unpack = PREFIX.unpack_from
        limit = self._max
        need = 5
        while size - offset >= 5:
            flag, length = unpack(buffer, offset)
            if length > limit:
                raise FramingError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"received message larger than max ({length} vs. {limit})",
                )
            end = offset + 5 + length
            if end > size:
                need = 5 + length
                break
            payload = buffer[offset + 5 : end]
            if flag:
                payload = self._decompress(payload)
            append(payload)
            offset = end
        if offset < size:
            self._chunks.append(buffer[offset:] if offset else buffer)
            self._have = size - offset
            self._need = need
        return messages

    def _decompress(self, payload: bytes) -> bytes:
        if self._encoding == "gzip":
            wbits = 31
        elif self._encoding == "deflate":
            wbits = 15  # gRPC's "deflate" is the zlib format
        else:
            raise FramingError(
                grpc.StatusCode.INTERNAL, "compressed message without a grpc-encoding header"
            )
        inflater = zlib.decompressobj(wbits=wbits)
        try:
            # At most one byte past the limit: enough to know it is exceeded.
            message = inflater.decompress(payload, self._max + 1)
        except zlib.error as exc:
            raise FramingError(
                grpc.StatusCode.INTERNAL, f"bad {self._encoding} message: {exc}"
            ) from exc
        if len(message) > self._max:
            raise FramingError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"received message larger than max once decompressed (over {self._max} bytes)",
            )
        if not inflater.eof:
            raise FramingError(grpc.StatusCode.INTERNAL, f"bad {self._encoding} message: truncated")
        return message


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
