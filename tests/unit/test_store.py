"""The local server's SQLite store, on real files in tmp_path."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from daq_agent._proto.sift.common.type.v1 import channel_data_type_pb2 as cdt
from daq_agent._proto.sift.ingest.v1 import ingest_pb2
from daq_agent._proto.sift.ingestion_configs.v2 import ingestion_configs_pb2 as ic
from daq_agent.core.errors import DaqError
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
