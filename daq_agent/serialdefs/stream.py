"""A byte stream in, samples out: a framer and a codec with the counters of every fault.

:class:`FrameStream` is what a serial reader, the ``decode --defs`` command and the benchmark
share: feed it the chunks a port returns with their host read time, get
:class:`~daq_agent.core.sample.Sample` objects back. Nothing in it raises for a bad frame;
every byte is accounted for in its counters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from daq_agent.core.sample import Sample
from daq_agent.serialdefs.codec import CompiledFrame, FrameFault, SerialCodec
from daq_agent.serialdefs.framing import Framer

__all__ = ["COUNTER_NAMES", "FrameStream"]

COUNTER_NAMES: Final = (
    "bytes",
    "frames",
    "checksum_errors",
    "framing_errors",
    "unknown_types",
    "decode_errors",
    "dropped_bytes",
    "missing_checksums",
    "unmatched_values",
)
"""The counters of :meth:`FrameStream.counters`, in a stable order."""

_OTHER: Final = "other"


class FrameStream:
    """Frames and decodes a byte stream incrementally.

    Args:
        codec: the compiled definitions.
        byte_ns: the time one character takes on the line (10 bits / baud for 8N1), used to
            date each frame by the arrival of its first byte inside a chunk; 0 dates every
            frame starting in a chunk with the chunk's read time.
        unknown_limit: how many distinct unknown frame ids are counted separately before the
            rest are counted under ``"other"``.

    Attributes:
        bytes: bytes fed.
        frames: frames decoded into samples.
        unknown_types: frames whose id matched no frame type.
        decode_errors: frames too short, not text, or with a field that does not parse (and
            NMEA sentences without the checksum the definitions require).
        missing_checksums: of ``decode_errors``, the NMEA sentences without a checksum.
        unknown_ids: frames per unknown id (bounded).
    """

    __slots__ = (
        "_codec",
        "_decode",
        "_framer",
        "_has_device_time",
        "_last_t",
        "_on_fault",
        "_unknown_limit",
        "bytes",
        "decode_errors",
        "frames",
        "missing_checksums",
        "unknown_ids",
        "unknown_types",
        "verified_checksum_errors",
    )

    def __init__(
        self,
        codec: SerialCodec,
        *,
        byte_ns: int = 0,
        unknown_limit: int = 256,
        on_fault: Callable[[bytes, FrameFault], None] | None = None,
    ) -> None:
        self._codec = codec
        self._on_fault = on_fault  # called with each frame the codec refused (e.g. to log it)
        self._decode = codec.decoder()
        self._framer: Framer = codec.make_framer(byte_ns)
        self._has_device_time = any(c.timestamp_index >= 0 for c in codec.frames)
        self._unknown_limit = unknown_limit
        self._last_t = 0
        self.bytes = 0
        self.frames = 0
        self.unknown_types = 0
        self.decode_errors = 0
        self.verified_checksum_errors = 0
        self.missing_checksums = 0
        self.unknown_ids: dict[object, int] = {}

    @property
    def codec(self) -> SerialCodec:
        """The codec decoding the frames."""
        return self._codec

    @property
    def framer(self) -> Framer:
        """The framer cutting the stream."""
        return self._framer

    @property
    def checksum_errors(self) -> int:
        """Frames rejected by their checksum (while framing or while decoding)."""
        return self._framer.checksum_errors + self.verified_checksum_errors

    @property
    def framing_errors(self) -> int:
        """Runs of bytes that were not a frame (garbage, oversize, bad COBS/SLIP, bad length)."""
        return self._framer.framing_errors

    @property
    def unmatched_values(self) -> int:
        """Text values outside their field's value table: the sample was kept, that channel
        left empty."""
        return self._codec.unmatched_values

    @property
    def dropped_bytes(self) -> int:
        """Bytes thrown away by the framer."""
        return self._framer.dropped_bytes

    def counters(self) -> dict[str, int]:
        """Every counter by name (see :data:`COUNTER_NAMES`)."""
        return {name: int(getattr(self, name)) for name in COUNTER_NAMES}

    def reset(self, t_ns: int | None = None) -> None:
        """Forget any partial frame and the device clock (the port was reopened); counters are
        kept.

        Args:
            t_ns: the host time the port was opened: no frame is dated before it.
        """
        self._framer.reset()
        self._codec.reset_device_clock()
        if t_ns is not None:
            self._framer.prev_t = max(self._framer.prev_t, t_ns)

    def feed(self, data: bytes, t_ns: int) -> list[Sample]:
        """Add bytes read at host time ``t_ns``; return the samples of the frames they complete.

        A frame's host time is the arrival of its first byte: ``t_ns`` minus the bytes after it
        in this chunk times ``byte_ns`` (none when 0), never before the previous chunk's time
        (or the open time given to :meth:`reset`). Host times of successive samples strictly
        increase (so frames of one chunk read with ``byte_ns`` 0 are 1 ns apart), because a
        sample is identified by its flow and timestamp downstream.

        Args:
            data: the bytes read.
            t_ns: the host time they were read (ns since the epoch).

        Returns:
            One sample per decoded frame, in stream order.
        """
        self.bytes += len(data)
        out: list[Sample] = []
        decode = self._decode
        device_time = self._codec.device_time_ns if self._has_device_time else None
        last = self._last_t
        for frame, t in self._framer.feed(data, t_ns):
            result = decode(frame)
            if type(result) is tuple:
                compiled: CompiledFrame = result[0]
                values = result[1]
                stamp = None
                if device_time is not None and compiled.timestamp_index >= 0:
                    stamp = device_time(compiled, values, t)
                if stamp is not None:
                    t = stamp
                else:
                    # frames read in one chunk share its time; a sample is identified by
                    # (flow, timestamp), so host times strictly increase, 1 ns apart at least
                    if t <= last:
                        t = last + 1
                    last = t
                out.append(Sample(compiled.flow, t, values))
            else:
                self._count_fault(result)  # type: ignore[arg-type]  # narrowed by the type check
                if self._on_fault is not None:
                    self._on_fault(frame, result)  # type: ignore[arg-type]
        self._last_t = last
        self.frames += len(out)
        return out

    def _count_fault(self, fault: FrameFault) -> None:
        if fault is FrameFault.CHECKSUM:
            self.verified_checksum_errors += 1
        elif fault is FrameFault.UNKNOWN_TYPE:
            self.unknown_types += 1
            key = self._codec.last_unknown
            ids = self.unknown_ids
            if key not in ids and len(ids) >= self._unknown_limit:
                key = _OTHER
            ids[key] = ids.get(key, 0) + 1
        else:
            self.decode_errors += 1
            if fault is FrameFault.NO_CHECKSUM:
                self.missing_checksums += 1
