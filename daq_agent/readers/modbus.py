"""ModbusReader: a Modbus TCP or RTU device polled through pymodbus's synchronous client.

The device is named by a URL:

* ``tcp://host:port`` (port 502 by default): Modbus TCP (MBAP framing);
* ``rtu:///dev/ttyUSB0?baudrate=19200&parity=E&stopbits=1&bytesize=8`` (``baud`` is accepted for
  ``baudrate``): Modbus RTU on a serial line; any pyserial URL works after ``rtu://``
  (``rtu://socket://host:port`` included);
* ``rtu+tcp://host:port``: RTU frames over a TCP socket (serial-to-Ethernet gateways).

Its register map (:mod:`daq_agent.decode.registers`) is compiled into one flow per poll group and
the fewest read requests per group (contiguous blocks, at most 125 registers or 2000 bits each,
gaps up to the map's ``max_gap`` merged). A poll of a group reads its blocks in address order and
stops at the first block that fails: the group's sample is emitted only when every block
answered, so a sample never mixes values of two polls.

Counters (:mod:`daq_agent.readers.poll`): a *timeout* is a request with no reply within
``timeout_s`` (pymodbus's ``ModbusIOException``, with ``retries=0``: the next poll is the retry);
an *exception* is a Modbus exception response (per code name in ``exception_codes``:
``ILLEGAL_ADDRESS``…); a *late reply* is a reply to a request that had already timed out. Over
TCP it is recognised by its transaction id (pymodbus skips it; this reader counts it from the
raw bytes pymodbus hands its ``trace_packet`` hook); over RTU, which has no transaction ids,
bytes waiting before a request are discarded as one late reply, so a late
answer is never taken for the next request's. A refused or lost connection is a source failure:
reported, backed off and reconnected.
"""

from __future__ import annotations

import logging
import random
import select
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final
from urllib.parse import parse_qsl, urlsplit

from pymodbus import FramerType
from pymodbus.client import ModbusSerialClient, ModbusTcpClient
from pymodbus.client.base import ModbusBaseSyncClient
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from daq_agent.core.backoff import RetryPolicy
from daq_agent.core.errors import ConfigError, ReaderError
from daq_agent.core.model import FlowConfig
from daq_agent.core.sample import Sample, Value
from daq_agent.decode.registers import Function, RegisterCodec, RegisterMap, load_register_map
from daq_agent.readers.base import ErrorCallback, Sink
from daq_agent.readers.poll import PollFault, PollReaderABC

__all__ = ["ModbusReader", "ModbusTarget", "parse_modbus_url"]

log = logging.getLogger(__name__)

_SERIAL_KEYS: Final = {
    "baud": "baudrate",
    "baudrate": "baudrate",
    "bytesize": "bytesize",
    "parity": "parity",
    "stopbits": "stopbits",
}
_EXCEPTION_NAMES: Final = {code.value: code.name for code in ExcCodes}


@dataclass(frozen=True, slots=True)
class ModbusTarget:
    """Where a Modbus device is and how it is framed.

    Attributes:
        transport: ``tcp`` (a socket) or ``serial`` (a pyserial port).
        framer: ``socket`` (Modbus TCP) or ``rtu``.
        host: the TCP host, or the serial port (a path or pyserial URL).
        port: the TCP port (0 for serial).
        serial: serial line settings (``baudrate``, ``bytesize``, ``parity``, ``stopbits``).
    """

    transport: str
    framer: str
    host: str
    port: int = 0
    serial: tuple[tuple[str, Any], ...] = ()


def parse_modbus_url(url: str) -> ModbusTarget:
    """Parse ``tcp://host:port``, ``rtu+tcp://host:port`` or ``rtu://<port>?baudrate=…``.

    Raises:
        ConfigError: an unknown scheme, a missing host or port, or an invalid line setting.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigError(
            f"{url!r} is not a Modbus URL (tcp://host:port, rtu:///dev/ttyUSB0, "
            "rtu+tcp://host:port)",
            key="url",
        )
    scheme = scheme.lower()
    if scheme in ("tcp", "rtu+tcp"):
        parts = urlsplit(f"tcp://{rest}")
        try:
            port = parts.port or 502
        except ValueError as exc:
            raise ConfigError(f"invalid port in {url!r}", key="url") from exc
        if not parts.hostname:
            raise ConfigError(f"no host in {url!r}", key="url")
        return ModbusTarget("tcp", "socket" if scheme == "tcp" else "rtu", parts.hostname, port)
    if scheme == "rtu":
        path, _, query = rest.partition("?")
        if not path:
            raise ConfigError(f"no serial port in {url!r}", key="url")
        settings: dict[str, Any] = {}
        for key, value in parse_qsl(query, keep_blank_values=True):
            name = _SERIAL_KEYS.get(key)
            if name is None:
                known = ", ".join(sorted(_SERIAL_KEYS))
                raise ConfigError(f"unknown line setting {key!r} (known: {known})", key="url")
            try:
                if name == "parity":
                    if value.upper()[:1] not in ("N", "E", "O", "M", "S"):
                        raise ValueError(value)
                    settings[name] = value.upper()[:1]
                elif name == "stopbits":
                    settings[name] = float(value) if value == "1.5" else int(value)
                else:
                    settings[name] = int(value)
            except ValueError as exc:
                raise ConfigError(f"invalid {key}={value!r} in {url!r}", key="url") from exc
        return ModbusTarget("serial", "rtu", path, 0, tuple(sorted(settings.items())))
    raise ConfigError(f"unknown Modbus URL scheme {scheme!r} (tcp, rtu, rtu+tcp)", key="url")


class ModbusReader(PollReaderABC):
    """Polls a Modbus device's register map and hands one sample per group poll to a sink.

    Args:
        name: the device alias.
        url: see :func:`parse_modbus_url`.
        register_map: the map (loaded, or the path of its YAML file).
        sink: receives every sample.
        unit: the Modbus unit (slave) id, 0 to 247.
        rate_hz: polls per second of each group without a rate of its own.
        timeout_s: the longest to wait for one reply.
        flow_name_template: flow names from ``{device}`` and ``{frame}`` (the group).
        clock: host time in ns.
        on_error: called on the reader thread when the device fails.
        retry: delays between reconnect attempts.
        rng: the random source of the back-off's jitter.

    Raises:
        ConfigError: an invalid URL, unit, rate, timeout or map.
    """

    kind: ClassVar[str] = "modbus"

    def __init__(
        self,
        name: str,
        url: str,
        register_map: RegisterMap | str | Path,
        sink: Sink,
        *,
        unit: int = 1,
        rate_hz: float = 1.0,
        timeout_s: float = 1.0,
        flow_name_template: str = "{device}.{frame}",
        clock: Callable[[], int] | None = None,
        on_error: ErrorCallback | None = None,
        retry: RetryPolicy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(
            name,
            sink,
            rate_hz=rate_hz,
            timeout_s=timeout_s,
            clock=clock,
            on_error=on_error,
            retry=retry,
            rng=rng,
        )
        self.url = url
        self.target = parse_modbus_url(url)
        if isinstance(unit, bool) or not 0 <= unit <= 247:
            raise ConfigError(f"must be 0 to 247, got {unit!r}", key="unit")
        self.unit = unit
        if not isinstance(register_map, RegisterMap):
            register_map = load_register_map(register_map)
        self.codec = RegisterCodec(register_map, name, flow_name_template)
        self._set_rates([g.group.rate_hz for g in self.codec.groups])
        self._client: ModbusBaseSyncClient | None = None
        self._traced = b""  # the receive buffer the hook saw last, and how much of it it read
        self._traced_used = 0

    @property
    def flows(self) -> list[FlowConfig]:
        """One flow per poll group of the map."""
        return self.codec.flows

    def __repr__(self) -> str:
        return f"ModbusReader({self.name!r}, {self.url!r}, state={self.state.value})"

    # -- hooks ----------------------------------------------------------------------------------

    def _open(self) -> None:
        # pymodbus logs every timeout and skipped late reply at ERROR with a frame dump; this
        # reader counts them, so they would only flood the log (unless someone set a level)
        quiet = logging.getLogger("pymodbus")
        if quiet.level == logging.NOTSET:
            quiet.setLevel(logging.CRITICAL)
        target = self.target
        framer = FramerType.SOCKET if target.framer == "socket" else FramerType.RTU
        client: ModbusBaseSyncClient
        trace = self._trace_packet if framer is FramerType.SOCKET else None
        if target.transport == "tcp":
            client = ModbusTcpClient(
                target.host,
                port=target.port,
                framer=framer,
                timeout=self.timeout_s,
                retries=0,
                trace_packet=trace,
            )
        else:
            client = ModbusSerialClient(
                target.host,
                framer=framer,
                timeout=self.timeout_s,
                retries=0,
                **dict(target.serial),
            )
        try:
            connected = client.connect()
        except (ModbusException, OSError, ValueError) as exc:
            client.close()  # type: ignore[no-untyped-call]
            raise ReaderError(f"cannot connect to {self.url}: {exc}") from exc
        if not connected:
            client.close()  # type: ignore[no-untyped-call]
            raise ReaderError(f"cannot connect to {self.url}")
        self._client = client
        self._reset_schedule()

    def _close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()  # type: ignore[no-untyped-call]
            except (OSError, ModbusException):
                pass  # the connection is already gone

    def _poll(self, index: int) -> Sample | PollFault:
        client = self._client
        if client is None:
            raise ReaderError(f"{self.url}: not connected")
        group = self.codec.groups[index]
        values: list[Value] = [None] * group.width
        counters = self.counters.values
        stamp = self._now_ns()
        for number, block in enumerate(group.blocks):
            if self.target.framer == "rtu":
                self._drain_rtu(client)
            counters["requests"] += 1
            try:
                reply = _read(client, block.function, block.address, block.count, self.unit)
            except ModbusIOException:
                return PollFault.TIMEOUT
            except ConnectionException as exc:
                raise ReaderError(f"{self.url}: {exc}") from exc
            except ModbusException as exc:  # a reply pymodbus could not decode
                log.debug("device %s: %s", self.name, exc)
                return PollFault.DECODE
            if reply.isError():
                code = getattr(reply, "exception_code", 0)
                self.counters.add_key("exception_codes", _EXCEPTION_NAMES.get(code, str(code)))
                return PollFault.EXCEPTION
            data = reply.bits if block.function.is_bit else reply.registers
            try:
                group.decode_block(number, data, values)
            except (ValueError, TypeError, UnicodeDecodeError) as exc:
                log.debug("device %s: %s", self.name, exc)
                return PollFault.DECODE
            counters["values_read"] += block.count
        return Sample(group.flow, stamp, tuple(values))

    # -- late replies ----------------------------------------------------------------------------

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        """pymodbus's raw-bytes hook: count complete frames that answer an earlier request.

        pymodbus passes its whole receive buffer, again after each read while a frame is
        incomplete: frames of a buffer that only grew are not counted twice. Only the MBAP
        headers are read (transaction id and length, with ``struct``), not each reply decoded a
        second time with pymodbus's framer.
        """
        client = self._client
        if sending or client is None:
            return data
        used = 0
        if self._traced and data.startswith(self._traced):
            used = self._traced_used
        expected = client.transaction.request_transaction_id
        end = len(data)
        while end - used >= _MBAP.size:
            tid, _protocol, length = _MBAP.unpack_from(data, used)
            if length < 2 or used + 6 + length > end:  # not a frame yet (or not one at all)
                break
            used += 6 + length
            if tid != expected:
                self.counters.add("late_replies")
        self._traced, self._traced_used = data, used
        return data

    def _drain_rtu(self, client: ModbusBaseSyncClient) -> None:
        """Discard what is waiting before a request: a late reply (RTU has no transaction id to
        tell it from the next request's; one non-blocking check per request)."""
        port: Any = getattr(client, "socket", None)
        stale = b""
        try:
            if isinstance(port, socket.socket):
                while select.select([port], [], [], 0)[0]:
                    chunk = port.recv(4096)
                    if not chunk:
                        break
                    stale += chunk
            elif port is not None and int(getattr(port, "in_waiting", 0)):
                stale = port.read(port.in_waiting)
        except (OSError, ValueError) as exc:
            raise ReaderError(f"{self.url}: {exc}") from exc
        if stale:
            self.counters.add("late_replies")


_MBAP = struct.Struct(">HHH")  # the header of a Modbus TCP frame: transaction, protocol, length


def _read(
    client: ModbusBaseSyncClient, function: Function, address: int, count: int, unit: int
) -> Any:
    if function is Function.HOLDING:
        return client.read_holding_registers(address, count=count, device_id=unit)
    if function is Function.INPUT:
        return client.read_input_registers(address, count=count, device_id=unit)
    if function is Function.COIL:
        return client.read_coils(address, count=count, device_id=unit)
    return client.read_discrete_inputs(address, count=count, device_id=unit)
