"""``/status.json`` of a real agent (virtual CAN bus → agent → local server), and the monitor's
sources and screen (Textual's pilot) on it and on a bus read directly."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import can
import pytest
from monitor_support import PACK, TEMPS, wait_until, write_dbc

from daq_agent.agent import Agent
from daq_agent.config import load_config
from daq_agent.core.errors import DaqError
from daq_agent.decode.can_decoder import CanDecoder
from daq_agent.decode.dbc import load_database
from daq_agent.metrics import MetricsServer
from daq_agent.monitor.app import MonitorApp
from daq_agent.monitor.sources import AgentSource, DirectSource, status_url
from daq_agent.readers.base import ReaderState
from daq_agent.readers.can import CanReader
from daq_agent.status_json import status_route

pytestmark = pytest.mark.integration


@pytest.fixture
def agent(tmp_path: Path, channel: str) -> Iterator[Agent]:
    dbc = write_dbc(tmp_path)
    path = tmp_path / "agent.yaml"
    path.write_text(
        f"state_dir: {tmp_path / 'state'}\nasset: monitor-test\nbuses:\n"
        f"  - name: can0\n    interface: virtual\n    channel: {channel}\n"
        f"    databases: [{dbc}]\n"
    )
    agent = Agent(load_config(path, env={}))
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
        json_routes=status_route(agent.status, agent.latest),
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"] == "application/json"
        document: dict = json.loads(response.read())
        return document


def test_status_json_carries_the_status_and_the_latest_values(
    agent: Agent, metrics: MetricsServer, sender: can.BusABC
) -> None:
    """/status.json holds AgentStatus.as_dict() and, once read, the latest value of every channel
    the flusher took, named by its flow, with unit, enum label (a signed table's -1 as -1) and
    the flow's rate; the values change when the frames do."""
    url = f"{metrics.url}/status.json"
    first = get_json(url)  # starts the counting
    assert first["version"] == 1
    assert first["status"]["sources"][0]["name"] == "can0"
    for _ in range(20):
        sender.send(PACK)
        sender.send(TEMPS)
    wait_until(lambda: agent.status().flusher.taken >= 40, 15, "the flusher to take 40 samples")
    document = get_json(url)
    channels = {(c["flow"], c["name"]): c for c in document["channels"]}
    assert set(channels) == {
        ("can0.Pack", "PackVoltage"),
        ("can0.Pack", "ContactorState"),
        ("can0.Pack", "Gear"),
        ("can0.Temps", "CoolantTemp"),
    }
    voltage = channels["can0.Pack", "PackVoltage"]
    assert (voltage["value"], voltage["unit"], voltage["label"]) == (35.17, "V", "")
    gear = channels["can0.Pack", "Gear"]
    assert (gear["value"], gear["label"]) == (-1, "Reverse")
    contactor = channels["can0.Pack", "ContactorState"]
    assert (contactor["value"], contactor["label"]) == (2, "Closed")
    temp = channels["can0.Temps", "CoolantTemp"]
    assert (temp["value"], temp["unit"], temp["count"]) == (87, "degC", 20)
    assert temp["rate"] > 0
    assert abs(temp["timestamp_ns"] - time.time_ns()) < 60 * 10**9
    status = document["status"]
    assert status["sources"][0]["received"] == 40
    assert status["ring"]["put"] == 40
    assert status["flusher"]["taken"] == 40
    assert "spool" in status
    sender.send(
        can.Message(arbitration_id=0x200, data=bytes([40 - 5] + [0] * 7), is_extended_id=False)
    )
    wait_until(
        lambda: any(c["value"] == -5 for c in get_json(url)["channels"]),
        15,
        "the new CoolantTemp -5 in /status.json",
    )


def test_agent_source_polls_the_agent_and_says_why_when_it_cannot(
    agent: Agent, metrics: MetricsServer, sender: can.BusABC
) -> None:
    """AgentSource keeps the last document of its poll thread; an address with no agent, or one
    without /status.json, is an error it reports, never raises."""
    sender.send(PACK)
    wait_until(lambda: agent.status().flusher.taken >= 1, 15, "the flusher to take the frame")
    with AgentSource(metrics.url, interval_s=0.05) as source:
        wait_until(
            lambda: any(
                c["name"] == "Gear" for c in (source.document()[0] or {}).get("channels", [])
            ),
            15,
            "the Gear reading through AgentSource",
        )
        assert source.document()[1] == ""
    plain = MetricsServer(agent.status, ready=lambda: True, alive=lambda: True)
    plain.start()
    try:
        missing = AgentSource(plain.url)
        missing.poll()
        assert missing.document() == (
            None,
            f"{plain.url}/status.json: HTTP 404 (an agent without /status.json?)",
        )
        port = plain.port
    finally:
        plain.stop()
    gone = AgentSource(f"127.0.0.1:{port}", timeout_s=2.0)
    gone.poll()
    document, error = gone.document()
    assert document is None
    assert error.startswith(f"http://127.0.0.1:{port}/status.json: cannot reach the agent")
    with pytest.raises(DaqError, match="expected http"):
        status_url("ftp://x")
    assert status_url("http://h:1/") == "http://h:1/status.json"


def test_pilot_filter_sort_pause_and_quit_on_a_bus_read_directly(
    tmp_path: Path, channel: str, sender: can.BusABC
) -> None:
    """The screen over a DirectSource on a virtual bus: rows for every signal, the filter typed
    after / keeps only matching rows, s cycles the order, p pauses, q ends with 0."""
    import asyncio

    from textual.widgets import DataTable, Input

    decoder = CanDecoder("can0", [load_database(write_dbc(tmp_path))])
    bus = {"interface": "virtual", "channel": channel}
    source = DirectSource("bus", decoder.flows, [lambda tap: CanReader("can0", bus, decoder, tap)])

    async def drive() -> int | None:
        app = MonitorApp(source, refresh_s=0.1)
        async with app.run_test(size=(150, 40)) as pilot:
            table = app.query_one("#signals", DataTable)
            for _ in range(100):
                if table.row_count == 4:
                    break
                await pilot.pause(0.1)
            assert table.row_count == 4
            names = [table.get_row_at(i)[1] for i in range(4)]
            assert names == ["ContactorState", "Gear", "PackVoltage", "CoolantTemp"]
            assert table.get_row_at(1)[2:5] == ["-1", "", "Reverse"]
            await pilot.press("slash")
            await pilot.pause()
            assert isinstance(app.focused, Input)
            await pilot.press(*"gear", "enter")
            await pilot.pause(0.1)
            assert [table.get_row_at(i)[1] for i in range(table.row_count)] == ["Gear"]
            await pilot.press("s")
            assert app.model.sort.value == "rate"
            await pilot.press("p")
            assert app.model.paused
            updates = app.model.updates
            await pilot.pause(0.3)
            assert app.model.updates == updates
            await pilot.press("q")
        return app.return_value

    with source:
        assert source.readers[0].wait_state(ReaderState.RUNNING, timeout=10.0)

        def four_channels() -> bool:
            sender.send(PACK)
            sender.send(TEMPS)
            document, _ = source.document()
            return document is not None and len(document["channels"]) == 4

        wait_until(four_channels, 15, "the four channels in the tap")
        assert asyncio.run(drive()) == 0


def test_a_bus_that_cannot_open_shows_as_failed_with_its_reason(tmp_path: Path) -> None:
    """Read directly, a bus python-can cannot open is a source row 'failed' with the error;
    the monitor itself keeps running."""
    from daq_agent.monitor.model import MonitorModel

    decoder = CanDecoder("can0", [load_database(write_dbc(tmp_path))])
    bus = {"interface": "no-such-interface", "channel": "x"}
    source = DirectSource("bus", decoder.flows, [lambda tap: CanReader("can0", bus, decoder, tap)])
    model = MonitorModel()
    with source:

        def failed() -> bool:
            document, _ = source.document()
            model.update(document)
            return any(row.state == "failed" for row in model.health_rows())

        wait_until(failed, 15, "the source to fail")
    (row,) = [r for r in model.health_rows() if r.part == "can0 (can)"]
    assert "last error:" in row.detail
    assert "no-such-interface" in row.detail
    assert model.signal_rows() == []
