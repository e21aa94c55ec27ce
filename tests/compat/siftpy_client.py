"""A sift_py 0.25 session against a Sift API, run inside the sift_py environment (not by pytest).

Usage: ``python siftpy_client.py ADDRESS`` (host:port, plain text). It prints one JSON object:

    {"sent": [[flow, timestamp_ns, channel, kind, value], ...],   # every value it ingested
     "runs": [run id of the first session, of the second],
     "configs": [ingestion config id of the first session, of the second],
     "rules": {client key: {"description": ..., "expression": ..., "assets": [...],
                            "tags": [...]}},                    # rules read back at the end
     "lazy_flow_registered": bool}

The session: a telemetry config with two flows and two rules (one with a contextual channel and
annotation tags), a run attached by name, typed values ingested, a flow added at run time, the run
detached and data ingested without it; then a second IngestionService with the same client key
(and an edited rule, and a third flow), which reattaches the same run by name and ingests again.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Any

import grpc
from sift.tags.v2.tags_pb2 import CreateTagRequest
from sift.tags.v2.tags_pb2_grpc import TagServiceStub
from sift_py.grpc.transport import use_sift_channel
from sift_py.ingestion.channel import (
    ChannelBitFieldElement,
    ChannelConfig,
    ChannelDataType,
    ChannelEnumType,
    bit_field_value,
    bool_value,
    bytes_value,
    double_value,
    enum_value,
    float_value,
    int32_value,
    int64_value,
    string_value,
    uint32_value,
    uint64_value,
)
from sift_py.ingestion.config.telemetry import FlowConfig, TelemetryConfig
from sift_py.ingestion.service import IngestionService
from sift_py.rule.config import (
    RuleActionCreateDataReviewAnnotation,
    RuleActionCreatePhaseAnnotation,
    RuleConfig,
)
from sift_py.rule.service import RuleService

ASSET = "siftpy-bench"
CLIENT_KEY = "siftpy-bench-config"
RUN = "siftpy-run"
BASE_NS = 1_750_000_000_000_000_000

VOLTAGE = ChannelConfig("voltage", ChannelDataType.DOUBLE, unit="V", description="supply")
CURRENT = ChannelConfig("current", ChannelDataType.FLOAT, unit="A")
STATE = ChannelConfig(
    "state",
    ChannelDataType.ENUM,
    enum_types=[ChannelEnumType("idle", 0), ChannelEnumType("running", 1)],
)
FLAGS = ChannelConfig(
    "flags",
    ChannelDataType.BIT_FIELD,
    bit_field_elements=[ChannelBitFieldElement("a", 0, 4), ChannelBitFieldElement("b", 4, 4)],
)
COUNTS = [
    ChannelConfig("ok", ChannelDataType.BOOL),
    ChannelConfig("i32", ChannelDataType.INT_32),
    ChannelConfig("u32", ChannelDataType.UINT_32),
    ChannelConfig("i64", ChannelDataType.INT_64),
    ChannelConfig("u64", ChannelDataType.UINT_64),
]
LOG = ChannelConfig("message", ChannelDataType.STRING)
BLOB = ChannelConfig("blob", ChannelDataType.BYTES)

MAKERS = {
    "double": double_value,
    "float": float_value,
    "enum": enum_value,
    "bit_field": bit_field_value,
    "bool": bool_value,
    "int32": int32_value,
    "uint32": uint32_value,
    "int64": int64_value,
    "uint64": uint64_value,
    "string": string_value,
    "bytes": bytes_value,
}


def telemetry(description: str, extra_flows: list[FlowConfig]) -> TelemetryConfig:
    """The telemetry config (the first rule's description varies between sessions)."""
    return TelemetryConfig(
        asset_name=ASSET,
        ingestion_client_key=CLIENT_KEY,
        flows=[
            FlowConfig("power", [VOLTAGE, CURRENT, STATE, FLAGS]),
            FlowConfig("counters", COUNTS),
            *extra_flows,
        ],
        rules=[
            RuleConfig(
                name="overvoltage",
                description=description,
                expression="$1 > 13.5",
                rule_client_key="overvoltage-rule",
                channel_references=[{"channel_reference": "$1", "channel_config": VOLTAGE}],
                action=RuleActionCreateDataReviewAnnotation(tags=["bench"]),
            ),
            RuleConfig(
                name="running-hot",
                description="current while running",
                expression='$1 == "running" && $2 > $limit',
                rule_client_key="running-hot-rule",
                channel_references=[
                    {"channel_reference": "$1", "channel_config": STATE},
                    {"channel_reference": "$2", "channel_config": CURRENT},
                ],
                sub_expressions={"$limit": 2},
                contextual_channels=["voltage"],
                action=RuleActionCreatePhaseAnnotation(tags=["bench", "thermal"]),
            ),
        ],
    )


class Session:
    """Ingests typed values and remembers each one it sent."""

    def __init__(self, service: IngestionService, sent: list[list[Any]]) -> None:
        self.service = service
        self.sent = sent

    def ingest(self, flow: str, timestamp_ns: int, values: list[tuple[str, str, Any]]) -> None:
        """One flow with values ``(channel, kind, value)``; channels left out are sent empty."""
        channel_values = []
        for channel, kind, value in values:
            channel_values.append({"channel_name": channel, "value": MAKERS[kind](value)})
            shown = value.hex() if isinstance(value, bytes) else value
            self.sent.append([flow, timestamp_ns, channel, kind, shown])
        timestamp = datetime.fromtimestamp(timestamp_ns // 10**9, tz=UTC).replace(
            microsecond=(timestamp_ns % 10**9) // 1000
        )
        # sift_py's timestamps are datetimes: microsecond resolution
        assert timestamp_ns % 1000 == 0
        self.service.try_ingest_flows(
            {"flow_name": flow, "timestamp": timestamp, "channel_values": channel_values}
        )


def power(i: int) -> list[tuple[str, str, Any]]:
    return [
        ("voltage", "double", 12.0 + i / 8),
        ("current", "float", 0.5 * i),  # exact in float32
        ("state", "enum", i % 2),
        ("flags", "bit_field", bytes([i % 256])),
    ]


def counters(i: int) -> list[tuple[str, str, Any]]:
    return [
        ("ok", "bool", i % 3 == 0),
        ("i32", "int32", -(2**31) + i),
        ("u32", "uint32", 2**32 - 1 - i),
        ("i64", "int64", -(2**63) + i),
        ("u64", "uint64", 2**64 - 1 - i),
    ]


def main(address: str) -> int:
    config = {"uri": address, "apikey": "local-key", "use_ssl": False}
    sent: list[list[Any]] = []
    out: dict[str, Any] = {"sent": sent, "runs": [], "configs": []}
    with use_sift_channel(config) as channel:  # type: ignore[arg-type]
        tags = TagServiceStub(channel)
        for name in ("bench", "thermal"):
            try:
                tags.CreateTag(CreateTagRequest(name=name))
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise

        # first session: config, rules, run by name, typed values, a flow added at run time
        service = IngestionService(channel, telemetry("supply above 13.5 V", []))
        out["configs"].append(service.ingestion_config.ingestion_config_id)
        service.attach_run(channel, RUN, description="bench run", tags=["bench"])
        out["runs"].append(service.run_id)
        first = Session(service, sent)
        for i in range(20):
            first.ingest("power", BASE_NS + i * 1000, power(i))
            first.ingest("counters", BASE_NS + 5 * 10**8 + i * 1000, counters(i))
        service.try_create_flow(FlowConfig("log", [LOG, BLOB]))
        for i in range(5):
            first.ingest(
                "log",
                BASE_NS + 10**6 + i * 1000,
                [("message", "string", f"line {i} é"), ("blob", "bytes", bytes(range(i, i + 4)))],
            )
        first.ingest("power", BASE_NS + 2 * 10**6, power(1)[:2])  # state and flags empty
        service.detach_run()
        first.ingest("counters", BASE_NS + 3 * 10**6, counters(7))

        # second session, same client key: the edited rule is updated, a new flow registered
        service = IngestionService(
            channel,
            telemetry("supply above 13.5 V (edited)", [FlowConfig("extra", [VOLTAGE])]),
        )
        out["configs"].append(service.ingestion_config.ingestion_config_id)
        service.attach_run(channel, RUN)
        out["runs"].append(service.run_id)
        second = Session(service, sent)
        with service.buffered_ingestion(buffer_size=7) as buffered:
            second.service = buffered  # type: ignore[assignment]
            for i in range(20, 40):
                second.ingest("power", BASE_NS + i * 1000, power(i))
            second.ingest("extra", BASE_NS + 4 * 10**6, [("voltage", "double", -1.25)])
        out["lazy_flow_registered"] = "log" in service.flow_configs_by_name

        rules = RuleService(channel)
        out["rules"] = {}
        for key in ("overvoltage-rule", "running-hot-rule"):
            rule = rules.get_rule(key)
            assert rule is not None, key
            out["rules"][key] = {
                "name": rule.name,
                "description": rule.description,
                "expression": rule.expression,
                "assets": rule.asset_names,
                "tags": sorted(rule.action.tags or []) if rule.action else None,
                "contextual": rule.contextual_channels,
                "references": sorted(r["channel_identifier"] for r in rule.channel_references),
            }
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
