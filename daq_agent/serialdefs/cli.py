"""``daq-agent decode --defs FILE``: decode a captured serial byte stream, one frame per line.

The same framer and decoder as the agent. A captured stream has no host times, so the timestamp
printed is the device timestamp when the definitions declare one, else empty. Frames that do not
decode are printed too (``!`` lines, or ``{"error": ...}`` with ``--json``; text frames are shown
as text, an NMEA checksum fault with the checksum given and computed, a sentence without one as
``no checksum``), so the output accounts for the whole capture (faults found by the framer, like
garbage between frames or a truncated NMEA sentence, are reported after the frames of the 64 KiB
chunk they were found in); a summary of the counters ends the text output.
"""

from __future__ import annotations

import base64
import json
from typing import BinaryIO, TextIO

from daq_agent.core.model import FlowConfig
from daq_agent.core.sample import Value
from daq_agent.serialdefs.codec import DEFAULT_FLOW_NAME_TEMPLATE, FrameFault, SerialCodec
from daq_agent.serialdefs.framing import NmeaFramer
from daq_agent.serialdefs.loader import load_definitions

__all__ = ["decode_stream", "serial_flows"]

_CHUNK = 65536


def decode_stream(defs_path: str, stream: BinaryIO, out: TextIO, as_json: bool) -> int:
    """Decode every frame of ``stream`` with the definitions in ``defs_path``.

    Args:
        defs_path: the frame-definition YAML file.
        stream: the captured bytes (a file opened in binary mode, or ``sys.stdin.buffer``).
        out: where the decoded frames are printed, one per line.
        as_json: print JSON objects
            (``{"frame", "flow", "timestamp_ns", "fields": {name: value}}``; enum fields carry
            their numeric key, bytes are base64) instead of text.

    Returns:
        0 if every frame decoded, 1 if some bytes or frames could not be decoded.

    Raises:
        ConfigError: the definition file is missing or invalid (file, line, key).
    """
    defs = load_definitions(defs_path)
    codec = SerialCodec(defs, device=defs.name)
    framer = codec.make_framer()
    rejects: list[tuple[str, bytes]] | None = None
    if isinstance(framer, NmeaFramer):
        rejects = framer.rejects = []
    counts = {"frames": 0, "checksum": 0, "unknown_type": 0, "decode": 0, "no_checksum": 0}
    checksum_before = framing_before = dropped_before = 0
    while True:
        chunk = stream.read(_CHUNK)
        if not chunk:
            break
        for frame, _ in framer.feed(chunk, 0):
            result = codec.decode(frame)
            if isinstance(result, FrameFault):
                key = result.name.lower()
                counts[key] += 1
                _print_fault(out, codec, result, frame, as_json)
                continue
            compiled, values = result
            counts["frames"] += 1
            stamp = codec.device_time_ns(compiled, values)
            fields = {c.name: v for c, v in zip(compiled.channels, values, strict=True)}
            if as_json:
                record = {
                    "frame": compiled.name,
                    "flow": compiled.flow,
                    "timestamp_ns": stamp,
                    "fields": {k: _jsonable(v) for k, v in fields.items()},
                }
                out.write(json.dumps(record) + "\n")
            else:
                when = f"{stamp} " if stamp is not None else ""
                text = " ".join(f"{k}={_text(v)}" for k, v in fields.items())
                out.write(f"{when}{compiled.name}: {text}\n")
        # faults found by the framer (garbage, bad encodings; checksums of sync framings)
        rejected = framer.checksum_errors - checksum_before
        checksum_before = framer.checksum_errors
        counts["checksum"] += rejected
        garbage = framer.framing_errors - framing_before
        framing_before = framer.framing_errors
        dropped = framer.dropped_bytes - dropped_before
        dropped_before = framer.dropped_bytes
        for _ in range(rejected):
            out.write(json.dumps({"error": "checksum"}) + "\n" if as_json else "! checksum\n")
        if rejects:
            for reason, data in rejects:
                text = data.decode(defs.text_encoding, errors="backslashreplace")
                shown = text if text.isprintable() else repr(text)[1:-1]
                if as_json:
                    record = {"error": "framing", "reason": reason, "text": shown}
                    out.write(json.dumps(record) + "\n")
                else:
                    out.write(f"! framing ({reason}): {shown}\n")
            rejects.clear()
        elif garbage:
            if as_json:
                record = {"error": "framing", "count": garbage, "dropped_bytes": dropped}
                out.write(json.dumps(record) + "\n")
            else:
                out.write(f"! framing: {garbage} error(s), {dropped} bytes dropped\n")
    if framer.buffered:
        framer.framing_errors += 1
        framer.dropped_bytes += framer.buffered
    if not as_json:
        out.write(
            f"# {counts['frames']} frames decoded, {counts['checksum']} checksum errors, "
            f"{framer.framing_errors} framing errors ({framer.dropped_bytes} bytes dropped), "
            f"{counts['unknown_type']} unknown types, {counts['decode']} decode errors"
            + (f", {counts['no_checksum']} without checksum" if counts["no_checksum"] else "")
            + (
                f", {codec.unmatched_values} values outside their value table"
                if codec.unmatched_values
                else ""
            )
            + "\n"
        )
    bad = (
        counts["checksum"]
        + counts["unknown_type"]
        + counts["decode"]
        + counts["no_checksum"]
        + framer.framing_errors
    )
    return 1 if bad else 0


def serial_flows(
    defs_path: str,
    device: str | None = None,
    flow_name_template: str = DEFAULT_FLOW_NAME_TEMPLATE,
) -> list[FlowConfig]:
    """The flows a device with these definitions gets (for ``daq-agent flows --defs``).

    Args:
        defs_path: the frame-definition YAML file.
        device: the device name (``{device}``; default: the definitions' name).
        flow_name_template: flow names from ``{device}`` and ``{frame}``.

    Returns:
        One flow per frame type, in definition order.

    Raises:
        ConfigError: the file or the template is invalid.
    """
    defs = load_definitions(defs_path)
    return SerialCodec(
        defs, device=device or defs.name, flow_name_template=flow_name_template
    ).flows


def _print_fault(
    out: TextIO, codec: SerialCodec, fault: FrameFault, frame: bytes, as_json: bool
) -> None:
    if as_json:
        record: dict[str, object] = {"error": fault.name.lower(), "raw": frame.hex()}
        if codec.defs.format.is_text:
            record["text"] = frame.decode(codec.defs.text_encoding, errors="backslashreplace")
        if fault is FrameFault.UNKNOWN_TYPE:
            detail = codec.last_unknown
            record["id"] = detail if isinstance(detail, int | str) else str(detail)
        out.write(json.dumps(record) + "\n")
    else:
        out.write(f"! {codec.describe_fault(frame, fault)}\n")


def _jsonable(value: Value) -> object:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    return value


def _text(value: Value) -> str:
    if isinstance(value, bytes):
        return value.hex()
    return str(value)
