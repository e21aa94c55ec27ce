"""A Modbus device simulated from its register map: pymodbus's own server in a thread.

:class:`ModbusSimulator` serves a register map (:mod:`daq_agent.decode.registers`) on
``127.0.0.1`` (port 0: a free port, see :attr:`ModbusSimulator.port`) with pymodbus's asyncio
server (Modbus TCP, or RTU frames over TCP with ``framer="rtu"``), on its own event loop in a
thread named ``daq-sim-modbus``. Every register a request reads is computed at that moment from
the time since start, so values change over time like a real meter's:

* a numeric point follows a sine inside its ``min``/``max`` (a ramp over 0..1000 without them);
* an enum cycles through its values, a bit field counts, a bool toggles, a string is fixed;
* :meth:`ModbusSimulator.set_value` pins a point to a value (engineering units).

For tests and demos it can misbehave, per address or for every request: answer with a Modbus
exception (:meth:`~ModbusSimulator.set_exception`), answer late
(:meth:`~ModbusSimulator.set_delay`), or vanish and come back (:meth:`~ModbusSimulator.stop`,
then a new simulator on the same port). It counts the requests it receives, by
(function, address, count), from pymodbus's server-side ``trace_pdu`` hook (:attr:`requests`).

``daq-agent simulate modbus --map FILE [--port N] [--unit N]`` runs one until stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Final

from pymodbus import FramerType
from pymodbus.constants import ExcCodes
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from daq_agent.core.errors import ConfigError, ReaderError
from daq_agent.core.signals import stop_on_signals
from daq_agent.decode.registers import (
    Function,
    Point,
    RegisterMap,
    encode_point,
    load_register_map,
)

__all__ = ["ModbusSimulator", "run"]

_BLOCK_KEYS: Final = {
    Function.COIL: 0,
    Function.DISCRETE: 1,
    Function.HOLDING: 2,
    Function.INPUT: 3,
}
_FUNCTION_OF_CODE: Final = {
    1: Function.COIL,
    5: Function.COIL,
    15: Function.COIL,
    2: Function.DISCRETE,
    3: Function.HOLDING,
    6: Function.HOLDING,
    16: Function.HOLDING,
    4: Function.INPUT,
}


class ModbusSimulator:
    """Serves a register map with values that change over time.

    Args:
        register_map: the map (or the path of its YAML file).
        unit: the unit id answered (0: every unit).
        host: the address to listen on.
        port: the TCP port (0: a free one).
        framer: ``socket`` (Modbus TCP) or ``rtu`` (RTU frames over TCP).
        spare: addresses served beyond the map's last one (reads there return 0).

    Raises:
        ConfigError: an invalid map, unit or framer.
    """

    def __init__(
        self,
        register_map: RegisterMap | str | Path,
        *,
        unit: int = 1,
        host: str = "127.0.0.1",
        port: int = 0,
        framer: str = "socket",
        spare: int = 16,
    ) -> None:
        if not isinstance(register_map, RegisterMap):
            register_map = load_register_map(register_map)
        if framer not in ("socket", "rtu"):
            raise ConfigError(f"framer must be socket or rtu, not {framer!r}")
        if not 0 <= unit <= 247:
            raise ConfigError(f"unit must be 0 to 247, got {unit}")
        self.map = register_map
        self.unit = unit
        self.host = host
        self._want_port = port
        self.framer = FramerType.SOCKET if framer == "socket" else FramerType.RTU
        self.points: tuple[Point, ...] = tuple(p for g in register_map.groups for p in g.points)
        self._by_function: dict[Function, list[Point]] = {f: [] for f in Function}
        for point in self.points:
            self._by_function[point.function].append(point)
        self._ends = {
            f: max((p.end for p in pts), default=0) + spare for f, pts in self._by_function.items()
        }
        self._pinned: dict[str, float | int | str | bool] = {}
        self._delays: dict[int | None, float] = {}
        self._exceptions: dict[int | None, ExcCodes] = {}
        self._lock = threading.Lock()
        self.requests: Counter[tuple[Function, int, int]] = Counter()
        """Requests received: (function, address, count) → how many."""
        self._started_at = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: ModbusTcpServer | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.port = 0
        """The port it listens on (known once started)."""

    # -- control --------------------------------------------------------------------------------

    def set_value(self, name: str, value: float | int | str | bool | None) -> None:
        """Pin point ``name`` to ``value`` (engineering units; the raw integer for a point with
        bit fields); None lets it follow its waveform again.

        Raises:
            KeyError: no such point.
        """
        if not any(p.name == name for p in self.points):
            raise KeyError(name)
        with self._lock:
            if value is None:
                self._pinned.pop(name, None)
            else:
                self._pinned[name] = value

    def set_delay(self, seconds: float, address: int | None = None) -> None:
        """Answer requests starting at ``address`` (None: every request) ``seconds`` late
        (0: on time again)."""
        with self._lock:
            if seconds > 0:
                self._delays[address] = seconds
            else:
                self._delays.pop(address, None)

    def set_exception(self, code: ExcCodes | None, address: int | None = None) -> None:
        """Answer requests starting at ``address`` (None: every request) with exception
        ``code`` (None: normally again)."""
        with self._lock:
            if code is None:
                self._exceptions.pop(address, None)
            else:
                self._exceptions[address] = code

    def request_count(self) -> int:
        """Read requests received so far."""
        with self._lock:
            return sum(self.requests.values())

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Start serving (returns once it listens).

        Raises:
            ReaderError: the server could not listen (the port is taken…).
        """
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="daq-sim-modbus", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            self.stop()
            raise ReaderError(f"the Modbus simulator did not start: {self._error}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and join the thread (idempotent); open connections are closed."""
        loop, server, thread = self._loop, self._server, self._thread
        if loop is not None and server is not None and not loop.is_closed():
            try:
                closing = server.shutdown()  # type: ignore[no-untyped-call]
                asyncio.run_coroutine_threadsafe(closing, loop).result(timeout)
            except (RuntimeError, TimeoutError, asyncio.CancelledError):
                pass  # the loop already ended
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._thread = None

    def __enter__(self) -> ModbusSimulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The URL a :class:`~daq_agent.readers.modbus.ModbusReader` connects to."""
        scheme = "tcp" if self.framer is FramerType.SOCKET else "rtu+tcp"
        return f"{scheme}://{self.host}:{self.port}"

    # -- the server ------------------------------------------------------------------------------

    def _device(self) -> SimDevice:
        blocks: list[list[SimData]] = []
        for function in (Function.COIL, Function.DISCRETE, Function.HOLDING, Function.INPUT):
            end = self._ends[function]
            if function.is_bit:
                bits = -(-end // 16) * 16
                blocks.append([SimData(0, count=bits, values=False, datatype=DataType.BITS)])
            else:
                blocks.append([SimData(0, count=end, values=0, datatype=DataType.REGISTERS)])
        return SimDevice(
            self.unit,
            simdata=(blocks[0], blocks[1], blocks[2], blocks[3]),
            use_bit_addressing=True,
            action=self._action,
        )

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start(); the thread ends either way
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        server = ModbusTcpServer(
            self._device(),
            address=(self.host, self._want_port),
            framer=self.framer,
            trace_pdu=self._trace_pdu,
        )
        await server.serve_forever(background=True)
        listener: Any = server.transport
        self.port = int(listener.sockets[0].getsockname()[1])
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._started_at = time.monotonic()
        self._ready.set()
        await server.serving
        server.close()

    def _trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            function = _FUNCTION_OF_CODE.get(pdu.function_code)
            if function is not None:
                with self._lock:
                    self.requests[(function, pdu.address, pdu.count)] += 1
        return pdu

    async def _action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        function = _FUNCTION_OF_CODE.get(function_code)
        with self._lock:
            delay = self._delays.get(address, self._delays.get(None, 0.0))
            code = self._exceptions.get(address, self._exceptions.get(None))
            pinned = dict(self._pinned)
        if delay:
            await asyncio.sleep(delay)
        if code is not None:
            return code
        if function is None or set_values is not None:
            return None
        t = time.monotonic() - self._started_at
        if function.is_bit:
            first, last = address, address + count * 16
        else:
            first, last = address, address + count
        for point in self._by_function[function]:
            if point.end <= first or point.address >= last:
                continue
            value = pinned.get(point.name)
            if value is None:
                value = _wave(point, t)
            words = encode_point(point, value)
            if function.is_bit:
                index, bit = divmod(point.address, 16)
                index -= start_address
                if words[0]:
                    registers[index] |= 1 << bit
                else:
                    registers[index] &= ~(1 << bit)
            else:
                at = point.address - start_address
                registers[at : at + len(words)] = [int(w) for w in words]
        return None


def _wave(point: Point, t: float) -> float | int | str | bool:
    """The value of ``point`` at ``t`` seconds since start."""
    if point.function.is_bit or point.type == "bool":
        return int(t * 2 + point.address) % 2 == 1
    if point.type == "string":
        return f"SIM-{point.name}"[: point.count * 2]
    if point.values:
        keys = [k for k, _ in point.values]
        return keys[int(t) % len(keys)]
    if point.bits:
        return int(t * 4) & 0xFFFF
    period = 10.0 + (point.address % 7)
    if point.minimum is not None and point.maximum is not None:
        low, high = point.minimum, point.maximum
        return low + (high - low) * (0.5 + 0.5 * math.sin(2 * math.pi * t / period))
    return (t * 10.0) % 1000.0


# -- the command ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM or ``--duration``; prints the URL, then the request count."""
    sim = ModbusSimulator(
        args.map, unit=args.unit, host=args.host, port=args.port, framer=args.framer
    )
    for item in args.pin:
        name, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--pin wants POINT=VALUE, got {item!r}")
        sim.set_value(name, _number(text))
    stop = threading.Event()
    with stop_on_signals(stop):
        try:
            sim.start()
            print(sim.url, flush=True)
            stop.wait(args.duration)
        finally:
            sim.stop()
    print(f"served {sim.request_count()} requests", file=sys.stderr)
    return 0


def _number(text: str) -> float | int | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text
