"""The ingestion service: registers a telemetry config with the API and streams data against it.

:class:`IngestionService` has the names and behaviour of Sift's Python client
(``sift_py.ingestion.service.IngestionService``)::

    with use_sift_channel({"uri": "127.0.0.1:50051", "apikey": key, "use_ssl": False}) as channel:
        service = IngestionService(channel, TelemetryConfig.try_from_yaml("telemetry.yml"))
        service.attach_run(channel, "bench-42")
        service.try_ingest_flows({
            "flow_name": "readings",
            "timestamp": time.time_ns(),
            "channel_values": [{"channel_name": "voltage", "value": double_value(3.3)}],
        })

On construction the ingestion config is fetched by its client key, or created. A config without
an ``ingestion_client_key`` gets one derived from its content (:func:`telemetry_config_hash`, the
hash sift_py uses): every start with the same config finds the same ingestion config. A config
whose ``CreateIngestionConfig`` request would not fit one gRPC message (4 MiB) is created without
flows, and each flow is registered the first time it is ingested (*lazy flow creation*).

Unary calls (configs, flows, runs) go through grpcio on the channel. Every data stream goes through
Sift's own streaming client, sift_stream, as an :class:`~daq_agent.ingestion.stream.IngestStream`
(:meth:`IngestionService.open_stream`), to the channel's address with its key: :meth:`ingest` is
one such stream per call. Errors for gRPC statuses are
:class:`~daq_agent.ingestion.errors.RpcError`, a ``grpc.RpcError``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, TypeVar

import grpc
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from daq_agent import methods
from daq_agent._proto.sift.ingest.v1 import ingest_pb2
from daq_agent._proto.sift.ingestion_configs.v2 import ingestion_configs_pb2 as ic_pb2
from daq_agent._proto.sift.metadata.v1 import metadata_pb2
from daq_agent._proto.sift.runs.v2 import runs_pb2
from daq_agent.core.errors import ConfigError, IngestionValidationError
from daq_agent.core.model import FlowConfig, TelemetryConfig
from daq_agent.ingestion.channel import (
    ChannelValue,
    Flow,
    FlowOrderedChannelValues,
    empty_value,
    is_data_type,
)
from daq_agent.ingestion.config import telemetry_config_hash
from daq_agent.ingestion.errors import RpcError
from daq_agent.ingestion.stream import DEFAULT_STREAM_TIMEOUT_SEC, IngestStream
from daq_agent.ingestion.transport import SiftChannel, map_rpc_errors

if TYPE_CHECKING:
    from daq_agent.ingestion.buffer import BufferedIngestionService, OnErrorCallback

__all__ = ["MAX_MESSAGE_BYTES", "IngestionService"]

IngestWithConfigDataStreamRequest = ingest_pb2.IngestWithConfigDataStreamRequest
IngestWithConfigDataChannelValue = ingest_pb2.IngestWithConfigDataChannelValue

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
"""The gRPC default (and real API) limit on one message, which the service keeps under."""

_UNARY_TIMEOUT_SEC = 120.0
_PAGE_SIZE = 1000
# Room left in a CreateIngestionConfigFlows batch for the config id and the per-flow framing.
_BATCH_HEADROOM = 1024
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NS_PER_SEC = 1_000_000_000
_MIN_TIMESTAMP_SEC = -62_135_596_800  # 0001-01-01T00:00:00Z, the protobuf Timestamp range
_MAX_TIMESTAMP_SEC = 253_402_300_799  # 9999-12-31T23:59:59Z

_log = logging.getLogger(__name__)

_M = TypeVar("_M", bound=Message)


class IngestionService:
    """A fully configured service, ready to ingest data once constructed.

    Attributes:
        transport_channel: the gRPC channel to the ingestion API (prefer a :class:`SiftChannel`).
        ingestion_config: the wire ``IngestionConfig`` the data is ingested against.
        asset_name: the asset telemetered.
        flow_configs_by_name: the flows known to this service, by name.
        run_id: the run data is associated with, if any (see :meth:`attach_run`).
        organization_id: the organization of the user, if given by the telemetry config.
        end_stream_on_error: when true, a request the API finds invalid ends the stream with an
            error instead of being recorded asynchronously on the API side.
        lazy_flow_creation: when true, each flow is registered with the API the first time it is
            ingested, instead of all of them with the config (set automatically when the config
            does not fit one message, or forced by ``force_lazy_flow_creation``).
    """

    transport_channel: grpc.Channel
    ingestion_config: ic_pb2.IngestionConfig
    asset_name: str
    flow_configs_by_name: dict[str, FlowConfig]
    run_id: str | None
    organization_id: str | None
    end_stream_on_error: bool
    lazy_flow_creation: bool

    def __init__(
        self,
        channel: grpc.Channel,
        config: TelemetryConfig,
        run_id: str | None = None,
        end_stream_on_error: bool = False,
        force_lazy_flow_creation: bool = False,
        unary_timeout_s: float = _UNARY_TIMEOUT_SEC,
    ) -> None:
        """Fetch the ingestion config by its client key, or create it, and register its flows.

        Args:
            channel: the channel to the API (see :func:`use_sift_channel`).
            config: the asset, its client key and flows. Without a client key, the key is the
                hash of the config's content (:func:`telemetry_config_hash`, as sift_py does);
                flows cannot be added at runtime then.
            run_id: a run to associate data with.
            end_stream_on_error: see the class attributes.
            force_lazy_flow_creation: register flows when first ingested, whatever the size.
            unary_timeout_s: the deadline of each unary call (set-up, flows, runs).

        Raises:
            RpcError: when the API answers an error.
            TransportError: when the API cannot be reached.
        """
        self.transport_channel = channel
        self._unary_timeout = unary_timeout_s
        self.asset_name = config.asset_name
        self.organization_id = config.organization_id
        self.run_id = run_id
        self.end_stream_on_error = end_stream_on_error
        self.flow_configs_by_name = {flow.name: flow for flow in config.flows}
        self.lazy_flow_creation = force_lazy_flow_creation
        # Guards flow_configs_by_name and _registered; held across flow-registration calls so two
        # threads never register the same flow twice.
        self._flows_lock = threading.Lock()
        self._registered: set[str] = set()
        self._generated_key = not config.ingestion_client_key
        client_key = config.ingestion_client_key or telemetry_config_hash(config)
        request = ic_pb2.CreateIngestionConfigRequest(
            asset_name=config.asset_name,
            organization_id=config.organization_id or "",
            client_key=client_key,
        )
        if not self.lazy_flow_creation:
            # The same config gets the same mode on every start, whether it exists yet or not.
            request.flows.extend(flow.as_pb() for flow in config.flows)
            size = request.ByteSize()
            if size > MAX_MESSAGE_BYTES:
                _log.info(
                    "ingestion config of %d flows is %d bytes (> %d): lazy flow creation",
                    len(config.flows),
                    size,
                    MAX_MESSAGE_BYTES,
                )
                self.lazy_flow_creation = True
                del request.flows[:]
        existing = self._find_ingestion_config(client_key)
        if existing is not None:
            self.ingestion_config = existing
            self._registered = self._list_flow_names()
            missing = [f for f in config.flows if f.name not in self._registered]
            if missing and not self.lazy_flow_creation:
                self._register_flows(missing)
        else:
            response = self._unary(
                methods.CREATE_INGESTION_CONFIG, request, ic_pb2.CreateIngestionConfigResponse
            )
            self.ingestion_config = response.ingestion_config
            if not self.lazy_flow_creation:
                self._registered = {flow.name for flow in config.flows}

    # -- ingestion config and flows -------------------------------------------------------------

    @property
    def registered_flows(self) -> frozenset[str]:
        """The names of the flows known to be registered with the API."""
        with self._flows_lock:
            return frozenset(self._registered)

    def _find_ingestion_config(self, client_key: str) -> ic_pb2.IngestionConfig | None:
        request = ic_pb2.ListIngestionConfigsRequest(
            page_size=1, filter=f"client_key=={_cel_string(client_key)}"
        )
        response = self._unary(
            methods.LIST_INGESTION_CONFIGS, request, ic_pb2.ListIngestionConfigsResponse
        )
        for found in response.ingestion_configs:
            if found.client_key == client_key:
                return found
        return None

    def _list_flow_names(self) -> set[str]:
        return set(self._list_flows())

    def _list_flows(self) -> dict[str, ic_pb2.FlowConfig]:
        flows: dict[str, ic_pb2.FlowConfig] = {}
        token = ""
        while True:
            request = ic_pb2.ListIngestionConfigFlowsRequest(
                ingestion_config_id=self.ingestion_config.ingestion_config_id,
                page_size=_PAGE_SIZE,
                page_token=token,
            )
            response = self._unary(
                methods.LIST_INGESTION_CONFIG_FLOWS,
                request,
                ic_pb2.ListIngestionConfigFlowsResponse,
            )
            for flow in response.flows:
                flows.setdefault(flow.name, flow)
            token = response.next_page_token
            if not token:
                return flows

    def conflicting_flows(self, flows: Iterable[FlowConfig]) -> dict[str, str]:
        """Those of ``flows`` the API already has under the same name with other channels (by
        name and data type, in order), each with why; a unary call.

        Samples of such a flow would be read against the API's channels: refuse them instead.

        Raises:
            RpcError: when the API answers an error.
            TransportError: when the API cannot be reached.
        """
        wanted = {flow.name: flow for flow in flows}
        if not wanted:
            return {}
        on_server = self._list_flows()
        out: dict[str, str] = {}
        for name, flow in wanted.items():
            theirs = on_server.get(name)
            if theirs is None:
                continue
            mine = [(c.name, c.data_type.value) for c in flow.channels]
            known = [(c.name, c.data_type) for c in theirs.channels]
            if mine != known:
                out[name] = (
                    f"flow {name!r} already exists in ingestion config "
                    f"{self.ingestion_config.client_key!r} with other channels "
                    f"({', '.join(n for n, _ in known[:6])}{' …' if len(known) > 6 else ''}): "
                    "its samples are refused; give the config another ingestion_client_key or "
                    "rename the message"
                )
        return out

    def _register_flows(self, flows: Sequence[FlowConfig]) -> None:
        """Create ``flows`` in the ingestion config, in batches that fit one message.

        A batch the API refuses as a whole (one of its flows exists, or it is too large) is
        retried one flow at a time; ``ALREADY_EXISTS`` for a single flow counts as done.
        """
        config_id = self.ingestion_config.ingestion_config_id
        budget = MAX_MESSAGE_BYTES - _BATCH_HEADROOM - len(config_id.encode())
        batch: list[ic_pb2.FlowConfig] = []
        batch_bytes = 0
        for flow in flows:
            message = flow.as_pb()
            size = message.ByteSize() + 8  # tag and length prefix of the repeated field
            if batch and batch_bytes + size > budget:
                self._send_flow_batch(batch)
                batch, batch_bytes = [], 0
            batch.append(message)
            batch_bytes += size
        if batch:
            self._send_flow_batch(batch)
        self._registered.update(flow.name for flow in flows)

    def _send_flow_batch(self, batch: Sequence[ic_pb2.FlowConfig]) -> None:
        try:
            self._create_flows_call(batch)
        except RpcError as exc:
            if exc.status_code is grpc.StatusCode.ALREADY_EXISTS and len(batch) == 1:
                return
            if len(batch) == 1 or exc.status_code not in (
                grpc.StatusCode.ALREADY_EXISTS,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            ):
                raise
            _log.debug("flow batch refused (%s): one flow at a time", exc.status_code.name)
            for flow in batch:
                self._send_flow_batch([flow])

    def _create_flows_call(self, batch: Sequence[ic_pb2.FlowConfig]) -> None:
        request = ic_pb2.CreateIngestionConfigFlowsRequest(
            ingestion_config_id=self.ingestion_config.ingestion_config_id, flows=batch
        )
        self._unary(
            methods.CREATE_INGESTION_CONFIG_FLOWS,
            request,
            ic_pb2.CreateIngestionConfigFlowsResponse,
        )

    def try_create_flow(self, *flow_config: FlowConfig) -> None:
        """Create new flows at runtime, refusing a name that already exists.

        Raises:
            IngestionValidationError: when a flow of that name exists (or is given twice), a flow
                has two channels of the same name, or the config's client key was derived from
                its content (it cannot change at runtime); nothing is created then.
            RpcError: when the API answers an error.
            TransportError: when the API cannot be reached.
        """
        self._check_key_not_derived(flow_config)
        with self._flows_lock:
            seen: set[str] = set()
            for flow in flow_config:
                if flow.name in self.flow_configs_by_name or flow.name in seen:
                    raise IngestionValidationError(f"flow {flow.name!r} already exists")
                _check_flow(flow)
                seen.add(flow.name)
            self._add_flows(flow_config)

    def try_create_flows(self, *flow_configs: FlowConfig) -> None:
        """See :meth:`try_create_flow`.

        Raises:
            IngestionValidationError: when a flow of that name exists, or the client key was
                derived from the config's content.
            RpcError: when the API answers an error.
            TransportError: when the API cannot be reached.
        """
        self.try_create_flow(*flow_configs)

    def create_flow(self, *flow_config: FlowConfig) -> None:
        """Like :meth:`try_create_flow`, but a flow whose name exists raises no error.

        A flow known to the service but not yet registered with the API (lazy flow creation) is
        registered now, with the service's config of it.

        Raises:
            IngestionValidationError: when a flow has two channels of the same name, or is new
                and the client key was derived from the config's content.
            RpcError: when the API answers an error.
            TransportError: when the API cannot be reached.
        """
        self.register_flows(flow_config)

    def create_flows(self, *flow_configs: FlowConfig) -> None:
        """See :meth:`create_flow`.

        Raises:
            IngestionValidationError: when a flow has two channels of the same name, or is new
                and the client key was derived from the config's content.
            RpcError: when the API answers an error.
            TransportError: when the API cannot be reached.
        """
        self.register_flows(flow_configs)

    def register_flows(self, flows: Iterable[FlowConfig]) -> None:
        """Make sure ``flows`` are registered with the API (:meth:`create_flows` on a sequence).

        Flows the service does not know are added to :attr:`flow_configs_by_name`; flows already
        registered cost nothing; ``ALREADY_EXISTS`` from the API counts as registered.

        Raises:
            IngestionValidationError: when a new flow has two channels of the same name, or the
                client key was derived from the config's content (no flow can be added then).
            RpcError: when the API answers an error.
            TransportError: when the API cannot be reached.
        """
        flows = list(flows)
        self._check_key_not_derived(flows)
        with self._flows_lock:
            todo: dict[str, FlowConfig] = {}
            for flow in flows:
                if flow.name in todo or flow.name in self._registered:
                    continue
                known = self.flow_configs_by_name.get(flow.name)
                if known is None:
                    _check_flow(flow)
                todo[flow.name] = known or flow
            self._add_flows(list(todo.values()))

    def _add_flows(self, flows: Sequence[FlowConfig]) -> None:
        # Called with _flows_lock held. Flows created explicitly are registered now, lazy or not.
        if not flows:
            return
        self._register_flows(flows)
        for flow in flows:
            self.flow_configs_by_name.setdefault(flow.name, flow)

    def _check_key_not_derived(self, flows: Iterable[FlowConfig]) -> None:
        if not self._generated_key:
            return
        new = [flow.name for flow in flows if flow.name not in self.flow_configs_by_name]
        if new:
            raise IngestionValidationError(
                f"cannot add flows {new} at runtime: the config has no ingestion_client_key, so "
                "its key is derived from its content; give it an ingestion_client_key to add flows"
            )

    def _register_lazily(self, names: Iterable[str]) -> None:
        """Register the flows named that the service knows and the API does not yet."""
        pending: dict[str, FlowConfig] = {}
        for name in names:
            if name not in self._registered and name not in pending:
                flow = self.flow_configs_by_name.get(name)
                if flow is not None:  # an unknown flow is left for the API to report
                    pending[name] = flow
        if not pending:
            return
        with self._flows_lock:
            todo = [flow for name, flow in pending.items() if name not in self._registered]
            if todo:
                self._register_flows(todo)

    # -- runs -----------------------------------------------------------------------------------

    def attach_run(
        self,
        channel: grpc.Channel,
        run_name: str,
        description: str | None = None,
        organization_id: str | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, str | float | bool] | None = None,
        force_new: bool = False,
    ) -> None:
        """Use the run named ``run_name`` for the data ingested from now on, creating it if needed.

        Args:
            channel: the channel to the API's run service.
            run_name: the run's name; an existing run of that name is reused unless ``force_new``.
            description: the new run's description.
            organization_id: the new run's organization.
            tags: the new run's tags.
            metadata: the new run's metadata: string, number or boolean values by key.
            force_new: create a new run even if one of that name exists.

        Raises:
            IngestionValidationError: when a metadata value is not a string, number or boolean.
            RpcError: when the API answers an error.
            TransportError: when the API cannot be reached.
        """
        values = _metadata_values(metadata or {})
        if not force_new:
            listed = self._unary(
                methods.LIST_RUNS,
                runs_pb2.ListRunsRequest(page_size=1, filter=f"name=={_cel_string(run_name)}"),
                runs_pb2.ListRunsResponse,
                channel=channel,
            )
            for run in listed.runs:
                if run.name == run_name:
                    self.run_id = run.run_id
                    return
        created = self._unary(
            methods.CREATE_RUN,
            runs_pb2.CreateRunRequest(
                name=run_name,
                description=description or "",
                tags=tags or [],
                organization_id=organization_id or self.organization_id or "",
                metadata=values,
            ),
            runs_pb2.CreateRunResponse,
            channel=channel,
        )
        self.run_id = created.run.run_id

    def stop_run(self, run_id: str) -> None:
        """Mark a run stopped (``StopRun``).

        Raises:
            RpcError: when the API answers an error.
            TransportError: when the API cannot be reached.
        """
        self._unary(
            methods.STOP_RUN, runs_pb2.StopRunRequest(run_id=run_id), runs_pb2.StopRunResponse
        )

    def detach_run(self) -> None:
        """Stop associating the data ingested from now on with the attached run."""
        self.run_id = None

    # -- requests -------------------------------------------------------------------------------

    def create_ingestion_request(
        self,
        flow_name: str,
        timestamp: datetime | int,
        channel_values: Sequence[IngestWithConfigDataChannelValue],
    ) -> IngestWithConfigDataStreamRequest:
        """Build a request without validating it (see :meth:`try_create_ingestion_request`).

        The values must be in the order of the flow's channels, one per channel
        (:func:`empty_value` for none); ``timestamp`` is integer nanoseconds since the Unix epoch
        or a UTC :class:`datetime` (a naive one is taken as UTC). The API reports a request that
        does not match its flow (asynchronously, or by ending the stream with
        ``end_stream_on_error``).

        Raises:
            IngestionValidationError: only when ``timestamp`` is out of the protobuf range.
        """
        return IngestWithConfigDataStreamRequest(
            ingestion_config_id=self.ingestion_config.ingestion_config_id,
            flow=flow_name,
            timestamp=_timestamp(timestamp),
            channel_values=channel_values,
            run_id=self.run_id or "",
            end_stream_on_validation_error=self.end_stream_on_error,
            organization_id=self.organization_id or "",
        )

    def try_create_ingestion_request(
        self,
        flow_name: str,
        timestamp: datetime | int,
        channel_values: Sequence[ChannelValue] | Sequence[IngestWithConfigDataChannelValue],
    ) -> IngestWithConfigDataStreamRequest:
        """Build a request for ``flow_name`` after checking it against the flow's config.

        ``channel_values`` is either a list of :class:`ChannelValue` dicts (channels by name; the
        flow's channels not named are sent empty) or a list of values in the flow's channel order.

        Raises:
            IngestionValidationError: when the flow is unknown, a channel is unknown or given
                twice, a value has the wrong type, a positional list has the wrong length, or the
                timestamp is not UTC (a naive or non-UTC datetime) or out of range.
        """
        flow = self.flow_configs_by_name.get(flow_name)
        if flow is None:
            raise IngestionValidationError(f"unknown flow {flow_name!r}")
        _check_timestamp(timestamp)
        channels = flow.channels
        values: list[IngestWithConfigDataChannelValue]
        if channel_values and all(
            isinstance(v, IngestWithConfigDataChannelValue) for v in channel_values
        ):
            values = list(channel_values)  # type: ignore[arg-type]
            if len(values) != len(channels):
                raise IngestionValidationError(
                    f"flow {flow_name!r} has {len(channels)} channels, "
                    f"got {len(values)} positional values"
                )
        else:
            index = {channel.fqn(): i for i, channel in enumerate(channels)}
            slots: list[IngestWithConfigDataChannelValue | None] = [None] * len(channels)
            for item in channel_values:
                if not isinstance(item, dict):
                    raise IngestionValidationError(
                        "channel_values must be all ChannelValue dicts or all channel values"
                    )
                name = _channel_name(item)
                i = index.get(name)
                if i is None:
                    raise IngestionValidationError(
                        f"unknown channel {name!r} for flow {flow_name!r}"
                    )
                if slots[i] is not None:
                    raise IngestionValidationError(
                        f"channel {name!r} given twice for flow {flow_name!r}"
                    )
                value = item.get("value")
                if not isinstance(value, IngestWithConfigDataChannelValue):
                    raise IngestionValidationError(
                        f"value of channel {name!r} must be a channel value "
                        "(double_value(), int32_value()…)"
                    )
                slots[i] = value
            values = [empty_value() if v is None else v for v in slots]
        for channel, value in zip(channels, values, strict=True):
            if not is_data_type(value, channel.data_type):
                raise IngestionValidationError(
                    f"channel {channel.name!r} of flow {flow_name!r} expects "
                    f"{channel.data_type.as_human_str()}, got {value.WhichOneof('type')}"
                )
        return self.create_ingestion_request(flow_name, timestamp, values)

    # -- ingestion ------------------------------------------------------------------------------

    def ingest(self, *requests: IngestWithConfigDataStreamRequest) -> None:
        """Send ``requests`` on one stream and return when the API has accepted them.

        With lazy flow creation, flows not yet registered are registered first. The stream is
        an :class:`~daq_agent.ingestion.stream.IngestStream` (sift_stream); when it failed and
        was reconnected on the way, the call fails: some requests may not be stored, send them
        again.

        Raises:
            RpcError: when the API ends the stream with an error (``INVALID_ARGUMENT`` for a
                request that does not match its flow when ``end_stream_on_error`` is set), cannot
                be reached (``UNAVAILABLE``), refuses the key (``UNAUTHENTICATED``) or does not
                answer in time (``DEADLINE_EXCEEDED``).
            ConfigError: when the channel is not a :class:`SiftChannel`.
        """
        if not requests:
            return
        with self.open_stream() as stream:
            stream.send(*requests)

    def ingest_flows(self, *flows: FlowOrderedChannelValues) -> None:
        """Build requests with :meth:`create_ingestion_request` (no validation) and ingest them.

        Raises:
            IngestionValidationError: when a timestamp is out of range.
            RpcError: when the API ends the stream with an error.
            ConfigError: when the channel is not a :class:`SiftChannel`.
        """
        self.ingest(*self._requests_from_ordered(flows))

    def try_ingest_flows(self, *flows: Flow) -> None:
        """Build requests with :meth:`try_create_ingestion_request` and ingest them.

        Nothing is sent when one of them is invalid.

        Raises:
            IngestionValidationError: when a flow does not match its config.
            RpcError: when the API ends the stream with an error.
            ConfigError: when the channel is not a :class:`SiftChannel`.
        """
        self.ingest(*self._requests_from_flows(flows))

    def buffered_ingestion(
        self,
        buffer_size: int | None = None,
        flush_interval_sec: float | None = None,
        on_error: OnErrorCallback | None = None,
    ) -> BufferedIngestionService:
        """Buffer requests and ingest them in batches; use the result in a ``with`` block.

        The buffer is flushed when it holds ``buffer_size`` requests (default
        :data:`~daq_agent.ingestion.buffer.DEFAULT_BUFFER_SIZE`), every ``flush_interval_sec``
        seconds if given (the interval restarts after a flush), and on leaving the block. When
        the block raises, ``on_error(error, buffer, flush)`` is called if given (``buffer`` is
        the live list of requests not yet delivered: what it holds when ``flush()`` is called
        is what is sent), else one last flush is tried; the error is then re-raised.

        Raises:
            ValueError: when ``buffer_size`` or ``flush_interval_sec`` is not positive.
        """
        from daq_agent.ingestion.buffer import BufferedIngestionService

        return BufferedIngestionService(self, buffer_size, flush_interval_sec, on_error)

    def _requests_from_ordered(
        self, flows: Iterable[FlowOrderedChannelValues]
    ) -> list[IngestWithConfigDataStreamRequest]:
        return [
            self.create_ingestion_request(f["flow_name"], f["timestamp"], f["channel_values"])
            for f in flows
        ]

    def _requests_from_flows(
        self, flows: Iterable[Flow]
    ) -> list[IngestWithConfigDataStreamRequest]:
        return [
            self.try_create_ingestion_request(f["flow_name"], f["timestamp"], f["channel_values"])
            for f in flows
        ]

    def open_stream(self, timeout: float | None = None) -> IngestStream:
        """Open a data stream on Sift's own streaming client (sift_stream).

        Send protobuf requests with ``send(*requests)`` or samples (``Sample(flow, timestamp_ns,
        values)``, the faster path) with ``send_samples(samples)``; ``close()`` returns once
        the API answered OK, which acknowledges everything the stream carried. Use it as a
        context manager: closed on leaving the block, cancelled if the block raises. See
        :mod:`daq_agent.ingestion.stream`.

        Args:
            timeout: the longest building the stream, one send or the close may take, in seconds
                (default :data:`~daq_agent.ingestion.stream.DEFAULT_STREAM_TIMEOUT_SEC`).

        Raises:
            RpcError: when the API cannot be reached (``UNAVAILABLE``) or refuses the key.
            ConfigError: when the channel is not a :class:`SiftChannel` (sift_stream needs the
                API's address and key, which only a channel from :func:`use_sift_channel` knows).
        """
        channel = self.transport_channel
        if not isinstance(channel, SiftChannel):
            raise ConfigError(
                f"data streams go through sift_stream, which needs the API's address and key: "
                f"open the channel with use_sift_channel(), not {type(channel).__name__}",
                key="channel",
            )
        return IngestStream(
            self, channel, timeout=DEFAULT_STREAM_TIMEOUT_SEC if timeout is None else timeout
        )

    # -- plumbing -------------------------------------------------------------------------------

    def _errors(self, method: str) -> AbstractContextManager[None]:
        channel = self.transport_channel
        if isinstance(channel, SiftChannel):
            return channel.map_errors(method)
        return map_rpc_errors(method)

    def _unary(
        self,
        method: str,
        request: Message,
        response_type: type[_M],
        *,
        channel: grpc.Channel | None = None,
    ) -> _M:
        call = (channel or self.transport_channel).unary_unary(
            method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        with self._errors(method):
            response: _M = call(request, timeout=self._unary_timeout)
        return response


def _cel_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _channel_name(item: ChannelValue) -> str:
    name = item.get("channel_name")
    if not isinstance(name, str):
        raise IngestionValidationError("a ChannelValue needs a channel_name string")
    component = item.get("component")
    return f"{component}.{name}" if component else name


def _check_flow(flow: FlowConfig) -> None:
    if not flow.name:
        raise IngestionValidationError("a flow needs a name")
    names: set[str] = set()
    for channel in flow.channels:
        if channel.name in names:
            raise IngestionValidationError(
                f"flow {flow.name!r} has two channels named {channel.name!r}"
            )
        names.add(channel.name)


def _check_timestamp(timestamp: object) -> None:
    if isinstance(timestamp, datetime):
        offset = timestamp.utcoffset()
        if offset is None:
            raise IngestionValidationError(
                f"timestamp {timestamp.isoformat()} has no time zone: use a UTC datetime"
            )
        if offset != timedelta(0):
            raise IngestionValidationError(f"timestamp {timestamp.isoformat()} is not UTC")
    elif isinstance(timestamp, bool) or not isinstance(timestamp, int):
        raise IngestionValidationError(
            "timestamp must be a UTC datetime or integer nanoseconds since the Unix epoch, "
            f"not {type(timestamp).__name__}"
        )


def _timestamp(timestamp: datetime | int) -> Timestamp:
    if isinstance(timestamp, datetime):
        if timestamp.tzinfo is None:
            timestamp = timestamp.replace(tzinfo=UTC)
        delta = timestamp - _EPOCH
        seconds = delta.days * 86_400 + delta.seconds
        nanos = delta.microseconds * 1_000
    else:
        seconds, nanos = divmod(int(timestamp), _NS_PER_SEC)
    if not _MIN_TIMESTAMP_SEC <= seconds <= _MAX_TIMESTAMP_SEC:
        raise IngestionValidationError(f"timestamp {timestamp!r} is out of range")
    return Timestamp(seconds=seconds, nanos=nanos)


def _metadata_values(metadata: dict[str, str | float | bool]) -> list[metadata_pb2.MetadataValue]:
    values = []
    for name, value in metadata.items():
        if isinstance(value, bool):
            key = metadata_pb2.MetadataKey(name=name, type=metadata_pb2.METADATA_KEY_TYPE_BOOLEAN)
            values.append(metadata_pb2.MetadataValue(key=key, boolean_value=value))
        elif isinstance(value, int | float):
            key = metadata_pb2.MetadataKey(name=name, type=metadata_pb2.METADATA_KEY_TYPE_NUMBER)
            values.append(metadata_pb2.MetadataValue(key=key, number_value=float(value)))
        elif isinstance(value, str):
            key = metadata_pb2.MetadataKey(name=name, type=metadata_pb2.METADATA_KEY_TYPE_STRING)
            values.append(metadata_pb2.MetadataValue(key=key, string_value=value))
        else:
            raise IngestionValidationError(
                f"metadata {name!r}: a value must be a string, number or boolean, "
                f"not {type(value).__name__}"
            )
    return values
