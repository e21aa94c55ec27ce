"""Sift's Python client (sift_py 0.25, in its own environment) against the local server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from compat_support import Cell, export

from daq_agent._proto.sift.rules.v1 import rules_pb2
from daq_agent.server.local import LocalIngestServer

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
FLOWS = ("power", "counters", "log", "extra")
RUN = "siftpy-run"


def _cell_value(kind: str, value: Any) -> str:
    """How ``daq-agent export`` writes a value sift_py sent (bytes arrive as hex already)."""
    if kind in ("double", "float"):
        return repr(float(value))
    if kind == "bool":
        return "true" if value else "false"
    return str(value)


def _run_client(python: Path, server: LocalIngestServer, script: str, *args: str) -> Any:
    done = subprocess.run(
        [str(python), "-W", "ignore::FutureWarning", str(HERE / script), server.address, *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def test_sift_py_session_is_stored_and_reads_back(
    sift_py_python: Path, local_server: LocalIngestServer
) -> None:
    """sift_py creates a config with rules, attaches a run by name, ingests every type, adds a
    flow at run time, reconnects with the same client key (rules updated, run reused, a flow
    added); export then shows exactly what it sent, and its rules read back as written."""
    out = _run_client(sift_py_python, local_server, "siftpy_client.py")

    assert out["configs"][0] == out["configs"][1]
    assert out["runs"][0] == out["runs"][1]
    assert out["lazy_flow_registered"]
    sent: dict[Cell, str] = {}
    detached: set[Cell] = set()
    for flow, ts, channel, kind, value in out["sent"]:
        cell = (ts, flow, channel)
        assert cell not in sent
        sent[cell] = _cell_value(kind, value)
        if ts == 1_750_000_000_000_000_000 + 3 * 10**6:
            detached.add(cell)
    assert len(sent) > 250
    assert len(detached) == 5
    assert export(local_server.db_path, flows=FLOWS) == sent
    in_run = export(local_server.db_path, run=RUN, flows=FLOWS)
    assert in_run == {cell: v for cell, v in sent.items() if cell not in detached}

    with local_server.open_store() as store:
        assert store.count_validation_errors() == 0
        (asset,) = store.list_assets({"name": "siftpy-bench"})
        tag_ids = {t.name: t.tag_id for t in store.list_tags()}
        stored = {r.client_key: rules_pb2.Rule.FromString(r.definition) for r in store.list_rules()}
    rules = out["rules"]
    assert rules["overvoltage-rule"] == {
        "name": "overvoltage",
        "description": "supply above 13.5 V (edited)",
        "expression": "$1 > 13.5",
        "assets": ["siftpy-bench"],
        "tags": [tag_ids["bench"]],
        "contextual": [],
        "references": ["voltage"],
    }
    assert rules["running-hot-rule"]["expression"] == '$1 == "running" && $2 > 2'
    assert rules["running-hot-rule"]["contextual"] == ["voltage"]
    assert rules["running-hot-rule"]["references"] == ["current", "state"]
    assert set(stored) == {"overvoltage-rule", "running-hot-rule"}
    for rule in stored.values():
        assert list(rule.asset_configuration.asset_ids) == [asset.asset_id]
        (condition,) = rule.conditions
        assert condition.rule_id == rule.rule_id
        assert condition.rule_condition_id


def test_descriptors_match_sift_py(sift_py_python: Path, tmp_path: Path) -> None:
    """Every message, enum and method we define has the field names, numbers, types and
    signatures of the same definitions in sift_py 0.25's generated code."""
    ours = _descriptors(sys.executable, "daq_agent._proto.", tmp_path)
    theirs = _descriptors(str(sift_py_python), "", tmp_path)
    assert len(ours) > 60
    for name, members in ours.items():
        assert name in theirs, f"{name} is not in sift_py"
        for member, definition in members.items():
            assert theirs[name].get(member) == definition, f"{name}.{member}"


_DUMP = """
import importlib, json, sys
out = {}
def walk(d):
    out[d.full_name] = {}
    for f in d.fields:
        kind = f.message_type or f.enum_type
        out[d.full_name][f.name] = [
            f.number, f.type, f.is_repeated, kind.full_name if kind else ""
        ]
    for n in d.nested_types:
        walk(n)
for name in sys.argv[2:]:
    module = importlib.import_module(sys.argv[1] + name)
    for d in module.DESCRIPTOR.message_types_by_name.values():
        walk(d)
    for e in module.DESCRIPTOR.enum_types_by_name.values():
        out[e.full_name] = {v.name: v.number for v in e.values}
    for s in module.DESCRIPTOR.services_by_name.values():
        out[s.full_name] = {
            m.name: [m.input_type.full_name, m.output_type.full_name, m.client_streaming]
            for m in s.methods
        }
print(json.dumps(out))
"""
_MODULES = [
    "sift.assets.v1.assets_pb2",
    "sift.annotations.v1.annotations_pb2",
    "sift.channels.v3.channels_pb2",
    "sift.common.type.v1.channel_bit_field_element_pb2",
    "sift.common.type.v1.channel_data_type_pb2",
    "sift.common.type.v1.channel_enum_type_pb2",
    "sift.ingest.v1.ingest_pb2",
    "sift.ingestion_configs.v2.ingestion_configs_pb2",
    "sift.metadata.v1.metadata_pb2",
    "sift.ping.v1.ping_pb2",
    "sift.rules.v1.rules_pb2",
    "sift.runs.v2.runs_pb2",
    "sift.tags.v2.tags_pb2",
]


def _descriptors(python: str, prefix: str, tmp_path: Path) -> dict[str, dict[str, Any]]:
    script = tmp_path / "dump_descriptors.py"
    script.write_text(_DUMP)
    done = subprocess.run(
        [python, "-W", "ignore", str(script), prefix, *_MODULES],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env={"PYTHONPATH": str(HERE.parents[1])} if prefix else {},
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, dict[str, Any]] = json.loads(done.stdout)
    return result
