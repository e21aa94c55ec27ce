"""The generated protobuf code is fresh and reproduces the Sift wire contract."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from daq_agent._proto.sift.annotations.v1 import annotations_pb2
from daq_agent._proto.sift.assets.v1 import assets_pb2
from daq_agent._proto.sift.channels.v3 import channels_pb2
from daq_agent._proto.sift.common.type.v1 import channel_data_type_pb2
from daq_agent._proto.sift.ingest.v1 import ingest_pb2
from daq_agent._proto.sift.ingestion_configs.v2 import ingestion_configs_pb2
from daq_agent._proto.sift.metadata.v1 import metadata_pb2
from daq_agent._proto.sift.ping.v1 import ping_pb2
from daq_agent._proto.sift.rules.v1 import rules_pb2
from daq_agent._proto.sift.runs.v2 import runs_pb2
from daq_agent._proto.sift.tags.v2 import tags_pb2

ROOT = Path(__file__).resolve().parents[2]

F = FieldDescriptor
STRING, DOUBLE, FLOAT, BOOL = F.TYPE_STRING, F.TYPE_DOUBLE, F.TYPE_FLOAT, F.TYPE_BOOL
INT32, UINT32, INT64, UINT64 = F.TYPE_INT32, F.TYPE_UINT32, F.TYPE_INT64, F.TYPE_UINT64
BYTES, MESSAGE, ENUM = F.TYPE_BYTES, F.TYPE_MESSAGE, F.TYPE_ENUM

# The paging fields of Sift's List* requests (those with an order_by, and those without).
_PAGE = {
    "page_size": (1, UINT32, False),
    "page_token": (2, STRING, False),
    "filter": (3, STRING, False),
}
_ORDERED_PAGE = {**_PAGE, "order_by": (4, STRING, False)}

# (message, {name: (number, type, repeated)}) straight from the wire contract.
CONTRACT: list[tuple[Descriptor, dict[str, tuple[int, int, bool]]]] = [
    (
        ingest_pb2.IngestWithConfigDataStreamRequest.DESCRIPTOR,
        {
            "ingestion_config_id": (1, STRING, False),
            "flow": (2, STRING, False),
            "timestamp": (3, MESSAGE, False),
            "channel_values": (4, MESSAGE, True),
            "run_id": (5, STRING, False),
            "end_stream_on_validation_error": (6, BOOL, False),
            "organization_id": (7, STRING, False),
        },
    ),
    (
        ingest_pb2.IngestWithConfigDataChannelValue.DESCRIPTOR,
        {
            "string": (1, STRING, False),
            "double": (2, DOUBLE, False),
            "float": (3, FLOAT, False),
            "bool": (4, BOOL, False),
            "int32": (5, INT32, False),
            "uint32": (6, UINT32, False),
            "int64": (7, INT64, False),
            "uint64": (8, UINT64, False),
            "bit_field": (9, BYTES, False),
            "enum": (10, UINT32, False),
            "empty": (11, MESSAGE, False),
            "bytes": (12, BYTES, False),
        },
    ),
    (
        ingestion_configs_pb2.IngestionConfig.DESCRIPTOR,
        {
            "ingestion_config_id": (1, STRING, False),
            "asset_id": (2, STRING, False),
            "client_key": (3, STRING, False),
        },
    ),
    (
        ingestion_configs_pb2.FlowConfig.DESCRIPTOR,
        {"name": (1, STRING, False), "channels": (2, MESSAGE, True)},
    ),
    (
        ingestion_configs_pb2.ChannelConfig.DESCRIPTOR,
        {
            "name": (1, STRING, False),
            "unit": (2, STRING, False),
            "description": (3, STRING, False),
            "data_type": (4, ENUM, False),
            "enum_types": (5, MESSAGE, True),
            "bit_field_elements": (6, MESSAGE, True),
        },
    ),
    (
        ingestion_configs_pb2.CreateIngestionConfigRequest.DESCRIPTOR,
        {
            "asset_name": (1, STRING, False),
            "flows": (2, MESSAGE, True),
            "organization_id": (3, STRING, False),
            "client_key": (4, STRING, False),
        },
    ),
    (
        ingestion_configs_pb2.ListIngestionConfigsRequest.DESCRIPTOR,
        _PAGE,
    ),
    (
        ingestion_configs_pb2.ListIngestionConfigFlowsRequest.DESCRIPTOR,
        {
            "ingestion_config_id": (1, STRING, False),
            "page_size": (2, UINT32, False),
            "page_token": (3, STRING, False),
            "filter": (4, STRING, False),
        },
    ),
    (
        ingestion_configs_pb2.CreateIngestionConfigFlowsRequest.DESCRIPTOR,
        {"ingestion_config_id": (1, STRING, False), "flows": (2, MESSAGE, True)},
    ),
    (
        runs_pb2.Run.DESCRIPTOR,
        {
            "run_id": (1, STRING, False),
            "created_date": (2, MESSAGE, False),
            "modified_date": (3, MESSAGE, False),
            "organization_id": (6, STRING, False),
            "start_time": (7, MESSAGE, False),
            "stop_time": (8, MESSAGE, False),
            "name": (10, STRING, False),
            "description": (11, STRING, False),
            "tags": (12, STRING, True),
            "client_key": (14, STRING, False),
            "metadata": (15, MESSAGE, True),
            "asset_ids": (16, STRING, True),
            "is_stopped": (22, BOOL, False),
        },
    ),
    (
        runs_pb2.CreateRunRequest.DESCRIPTOR,
        {
            "name": (1, STRING, False),
            "description": (2, STRING, False),
            "tags": (3, STRING, True),
            "start_time": (4, MESSAGE, False),
            "stop_time": (5, MESSAGE, False),
            "organization_id": (7, STRING, False),
            "client_key": (8, STRING, False),
            "metadata": (9, MESSAGE, True),
        },
    ),
    (
        runs_pb2.ListRunsRequest.DESCRIPTOR,
        _ORDERED_PAGE,
    ),
    (
        metadata_pb2.MetadataValue.DESCRIPTOR,
        {
            "key": (1, MESSAGE, False),
            "string_value": (2, STRING, False),
            "number_value": (3, DOUBLE, False),
            "boolean_value": (4, BOOL, False),
        },
    ),
    (ping_pb2.PingResponse.DESCRIPTOR, {"response": (1, STRING, False)}),
    (
        runs_pb2.UpdateRunRequest.DESCRIPTOR,
        {"run": (1, MESSAGE, False), "update_mask": (2, MESSAGE, False)},
    ),
    (runs_pb2.UpdateRunResponse.DESCRIPTOR, {"run": (1, MESSAGE, False)}),
    (
        assets_pb2.Asset.DESCRIPTOR,
        {
            "asset_id": (1, STRING, False),
            "name": (2, STRING, False),
            "organization_id": (4, STRING, False),
            "created_date": (5, MESSAGE, False),
            "created_by_user_id": (6, STRING, False),
            "modified_date": (7, MESSAGE, False),
            "modified_by_user_id": (8, STRING, False),
            "tags": (9, STRING, True),
            "metadata": (10, MESSAGE, True),
            "archived_date": (11, MESSAGE, False),
            "is_archived": (12, BOOL, False),
        },
    ),
    (assets_pb2.GetAssetRequest.DESCRIPTOR, {"asset_id": (1, STRING, False)}),
    (assets_pb2.GetAssetResponse.DESCRIPTOR, {"asset": (1, MESSAGE, False)}),
    (
        assets_pb2.ListAssetsRequest.DESCRIPTOR,
        _ORDERED_PAGE,
    ),
    (
        assets_pb2.ListAssetsResponse.DESCRIPTOR,
        {"assets": (1, MESSAGE, True), "next_page_token": (5, STRING, False)},
    ),
    (
        assets_pb2.UpdateAssetRequest.DESCRIPTOR,
        {"asset": (1, MESSAGE, False), "update_mask": (2, MESSAGE, False)},
    ),
    (assets_pb2.UpdateAssetResponse.DESCRIPTOR, {"asset": (1, MESSAGE, False)}),
    (
        rules_pb2.Rule.DESCRIPTOR,
        {
            "rule_id": (1, STRING, False),
            "asset_id": (2, STRING, False),
            "name": (3, STRING, False),
            "description": (4, STRING, False),
            "is_enabled": (6, BOOL, False),
            "created_date": (7, MESSAGE, False),
            "modified_date": (8, MESSAGE, False),
            "created_by_user_id": (9, STRING, False),
            "modified_by_user_id": (10, STRING, False),
            "organization_id": (11, STRING, False),
            "conditions": (12, MESSAGE, True),
            "client_key": (14, STRING, False),
            "asset_configuration": (15, MESSAGE, False),
            "contextual_channels": (16, MESSAGE, False),
            "deleted_date": (17, MESSAGE, False),
            "is_external": (18, BOOL, False),
            "metadata": (19, MESSAGE, True),
            "archived_date": (20, MESSAGE, False),
            "is_archived": (21, BOOL, False),
            "is_live_evaluation_enabled": (22, BOOL, False),
            "current_version_id": (23, STRING, False),
            "folder_ids": (24, STRING, True),
        },
    ),
    (
        rules_pb2.RuleCondition.DESCRIPTOR,
        {
            "rule_condition_id": (1, STRING, False),
            "rule_id": (2, STRING, False),
            "expression": (3, MESSAGE, False),
            "created_date": (5, MESSAGE, False),
            "modified_date": (6, MESSAGE, False),
            "created_by_user_id": (7, STRING, False),
            "modified_by_user_id": (8, STRING, False),
            "actions": (9, MESSAGE, True),
            "rule_condition_version_id": (10, STRING, False),
        },
    ),
    (
        rules_pb2.RuleAction.DESCRIPTOR,
        {
            "rule_action_id": (1, STRING, False),
            "rule_condition_id": (2, STRING, False),
            "action_type": (3, ENUM, False),
            "configuration": (4, MESSAGE, False),
            "created_date": (5, MESSAGE, False),
            "modified_date": (6, MESSAGE, False),
            "created_by_user_id": (7, STRING, False),
            "modified_by_user_id": (8, STRING, False),
            "rule_action_version_id": (9, STRING, False),
        },
    ),
    (
        rules_pb2.UpdateRuleRequest.DESCRIPTOR,
        {
            "rule_id": (1, STRING, False),
            "name": (2, STRING, False),
            "description": (3, STRING, False),
            "asset_id": (4, STRING, False),
            "is_enabled": (5, BOOL, False),
            "conditions": (6, MESSAGE, True),
            "organization_id": (7, STRING, False),
            "version_notes": (8, STRING, False),
            "client_key": (9, STRING, False),
            "asset_configuration": (10, MESSAGE, False),
            "contextual_channels": (11, MESSAGE, False),
            "is_external": (12, BOOL, False),
            "metadata": (13, MESSAGE, True),
            "is_archived": (14, BOOL, False),
            "is_live_evaluation_enabled": (15, BOOL, False),
        },
    ),
    (
        rules_pb2.UpdateConditionRequest.DESCRIPTOR,
        {
            "rule_condition_id": (1, STRING, False),
            "expression": (3, MESSAGE, False),
            "actions": (4, MESSAGE, True),
        },
    ),
    (
        rules_pb2.UpdateActionRequest.DESCRIPTOR,
        {
            "rule_action_id": (1, STRING, False),
            "action_type": (2, ENUM, False),
            "configuration": (3, MESSAGE, False),
        },
    ),
    (
        rules_pb2.GetRuleRequest.DESCRIPTOR,
        {"rule_id": (1, STRING, False), "client_key": (2, STRING, False)},
    ),
    (rules_pb2.CreateRuleRequest.DESCRIPTOR, {"update": (1, MESSAGE, False)}),
    (rules_pb2.CreateRuleResponse.DESCRIPTOR, {"rule_id": (1, STRING, False)}),
    (rules_pb2.UpdateRuleResponse.DESCRIPTOR, {"rule_id": (1, STRING, False)}),
    (
        rules_pb2.RuleAssetConfiguration.DESCRIPTOR,
        {"asset_ids": (1, STRING, True), "tag_ids": (2, STRING, True)},
    ),
    (rules_pb2.ContextualChannels.DESCRIPTOR, {"channels": (1, MESSAGE, True)}),
    (
        rules_pb2.RuleConditionExpression.DESCRIPTOR,
        {
            "single_channel_comparison": (1, MESSAGE, False),
            "calculated_channel": (2, MESSAGE, False),
        },
    ),
    (
        rules_pb2.CalculatedChannelConfig.DESCRIPTOR,
        {"channel_references": (1, MESSAGE, True), "expression": (2, STRING, False)},
    ),
    (
        rules_pb2.ChannelReference.DESCRIPTOR,
        {
            "name": (1, STRING, False),
            "component": (2, STRING, False),
            "calculated_channel_version_id": (3, STRING, False),
        },
    ),
    (
        rules_pb2.RuleActionConfiguration.DESCRIPTOR,
        {
            "notification": (1, MESSAGE, False),
            "annotation": (2, MESSAGE, False),
            "webhook": (3, MESSAGE, False),
        },
    ),
    (
        rules_pb2.AnnotationActionConfiguration.DESCRIPTOR,
        {
            "tag_ids": (1, STRING, True),
            "annotation_type": (2, ENUM, False),
            "assigned_to_user_id": (3, STRING, False),
            "metadata": (4, MESSAGE, True),
        },
    ),
    (
        channels_pb2.Channel.DESCRIPTOR,
        {
            "channel_id": (1, STRING, False),
            "name": (2, STRING, False),
            "asset_id": (3, STRING, False),
            "description": (4, STRING, False),
            "unit_id": (5, STRING, False),
            "created_date": (6, MESSAGE, False),
            "modified_date": (7, MESSAGE, False),
            "created_by_user_id": (8, STRING, False),
            "modified_by_user_id": (9, STRING, False),
            "data_type": (10, ENUM, False),
            "enum_types": (11, MESSAGE, True),
            "bit_field_elements": (12, MESSAGE, True),
            "display_description": (13, STRING, False),
            "display_unit_id": (14, STRING, False),
            "metadata": (15, MESSAGE, True),
            "active": (16, BOOL, False),
        },
    ),
    (
        channels_pb2.ListChannelsRequest.DESCRIPTOR,
        _ORDERED_PAGE,
    ),
    (
        channels_pb2.ListChannelsResponse.DESCRIPTOR,
        {"channels": (1, MESSAGE, True), "next_page_token": (2, STRING, False)},
    ),
    (
        tags_pb2.Tag.DESCRIPTOR,
        {
            "tag_id": (1, STRING, False),
            "name": (2, STRING, False),
            "created_by_user_id": (3, STRING, False),
            "created_date": (4, MESSAGE, False),
        },
    ),
    (tags_pb2.CreateTagRequest.DESCRIPTOR, {"name": (1, STRING, False)}),
    (
        tags_pb2.ListTagsRequest.DESCRIPTOR,
        {**_ORDERED_PAGE, "tag_type": (5, ENUM, False)},
    ),
    (
        tags_pb2.ListTagsResponse.DESCRIPTOR,
        {"tags": (1, MESSAGE, True), "next_page_token": (2, STRING, False)},
    ),
]


@pytest.mark.parametrize(
    ("descriptor", "fields"), CONTRACT, ids=lambda v: getattr(v, "full_name", "")
)
def test_messages_match_the_wire_contract(
    descriptor: Descriptor, fields: dict[str, tuple[int, int, bool]]
) -> None:
    """Every message has exactly the contract's field names, numbers, types and cardinality."""
    actual = {f.name: (f.number, f.type, f.is_repeated) for f in descriptor.fields}
    assert actual == fields


def test_packages_services_and_enums_match_the_wire_contract() -> None:
    """Proto packages, service method paths and enum values are the contract's."""
    assert ingest_pb2.DESCRIPTOR.package == "sift.ingest.v1"
    assert ingestion_configs_pb2.DESCRIPTOR.package == "sift.ingestion_configs.v2"
    assert runs_pb2.DESCRIPTOR.package == "sift.runs.v2"
    assert assets_pb2.DESCRIPTOR.package == "sift.assets.v1"
    services = {
        s.full_name: sorted(m.name for m in s.methods)
        for module in (
            ingest_pb2,
            ingestion_configs_pb2,
            runs_pb2,
            ping_pb2,
            assets_pb2,
            rules_pb2,
            channels_pb2,
            tags_pb2,
        )
        for s in module.DESCRIPTOR.services_by_name.values()
    }
    assert services == {
        "sift.ingest.v1.IngestService": ["IngestWithConfigDataStream"],
        "sift.ingestion_configs.v2.IngestionConfigService": [
            "CreateIngestionConfig",
            "CreateIngestionConfigFlows",
            "GetIngestionConfig",
            "ListIngestionConfigFlows",
            "ListIngestionConfigs",
        ],
        "sift.runs.v2.RunService": ["CreateRun", "GetRun", "ListRuns", "StopRun", "UpdateRun"],
        "sift.ping.v1.PingService": ["Ping"],
        "sift.assets.v1.AssetService": ["GetAsset", "ListAssets", "UpdateAsset"],
        "sift.rules.v1.RuleService": [
            "BatchGetRules",
            "BatchUpdateRules",
            "CreateRule",
            "GetRule",
            "ListRules",
            "UpdateRule",
        ],
        "sift.channels.v3.ChannelService": ["ListChannels"],
        "sift.tags.v2.TagService": ["CreateTag", "ListTags"],
    }
    assert annotations_pb2.AnnotationType.items() == [
        ("ANNOTATION_TYPE_UNSPECIFIED", 0),
        ("ANNOTATION_TYPE_DATA_REVIEW", 1),
        ("ANNOTATION_TYPE_PHASE", 2),
    ]
    assert rules_pb2.ActionKind.items() == [
        ("ACTION_KIND_UNSPECIFIED", 0),
        ("NOTIFICATION", 1),
        ("ANNOTATION", 2),
        ("WEBHOOK", 3),
    ]
    assert tags_pb2.TagType.values() == list(range(7))
    assert rules_pb2.DESCRIPTOR.package == "sift.rules.v1"
    assert channels_pb2.DESCRIPTOR.package == "sift.channels.v3"
    assert tags_pb2.DESCRIPTOR.package == "sift.tags.v2"
    names = channel_data_type_pb2.ChannelDataType.keys()
    assert names == [
        f"CHANNEL_DATA_TYPE_{n}"
        for n in [
            "UNSPECIFIED",
            "DOUBLE",
            "STRING",
            "ENUM",
            "BIT_FIELD",
            "BOOL",
            "FLOAT",
            "INT_32",
            "UINT_32",
            "INT_64",
            "UINT_64",
            "BYTES",
        ]
    ]
    assert channel_data_type_pb2.ChannelDataType.values() == list(range(12))
    assert metadata_pb2.MetadataKeyType.keys() == [
        "METADATA_KEY_TYPE_UNSPECIFIED",
        "METADATA_KEY_TYPE_STRING",
        "METADATA_KEY_TYPE_NUMBER",
        "METADATA_KEY_TYPE_BOOLEAN",
    ]


def test_generated_code_is_fresh() -> None:
    """The committed daq_agent/_proto is exactly what protos/ generates now."""
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = module
    spec.loader.exec_module(module)
    assert module.stale_files() == [], "run `make protos` and commit daq_agent/_proto"


def test_no_top_level_sift_package() -> None:
    """The generated code never imports or installs a top-level ``sift`` package."""
    for path in (ROOT / "daq_agent" / "_proto").rglob("*.py"):
        text = path.read_text()
        assert "from sift." not in text, path
        assert "import sift." not in text, path
