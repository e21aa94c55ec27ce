"""``export --format parquet`` streams: peak memory does not grow with the size of the store.

The stores are written through the server's own store writer (real SQLite, the sample encoding
the server stores), ten times apart in size; the export runs as a process of its own so its peak
RSS can be read.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from daq_agent._proto.sift.common.type.v1 import channel_data_type_pb2 as cdt
from daq_agent._proto.sift.ingest.v1 import ingest_pb2
from daq_agent._proto.sift.ingestion_configs.v2 import ingestion_configs_pb2 as ic
from daq_agent.server.store import Store

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BASE_NS = 1_750_000_000_000_000_000
CHANNELS = 8


def build(path: Path, samples: int) -> None:
    """A store of one run with flows ``a`` and ``b`` (8 doubles each), samples 1 µs apart."""
    with Store.open(path, durable=False) as store:
        config = store.create_ingestion_config(asset_name="big", client_key="big")
        definitions = []
        for name in ("a", "b"):
            channels = [
                ic.ChannelConfig(name=f"{name}{i}", data_type=cdt.CHANNEL_DATA_TYPE_DOUBLE)
                for i in range(CHANNELS)
            ]
            definitions.append((name, ic.FlowConfig(name=name, channels=channels)))
        store.add_flows(config.pk, [(n, f.SerializeToString()) for n, f in definitions])
        pks = {flow.name: flow.pk for flow in store.list_flows()}
        run = store.create_run(name="big")
        rows = []
        for i in range(samples):
            request = ingest_pb2.IngestWithConfigDataStreamRequest()
            for k in range(CHANNELS):
                request.channel_values.add(double=i + k / 8)
            rows.append((pks["b" if i % 2 else "a"], run.pk, BASE_NS + i * 1000,
                         request.SerializeToString()))  # fmt: skip
            if len(rows) == 5000:
                store.insert_samples(rows)
                rows = []
        store.insert_samples(rows)
        store.commit()


def export_peak_rss_kib(db: Path, out: Path) -> int:
    """Run ``export --format parquet`` in a new interpreter; its peak RSS in KiB."""
    code = (
        "import resource, sys\n"
        "from daq_agent.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", code, "-q", "export", "--db", str(db), "--format", "parquet",
         "--row-group-size", "1024", "--output", str(out)],
        capture_output=True, text=True, timeout=100, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    peak = [line for line in done.stderr.splitlines() if line.startswith("peak ")]
    return int(peak[-1].split()[1])


def test_parquet_export_memory_does_not_grow_with_the_store(tmp_path: Path) -> None:
    """Ten times the samples: the same peak RSS (within 12 MiB), row groups of 1024 rows."""
    small, large = tmp_path / "small.sqlite", tmp_path / "large.sqlite"
    build(small, 4_000)
    build(large, 40_000)
    small_peak = export_peak_rss_kib(small, tmp_path / "small")
    large_peak = export_peak_rss_kib(large, tmp_path / "large")
    with Store.open(large, readonly=True) as store:
        assert store.count_samples() == 40_000
    print(f"peak RSS: {small_peak} KiB for 4 000 samples, {large_peak} KiB for 40 000")
    # held whole (rows listed, one row group) the large export peaks ~19 MiB higher; streamed,
    # the peak stays where the small store's was (measured: +1.2 MiB)
    assert large_peak - small_peak < 12 * 1024, (small_peak, large_peak)
    file = pq.ParquetFile(tmp_path / "large" / "b.parquet")
    assert file.metadata.num_rows == 20_000
    assert file.metadata.num_row_groups == 20  # 20 000 rows in groups of 1024
    table = file.read_row_group(19, columns=["timestamp", "b0", "b7"])
    last = 39_999
    assert table.column("timestamp").cast("int64").to_pylist()[-1] == BASE_NS + last * 1000
    assert table.column("b7").to_pylist()[-1] == last + 7 / 8
