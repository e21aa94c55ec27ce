"""The local server's SQLite store, on real files in tmp_path."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daq_agent._proto.sift.common.type.v1 import channel_data_type_pb2 as cdt
from daq_agent._proto.sift.ingest.v1 import ingest_pb2
from daq_agent._proto.sift.ingestion_configs.v2 import ingestion_configs_pb2 as ic
from daq_agent.core.errors import DaqError
from daq_agent.server.filters import FilterError
from daq_agent.server.store import SampleRow, Store, ValidationErrorRecord

BASE = 1_700_000_000_000_000_007


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A writable store in tmp_path."""
    with Store.open(tmp_path / "s.sqlite") as opened:
        yield opened


def _flow(name: str, *channels: str) -> bytes:
    return ic.FlowConfig(
        name=name,
        channels=[
            ic.ChannelConfig(name=c, data_type=cdt.CHANNEL_DATA_TYPE_DOUBLE) for c in channels
        ],
    ).SerializeToString()


def _data(*values: float | None) -> bytes:
    request = ingest_pb2.IngestWithConfigDataStreamRequest()
    for value in values:
        item = request.channel_values.add()
        if value is None:
            item.empty.SetInParent()
        else:
            item.double = value
    return request.SerializeToString()


def _setup(store: Store) -> tuple[int, int, str]:
    """A config with flows a (x, y) and b (z), and a run; returns (flow a pk, flow b pk, run id)."""
    config = store.create_ingestion_config(asset_name="rig", client_key="k")
    store.add_flows(config.pk, [("a", _flow("a", "x", "y")), ("b", _flow("b", "z"))])
    flows = {f.name: f.pk for f in store.list_flows(config.pk)}
    run = store.create_run(name="r")
    return flows["a"], flows["b"], run.run_id


def test_open_creates_a_wal_database(tmp_path: Path) -> None:
    """A new store is in WAL mode and reopens with its data."""
    path = tmp_path / "new" / "s.sqlite"
    with Store.open(path) as store:
        store.create_ingestion_config(asset_name="rig", client_key="k")
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    with Store.open(path, readonly=True) as reader:
        assert [c.client_key for c in reader.list_ingestion_configs()] == ["k"]


def test_open_errors(tmp_path: Path) -> None:
    """A missing file (read-only) or a foreign database raises DaqError naming the file."""
    with pytest.raises(DaqError, match="no database at"):
        Store.open(tmp_path / "missing.sqlite", readonly=True)
    foreign = tmp_path / "foreign.sqlite"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(DaqError, match=r"foreign\.sqlite"):
        Store.open(foreign, readonly=True)
    with pytest.raises(DaqError, match="not a daq-agent database"):
        Store.open(foreign)


def test_samples_are_deduplicated(store: Store) -> None:
    """(flow, run, timestamp) is one sample: re-sent rows are ignored, other runs are new."""
    a, b, run_id = _setup(store)
    run_pk = store.get_run(run_id).pk  # type: ignore[union-attr]
    rows: list[SampleRow] = [(a, run_pk, BASE + i, _data(i, -i)) for i in range(600)]
    store.insert_samples(rows)
    store.insert_samples(rows[100:400])
    store.insert_samples([(a, 0, BASE, _data(1, 2)), (b, run_pk, BASE, _data(3))])
    store.commit()
    assert store.count_samples() == 602
    assert store.count_samples(run_id=run_id) == 601
    assert store.count_samples(flow="a") == 601
    assert store.flow_counts() == {"a": 601, "b": 1}
    assert store.flow_counts(run_id=run_id) == {"a": 600, "b": 1}


def test_readers_see_only_committed_samples(store: Store) -> None:
    """A read-only store sees samples once the writer commits."""
    a, _, _ = _setup(store)
    store.insert_samples([(a, 0, BASE, _data(1, 2))])
    with Store.open(store.path, readonly=True) as reader:
        assert reader.count_samples() == 0
        assert store.pending == 1
        store.commit()
        assert reader.count_samples() == 1
        assert store.pending == 0


@pytest.mark.parametrize(
    "refused",
    [
        lambda s: s.create_tag("hot"),
        lambda s: s.create_run(name="r2", client_key="rk"),
        lambda s: s.create_rule(name="x", client_key="k", definition=b""),
        lambda s: s.create_ingestion_config(asset_name="new-asset", client_key="k"),
    ],
    ids=["tag", "run", "rule", "config"],
)
def test_a_refused_write_keeps_the_uncommitted_samples(
    store: Store, refused: Callable[[Store], object]
) -> None:
    """A write refused for a taken name or key undoes only itself: the samples (and validation
    errors) written before it and not yet committed are kept, and a new asset is not left behind."""
    a, _, _ = _setup(store)
    store.create_tag("hot")
    store.create_run(name="r", client_key="rk")
    store.create_rule(name="x", client_key="k", definition=b"")
    store.insert_samples([(a, 0, BASE + i, _data(i, i)) for i in range(3)])
    store.insert_validation_errors([ValidationErrorRecord(BASE, "c", "a", "", 0, "why", "")])
    with pytest.raises(DaqError, match=r"taken|exists"):
        refused(store)
    assert store.pending == 3
    store.commit()
    with Store.open(store.path, readonly=True) as reader:
        assert reader.count_samples() == 3
        assert reader.count_validation_errors() == 1
        assert [x.name for x in reader.list_assets()] == ["rig"]


def test_iter_samples_decodes_in_time_order(store: Store) -> None:
    """Samples come back in timestamp order with channel names, None for empty values."""
    a, b, run_id = _setup(store)
    run_pk = store.get_run(run_id).pk  # type: ignore[union-attr]
    store.insert_samples(
        [
            (a, run_pk, BASE + 2, _data(3.5, None)),
            (b, 0, BASE + 1, _data(9)),
            (a, run_pk, BASE, _data(1.0, 2.0)),
        ]
    )
    store.commit()
    samples = list(store.iter_samples())
    assert [(s.flow, s.timestamp_ns) for s in samples] == [
        ("a", BASE),
        ("b", BASE + 1),
        ("a", BASE + 2),
    ]
    flow, timestamp_ns, values = samples[2]
    assert (flow, timestamp_ns, values) == ("a", BASE + 2, {"x": 3.5, "y": None})
    assert [s.flow for s in store.iter_samples(run_id=run_id)] == ["a", "a"]
    assert [s.flow for s in store.iter_samples(run_name="r")] == ["a", "a"]
    assert [s.flow for s in store.iter_samples(flows=["b"])] == ["b"]
    config_id = store.list_ingestion_configs()[0].ingestion_config_id
    assert len(list(store.iter_samples(ingestion_config_id=config_id))) == 3
    assert list(store.iter_samples(ingestion_config_id="other")) == []


def test_validation_errors(store: Store) -> None:
    """Recorded validation errors list oldest first; limit keeps the last ones."""
    store.insert_validation_errors(
        ValidationErrorRecord(BASE + i, "cfg", "f", "", i, f"reason {i}", "peer") for i in range(5)
    )
    store.commit()
    assert store.count_validation_errors() == 5
    assert [e.reason for e in store.validation_errors()] == [f"reason {i}" for i in range(5)]
    assert [e.request_index for e in store.validation_errors(limit=2)] == [3, 4]


def test_configs_and_flows(store: Store) -> None:
    """Client keys and flow names are unique; a failed add_flows adds nothing."""
    first = store.create_ingestion_config(asset_name="rig", client_key="k1")
    second = store.create_ingestion_config(asset_name="rig", client_key="")
    third = store.create_ingestion_config(asset_name="rig", client_key="")
    assert first.asset_id == second.asset_id == third.asset_id
    with pytest.raises(DaqError, match="k1"):
        store.create_ingestion_config(asset_name="other", client_key="k1")
    assert [c.pk for c in store.list_ingestion_configs({"client_key": "k1"})] == [first.pk]
    assert [c.pk for c in store.list_ingestion_configs(after=first.pk, limit=1)] == [second.pk]
    store.add_flows(first.pk, [("a", _flow("a", "x"))])
    with pytest.raises(DaqError):
        store.add_flows(first.pk, [("b", _flow("b", "x")), ("a", _flow("a", "x"))])
    assert store.flow_names(first.pk) == {"a"}
    store.add_flows(second.pk, [("a", _flow("a", "x"))])
    record = store.get_flow(first.ingestion_config_id, "a")
    assert record is not None
    assert [c.name for c in record.channels()] == ["x"]
    assert store.get_flow(first.ingestion_config_id, "b") is None
    with pytest.raises(DaqError, match="cannot filter"):
        store.list_ingestion_configs({"colour": "red"})


def test_runs(store: Store) -> None:
    """Runs are created, found by name and stopped with a stop time."""
    run = store.create_run(name="r", tags=["t"], client_key="ck", start_ns=BASE)
    other = store.create_run(name="r")
    with pytest.raises(DaqError, match="ck"):
        store.create_run(name="x", client_key="ck")
    assert [r.run_id for r in store.list_runs({"name": "r"})] == [run.run_id, other.run_id]
    stopped = store.stop_run(run.run_id, stop_ns=BASE + 5)
    assert stopped is not None
    assert stopped.is_stopped
    assert stopped.stop_ns == BASE + 5
    assert stopped.tags == ("t",)
    assert stopped.start_ns == BASE
    assert store.stop_run("missing") is None
    assert store.get_run("missing") is None


def test_validation_errors_are_capped_and_the_overflow_counted(store: Store) -> None:
    """Only the newest max_rows errors are kept; every deleted one is counted, across calls and
    commits, and a reader sees the count."""
    for i in range(25):
        store.insert_validation_errors(
            [ValidationErrorRecord(BASE + i, "cfg", "f", "", i, f"reason {i}", "p")], max_rows=10
        )
    store.insert_validation_errors(
        (ValidationErrorRecord(BASE, "cfg", "f", "", 100 + i, "batch", "p") for i in range(4)),
        max_rows=10,
    )
    store.commit()
    assert store.count_validation_errors() == 10
    assert store.validation_errors_overflow() == 19
    kept = [e.request_index for e in store.validation_errors()]
    assert kept == [*range(19, 25), 100, 101, 102, 103]
    with Store.open(store.path, readonly=True) as reader:
        assert reader.validation_errors_overflow() == 19
    store.insert_validation_errors(
        [ValidationErrorRecord(BASE, "cfg", "f", "", 200, "none kept", "p")], max_rows=0
    )
    assert store.count_validation_errors() == 0
    assert store.validation_errors_overflow() == 30


def test_assets_channels_tags_and_rules(store: Store) -> None:
    """Assets keep tags and metadata; an asset's channels follow its flows (first definition of
    a name wins); tag names and rule client keys are unique; Sift filters select rows."""
    config = store.create_ingestion_config(asset_name="rig", client_key="k")
    store.create_ingestion_config(asset_name="other", client_key="k2")
    store.add_flows(config.pk, [("a", _flow("a", "x", "y"))])
    store.add_flows(config.pk, [("b", _flow("b", "y", "z"))])
    asset = store.get_asset(config.asset_id)
    assert asset is not None
    assert (asset.name, asset.tags, asset.metadata) == ("rig", (), b"")
    updated = store.update_asset(config.asset_id, tags=["t1"], metadata=b"\x52\x00")
    assert updated is not None
    assert (updated.tags, updated.metadata) == (("t1",), b"\x52\x00")
    assert store.update_asset(config.asset_id, tags=["t2"]).metadata == b"\x52\x00"  # type: ignore[union-attr]
    assert store.update_asset("missing", tags=[]) is None
    assert [a.name for a in store.list_assets("name in ['rig', 'nope']")] == ["rig"]
    assert [a.name for a in store.list_assets(newest_first=True)] == ["other", "rig"]
    channels = store.list_channels(f"asset_id == '{config.asset_id}'")
    assert [c.name for c in channels] == ["x", "y", "z"]
    assert channels[1].channel_config().data_type == cdt.CHANNEL_DATA_TYPE_DOUBLE
    assert store.list_channels("name == 'z' && asset_id != ''")[0].asset_id == config.asset_id

    tag = store.create_tag("hot")
    with pytest.raises(DaqError, match="hot"):
        store.create_tag("hot")
    assert [t.tag_id for t in store.list_tags({"name": "hot"})] == [tag.tag_id]

    rule = store.create_rule(name="r1", client_key="rk", definition=b"\x1a\x02r1")
    with pytest.raises(DaqError, match="rk"):
        store.create_rule(name="r2", client_key="rk", definition=b"")
    second = store.create_rule(name="r2", client_key=None, definition=b"")
    assert store.get_rule(client_key="rk") == rule
    assert store.get_rule(rule_id=second.rule_id) == second
    assert store.get_rule() is None
    changed = store.update_rule(rule.rule_id, name="r1b", client_key="rk", definition=b"")
    assert changed is not None
    assert (changed.name, changed.created_ns) == ("r1b", rule.created_ns)
    with pytest.raises(DaqError, match="rk"):
        store.update_rule(second.rule_id, name="r2", client_key="rk", definition=b"")
    assert store.update_rule("missing", name="x", client_key=None, definition=b"") is None
    assert [r.name for r in store.list_rules("client_key == ''")] == ["r2"]
    with pytest.raises(FilterError, match="offset 5"):
        store.list_rules("name = 'x'")


def test_update_run(store: Store) -> None:
    """update_run sets only the given fields; a client key another run has is refused."""
    run = store.create_run(name="r", description="d", tags=["a"], start_ns=BASE)
    store.create_run(name="other", client_key="taken")
    updated = store.update_run(run.run_id, {"tags": ["b"], "stop_ns": BASE + 1, "client_key": "ck"})
    assert updated is not None
    assert (updated.name, updated.description, updated.tags) == ("r", "d", ("b",))
    assert (updated.start_ns, updated.stop_ns, updated.client_key) == (BASE, BASE + 1, "ck")
    assert store.update_run(run.run_id, {"start_ns": None}).start_ns is None  # type: ignore[union-attr]
    with pytest.raises(DaqError, match="taken"):
        store.update_run(run.run_id, {"client_key": "taken"})
    with pytest.raises(DaqError, match="run_id"):
        store.update_run(run.run_id, {"run_id": "x"})
    assert store.update_run("missing", {"name": "x"}) is None
    assert [r.name for r in store.list_runs("client_key == 'ck'")] == ["r"]


def test_a_version_1_file_is_migrated(tmp_path: Path) -> None:
    """A schema-1 file opened for writing gains asset tags/metadata and the channels, tags and
    rules tables (channels filled from its flows), keeping its data."""
    path = tmp_path / "v1.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(_V1_SCHEMA)
    conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    conn.execute("INSERT INTO assets VALUES (1, 'asset-1', 'rig', 5)")
    conn.execute("INSERT INTO ingestion_configs VALUES (1, 'cfg-1', 1, 'k', '', 6)")
    conn.execute("INSERT INTO flows VALUES (1, 1, 'a', ?, 7)", (_flow("a", "x", "y"),))
    conn.commit()
    conn.close()
    with Store.open(path) as store:
        asset = store.get_asset("asset-1")
        assert asset is not None
        assert (asset.name, asset.tags, asset.modified_ns) == ("rig", (), 5)
        assert [c.name for c in store.list_channels()] == ["x", "y"]
        assert store.list_rules() == []
        assert [f.name for f in store.list_flows()] == ["a"]
    with Store.open(path, readonly=True) as reader:
        assert reader.get_asset("asset-1") is not None


_V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS assets (
    id INTEGER PRIMARY KEY,
    asset_id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL UNIQUE,
    created_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS ingestion_configs (
    id INTEGER PRIMARY KEY,
    ingestion_config_id TEXT NOT NULL UNIQUE,
    asset INTEGER NOT NULL REFERENCES assets(id),
    client_key TEXT UNIQUE,
    organization_id TEXT NOT NULL DEFAULT '',
    created_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS flows (
    id INTEGER PRIMARY KEY,
    config INTEGER NOT NULL REFERENCES ingestion_configs(id),
    name TEXT NOT NULL,
    definition BLOB NOT NULL,
    created_ns INTEGER NOT NULL,
    UNIQUE (config, name)
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    tags TEXT NOT NULL DEFAULT '[]',
    metadata BLOB NOT NULL DEFAULT x'',
    client_key TEXT UNIQUE,
    organization_id TEXT NOT NULL DEFAULT '',
    start_ns INTEGER,
    stop_ns INTEGER,
    is_stopped INTEGER NOT NULL DEFAULT 0,
    created_ns INTEGER NOT NULL,
    modified_ns INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_by_name ON runs (name);
CREATE TABLE IF NOT EXISTS samples (
    flow INTEGER NOT NULL,
    run INTEGER NOT NULL,
    timestamp_ns INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (flow, run, timestamp_ns)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS validation_errors (
    id INTEGER PRIMARY KEY,
    time_ns INTEGER NOT NULL,
    ingestion_config_id TEXT NOT NULL,
    flow TEXT NOT NULL,
    run_id TEXT NOT NULL,
    request_index INTEGER NOT NULL,
    reason TEXT NOT NULL,
    peer TEXT NOT NULL DEFAULT ''
);
"""
