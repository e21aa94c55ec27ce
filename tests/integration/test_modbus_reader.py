"""ModbusReader against pymodbus's own server (daq_agent.sim.modbus) on 127.0.0.1."""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from poll_support import Collected, wait_until
from pymodbus.client import ModbusTcpClient
from pymodbus.constants import ExcCodes

from daq_agent.core.backoff import RetryPolicy
from daq_agent.decode.registers import Function, load_register_map, loads_register_map
from daq_agent.readers.base import ReaderState
from daq_agent.readers.modbus import ModbusReader
from daq_agent.sim.modbus import ModbusSimulator

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PM_MAP = REPO / "configs" / "devices" / "pm_meter.yaml"
FAST_RETRY = RetryPolicy(initial_s=0.05, max_s=0.2)


def _balanced(reader: ModbusReader) -> bool:
    c = reader.counters
    return c.get("received") == c.get("decoded") + c.get("timeouts") + c.get("exceptions") + c.get(
        "decode_errors"
    )


def test_values_decode_end_to_end_with_word_swapped_floats_enum_and_bits() -> None:
    """Pinned values travel server → client → register map → sample, each type intact."""
    pm = load_register_map(PM_MAP)
    out = Collected()
    with ModbusSimulator(pm) as sim:
        sim.set_value("voltage_an", 230.5)
        sim.set_value("current_a", 12.75)
        sim.set_value("frequency", 50.02)
        sim.set_value("mode", 3)
        sim.set_value("status", 0b1001)  # alarm, phase_sequence acb (bits 2-3 = 2)
        sim.set_value("energy", 123456.789)
        sim.set_value("remote_enabled", True)
        with ModbusReader("pm1", sim.url, pm, out, rate_hz=20, timeout_s=1.0) as reader:
            wait_until(lambda: len(out.of("pm1.state")) >= 1 and len(out.of("pm1.power")) >= 3)
        power = out.of("pm1.power")[-1].values
        assert (power[0], power[2]) == (230.5, 12.75)
        assert power[4] == pytest.approx(50.02)
        assert 225 <= power[1] <= 235  # not pinned: follows its waveform inside min/max
        state = out.of("pm1.state")[0].values
        assert state[:4] == (3, True, False, 2)
        assert state[4] == pytest.approx(123456.789)
        assert state[5] == "SIM-serial_n"
        assert state[6] is True
    assert reader.counters.get("timeouts") == reader.counters.get("exceptions") == 0
    assert _balanced(reader)


def test_values_change_over_time() -> None:
    """An unpinned point follows the simulator's waveform: successive polls differ."""
    pm = load_register_map(PM_MAP)
    out = Collected()
    with ModbusSimulator(pm) as sim, ModbusReader("pm1", sim.url, pm, out, rate_hz=50):
        wait_until(lambda: len({s.values[1] for s in out.of("pm1.power")}) >= 5)


_BATCH_MAP = (
    "version: 1\nname: t\nmax_gap: {gap}\ngroups:\n  - name: g\n    points:\n"
    "      - {{name: a, address: 0, type: float32}}\n"
    "      - {{name: b, address: 4, type: uint16}}\n"
    "      - {{name: wide, address: 10, type: string, count: 120}}\n"
    "      - {{name: tail, address: 131, type: uint16}}\n"
    "      - {{name: c1, function: coil, address: 0}}\n"
    "      - {{name: c2, function: coil, address: 1}}\n"
)


@pytest.mark.parametrize(
    ("gap", "expected"),
    [
        (
            0,
            {
                (Function.HOLDING, 0, 2),
                (Function.HOLDING, 4, 1),
                (Function.HOLDING, 10, 120),
                (Function.HOLDING, 131, 1),
                (Function.COIL, 0, 2),
            },
        ),
        # 0..5 merged across a gap of 2; 0..131 would be more than 125: a second block
        (10, {(Function.HOLDING, 0, 5), (Function.HOLDING, 10, 122), (Function.COIL, 0, 2)}),
    ],
)
def test_each_block_is_one_request_counted_on_the_server(
    gap: int, expected: set[tuple[Function, int, int]]
) -> None:
    """The server sees one request per block per poll: gaps merged by max_gap, 125 at most."""
    rmap = loads_register_map(_BATCH_MAP.format(gap=gap))
    out = Collected()
    with ModbusSimulator(rmap) as sim:
        with ModbusReader("dev", sim.url, rmap, out, rate_hz=50) as reader:
            wait_until(lambda: len(out.samples) >= 5)
        polls = reader.counters.get("received")
        assert set(sim.requests) == expected
        # every poll asked each block once (the last poll may have been cut short by the stop)
        counts = [sim.requests[key] for key in expected]
        assert max(counts) - min(counts) <= 1
        assert max(counts) == polls
        assert reader.counters.get("requests") == sim.request_count()
        assert reader.counters.get("values_read") == len(out.samples) * sum(
            n for _, _, n in expected
        )


def test_exception_responses_are_counted_by_code_and_no_sample_is_emitted() -> None:
    """ILLEGAL_ADDRESS answers count as exceptions (by code name); the other group goes on."""
    pm = load_register_map(PM_MAP)
    out = Collected()
    with ModbusSimulator(pm) as sim:
        sim.set_exception(ExcCodes.ILLEGAL_ADDRESS, address=3000)
        with ModbusReader("pm1", sim.url, pm, out, rate_hz=20) as reader:
            wait_until(lambda: reader.counters.get("exceptions") >= 5)
            wait_until(lambda: len(out.of("pm1.state")) >= 1)
            assert out.of("pm1.power") == []
            sim.set_exception(None, address=3000)
            wait_until(lambda: len(out.of("pm1.power")) >= 1, what="recovery")
    assert reader.counters.keyed("exception_codes").snapshot() == {
        "ILLEGAL_ADDRESS": reader.counters.get("exceptions")
    }
    assert _balanced(reader)
    assert reader.counters.get("failures") == 0  # an exception is not a device failure


@pytest.mark.parametrize("framer", ["socket", "rtu"])
def test_timeouts_and_late_replies_are_counted(framer: str) -> None:
    """A reply later than timeout_s is a timeout; when it comes, a late reply, never a value."""
    pm = load_register_map(PM_MAP)
    out = Collected()
    with ModbusSimulator(pm, framer=framer) as sim:
        sim.set_delay(0.12, address=3000)  # later than the timeout, before the next poll
        with ModbusReader("pm1", sim.url, pm, out, rate_hz=5, timeout_s=0.05) as reader:
            wait_until(lambda: reader.counters.get("late_replies") >= 2, what="late replies")
            assert reader.counters.get("timeouts") >= 2
            assert out.of("pm1.power") == []
            sim.set_delay(0, address=3000)
            wait_until(lambda: len(out.of("pm1.power")) >= 2, what="recovery")
    assert _balanced(reader)
    assert reader.counters.get("failures") == 0
    if framer == "socket":  # matched by transaction id: exactly one per timeout
        assert reader.counters.get("late_replies") <= reader.counters.get("timeouts")


class _PtyBridge:
    """A real tty for the reader: a pty whose master end is wired, byte for byte, to a TCP
    server (the RTU simulator), so ``rtu:///dev/pts/N`` goes through pyserial's serial port."""

    def __init__(self, port: int) -> None:
        self.master, slave = os.openpty()
        self.path = os.ttyname(slave)
        os.close(slave)  # the reader opens it by name; the master end stays readable
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._pump, name="pty-bridge", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        while not self.stop.is_set():
            ready, _, _ = select.select([self.master, self.sock], [], [], 0.05)
            try:
                if self.master in ready:
                    self.sock.sendall(os.read(self.master, 4096))
                if self.sock in ready:
                    data = self.sock.recv(4096)
                    if not data:
                        return
                    os.write(self.master, data)
            except OSError:  # EIO while no one has the tty open: wait for the reader
                time.sleep(0.01)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()
        os.close(self.master)


@pytest.mark.parametrize("line", ["pty", "pyserial-socket"])
def test_rtu_on_a_serial_port_polls_and_decodes(line: str) -> None:
    """``rtu://PORT`` takes pymodbus's serial client through pyserial: a real pty (the line
    settings applied to a tty), and pyserial's ``socket://`` URL; the RTU frames reach the
    simulator and the values come back decoded."""
    pm = load_register_map(PM_MAP)
    out = Collected()
    with ModbusSimulator(pm, framer="rtu") as sim:
        sim.set_value("voltage_an", 229.25)
        bridge = _PtyBridge(sim.port) if line == "pty" else None
        try:
            where = bridge.path if bridge else f"socket://127.0.0.1:{sim.port}"
            url = f"rtu://{where}?baudrate=115200&parity=N"
            with ModbusReader("pm1", url, pm, out, rate_hz=20, timeout_s=1.0) as reader:
                wait_until(lambda: len(out.of("pm1.power")) >= 3, what="samples over RTU")
        finally:
            if bridge is not None:
                bridge.close()
    assert {s.values[0] for s in out.of("pm1.power")} == {229.25}
    assert reader.counters.get("opens") == 1
    assert reader.counters.get("timeouts") == reader.counters.get("exceptions") == 0
    assert _balanced(reader)


def test_late_replies_are_counted_once_from_the_receive_buffer() -> None:
    """The raw-bytes hook sees pymodbus's receive buffer, again each time it grows: a late
    frame is counted once, an incomplete one not yet, the expected reply never."""
    pm = load_register_map(PM_MAP)
    reader = ModbusReader("pm1", "tcp://127.0.0.1:1", pm, Collected())
    client = ModbusTcpClient("127.0.0.1", port=1)  # never connected: its transaction state
    client.transaction.request_transaction_id = 7
    reader._client = client

    def frame(tid: int) -> bytes:  # MBAP header + unit + read-holding reply of one register
        return struct.pack(">HHHBBBH", tid, 0, 5, 1, 3, 2, 0x1234)

    late, answer = frame(6), frame(7)
    assert reader._trace_packet(False, late + answer[:4]) == late + answer[:4]
    assert reader.counters.get("late_replies") == 1
    reader._trace_packet(False, late + answer)  # the same buffer, grown: not counted again
    assert reader.counters.get("late_replies") == 1
    reader._trace_packet(False, frame(5)[:8])  # a new buffer, its frame incomplete
    assert reader.counters.get("late_replies") == 1
    reader._trace_packet(False, frame(5))
    assert reader.counters.get("late_replies") == 2
    reader._trace_packet(True, frame(1))  # what is sent is never a reply
    assert reader.counters.get("late_replies") == 2


def test_a_vanished_server_is_retried_and_polling_resumes() -> None:
    """Server gone: failures counted, the thread backs off and lives; back: samples again."""
    pm = load_register_map(PM_MAP)
    out = Collected()
    sim = ModbusSimulator(pm)
    sim.start()
    port = sim.port
    reader = ModbusReader("pm1", sim.url, pm, out, rate_hz=20, timeout_s=0.2, retry=FAST_RETRY)
    try:
        reader.start()
        wait_until(lambda: len(out.of("pm1.power")) >= 2)
        sim.stop()
        wait_until(lambda: reader.counters.get("failures") >= 3, what="failures")
        assert reader.is_alive()
        assert reader.state in (ReaderState.BACKOFF, ReaderState.OPENING)
        seen = len(out.of("pm1.power"))
        sim = ModbusSimulator(pm, port=port)
        sim.start()
        wait_until(lambda: len(out.of("pm1.power")) >= seen + 2, what="samples after restart")
        assert reader.counters.get("reopens") >= 1
    finally:
        reader.stop()
        sim.stop()
    assert "cannot connect" in reader.counters.last_error


def test_a_refused_connection_never_kills_the_thread() -> None:
    """Nothing listening: the reader keeps retrying with its back-off."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pm = load_register_map(PM_MAP)
    with ModbusReader(
        "pm1", f"tcp://127.0.0.1:{port}", pm, Collected(), retry=FAST_RETRY
    ) as reader:
        wait_until(lambda: reader.counters.get("failures") >= 3)
        assert reader.is_alive()
        assert reader.counters.get("opens") == 0
        assert "cannot connect" in reader.counters.last_error


def test_simulate_modbus_command_serves_the_map() -> None:
    """`daq-agent simulate modbus` prints its URL, serves pinned values, stops on SIGTERM."""
    command = [sys.executable, "-m", "daq_agent.cli", "simulate", "modbus", "--map", str(PM_MAP)]
    command += ["--port", "0", "--pin", "voltage_an=231.5", "--duration", "60"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("tcp://127.0.0.1:")
        out = Collected()
        pm = load_register_map(PM_MAP)
        with ModbusReader("pm1", url, pm, out, rate_hz=20):
            wait_until(lambda: len(out.of("pm1.power")) >= 2)
        assert out.of("pm1.power")[0].values[0] == 231.5
    finally:
        process.terminate()
        _, err = process.communicate(timeout=20)
    assert process.returncode == 0
    assert "served" in err
