"""SerialReader against real ports: a pty, a pty that vanishes and comes back at a symlinked
path, and a TCP peer (socket://) that goes away and returns."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from daq_agent.core.backoff import RetryPolicy
from daq_agent.core.errors import ConfigError
from daq_agent.core.sample import Sample, Value
from daq_agent.readers.base import ReaderState
from daq_agent.readers.serial import SerialReader
from daq_agent.serialdefs import SerialCodec, load_definitions

pytestmark = pytest.mark.integration

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "serial"
IMU = CONFIGS / "imu_cobs.yaml"
GPS = CONFIGS / "gps_nmea.yaml"
FAST_RETRY = RetryPolicy(initial_s=0.02, max_s=0.1)


class Collector:
    """A sink that records samples and lets a test wait for a count."""

    def __init__(self) -> None:
        self.samples: list[Sample] = []
        self._cond = threading.Condition()

    def __call__(self, sample: Sample) -> None:
        with self._cond:
            self.samples.append(sample)
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        """Wait until at least ``count`` samples arrived."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.samples) >= count, timeout)


class Pty:
    """A pseudo-terminal: the test writes to the master, the reader opens the slave path."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.master, view)
            view = view[written:]

    def close(self) -> None:
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def pty_port() -> Iterator[Pty]:
    """A raw pty, closed after the test."""
    port = Pty()
    try:
        yield port
    finally:
        port.close()


def imu_values(i: int) -> dict[str, Value]:
    """Plausible IMU values for sample ``i``."""
    return {
        "seq": i % 65536,
        "time_us": 5000 * i,
        "accel_x": round(0.0006 * (i % 100), 4),
        "accel_y": -1.2,
        "accel_z": 9.81,
        "gyro_x": 0.5,
        "gyro_y": -0.25,
        "gyro_z": 12.0,
        "temperature": 25.0 + (i % 7) * 0.01,
        "mode": 2,
        "accel_ok": True,
        "gyro_ok": i % 2 == 0,
        "mag_ok": False,
        "saturated": False,
        "filter_state": 2,
    }


def test_pty_end_to_end_with_garbage(pty_port: Pty) -> None:
    """Frames written to a pty (with garbage bursts between them) all reach the sink, decoded."""
    defs = load_definitions(IMU)
    codec = SerialCodec(defs, device="imu0")
    sink = Collector()
    reader = SerialReader(
        name="imu0",
        url=pty_port.path,
        serial_options={"baudrate": 921600, "parity": "N", "stopbits": 1, "bytesize": 8},
        defs=defs,
        sink=sink,
    )
    with reader:
        assert reader.wait_state(ReaderState.RUNNING, timeout=5)
        count = 300
        chunks = []
        for i in range(count):
            if i % 50 == 25:
                chunks.append(bytes(range(1, 40)))  # a garbage burst without a delimiter
            chunks.append(codec.encode("imu", imu_values(i)))
        pty_port.write(b"".join(chunks))
        assert sink.wait_for(count), reader.counters.snapshot()
    assert reader.state is ReaderState.STOPPED
    assert [s.values[0] for s in sink.samples] == list(range(count))
    first = sink.samples[0]
    assert first.flow == "imu0.imu"
    assert first.values[9] == 2  # mode: running (the enum key)
    assert first.values[10] is True
    counters = reader.counters
    assert counters.get("decoded") == count
    assert counters.get("framing_errors") == 6  # each burst is isolated by COBS delimiters
    assert counters.get("dropped_bytes") == 6 * 39
    assert counters.get("checksum_errors") == 0
    outcomes = ("decoded", "unknown", "checksum_errors", "framing_errors", "decode_errors")
    assert counters.get("received") == sum(counters.get(n) for n in outcomes) == count + 6
    assert counters.get("bytes") == sum(len(c) for c in chunks)
    assert [f.name for f in reader.flows] == ["imu0.imu", "imu0.status"]


def test_pty_nmea_and_host_timestamps(pty_port: Pty) -> None:
    """NMEA sentences through a pty get host receive times within the test's time window."""
    defs = load_definitions(GPS)
    codec = SerialCodec(defs, device="gps")
    sink = Collector()
    reader = SerialReader("gps", pty_port.path, {"baudrate": 9600}, GPS, sink)
    with reader:
        assert reader.wait_state(ReaderState.RUNNING, timeout=5)
        before = time.time_ns()
        pty_port.write(
            codec.encode("gga", {"utc_time": 1.0, "latitude": 48.12, "longitude": 11.52})
            + b"$GPZDA,garbage*00\r\n"
            + codec.encode("vtg", {"course_true": 90.0, "speed_kmh": 10.0, "mode": "A"})
        )
        assert sink.wait_for(2)
        after = time.time_ns()
    assert [s.flow for s in sink.samples] == ["gps.gga", "gps.vtg"]
    assert all(before - 50_000_000 <= s.timestamp_ns <= after for s in sink.samples)
    assert reader.counters.get("checksum_errors") == 1
    assert reader.byte_time_ns == 0  # a pty: no interpolation from the baud rate


def test_port_vanishes_and_comes_back(tmp_path: Path) -> None:
    """When the pty behind a symlinked path disappears, the reader reports, backs off, and
    reads the new device once it appears at the same path."""
    link = tmp_path / "ttyIMU"
    defs = load_definitions(IMU)
    codec = SerialCodec(defs, device="imu")
    errors: list[BaseException] = []
    sink = Collector()
    first = Pty()
    second: Pty | None = None
    link.symlink_to(first.path)
    reader = SerialReader(
        "imu",
        str(link),
        {"baudrate": 115200},
        defs,
        sink,
        retry=FAST_RETRY,
        on_error=lambda _reader, exc: errors.append(exc),
    )
    try:
        reader.start()
        assert reader.wait_state(ReaderState.RUNNING, timeout=5)
        first.write(b"".join(codec.encode("imu", imu_values(i)) for i in range(10)))
        assert sink.wait_for(10)
        first.close()  # unplugged
        link.unlink()
        assert reader.wait_state(ReaderState.BACKOFF, ReaderState.OPENING, timeout=5)
        second = Pty()
        tmp_link = tmp_path / "ttyIMU.new"
        tmp_link.symlink_to(second.path)
        tmp_link.replace(link)  # plugged back in
        deadline = time.monotonic() + 10
        while reader.counters.get("reopens") < 1 and time.monotonic() < deadline:
            reader.wait_state(ReaderState.RUNNING, timeout=0.1)
        assert reader.counters.get("reopens") >= 1
        assert reader.wait_state(ReaderState.RUNNING, timeout=5)
        second.write(b"".join(codec.encode("imu", imu_values(i)) for i in range(10, 20)))
        assert sink.wait_for(20)
    finally:
        reader.stop()
        first.close()
        if second is not None:
            second.close()
    assert [s.values[0] for s in sink.samples] == list(range(20))
    assert reader.byte_time_ns == 0  # a pty behind a symlink: no baud-rate interpolation
    assert reader.counters.get("failures") >= 1
    assert errors
    assert "imu" in reader.counters.last_error or reader.counters.last_error


def _listen(port: int = 0) -> socket.socket:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(1)
    server.settimeout(10)
    return server


def test_socket_peer_goes_away_and_returns() -> None:
    """A socket:// device whose peer closes is reopened when the peer listens again."""
    defs = load_definitions(IMU)
    codec = SerialCodec(defs, device="net")
    sink = Collector()
    server = _listen()
    port = server.getsockname()[1]
    reader = SerialReader("net", f"socket://127.0.0.1:{port}", None, defs, sink, retry=FAST_RETRY)
    try:
        reader.start()
        conn, _ = server.accept()
        with conn:
            # pyserial flushes its input when opening: send once the reader runs
            assert reader.wait_state(ReaderState.RUNNING, timeout=5)
            conn.sendall(b"".join(codec.encode("imu", imu_values(i)) for i in range(5)))
            assert sink.wait_for(5)
        server.close()  # the peer is gone; reconnects are refused
        assert reader.wait_state(ReaderState.BACKOFF, timeout=5)
        server = _listen(port)
        conn, _ = server.accept()
        with conn:
            deadline = time.monotonic() + 5
            while reader.counters.get("reopens") < 1 and time.monotonic() < deadline:
                reader.wait_state(ReaderState.RUNNING, timeout=0.05)
            assert reader.wait_state(ReaderState.RUNNING, timeout=5)
            conn.sendall(b"".join(codec.encode("imu", imu_values(i)) for i in range(5, 12)))
            assert sink.wait_for(12)
    finally:
        reader.stop()
        server.close()
    assert [s.values[0] for s in sink.samples] == list(range(12))
    assert reader.counters.get("reopens") >= 1


def test_unknown_url_scheme_fails_without_retrying() -> None:
    """A URL scheme pyserial does not know is a configuration error: the reader stops trying."""
    reader = SerialReader("bad", "nosuchscheme://x", None, IMU, Collector(), retry=FAST_RETRY)
    with reader:
        assert reader.wait_state(ReaderState.FAILED, timeout=5)
    assert reader.counters.get("failures") == 1
    assert "nosuchscheme" in reader.counters.last_error


def test_missing_device_is_retried(tmp_path: Path) -> None:
    """A device path that does not exist yet is retried with back-off, never fatal."""
    reader = SerialReader(
        "later", str(tmp_path / "ttyNONE"), None, IMU, Collector(), retry=FAST_RETRY
    )
    with reader:
        deadline = time.monotonic() + 5
        while reader.counters.get("failures") < 3 and time.monotonic() < deadline:
            reader.wait_state(ReaderState.OPENING, timeout=0.05)
        assert reader.counters.get("failures") >= 3
        assert reader.is_alive()
    assert reader.state is ReaderState.STOPPED


def test_invalid_serial_options_are_config_errors() -> None:
    """Unknown keys and impossible line settings raise ConfigError naming the key."""
    with pytest.raises(ConfigError, match=r"serial_options\.parity"):
        SerialReader("x", "loop://", {"parity": "Q"}, IMU, Collector())
    with pytest.raises(ConfigError, match=r"serial_options\.speed"):
        SerialReader("x", "loop://", {"speed": 9600}, IMU, Collector())
    with pytest.raises(ConfigError, match=r"serial_options\.stopbits"):
        SerialReader("x", "loop://", {"stopbits": 3}, IMU, Collector())


def test_from_agent_config(pty_port: Pty) -> None:
    """A reader built from the agent config's serial device reads its port with its settings."""
    from daq_agent.config import SerialConfig

    device = SerialConfig(name="gnss", port=pty_port.path, defs=GPS, baudrate=4800, parity="E")
    sink = Collector()
    reader = SerialReader.from_config(device, sink, flow_name_template="bench/{device}/{frame}")
    assert reader.options["baudrate"] == 4800
    assert reader.options["parity"] == "E"
    assert [f.name for f in reader.flows] == ["bench/gnss/gga", "bench/gnss/rmc", "bench/gnss/vtg"]
    codec = SerialCodec(load_definitions(GPS), device="gnss")
    with reader:
        assert reader.wait_state(ReaderState.RUNNING, timeout=5)
        pty_port.write(codec.encode("vtg", {"course_true": 1.5}))
        assert sink.wait_for(1)
    assert sink.samples[0].flow == "bench/gnss/vtg"
    with pytest.raises(ConfigError, match=r"serial\[gnss\]\.serial_options\.stopbits"):
        SerialReader.from_config(
            SerialConfig(name="gnss", port="loop://", defs=GPS, stopbits=3), Collector()
        )


@pytest.mark.hardware
def test_real_port_with_loopback_plug() -> None:
    """A real serial port with TX wired to RX (DAQ_SERIAL_LOOPBACK=/dev/ttyUSB0) reads back
    the frames written to it at 115200 8N1."""
    import serial

    port_path = os.environ.get("DAQ_SERIAL_LOOPBACK", "")
    if os.environ.get("DAQ_HARDWARE") != "1" or not port_path:
        pytest.skip("needs DAQ_HARDWARE=1 and DAQ_SERIAL_LOOPBACK=<a port with a loopback plug>")
    defs = load_definitions(IMU)
    codec = SerialCodec(defs, device="hw")
    sink = Collector()
    reader = SerialReader("hw", port_path, {"baudrate": 115200}, defs, sink)
    assert reader.byte_time_ns == round(10 * 1e9 / 115200)
    with reader, serial.serial_for_url(port_path, baudrate=115200) as writer:
        assert reader.wait_state(ReaderState.RUNNING, timeout=5)
        writer.write(b"".join(codec.encode("imu", imu_values(i)) for i in range(100)))
        assert sink.wait_for(100, timeout=20)
    assert [s.values[0] for s in sink.samples] == list(range(100))


def _nmea(body: str) -> bytes:
    checksum = 0
    for char in body.encode():
        checksum ^= char
    return f"${body}*{checksum:02X}\r\n".encode()


def test_refused_frames_are_logged_as_text_at_debug(
    pty_port: Pty, caplog: pytest.LogCaptureFixture
) -> None:
    """With -vv, each frame the codec refuses is logged with the device's name and the frame as
    text (a sentence without a checksum, an unknown sentence type); the good ones decode."""
    caplog.set_level(logging.DEBUG, logger="daq_agent.readers.serial")
    codec = SerialCodec(load_definitions(GPS), device="gps")
    sink = Collector()
    reader = SerialReader("gps", pty_port.path, {"baudrate": 9600}, GPS, sink)
    with reader:
        assert reader.wait_state(ReaderState.RUNNING, timeout=5)
        pty_port.write(
            b"$GPGGA,000001.00,4807.2000,N,01131.2000,E,1,08,0.9,545.4,M,46.9,M,,\r\n"
            + _nmea("GPXYZ,1,2,3")
            + codec.encode("vtg", {"course_true": 90.0, "speed_kmh": 10.0, "mode": "A"})
        )
        assert sink.wait_for(1)
        deadline = time.monotonic() + 5
        while reader.counters.get("unknown") < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    lines = [r.getMessage() for r in caplog.records if r.name == "daq_agent.readers.serial"]
    assert any(
        line.startswith("serial gps: ") and "no checksum" in line and "$GPGGA,000001.00" in line
        for line in lines
    ), lines
    assert any("GPXYZ,1,2,3" in line for line in lines), lines
    assert [s.flow for s in sink.samples] == ["gps.vtg"]
