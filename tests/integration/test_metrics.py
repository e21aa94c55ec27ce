"""The metrics endpoint against a real agent: virtual CAN bus → agent → local server, scraped
over HTTP and parsed with prometheus_client's own parser."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import can
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daq_agent.agent import Agent
from daq_agent.config import AgentConfig, load_config
from daq_agent.core.errors import DaqError
from daq_agent.decode.dbc import load_database
from daq_agent.metrics import MetricsServer, write_summary_json
from daq_agent.pipeline.status import AgentStatus
from daq_agent.readers.base import ReaderState
from daq_agent.sim.can import CanSimulator

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BENCH_DBC = REPO / "dbc" / "bench.dbc"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait until ``predicate()`` holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def make_config(tmp_path: Path, channel: str) -> AgentConfig:
    path = tmp_path / "agent.yaml"
    path.write_text(
        f"state_dir: {tmp_path / 'state'}\n"
        "asset: bench-test\n"
        "buses:\n"
        "  - name: can0\n"
        "    interface: virtual\n"
        f"    channel: {channel}\n"
        f"    databases: [{BENCH_DBC}]\n"
    )
    return load_config(path, env={})


def get(url: str) -> tuple[int, str]:
    """GET ``url``: the status code and the body (also for 4xx/5xx)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def scrape(server: MetricsServer) -> Samples:
    """Every sample of ``/metrics``, keyed by (sample name, labels)."""
    code, text = get(f"{server.url}/metrics")
    assert code == 200, text
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def src(**labels: str) -> frozenset[tuple[str, str]]:
    return frozenset({"source": "can0", "kind": "can", **labels}.items())


NONE: frozenset[tuple[str, str]] = frozenset()


@pytest.fixture
def agent(tmp_path: Path, channel: str) -> Iterator[Agent]:
    agent = Agent(make_config(tmp_path, channel))
    agent.start()
    try:
        for reader in agent.readers:
            assert reader.wait_state(ReaderState.RUNNING, timeout=10.0), reader.counters.last_error
        yield agent
    finally:
        agent.stop()


@pytest.fixture
def metrics(agent: Agent) -> Iterator[MetricsServer]:
    server = MetricsServer(
        agent.status,
        ready=lambda: agent.readiness() or True,
        alive=lambda: agent.health() or True,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def bench_frames(count: int) -> list[can.Message]:
    """``count`` frames of the bench database, 10 µs apart, stamped now (live data: the flusher
    measures their latency)."""
    simulator = CanSimulator([load_database(BENCH_DBC)])
    frames = []
    base = time.time()
    for i, (_plan, msg) in enumerate(simulator.frames(count=count)):
        msg.timestamp = base + i * 1e-5
        frames.append(msg)
    return frames


def test_metrics_equal_the_status_and_health_follows_the_agent(
    agent: Agent, metrics: MetricsServer, sender: can.BusABC, tmp_path: Path
) -> None:
    """/metrics shows the agent's own counters at scrape time; /healthz and /readyz are 200 while
    it runs and /healthz turns 503 (naming the sender) once the flusher stopped."""
    before = scrape(metrics)
    assert before[("daq_source_frames_received_total", src())] == 0
    assert before[("daq_source_state", src(daq_source_state="running"))] == 1
    assert before[("daq_source_state", src(daq_source_state="backoff"))] == 0
    assert get(f"{metrics.url}/healthz") == (200, "ok\n")
    assert get(f"{metrics.url}/readyz") == (200, "ok\n")

    frames = bench_frames(1500)
    unknown = [
        can.Message(arbitration_id=0x7AB, data=b"\x00" * 8, timestamp=1.0, is_extended_id=False)
        for _ in range(5)
    ]
    for msg in [*frames, *unknown]:
        sender.send(msg)
    wait_for(lambda: agent.status().flusher.delivered == 1500, 30, "every sample delivered")
    wait_for(lambda: agent.status().flusher.pending == 0, 10, "nothing pending")

    after = scrape(metrics)
    status = agent.status()
    source = status.sources[0]
    assert after[("daq_source_frames_received_total", src())] == source.received == 1505
    assert after[("daq_source_frames_decoded_total", src())] == source.decoded == 1500
    assert after[("daq_source_frames_unknown_total", src())] == source.unknown == 5
    assert after[("daq_source_frame_errors_total", src())] == source.errors == 0
    assert after[("daq_source_live", src())] == 1
    assert after[("daq_ring_put_total", NONE)] == status.ring.put_count == 1500
    assert after[("daq_ring_got_total", NONE)] == status.ring.got == 1500
    assert after[("daq_ring_capacity", NONE)] == status.ring.capacity
    assert after[("daq_flusher_samples_taken_total", NONE)] == status.flusher.taken == 1500
    assert after[("daq_flusher_samples_delivered_total", NONE)] == status.flusher.delivered
    assert after[("daq_flusher_samples_pending", NONE)] == 0
    assert after[("daq_flusher_checkpoints_total", NONE)] == status.flusher.checkpoints > 0
    assert after[("daq_agent_balanced", NONE)] == 1
    assert status.spool is not None  # the default config spools to disk
    assert after[("daq_spool_segments", NONE)] == status.spool.segments
    assert after[("daq_spool_pending_records", NONE)] == status.spool.pending_records == 0
    assert status.flusher.latency_p99_ms is not None
    p99 = after[("daq_delivery_latency_p99_seconds", NONE)]
    assert p99 == pytest.approx(status.flusher.latency_p99_ms / 1000)
    # per flow: what was sent of each message (flows are named "<bus>.<message>")
    names = {(m.frame_id, m.is_extended_frame): m.name for m in load_database(BENCH_DBC).messages}
    sent = Counter(f"can0.{names[m.arbitration_id, m.is_extended_id]}" for m in frames)
    per_flow = {
        dict(labels)["flow"]: value
        for (name, labels), value in after.items()
        if name == "daq_flow_samples_total"
    }
    assert per_flow == dict(sent) == dict(status.flusher.per_flow)
    assert len(per_flow) > 1
    # the latency histogram: cumulative buckets ending in +Inf = count, two per checkpointed batch
    buckets = sorted(
        (float(dict(labels)["le"]), value)
        for (name, labels), value in after.items()
        if name == "daq_delivery_latency_seconds_bucket"
    )
    counts = [value for _le, value in buckets]
    assert buckets[-1][0] == float("inf")
    assert counts == sorted(counts)  # cumulative
    assert counts[-1] == after[("daq_delivery_latency_seconds_count", NONE)] > 0
    assert counts[-1] == sum(status.flusher.latency_buckets)
    assert counts[-1] <= 2 * status.flusher.batches
    assert 0 < after[("daq_delivery_latency_seconds_sum", NONE)] < 60 * counts[-1]
    assert after[("daq_stream_windows_committed_total", NONE)] == status.stream["windows"] > 0
    assert ("daq_stream_windows_failed_total", NONE) in after
    info = [k for k in after if k[0] == "daq_agent_info"]
    assert len(info) == 1
    assert dict(info[0][1])["target"] == status.target

    assert get(f"{metrics.url}/healthz") == (200, "ok\n")
    assert get(f"{metrics.url}/readyz") == (200, "ok\n")

    final = agent.stop()
    code, reason = get(f"{metrics.url}/healthz")
    assert code == 503
    assert "sender" in reason
    assert "the sender (flusher) is not running" in reason
    assert get(f"{metrics.url}/readyz")[0] == 503
    last = scrape(metrics)  # still served: the final numbers
    assert last[("daq_flusher_samples_delivered_total", NONE)] == final.flusher.delivered == 1500

    out = tmp_path / "summary.json"
    write_summary_json(out, final)
    assert json.loads(out.read_text()) == json.loads(json.dumps(final.as_dict()))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".summary")] == []


def test_bad_requests_and_failing_checks_do_not_break_the_server(
    agent: Agent, tmp_path: Path
) -> None:
    """Unknown paths get 404, garbage gets 400, a check or a snapshot that raises gets a 5xx;
    the server keeps answering afterwards."""
    calls = {"n": 0}

    def flaky_status() -> AgentStatus:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("snapshot broke")
        return agent.status()

    def broken() -> bool | str:
        raise ValueError("check broke")

    with MetricsServer(flaky_status, ready=broken, alive=lambda: False) as server:
        assert get(f"{server.url}/metrics")[0] == 500
        assert get(f"{server.url}/nope")[0] == 404
        assert get(f"{server.url}/healthz") == (503, "not ok\n")
        assert get(f"{server.url}/readyz") == (503, "check failed: ValueError: check broke\n")
        for request, status in (
            (b"\x16\x03\x01garbage\r\n\r\n", b"400"),  # a TLS hello: no HTTP/0.9 status line
            (b"BREW /metrics HTTP/1.1\r\n\r\n", b"HTTP/1.0 501"),
            (b"GET /metrics HTTP/9.9\r\n\r\n", b"505"),
        ):
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
                conn.sendall(request)
                reply = conn.recv(4096)
            assert reply.startswith(status), reply
            assert b"Traceback" not in reply
        assert scrape(server)[("daq_source_frames_received_total", src())] == 0


def test_a_taken_port_and_an_unwritable_summary_are_clear_errors(
    agent: Agent, tmp_path: Path
) -> None:
    with MetricsServer(agent.status, ready=lambda: True, alive=lambda: True) as first:
        clash = MetricsServer(agent.status, ready=lambda: True, alive=lambda: True, port=first.port)
        with pytest.raises(DaqError, match=f"metrics: cannot listen on 127.0.0.1:{first.port}"):
            clash.start()
    missing = tmp_path / "no-such-dir" / "summary.json"
    with pytest.raises(DaqError, match=r"no-such-dir/summary\.json: cannot write the summary"):
        write_summary_json(missing, agent.status())


def test_daq_agent_run_serves_metrics_and_writes_the_summary(tmp_path: Path) -> None:
    """``daq-agent run --metrics-port P --summary-json F``: /metrics and /readyz answer during
    the run; the summary file holds the final counters."""
    import json
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dbc = Path(__file__).resolve().parents[2] / "dbc" / "bench.dbc"
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"asset: m\nstate_dir: {tmp_path / 'state'}\nbuses:\n"
        f"  - {{name: can0, interface: virtual, channel: m-{port}, databases: [{dbc}]}}\n"
    )
    summary = tmp_path / "summary.json"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daq_agent.cli",
            "-q",
            "run",
            "--no-live",
            str(config),
            "--metrics-port",
            str(port),
            "--summary-json",
            str(summary),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "the metrics endpoint never answered"
                assert process.poll() is None, process.communicate()
                time.sleep(0.1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert 'daq_source_frames_received_total{kind="can",source="can0"}' in text
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    written = json.loads(summary.read_text())
    assert written["balanced"] is True
    assert written["sources"][0]["name"] == "can0"
