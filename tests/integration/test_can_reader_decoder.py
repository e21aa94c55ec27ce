"""CanReader with the real CanDecoder on simulated bench traffic: values equal cantools'."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import can
import pytest

from daq_agent.core.sample import Sample
from daq_agent.decode.can_decoder import CanDecoder
from daq_agent.decode.dbc import load_database
from daq_agent.pipeline.ring_buffer import RingBuffer
from daq_agent.readers import CanReader, ReaderState, ReplayReader
from daq_agent.sim.can import CanSimulator

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[2] / "dbc" / "bench.dbc"


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves a reader thread running."""
    yield
    leaked = [t.name for t in threading.enumerate() if t.name.startswith("daq-reader[")]
    assert not leaked, f"leaked reader threads: {leaked}"


@pytest.fixture
def bench() -> Any:
    """The repository's bench database, loaded by the agent's loader."""
    if not BENCH.is_file():
        pytest.skip("dbc/bench.dbc not in the tree")
    return load_database(BENCH)


def expected(db: Any, frame: can.Message) -> tuple[str, tuple[Any, ...]]:
    """The message name and cantools' values (signal order, absent signals None).

    A negative enum key is carried as its 32-bit two's complement (CanDecoder's documented rule).
    """
    message = next(
        m
        for m in db.messages
        if m.frame_id == frame.arbitration_id and m.is_extended_frame == frame.is_extended_id
    )
    values = message.decode(bytes(frame.data), decode_choices=False)
    out = []
    for signal in message.signals:
        value = values.get(signal.name)
        if signal.choices and isinstance(value, int) and value < 0:
            value &= 0xFFFFFFFF
        out.append(value)
    return message.name, tuple(out)


def test_simulated_bench_traffic_decodes_like_cantools(bench: Any) -> None:
    """Every simulated bench frame arrives once through CanReader+CanDecoder, cantools' values."""
    decoder = CanDecoder("bench", [bench])
    channel = f"dec-{uuid.uuid4().hex[:8]}"
    frames = [frame for _plan, frame in CanSimulator([bench], seed=11).frames(count=2000)]
    ring: RingBuffer[Sample] = RingBuffer(10_000, "block")
    reader = CanReader("bench", {"interface": "virtual", "channel": channel}, decoder, ring.put)
    with reader, can.Bus(channel, interface="virtual") as bus:
        assert reader.wait_state(ReaderState.RUNNING, timeout=5)
        for frame in frames:
            bus.send(frame)
        deadline = time.monotonic() + 20
        while reader.counters.get("received") < len(frames) and time.monotonic() < deadline:
            time.sleep(0.005)
    samples = ring.get_batch(10_000, timeout=0)
    assert reader.counters.get("decoded") == len(frames), reader.counters.snapshot()
    assert len(samples) == len(frames)
    flows = {f.name for f in decoder.flows}
    for sample, frame in zip(samples, frames, strict=True):
        name, values = expected(bench, frame)
        assert sample.flow in flows
        assert sample.flow.endswith(name)
        assert sample.values == values, name


def test_replayed_candump_log_with_real_decoder(bench: Any, tmp_path: Path) -> None:
    """A candump log of simulated traffic replays fast through CanDecoder and ends."""
    frames = []
    for _plan, frame in CanSimulator([bench], seed=12).frames(count=500):
        frame.timestamp += 1_700_000_000.0
        frame.channel = "can0"
        frames.append(frame)
    path = tmp_path / "bench.log"
    with can.Logger(path) as logger:
        for frame in frames:
            logger.on_message_received(frame)
    ring: RingBuffer[Sample] = RingBuffer(10_000, "block")
    reader = ReplayReader("bench", path, CanDecoder("bench", [bench]), ring.put, realtime=False)
    with reader:
        assert reader.wait_ended(timeout=30)
    samples = ring.get_batch(10_000, timeout=0)
    assert len(samples) == len(frames)
    for sample, frame in zip(samples, frames, strict=True):
        # candump stores "%.6f" seconds: exactly that many microseconds must come back
        assert sample.timestamp_ns == int(f"{frame.timestamp:.6f}".replace(".", "")) * 1000
        assert sample.values == expected(bench, frame)[1]
