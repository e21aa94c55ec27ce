"""ScpiReader: a line-query instrument (SCPI and the like) on any pyserial port, polled.

The reader sends each query of its *query file* at the query's rate on a pyserial URL
(``/dev/ttyUSB0``, ``socket://host:port``, ``rfc2217://…``), reads the reply up to the
terminator within ``timeout_s``, and decodes it with the serial frame language
(:mod:`daq_agent.serialdefs`: the reply is one text frame of a ``csv``, ``key_value`` or
``regex`` format). A query file is the frame language's top-level settings plus ``queries``, each
with its reply's frame definition::

    version: 1
    name: psu
    format: csv
    framing: {kind: line, terminator: "\\n", max_length: 256}
    write_terminator: "\\n"             # appended to every query (default "\\n")
    queries:
      - query: "MEAS:VOLT?;:MEAS:CURR?"
        rate_hz: 5                      # default: the device's rate
        reply:                          # a frame definition: its name is the flow's {frame}
          name: output
          fields:
            - {name: voltage, type: float, unit: V}
            - {name: current, type: float, unit: A}

Counters (:mod:`daq_agent.readers.poll`): a *timeout* is a query without a complete reply in
time; a *decode error* a reply the frame does not decode (an instrument's error text included);
``exceptions`` stays 0 (SCPI reports errors through its error queue, which is just another
query). Replies waiting before a query is sent (late answers to a query that timed out) are
discarded and counted in ``late_replies``, one per terminator, so a late answer is never taken
for the next query's (a reply later than its timeout plus one poll period still can be: choose a
timeout longer than the instrument's slowest answer).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final

import serial

from daq_agent.core.backoff import RetryPolicy
from daq_agent.core.errors import ConfigError, ReaderError
from daq_agent.core.model import FlowConfig
from daq_agent.core.sample import Sample
from daq_agent.core.yamlfile import parse_yaml, read_text
from daq_agent.readers.base import ErrorCallback, Sink
from daq_agent.readers.poll import PollFault, PollReaderABC
from daq_agent.readers.serial import normalize_serial_options
from daq_agent.serialdefs.codec import SerialCodec
from daq_agent.serialdefs.loader import parse_definitions
from daq_agent.serialdefs.model import FormatKind, SerialDefinitions

__all__ = ["Query", "QueryFile", "ScpiReader", "load_query_file", "loads_query_file"]

_QUERY_KEYS: Final = frozenset({"query", "rate_hz", "reply"})
_OWN_KEYS: Final = frozenset({"queries", "write_terminator"})
_TEXT_FORMATS: Final = frozenset({FormatKind.CSV, FormatKind.KEY_VALUE, FormatKind.REGEX})


@dataclass(frozen=True, slots=True)
class Query:
    """One query and how its reply decodes.

    Attributes:
        text: what is sent (without the write terminator).
        defs: frame definitions with exactly one frame: the reply.
        rate_hz: its own poll rate (None: the device's).
    """

    text: str
    defs: SerialDefinitions
    rate_hz: float | None = None


@dataclass(frozen=True, slots=True)
class QueryFile:
    """A line-query instrument's queries (one YAML file).

    Attributes:
        name: the instrument type.
        queries: the queries, in poll order.
        write_terminator: appended to every query.
        terminator: ends every reply (the framing's terminator).
        max_length: the longest reply, bytes.
        source: the file.
    """

    name: str
    queries: tuple[Query, ...]
    write_terminator: bytes = b"\n"
    terminator: bytes = b"\n"
    max_length: int = 4096
    source: str = dataclasses.field(default="", compare=False)


def load_query_file(path: str | Path) -> QueryFile:
    """Load a query file.

    Raises:
        ConfigError: it cannot be read, is not YAML, or is invalid (names file, line, key).
    """
    return loads_query_file(read_text(path), source=str(path))


def loads_query_file(text: str, *, source: str = "<string>") -> QueryFile:
    """Parse a query file from YAML text.

    Raises:
        ConfigError: invalid YAML or an invalid file (names source, line, key).
    """
    document, lines = parse_yaml(text, source)
    if not isinstance(document, Mapping):
        raise ConfigError("must be a mapping with queries", source=source, line=1)
    shared = {k: v for k, v in document.items() if k not in _OWN_KEYS}
    terminator = document.get("write_terminator", "\n")
    if not isinstance(terminator, str):
        raise ConfigError(
            "must be a string",
            source=source,
            key="write_terminator",
            line=lines.get("write_terminator"),
        )
    raw = document.get("queries")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(
            "must be a non-empty list of queries",
            source=source,
            key="queries",
            line=lines.get("queries"),
        )
    queries: list[Query] = []
    flows: set[str] = set()
    for i, item in enumerate(raw):
        where = f"queries[{i}]"
        if not isinstance(item, Mapping) or set(item) - _QUERY_KEYS:
            unknown = sorted(set(item) - _QUERY_KEYS) if isinstance(item, Mapping) else []
            reason = f"unknown key {unknown[0]!r}" if unknown else "must be a mapping"
            raise ConfigError(
                f"{reason} (expected: query, rate_hz, reply)",
                source=source,
                key=where,
                line=lines.get(where),
            )
        query = item.get("query")
        if not isinstance(query, str) or not query:
            raise ConfigError(
                "is required (the text sent)",
                source=source,
                key=f"{where}.query",
                line=lines.get(where),
            )
        rate = item.get("rate_hz")
        if rate is not None and (
            isinstance(rate, bool) or not isinstance(rate, int | float) or not rate > 0
        ):
            raise ConfigError(
                f"must be > 0, got {rate!r}",
                source=source,
                key=f"{where}.rate_hz",
                line=lines.get(f"{where}.rate_hz"),
            )
        prefix = f"{where}.reply"
        sub_lines = {k: v for k, v in lines.items() if not k.startswith("queries")}
        sub_lines.update(
            {"frames[0]" + k[len(prefix) :]: v for k, v in lines.items() if k.startswith(prefix)}
        )
        try:
            defs = parse_definitions(
                {**shared, "frames": [item.get("reply")]}, source=source, lines=sub_lines
            )
        except ConfigError as exc:
            key = exc.key or ""
            key = prefix + key[len("frames[0]") :] if key.startswith("frames[0]") else key
            line = exc.line or lines.get(key) or lines.get(prefix) or lines.get(where)
            raise ConfigError(exc.reason, source=source, key=key or None, line=line) from exc
        if defs.format not in _TEXT_FORMATS:
            raise ConfigError(
                f"replies must be a text format (csv, key_value, regex), not {defs.format.value}",
                source=source,
                key="format",
                line=lines.get("format"),
            )
        name = defs.frames[0].name
        if name in flows:
            raise ConfigError(
                f"two replies are called {name!r}",
                source=source,
                key=f"{prefix}.name",
                line=lines.get(f"{prefix}.name"),
            )
        flows.add(name)
        queries.append(Query(query, defs, None if rate is None else float(rate)))
    first = queries[0].defs
    framing = first.framing
    term = getattr(framing, "terminator", "\n") or "\n"
    return QueryFile(
        name=first.name,
        queries=tuple(queries),
        write_terminator=terminator.encode(first.text_encoding),
        terminator=term.encode(first.text_encoding) if isinstance(term, str) else bytes(term),
        max_length=int(getattr(framing, "max_length", 0) or 4096),
        source=source,
    )


class ScpiReader(PollReaderABC):
    """Sends queries on a serial port and decodes their replies into one sample each.

    Args:
        name: the device alias.
        url: a pyserial URL or device path.
        queries: the query file (loaded, or its path).
        sink: receives every sample.
        serial_options: line settings (see
            :func:`~daq_agent.readers.serial.normalize_serial_options`).
        rate_hz: polls per second of each query without a rate of its own.
        timeout_s: the longest to wait for one reply.
        flow_name_template: flow names from ``{device}`` and ``{frame}`` (the reply's name).
        clock: host time in ns.
        on_error: called on the reader thread when the port fails.
        retry: delays between reopen attempts.
        rng: the random source of the back-off's jitter.

    Raises:
        ConfigError: invalid options, rate, timeout or query file.
    """

    kind: ClassVar[str] = "scpi"

    def __init__(
        self,
        name: str,
        url: str,
        queries: QueryFile | str | Path,
        sink: Sink,
        *,
        serial_options: Mapping[str, Any] | None = None,
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
        if not url:
            raise ConfigError("a device needs a url", key="url")
        self.url = url
        self.options = normalize_serial_options(serial_options)
        if not isinstance(queries, QueryFile):
            queries = load_query_file(queries)
        self.queries = queries
        self._codecs = tuple(SerialCodec(q.defs, name, flow_name_template) for q in queries.queries)
        flows = [c.flows[0].name for c in self._codecs]
        if len(set(flows)) != len(flows):
            raise ConfigError("two queries give one flow name", key="flow_name_template")
        self._requests = tuple(
            q.text.encode(q.defs.text_encoding) + queries.write_terminator for q in queries.queries
        )
        self._set_rates([q.rate_hz for q in queries.queries])
        self._port: serial.SerialBase | None = None

    @property
    def flows(self) -> list[FlowConfig]:
        """One flow per query (named after its reply)."""
        return [c.flows[0] for c in self._codecs]

    def __repr__(self) -> str:
        return f"ScpiReader({self.name!r}, {self.url!r}, state={self.state.value})"

    def _open(self) -> None:
        try:
            port = serial.serial_for_url(
                self.url, timeout=self.timeout_s, write_timeout=self.timeout_s, **self.options
            )
        except ValueError as exc:
            raise ConfigError(f"cannot open {self.url!r}: {exc}", key="url") from exc
        except (serial.SerialException, OSError) as exc:
            raise ReaderError(f"cannot open {self.url!r}: {exc}") from exc
        try:
            port.reset_input_buffer()
        except (serial.SerialException, OSError, AttributeError):
            pass  # not every handler has an input buffer to reset
        self._port = port
        self._reset_schedule()

    def _close(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            try:
                port.close()
            except (serial.SerialException, OSError):
                pass  # already gone

    def _poll(self, index: int) -> Sample | PollFault:
        port = self._port
        if port is None:
            raise ReaderError(f"{self.url!r} is not open")
        terminator = self.queries.terminator
        counters = self.counters.values
        try:
            waiting: int = port.in_waiting  # type: ignore[attr-defined]  # every backend has it
            if waiting:
                stale = port.read(waiting)
                counters["late_replies"] += max(1, stale.count(terminator))
            stamp = self._now_ns()
            port.write(self._requests[index])
            counters["requests"] += 1
            reply = port.read_until(terminator, self.queries.max_length)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise ReaderError(f"{self.url!r}: {exc}") from exc
        if not reply.endswith(terminator):
            if len(reply) >= self.queries.max_length:
                return PollFault.DECODE
            return PollFault.TIMEOUT
        counters["values_read"] += 1
        decoded = self._codecs[index].decode(reply[: -len(terminator)])
        if not isinstance(decoded, tuple):
            return PollFault.DECODE
        compiled, values = decoded
        return Sample(compiled.flow, stamp, tuple(values))

    def _wake(self) -> None:
        port = self._port
        cancel = getattr(port, "cancel_read", None)
        if cancel is not None:
            try:
                cancel()
            except (OSError, ValueError, TypeError):
                pass  # closing concurrently; the timeout bounds the wait anyway
