"""The CAN simulator: realistic values, schedule, determinism, and `simulate can` as a process."""

from __future__ import annotations

import itertools
import json
import random
import signal
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import can
import cantools
import pytest
from can_support import CantoolsDecoder, wait_for

from daq_agent.cli import main
from daq_agent.core.errors import ConfigError
from daq_agent.core.sample import Sample
from daq_agent.pipeline.ring_buffer import RingBuffer
from daq_agent.readers import CanReader, ReaderState
from daq_agent.sim.can import CanSimulator

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

DBC = """VERSION ""
NS_ :
BS_:
BU_: ECU BMS

BO_ 256 Engine: 8 ECU
 SG_ Speed : 0|16@1+ (0.1,0) [0|250] "km/h" BMS
 SG_ Temp : 16|8@1- (1,-40) [-40|87] "degC" BMS
 SG_ Mode : 24|2@1+ (1,0) [0|3] "" BMS
 SG_ Enabled : 26|1@1+ (1,0) [0|1] "" BMS

BO_ 2566848513 ExtStatus: 8 BMS
 SG_ Counter : 0|32@1+ (1,0) [0|0] "" ECU
 SG_ Voltage : 32|16@1+ (0.01,0) [0|400] "V" ECU

BO_ 512 Mux: 8 BMS
 SG_ Selector M : 0|8@1+ (1,0) [0|3] "" ECU
 SG_ CellA m0 : 8|16@1+ (0.001,0) [0|5] "V" ECU
 SG_ CellB m1 : 8|16@1+ (0.001,0) [0|5] "V" ECU
 SG_ CellC m3 : 8|16@1+ (0.001,0) [0|5] "V" ECU

BO_ 768 FdData: 64 BMS
 SG_ Big : 0|32@1+ (1,0) [0|100000] "" ECU
 SG_ Last : 500|8@1+ (1,0) [10|20] "" ECU

BA_DEF_ BO_ "GenMsgCycleTime" INT 0 65535;
BA_DEF_ BO_ "VFrameFormat" ENUM "StandardCAN","ExtendedCAN","reserved","reserved","reserved","reserved","reserved","reserved","reserved","reserved","reserved","reserved","reserved","reserved","StandardCAN_FD","ExtendedCAN_FD";
BA_DEF_DEF_ "GenMsgCycleTime" 0;
BA_DEF_DEF_ "VFrameFormat" "StandardCAN";
BA_ "GenMsgCycleTime" BO_ 256 10;
BA_ "GenMsgCycleTime" BO_ 512 50;
BA_ "VFrameFormat" BO_ 768 14;
VAL_ 256 Mode 0 "Off" 1 "Idle" 2 "Run" 3 "Fault" ;
"""  # noqa: E501


@pytest.fixture
def db() -> Any:
    """The test database."""
    return cantools.database.load_string(DBC, database_format="dbc")


@pytest.fixture
def dbc_file(tmp_path: Path) -> Path:
    """The test database as a file."""
    path = tmp_path / "sim.dbc"
    path.write_text(DBC)
    return path


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves a reader thread running."""
    yield
    leaked = [t.name for t in threading.enumerate() if t.name.startswith("daq-reader[")]
    assert not leaked, f"leaked reader threads: {leaked}"


def check_frame(db: Any, frame: can.Message) -> dict[str, Any]:
    """Decode ``frame`` with cantools and check every value is within its signal's range."""
    message = next(
        m
        for m in db.messages
        if m.frame_id == frame.arbitration_id and m.is_extended_frame == frame.is_extended_id
    )
    assert frame.is_fd == message.is_fd
    values: dict[str, Any] = message.decode(bytes(frame.data), decode_choices=False)
    for signal_def in message.signals:
        if signal_def.name not in values:
            continue
        value = values[signal_def.name]
        if signal_def.choices:
            assert value in signal_def.choices
        if signal_def.minimum is not None and signal_def.maximum is not None:
            assert signal_def.minimum - 1e-9 <= value <= signal_def.maximum + 1e-9, signal_def.name
    return values


def test_frames_decode_within_ranges_and_cover_muxes_and_enums(db: Any) -> None:
    """Generated frames decode with cantools, stay within [min, max], cycle enums and muxes."""
    simulator = CanSimulator([db], seed=1)
    seen: dict[str, list[dict[str, Any]]] = {}
    for plan, frame in simulator.frames(duration=2.0):
        seen.setdefault(plan.name, []).append(check_frame(db, frame))
    assert {v["Mode"] for v in seen["Engine"]} == {0, 1, 2, 3}
    assert {v["Enabled"] for v in seen["Engine"]} == {0, 1}
    assert {v["Selector"] for v in seen["Mux"]} == {0, 1, 3}
    assert all(("CellA" in v) == (v["Selector"] == 0) for v in seen["Mux"])
    speeds = [v["Speed"] for v in seen["Engine"]]
    assert len(set(speeds)) > 10, "a waveform should move"
    assert {v["Last"] for v in seen["FdData"]} <= set(range(10, 21))
    counters = [v["Counter"] for v in seen["ExtStatus"]]
    assert all(0 <= c < 2**32 for c in counters)


def test_cycle_times_and_rate_schedule(db: Any) -> None:
    """Periods come from GenMsgCycleTime (100 ms default), or a total rate spread evenly."""
    per_message = Counter(p.name for p, _f in CanSimulator([db]).frames(duration=1.0))
    assert per_message == {"Engine": 100, "Mux": 20, "ExtStatus": 10, "FdData": 10}
    timed = list(CanSimulator([db], rate=1000).frames(duration=1.0))
    assert len(timed) == 1000
    assert Counter(p.name for p, _f in timed) == {
        "Engine": 250,
        "Mux": 250,
        "ExtStatus": 250,
        "FdData": 250,
    }
    stamps = [f.timestamp for _p, f in timed]
    assert stamps == sorted(stamps)
    assert max(b - a for a, b in itertools.pairwise(stamps)) < 0.0011


def test_seed_makes_traffic_reproducible(db: Any) -> None:
    """Two simulators with the same seed produce the same frames; another seed differs."""

    def payloads(seed: int) -> list[bytes]:
        return [bytes(f.data) for _p, f in CanSimulator([db], seed=seed).frames(count=500)]

    assert payloads(3) == payloads(3)
    assert payloads(3) != payloads(4)


def test_in_process_virtual_bus_to_can_reader(db: Any) -> None:
    """CanSimulator on a virtual bus → CanReader: every frame sent is received and decoded."""
    channel = f"sim-{uuid.uuid4().hex[:8]}"
    ring: RingBuffer[Sample] = RingBuffer(10_000, "block")
    reader = CanReader(
        "sim", {"interface": "virtual", "channel": channel}, CantoolsDecoder(db), ring.put
    )
    with reader, can.Bus(channel, interface="virtual") as bus:
        assert reader.wait_state(ReaderState.RUNNING, timeout=5)
        summary = CanSimulator([db], bus, rate=5000, seed=2).run(count=1000)
        assert summary.frames == 1000
        assert summary.errors == 0
        assert wait_for(lambda: reader.counters.get("received") == 1000)
    samples = ring.get_batch(10_000, timeout=0)
    assert len(samples) == 1000
    assert Counter(s.flow for s in samples) == summary.per_message
    assert reader.counters.get("decode_errors") == reader.counters.get("unknown") == 0


def test_bench_database_simulates_cleanly() -> None:
    """Every frame generated from the repository's bench DBC decodes within its ranges."""
    path = REPO / "dbc" / "bench.dbc"
    if not path.is_file():
        pytest.skip("dbc/bench.dbc not in the tree yet")
    bench: Any = cantools.database.load_file(str(path), strict=False)
    simulator = CanSimulator([bench], seed=5)
    names = set()
    for plan, frame in simulator.frames(duration=1.0):
        check_frame(bench, frame)
        names.add(plan.name)
    assert names == {m.name for m in bench.messages}


def test_no_messages_is_a_config_error(db: Any) -> None:
    """Selecting no message (or an empty database) is a ConfigError, not a silent no-op."""
    with pytest.raises(ConfigError, match="no message"):
        CanSimulator([db], messages=["NoSuchMessage"])


def udp_bus_kwargs(port: int) -> dict[str, Any]:
    """udp_multicast options on a group and port no other test (or demo) uses."""
    return {"interface": "udp_multicast", "channel": "239.74.163.77", "port": port}


def simulate_cmd(dbc_file: Path, port: int, *extra: str) -> list[str]:
    """The `daq-agent simulate can` command line on udp_multicast."""
    return [
        sys.executable,
        "-m",
        "daq_agent.cli",
        "-q",
        "simulate",
        "can",
        "--dbc",
        str(dbc_file),
        "--interface",
        "udp_multicast",
        "--channel",
        "239.74.163.77",
        "--bus-option",
        f"port={port}",
        "--json",
        *extra,
    ]


def test_simulate_process_over_udp_multicast(db: Any, dbc_file: Path) -> None:
    """`simulate can` in its own process sends N frames that a CanReader here receives."""
    port = random.Random().randint(30000, 60000)
    ring: RingBuffer[Sample] = RingBuffer(10_000, "block")
    reader = CanReader("udp", udp_bus_kwargs(port), CantoolsDecoder(db), ring.put)
    with reader:
        assert reader.wait_state(ReaderState.RUNNING, timeout=10)
        proc = subprocess.run(
            simulate_cmd(dbc_file, port, "--rate", "1000", "--count", "400"),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout)
        assert summary["frames"] == 400
        assert wait_for(lambda: reader.counters.get("received") >= 400)
    counters = reader.counters.snapshot()
    assert counters["received"] == 400
    assert counters["decoded"] == 400
    samples = ring.get_batch(10_000, timeout=0)
    assert Counter(s.flow for s in samples) == summary["per_message"]


def test_simulate_process_stops_cleanly_on_sigterm(dbc_file: Path, db: Any) -> None:
    """SIGTERM stops an endless `simulate can`: exit 0 and a summary of what it sent."""
    port = random.Random().randint(30000, 60000)
    ring: RingBuffer[Sample] = RingBuffer(100_000)
    reader = CanReader("udp", udp_bus_kwargs(port), CantoolsDecoder(db), ring.put)
    with reader:
        assert reader.wait_state(ReaderState.RUNNING, timeout=10)
        with subprocess.Popen(
            simulate_cmd(dbc_file, port, "--cycle-times"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as proc:
            try:
                assert wait_for(lambda: reader.counters.get("received") >= 50, timeout=30)
                proc.send_signal(signal.SIGTERM)
                out, err = proc.communicate(timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
        assert proc.returncode == 0, err
        summary = json.loads(out)
        assert wait_for(lambda: reader.counters.get("received") >= summary["frames"], timeout=5)
    assert summary["frames"] >= 50
    assert reader.counters.get("received") == summary["frames"]


def test_simulate_serial_without_module_says_unavailable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """When daq_agent.sim.serial cannot be imported, `simulate serial` says so and exits 3."""
    monkeypatch.setitem(sys.modules, "daq_agent.sim.serial", None)  # makes the import fail
    assert main(["simulate", "serial", "--defs", "x"]) == 3
    assert "serial simulation unavailable" in capsys.readouterr().err
