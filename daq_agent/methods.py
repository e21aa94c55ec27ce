"""gRPC method paths (``/<package>.<Service>/<Method>``) of the Sift API subset.

Shared by the client and the local server.
"""

from __future__ import annotations

INGEST_WITH_CONFIG_DATA_STREAM = "/sift.ingest.v1.IngestService/IngestWithConfigDataStream"

GET_INGESTION_CONFIG = "/sift.ingestion_configs.v2.IngestionConfigService/GetIngestionConfig"
CREATE_INGESTION_CONFIG = "/sift.ingestion_configs.v2.IngestionConfigService/CreateIngestionConfig"
LIST_INGESTION_CONFIGS = "/sift.ingestion_configs.v2.IngestionConfigService/ListIngestionConfigs"
CREATE_INGESTION_CONFIG_FLOWS = (
    "/sift.ingestion_configs.v2.IngestionConfigService/CreateIngestionConfigFlows"
)
LIST_INGESTION_CONFIG_FLOWS = (
    "/sift.ingestion_configs.v2.IngestionConfigService/ListIngestionConfigFlows"
)

GET_RUN = "/sift.runs.v2.RunService/GetRun"
LIST_RUNS = "/sift.runs.v2.RunService/ListRuns"
CREATE_RUN = "/sift.runs.v2.RunService/CreateRun"
STOP_RUN = "/sift.runs.v2.RunService/StopRun"
UPDATE_RUN = "/sift.runs.v2.RunService/UpdateRun"

PING = "/sift.ping.v1.PingService/Ping"

GET_ASSET = "/sift.assets.v1.AssetService/GetAsset"
LIST_ASSETS = "/sift.assets.v1.AssetService/ListAssets"
UPDATE_ASSET = "/sift.assets.v1.AssetService/UpdateAsset"

LIST_CHANNELS = "/sift.channels.v3.ChannelService/ListChannels"

CREATE_TAG = "/sift.tags.v2.TagService/CreateTag"
LIST_TAGS = "/sift.tags.v2.TagService/ListTags"

GET_RULE = "/sift.rules.v1.RuleService/GetRule"
BATCH_GET_RULES = "/sift.rules.v1.RuleService/BatchGetRules"
CREATE_RULE = "/sift.rules.v1.RuleService/CreateRule"
UPDATE_RULE = "/sift.rules.v1.RuleService/UpdateRule"
BATCH_UPDATE_RULES = "/sift.rules.v1.RuleService/BatchUpdateRules"
LIST_RULES = "/sift.rules.v1.RuleService/ListRules"
