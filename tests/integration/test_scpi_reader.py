"""ScpiReader against a SCPI responder on a pty, and polled devices in the agent end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
from poll_support import Collected, wait_until

from daq_agent.agent import Agent
from daq_agent.config import LocalTarget, load_config
from daq_agent.core.errors import ConfigError
from daq_agent.readers.base import ReaderState
from daq_agent.readers.scpi import ScpiReader, load_query_file, loads_query_file
from daq_agent.server.store import Store
from daq_agent.sim.modbus import ModbusSimulator
from daq_agent.sim.scpi import ScpiSimulator

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PSU = REPO / "configs" / "devices" / "psu_scpi.yaml"
PM_MAP = REPO / "configs" / "devices" / "pm_meter.yaml"
MEAS = "MEAS:VOLT?;:MEAS:CURR?;:OUTP?"


def _balanced(reader: ScpiReader) -> bool:
    c = reader.counters
    return c.get("received") == c.get("decoded") + c.get("timeouts") + c.get("decode_errors")


def test_replies_decode_through_the_frame_language() -> None:
    """Each query's reply becomes a sample of its own flow, typed by its frame definition."""
    queries = load_query_file(PSU)
    out = Collected()
    with ScpiSimulator(queries) as sim:
        sim.set_values(MEAS, {"voltage": 12.0125, "current": 1.5, "output_on": 1})
        sim.set_values("*IDN?", {"manufacturer": "ACME", "model": "PSU-3000"})
        with ScpiReader("psu", sim.path, queries, out, rate_hz=20, timeout_s=1.0) as reader:
            wait_until(lambda: len(out.of("psu.output")) >= 3 and out.of("psu.identity"))
    assert [f.name for f in reader.flows] == ["psu.output", "psu.identity"]
    assert out.of("psu.output")[-1].values == (12.0125, 1.5, 1)
    assert out.of("psu.identity")[0].values[:2] == ("ACME", "PSU-3000")
    assert sim.queries["*IDN?"] >= 1
    assert reader.counters.get("requests") == sum(sim.queries.values())
    assert _balanced(reader)


def test_silence_is_a_timeout_and_a_late_answer_is_never_a_value() -> None:
    """No answer: timeouts; an answer after the timeout: discarded as a late reply."""
    queries = load_query_file(PSU)
    out = Collected()
    with ScpiSimulator(queries) as sim:
        sim.set_silent(MEAS)
        with ScpiReader("psu", sim.path, queries, out, rate_hz=10, timeout_s=0.05) as reader:
            wait_until(lambda: reader.counters.get("timeouts") >= 3)
            assert reader.counters.get("late_replies") == 0
            sim.set_values(MEAS, {"voltage": 99.0})  # what a late answer would carry
            sim.set_delay(MEAS, 0.08)
            sim.set_silent(MEAS, False)
            wait_until(lambda: reader.counters.get("late_replies") >= 2, what="late replies")
            assert all(s.values[0] != 99.0 for s in out.of("psu.output"))
            sim.set_delay(MEAS, 0)
            wait_until(lambda: any(s.values[0] == 99.0 for s in out.of("psu.output")))
    assert _balanced(reader)
    assert reader.counters.get("failures") == 0


def test_an_error_reply_is_a_decode_error() -> None:
    """A query the instrument does not know gets its error text, which does not decode."""
    asked = loads_query_file(
        'version: 1\nname: psu\nformat: csv\nframing: {kind: line, terminator: "\\n"}\n'
        "queries:\n"
        f"  - query: '{MEAS}'\n"
        "    reply: {name: output, fields: [{name: v, type: float}, {name: i, type: float}]}\n"
        "  - query: 'SYST:BOGUS?'\n"
        "    reply: {name: bogus, fields: [{name: a, type: float}, {name: b, type: float}]}\n",
        source="bogus.yaml",
    )
    out = Collected()
    with (
        ScpiSimulator(PSU) as sim,
        ScpiReader("psu", sim.path, asked, out, rate_hz=20, timeout_s=0.5) as reader,
    ):
        wait_until(lambda: reader.counters.get("decode_errors") >= 2)
        wait_until(lambda: len(out.of("psu.output")) >= 2)
    assert out.of("psu.bogus") == []
    assert sim.queries["SYST:BOGUS?"] >= 2
    assert _balanced(reader)


def test_invalid_query_files_name_the_file_line_and_key() -> None:
    """A mistake inside a reply definition is reported at its place in the query file."""
    text = PSU.read_text().replace("type: float, unit: V", "type: flaot, unit: V")
    with pytest.raises(ConfigError) as caught:
        loads_query_file(text, source="psu.yaml")
    error = caught.value
    assert error.source == "psu.yaml"
    assert error.key is not None
    assert error.key.startswith("queries[0].reply.fields[0]")
    assert error.line == 17


def test_polled_devices_in_the_agent_reach_the_local_store(tmp_path: Path) -> None:
    """devices: a Modbus meter and a SCPI supply, run by the agent, their values stored."""
    queries = load_query_file(PSU)
    with ModbusSimulator(PM_MAP) as meter, ScpiSimulator(queries) as psu:
        meter.set_value("voltage_an", 231.25)
        meter.set_value("mode", 1)
        psu.set_values(MEAS, {"voltage": 12.5, "current": 0.75, "output_on": 1})
        config_path = tmp_path / "agent.yaml"
        config_path.write_text(
            f"asset: poll-bench\nstate_dir: {tmp_path / 'state'}\n"
            "devices:\n"
            f"  - {{name: pm1, kind: modbus, url: '{meter.url}', unit: 1, rate_hz: 20,"
            f" timeout_s: 0.5, map: {PM_MAP}}}\n"
            f"  - {{name: psu, kind: scpi, url: '{psu.path}', baudrate: 115200, rate_hz: 20,"
            f" map: {PSU}}}\n"
        )
        config = load_config(config_path, env={})
        agent = Agent(config)
        assert {f.name for f in agent.plan.flows} == {
            "pm1.power",
            "pm1.state",
            "psu.output",
            "psu.identity",
        }
        agent.start()
        try:
            for reader in agent.readers:
                assert reader.wait_state(ReaderState.RUNNING, timeout=10)
            wait_until(lambda: agent.status().sources[0].decoded >= 10, timeout=20)
            wait_until(lambda: agent.status().sources[1].decoded >= 10, timeout=20)
        finally:
            final = agent.stop()
    assert final.balanced
    for source in final.sources:
        assert source.balanced
        assert source.errors == 0
    assert final.flusher.delivered == sum(s.decoded for s in final.sources)
    assert isinstance(config.target, LocalTarget)
    with Store.open(config.target.db_path, readonly=True) as store:
        stored = list(store.iter_samples(run_id=agent.run_id))
    power = [s for s in stored if s.flow == "pm1.power"]
    state = [s for s in stored if s.flow == "pm1.state"]
    output = [s for s in stored if s.flow == "psu.output"]
    assert power
    assert state
    assert output
    assert {s.values["voltage_an"] for s in power} == {231.25}
    assert {s.values["mode"] for s in state} == {1}
    assert {(s.values["voltage"], s.values["current"]) for s in output} == {(12.5, 0.75)}
