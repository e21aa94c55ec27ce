"""Data streams on Sift's own streaming client, ``sift-stream-bindings`` (Rust ``sift_stream``).

Its sends, HTTP/2, TLS and serialization run on Rust threads, off the GIL; building one request
object costs about 2 µs of Python. This module is the one place that drives it:

* :class:`StreamLoop`: the bindings' calls return awaitables that must be *created* on a thread
  with a running asyncio loop; one loop runs in a named thread (``daq-sift-stream``) and plain
  threads call into it with a timeout.
* :class:`RequestBuilder`: turns samples (flow, timestamp, values) into
  ``IngestWithConfigDataStreamRequestPy`` objects, with one value constructor per channel compiled
  per flow; a value that does not fit its channel raises :class:`IngestionValidationError`.
* :class:`Window`: one stream, built, sent and finished. sift_stream's ``finish`` half-closes the
  gRPC stream and waits for the server's status, which the server gives only after committing
  what the stream carried. But a stream that fails *before* ``finish`` is reconnected silently,
  and what the failed stream had taken is lost (measured: UNAVAILABLE, kill -9 and GOAWAY each
  lost what was in flight while ``finish`` still returned OK). So a window counts as committed
  only when ``finish`` returned OK **and** the stream's metrics, read just before ``finish``,
  show no retry and no completed stream (a stream that completes before ``finish`` ended early).
  A stream can't be reused after ``finish``: every window builds a new one (about 4 unary calls
  on loopback, ~10 ms, with flows registered lazily and metrics streaming off).

The live-with-backups mode is not used: its ``committed_message_id`` also advances for messages
that went to a backup file after a failed checkpoint, its ``finish`` returns OK when the last
stream failed, and it writes backups under ``~/.local/share`` even when asked not to.
"""

from __future__ import annotations

import asyncio
import operator
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import sift_stream_bindings as ssb

from daq_agent.core.errors import IngestionValidationError, TransportError
from daq_agent.core.model import ChannelDataType, FlowConfig
from daq_agent.core.sample import Value

__all__ = [
    "RequestBuilder",
    "StreamFailed",
    "StreamLoop",
    "StreamSettings",
    "StreamTimeout",
    "Window",
    "stream_uri",
]

_T = TypeVar("_T")
_V = ssb.IngestWithConfigDataChannelValuePy
_EMPTY = _V.empty()


def _bool(value: Any) -> Any:
    """A bool value; integer decoders give 0/1 for 1-bit signals (anything else: TypeError)."""
    if value.__class__ is not bool:
        value = operator.index(value) != 0
    return _V.bool(value)


_CONSTRUCTORS: dict[ChannelDataType, Callable[[Any], Any]] = {
    ChannelDataType.DOUBLE: _V.double,
    ChannelDataType.FLOAT: _V.float,
    ChannelDataType.STRING: _V.string,
    ChannelDataType.BOOL: _bool,
    ChannelDataType.INT_32: _V.int32,
    ChannelDataType.UINT_32: _V.uint32,
    ChannelDataType.INT_64: _V.int64,
    ChannelDataType.UINT_64: _V.uint64,
    ChannelDataType.ENUM: _V.enum_value,
    ChannelDataType.BIT_FIELD: _V.bitfield,
    ChannelDataType.BYTES: _V.bytes,
}


class StreamTimeout(TransportError):
    """A call into sift_stream did not complete in time (a hung server or a dead path)."""


class StreamFailed(TransportError):
    """The stream failed during a window and sift_stream reconnected it: what the failed stream
    had taken may be lost, so the window is not committed.

    Attributes:
        codes: how many streams ended with each gRPC status code (by its number), OK included
            (a stream that completed before the finish ended early).
        retries: the stream's retry count.
    """

    def __init__(self, message: str, codes: dict[int, int], retries: int = 0) -> None:
        super().__init__(message)
        self.codes = codes
        self.retries = retries


def stream_uri(uri: str, *, use_tls: bool) -> str:
    """The URI sift_stream takes (it needs a scheme): ``host:port`` → ``http(s)://host:port``."""
    if "://" in uri:
        return uri
    return f"{'https' if use_tls else 'http'}://{uri}"


class StreamLoop:
    """An asyncio loop in a named daemon thread, for the bindings' awaitables.

    Args:
        name: the thread's name.
    """

    def __init__(self, name: str = "daq-sift-stream") -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()
        self._loop.close()

    def call(self, make: Callable[[], Awaitable[_T]], timeout: float) -> _T:
        """Create an awaitable on the loop (``make`` runs there) and wait for it.

        Raises:
            StreamTimeout: it did not complete within ``timeout`` (it is cancelled).
            Exception: whatever the awaitable raised.
        """

        async def run() -> _T:
            return await asyncio.wait_for(make(), timeout)

        future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        try:
            return future.result(timeout + 5.0)
        except (TimeoutError, FutureTimeout) as exc:
            future.cancel()
            raise StreamTimeout(f"no answer within {timeout:.1f} s") from exc

    def call_sync(self, fn: Callable[[], _T], timeout: float) -> _T:
        """Run a plain function on the loop's thread (some bindings calls need a running loop)."""

        async def run() -> _T:
            return fn()

        return self.call(run, timeout)

    def close(self) -> None:
        """Stop the loop and join its thread."""
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)


def _compile_values(flow: FlowConfig) -> Callable[[Sequence[Value]], list[Any]]:
    """A function turning a flow's values into the bindings' channel values, generated for the
    flow: one constructor call per channel with no loop, a value of None is ``empty``.

    Generated code, because the bindings need one object per value: for 12 channels this takes
    2.2 µs against 3.8 µs for a comprehension over (constructor, value) pairs
    (``benchmarks/stages.py`` stage "request build").
    """
    n = len(flow.channels)
    env: dict[str, Any] = {"E": _EMPTY}
    env.update({f"m{i}": _CONSTRUCTORS[c.data_type] for i, c in enumerate(flow.channels)})
    items = ", ".join(f"E if (v{i} := values[{i}]) is None else m{i}(v{i})" for i in range(n))
    namespace: dict[str, Any] = {}
    exec(f"def values_of(values):\n    return [{items}]\n", env, namespace)
    fn: Callable[[Sequence[Value]], list[Any]] = namespace["values_of"]
    return fn


class RequestBuilder:
    """Samples → ``IngestWithConfigDataStreamRequestPy``, with per-flow compiled constructors.

    Args:
        flows: the flows samples may belong to.
        end_stream_on_validation_error: ask the server to end the stream with an error when a
            request is invalid (instead of recording it and dropping the data silently).
    """

    def __init__(
        self, flows: Sequence[FlowConfig], *, end_stream_on_validation_error: bool = True
    ) -> None:
        self._end_stream = end_stream_on_validation_error
        self._flows = {flow.name: flow for flow in flows}
        self._makers: dict[str, tuple[int, Callable[[Sequence[Value]], list[Any]]]] = {
            flow.name: (len(flow.channels), _compile_values(flow)) for flow in flows
        }

    @property
    def flows(self) -> dict[str, FlowConfig]:
        """The flows by name."""
        return self._flows

    def build(
        self,
        rows: Sequence[tuple[str, int, Sequence[Value]]],
        config_id: str,
        run_id: str,
        *,
        end_stream_on_validation_error: bool | None = None,
        organization_id: str = "",
    ) -> list[Any]:
        """One request per row, in order (with the given flag, default the builder's, and
        organization on each).

        Raises:
            IngestionValidationError: a row's flow is unknown, or a value does not fit its
                channel (wrong count, type or range); nothing of the rows is returned.
        """
        makers = self._makers
        request = ssb.IngestWithConfigDataStreamRequestPy
        from_ns = ssb.TimeValuePy.from_timestamp_nanos
        end_stream = (
            self._end_stream
            if end_stream_on_validation_error is None
            else end_stream_on_validation_error
        )
        out = []
        try:
            for flow, ts, values in rows:
                count, values_of = makers[flow]
                if len(values) != count:
                    raise IngestionValidationError(
                        f"flow {flow!r}: {len(values)} values for {count} channels"
                    )
                out.append(
                    request(
                        config_id,
                        flow,
                        from_ns(ts),
                        values_of(values),
                        run_id,
                        end_stream,
                        organization_id,
                    )
                )
        except KeyError as exc:
            raise IngestionValidationError(f"flow {exc.args[0]!r} is not in the config") from None
        except (TypeError, OverflowError, ValueError) as exc:
            raise IngestionValidationError(
                f"flow {flow!r}: a value does not fit its channel: {exc}"
            ) from None
        return out


DEFAULT_CAPACITY: Final = 262_144
"""The stream's queue by default, in requests (more than a default window)."""


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """How a window's stream is built.

    Attributes:
        uri: the API (``host:port`` or with a scheme).
        use_tls: TLS on the connection.
        asset: the asset name.
        client_key: the ingestion config's client key.
        capacity: the stream's queue, in requests (at least a window: sends never wait).
        timeout_s: the longest a build, a send or a finish may take.
    """

    uri: str
    use_tls: bool
    asset: str
    client_key: str
    capacity: int = DEFAULT_CAPACITY
    timeout_s: float = 30.0


class Window:
    """One sift_stream stream: built at construction, sent on, then finished once.

    Args:
        loop: the loop the bindings run on.
        settings: where and how.
        api_key: the key (never logged).

    Raises:
        StreamTimeout: the build took longer than ``settings.timeout_s``.
        RuntimeError: the bindings failed to build (connect, auth, config).
    """

    def __init__(
        self,
        loop: StreamLoop,
        settings: StreamSettings,
        api_key: str,
    ) -> None:
        self._loop = loop
        self._timeout = settings.timeout_s
        builder = ssb.SiftStreamBuilderPy(
            stream_uri(settings.uri, use_tls=settings.use_tls), api_key
        )
        builder.enable_tls = settings.use_tls
        config = builder.ingestion_config(
            ssb.IngestionConfigFormPy(settings.asset, settings.client_key, [])
        )
        mode = config.live_only()
        mode.metrics_streaming_interval = None
        mode.ingestion_data_channel_capacity = settings.capacity
        self._stream: Any = loop.call(mode.build, self._timeout)
        self.sent = 0

    def attach_run(self, run: Any) -> str:
        """Find or create a run (a ``RunFormPy``) and return its id."""
        stream = self._live()
        self._loop.call(lambda: stream.attach_run(ssb.RunSelectorPy.by_form(run)), self._timeout)
        run_id: str = stream.run() or ""
        return run_id

    def send(self, requests: list[Any]) -> None:
        """Queue requests on the stream (never waits: the queue holds a window).

        Raises:
            StreamTimeout, RuntimeError: the stream is closed or stuck.
            TransportError: the window was cancelled.
        """
        stream = self._live()
        self._loop.call(lambda: stream.send_requests(requests), self._timeout)
        self.sent += len(requests)

    def finish(self, timeout: float | None = None) -> Any:
        """Half-close the stream and wait for the server's status; the metrics before it.

        The metrics are read and the finish is started in one step on the loop's thread, so
        little can happen between them; a stream that fails in that gap, after the check, is
        still reconnected by sift_stream unseen (its metrics cannot be read after the finish).

        Args:
            timeout: the longest to wait (default: the settings' ``timeout_s``).

        Returns:
            The metrics snapshot taken just before finishing.

        Raises:
            StreamTimeout: no status in time.
            StreamFailed: the stream failed and was reconnected before the finish (what it
                carried may be lost: the window must be re-sent).
            RuntimeError: the server answered an error status.
        """
        stream = self._live()

        async def checked_finish() -> Any:
            snapshot = stream.get_metrics_snapshot()
            # a stream that completed before the finish ended early (the server ended it or the
            # connection broke) and was replaced: the statuses say how it ended
            codes = {i: n for i, n in enumerate(snapshot.grpc_status_counts) if n}
            if snapshot.cur_retry_count or codes:
                raise StreamFailed(
                    f"the stream failed and was reconnected during the window (retries "
                    f"{snapshot.cur_retry_count}, statuses {codes}): re-sending it",
                    codes,
                    snapshot.cur_retry_count,
                )
            await stream.finish()
            return snapshot

        try:
            return self._loop.call(checked_finish, self._timeout if timeout is None else timeout)
        except StreamFailed:
            self.cancel()
            raise

    def _live(self) -> Any:
        """The stream, unless the window was cancelled (TransportError)."""
        stream = self._stream
        if stream is None:
            raise TransportError("the window was cancelled")
        return stream

    def cancel(self) -> None:
        """Abandon the stream (its Rust tasks end when it is dropped)."""
        self._stream = None
