"""CanReader on a real python-can virtual bus: decoding, fault counting, timestamps, reopen."""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import can
import cantools
import pytest
from can_support import CantoolsDecoder, wait_for

from daq_agent.core.backoff import Backoff, RetryPolicy
from daq_agent.core.errors import ReaderError
from daq_agent.core.sample import Sample
from daq_agent.pipeline.ring_buffer import RingBuffer
from daq_agent.readers import (
    BACKENDS,
    CanReader,
    ReaderABC,
    ReaderState,
    describe,
    get_reader_class,
)
from daq_agent.readers.base import READER_RETRY
from daq_agent.readers.can import enlarge_receive_buffer

pytestmark = pytest.mark.integration

DBC = """VERSION ""
NS_ :
BS_:
BU_: ECU BMS

BO_ 256 Engine: 8 ECU
 SG_ Speed : 0|16@1+ (0.1,0) [0|6553.5] "km/h" BMS
 SG_ Temp : 16|8@1- (1,-40) [-40|87] "degC" BMS
 SG_ Mode : 24|2@1+ (1,0) [0|3] "" BMS
 SG_ Enabled : 26|1@1+ (1,0) [0|1] "" BMS

BO_ 2566848513 ExtStatus: 8 BMS
 SG_ Counter : 0|32@1+ (1,0) [0|0] "" ECU
 SG_ Voltage : 32|16@1+ (0.01,0) [0|400] "V" ECU

BO_ 1 StdOne: 2 BMS
 SG_ Word : 0|16@1+ (1,0) [0|0] "" ECU

BO_ 768 FdData: 64 BMS
 SG_ Big : 0|32@1+ (1,0) [0|100000] "" ECU
 SG_ Last : 500|8@1+ (1,0) [0|255] "" ECU

BA_DEF_ BO_ "VFrameFormat" ENUM "StandardCAN","ExtendedCAN","reserved","reserved","reserved","reserved","reserved","reserved","reserved","reserved","reserved","reserved","reserved","reserved","StandardCAN_FD","ExtendedCAN_FD";
BA_DEF_DEF_ "VFrameFormat" "StandardCAN";
BA_ "VFrameFormat" BO_ 768 14;
VAL_ 256 Mode 0 "Off" 1 "Idle" 2 "Run" 3 "Fault" ;
"""  # noqa: E501


@pytest.fixture
def db() -> Any:
    """The test database."""
    return cantools.database.load_string(DBC, database_format="dbc")


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves a reader thread running."""
    yield
    leaked = [t.name for t in threading.enumerate() if t.name.startswith("daq-reader[")]
    assert not leaked, f"leaked reader threads: {leaked}"


def make_reader(channel: str, db: Any, ring: RingBuffer[Sample], **kwargs: Any) -> CanReader:
    """A CanReader on the virtual test channel feeding ``ring``."""
    return CanReader(
        "bus0",
        {"interface": "virtual", "channel": channel},
        CantoolsDecoder(db),
        ring.put,
        **kwargs,
    )


def test_every_frame_arrives_once_with_cantools_values(db: Any, channel: str, sender: Any) -> None:
    """Each frame sent arrives once, in order, with cantools' values and the driver timestamp."""
    ring: RingBuffer[Sample] = RingBuffer(10_000, "block")
    rng = random.Random(7)
    sent: list[tuple[str, int, dict[str, Any]]] = []
    messages = list(db.messages)
    base_ts = 1_700_000_000.0
    with make_reader(channel, db, ring) as reader:
        assert reader.wait_state(ReaderState.RUNNING, timeout=5)
        for i in range(600):
            message = messages[i % len(messages)]
            raw = {
                s.name: rng.randint(0, (1 << s.length) - 1)
                if not s.is_signed
                else rng.randint(-(1 << (s.length - 1)), (1 << (s.length - 1)) - 1)
                for s in message.signals
            }
            data = message.encode(raw, scaling=False, strict=False)
            ts = base_ts + i * 0.001 + 0.000123
            sender.send(
                can.Message(
                    timestamp=ts,
                    arbitration_id=message.frame_id,
                    is_extended_id=message.is_extended_frame,
                    is_fd=message.is_fd,
                    data=data,
                )
            )
            sent.append((message.name, round(ts * 1e6) * 1000, message.decode(data, False)))
        assert wait_for(lambda: reader.counters.get("received") == 600)
    got = ring.get_batch(10_000, timeout=0)
    assert len(got) == 600
    for sample, (name, ts_ns, values) in zip(got, sent, strict=True):
        assert sample.flow == name
        assert sample.timestamp_ns == ts_ns
        message = db.get_message_by_name(name)
        assert sample.values == tuple(values[s.name] for s in message.signals)
    counters = reader.counters
    assert counters.get("decoded") == 600
    assert counters.get("unknown") == counters.get("decode_errors") == 0
    assert reader.state is ReaderState.STOPPED


def test_faulty_frames_are_counted_and_never_decoded(db: Any, channel: str, sender: Any) -> None:
    """Unknown ids, error, remote and short frames are counted per id and never emitted."""
    ring: RingBuffer[Sample] = RingBuffer(100)
    engine = db.get_message_by_name("Engine")
    good = engine.encode({"Speed": 12.3, "Temp": 20, "Mode": 2, "Enabled": 1})
    frames = [
        can.Message(arbitration_id=0x7FF, is_extended_id=False, data=b"\x00" * 8),  # unknown
        can.Message(arbitration_id=0x7FF, is_extended_id=False, data=b"\x01" * 8),  # unknown
        # 0x100 extended is not the standard Engine frame 0x100
        can.Message(arbitration_id=0x100, is_extended_id=True, data=good),
        # id 1 extended is unknown, id 1 standard is StdOne
        can.Message(arbitration_id=0x1, is_extended_id=True, data=b"\x00\x00"),
        can.Message(arbitration_id=0x40 | 0x80, is_error_frame=True, data=b"\x00" * 8),
        can.Message(arbitration_id=0x100, is_extended_id=False, is_remote_frame=True, dlc=8),
        can.Message(arbitration_id=0x100, is_extended_id=False, data=good[:3]),  # short
        can.Message(arbitration_id=0x100, is_extended_id=False, data=good),  # the one good frame
    ]
    with make_reader(channel, db, ring) as reader:
        assert reader.wait_state(ReaderState.RUNNING, timeout=5)
        for frame in frames:
            sender.send(frame)
        assert wait_for(lambda: reader.counters.get("received") == len(frames))
    samples = ring.get_batch(100, timeout=0)
    assert [s.flow for s in samples] == ["Engine"]
    assert samples[0].values == (12.3, 20, 2, 1)
    snap = reader.counters.snapshot()
    assert snap["decoded"] == 1
    assert snap["unknown"] == 4
    assert snap["unknown_ids"] == {"7FF": 2, "00000100x": 1, "00000001x": 1}
    assert snap["error_frames"] == 1
    assert snap["error_classes"] == {"bus_off": 1, "bus_error": 1}
    assert snap["remote_frames"] == 1
    assert snap["remote_ids"] == {"100": 1}
    assert snap["decode_errors"] == 1
    assert snap["decode_error_ids"] == {"100": 1}
    assert "Wrong data size" in reader.last_decode_error
    assert snap["received"] == (
        snap["decoded"]
        + snap["unknown"]
        + snap["decode_errors"]
        + snap["error_frames"]
        + snap["remote_frames"]
    )


def test_per_id_map_is_bounded(db: Any, channel: str, sender: Any) -> None:
    """Beyond key_limit distinct unknown ids, the rest are counted under 'other'."""
    ring: RingBuffer[Sample] = RingBuffer(10)
    with make_reader(channel, db, ring, key_limit=4) as reader:
        assert reader.wait_state(ReaderState.RUNNING, timeout=5)
        for frame_id in range(0x600, 0x60A):
            sender.send(can.Message(arbitration_id=frame_id, is_extended_id=False, data=b"\0"))
        assert wait_for(lambda: reader.counters.get("received") == 10)
    unknown = reader.counters.keyed("unknown_ids").snapshot()
    assert len(unknown) == 5
    assert unknown["other"] == 6
    assert sum(unknown.values()) == 10


def test_frame_without_driver_timestamp_gets_host_time(db: Any, channel: str, sender: Any) -> None:
    """A frame with timestamp 0 is stamped from the host clock, in ns near now."""
    ring: RingBuffer[Sample] = RingBuffer(10)
    data = db.get_message_by_name("StdOne").encode({"Word": 513})
    with make_reader(channel, db, ring) as reader:
        assert reader.wait_state(ReaderState.RUNNING, timeout=5)
        before = time.time_ns()
        sender.send(can.Message(timestamp=0.0, arbitration_id=1, is_extended_id=False, data=data))
        got = ring.get_batch(1, timeout=5)
        after = time.time_ns()
    assert len(got) == 1
    assert got[0].values == (513,)
    # the host clock is anchored once, so allow a little drift against time.time_ns()
    assert before - 50_000_000 <= got[0].timestamp_ns <= after + 50_000_000


def test_bus_shut_down_under_the_reader_is_reopened(db: Any, channel: str, sender: Any) -> None:
    """When the bus goes away the reader reports it, backs off, reopens and keeps reading."""
    ring: RingBuffer[Sample] = RingBuffer(100)
    errors: list[BaseException] = []
    data = db.get_message_by_name("StdOne").encode({"Word": 1})
    frame = can.Message(arbitration_id=1, is_extended_id=False, data=data)
    reader = make_reader(
        channel,
        db,
        ring,
        on_error=lambda _r, exc: errors.append(exc),
        retry=RetryPolicy(initial_s=0.01, max_s=0.05),
    )
    with reader:
        assert reader.wait_state(ReaderState.RUNNING, timeout=5)
        sender.send(frame)
        assert len(ring.get_batch(1, timeout=5)) == 1
        bus = reader.bus
        assert bus is not None
        bus.shutdown()  # the interface disappears under the reader
        assert wait_for(lambda: reader.counters.get("reopens") == 1)
        assert reader.wait_state(ReaderState.RUNNING, timeout=5)
        sender.send(frame)
        assert len(ring.get_batch(1, timeout=5)) == 1
    assert len(errors) == 1
    assert isinstance(errors[0], can.CanError)
    assert reader.counters.get("failures") == 1
    assert "closed bus" in reader.counters.last_error


def test_interface_that_fails_to_open_is_retried_with_backoff(
    db: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An interface that cannot be opened is retried (failures counted) until the reader stops;
    the repeated failure is logged once, with its likely cause, not once per attempt."""
    caplog.set_level(logging.DEBUG, logger="daq_agent.readers")
    ring: RingBuffer[Sample] = RingBuffer(10)
    # No SocketCAN on this machine (or no such device): opening raises OSError every time.
    reader = CanReader(
        "absent",
        {"interface": "socketcan", "channel": "daqabsent0"},
        CantoolsDecoder(db),
        ring.put,
        retry=RetryPolicy(initial_s=0.01, max_s=0.02),
    )
    with reader:
        assert wait_for(lambda: reader.counters.get("failures") >= 3)
        assert reader.state in (ReaderState.BACKOFF, ReaderState.OPENING)
    assert reader.wait_state(ReaderState.STOPPED, timeout=0)
    assert reader.counters.get("opens") == 0
    assert reader.counters.last_error.startswith("open: ")
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1, warned
    if "Address family not supported" in warned[0]:  # no SocketCAN here: say so, and what to do
        assert "SocketCAN" in warned[0]
        assert "modprobe" in warned[0]


def test_unknown_interface_fails_without_retry(db: Any) -> None:
    """An interface python-can does not know is a configuration error: the reader fails once."""
    ring: RingBuffer[Sample] = RingBuffer(10)
    reader = CanReader(
        "bad", {"interface": "no-such-interface", "channel": "x"}, CantoolsDecoder(db), ring.put
    )
    with reader:
        assert reader.wait_state(ReaderState.FAILED, timeout=5)
    assert reader.counters.get("failures") == 1
    assert not reader.ended
    assert "no-such-interface" in reader.counters.last_error


def test_stop_is_idempotent_and_prompt(db: Any, channel: str) -> None:
    """stop() joins the named thread quickly, can be repeated, and the reader cannot restart."""
    ring: RingBuffer[Sample] = RingBuffer(10)
    reader = make_reader(channel, db, ring)
    reader.start()
    reader.start()  # no second thread
    names = [t.name for t in threading.enumerate() if t.name == "daq-reader[bus0]"]
    assert names == ["daq-reader[bus0]"]
    assert reader.wait_state(ReaderState.RUNNING, timeout=5)
    started = time.monotonic()
    assert reader.stop(timeout=5)
    assert time.monotonic() - started < 2
    assert reader.stop()
    reader.shutdown()
    assert not reader.is_alive()
    assert reader.bus is None
    with pytest.raises(ReaderError, match="shut down"):
        reader.start()


def test_sink_failure_is_counted_not_fatal(db: Any, channel: str, sender: Any) -> None:
    """A sink that raises is counted in sink_errors; the reader keeps reading."""
    seen: list[Sample] = []

    def sink(sample: Sample) -> None:
        seen.append(sample)
        if len(seen) == 1:
            raise RuntimeError("sink broke once")

    data = db.get_message_by_name("StdOne").encode({"Word": 2})
    reader = CanReader(
        "bus0", {"interface": "virtual", "channel": channel}, CantoolsDecoder(db), sink
    )
    with reader:
        assert reader.wait_state(ReaderState.RUNNING, timeout=5)
        for _ in range(3):
            sender.send(can.Message(arbitration_id=1, is_extended_id=False, data=data))
        assert wait_for(lambda: len(seen) == 3)
        assert reader.state is ReaderState.RUNNING
    assert reader.counters.get("sink_errors") == 1


def test_live_reader_into_a_full_ring_drops_oldest_and_counts(
    db: Any, channel: str, sender: Any
) -> None:
    """A bus cannot wait: on a full ring its samples go in under the overflow policy and the
    drops are counted (put == got + dropped + depth); the reader never blocks."""
    ring: RingBuffer[Sample] = RingBuffer(8, "drop_oldest")
    reader = CanReader(
        "bus0", {"interface": "virtual", "channel": channel}, CantoolsDecoder(db), ring
    )
    assert reader.live
    assert describe(reader)["live"] is True
    message = db.get_message_by_name("StdOne")
    with reader:
        assert reader.wait_state(ReaderState.RUNNING, timeout=5)
        for i in range(50):
            sender.send(
                can.Message(
                    arbitration_id=1, is_extended_id=False, data=message.encode({"Word": i})
                )
            )
        assert wait_for(lambda: reader.counters.get("decoded") == 50)
        assert reader.state is ReaderState.RUNNING
    stats = ring.stats()
    assert (stats.put_count, stats.dropped, stats.depth) == (50, 42, 8)
    assert [s.values for s in ring.get_batch(8, timeout=0)] == [(i,) for i in range(42, 50)]
    assert reader.counters.get("unsent") == 0


def test_backend_registry_resolves_lazily() -> None:
    """BACKENDS maps kinds to classes; a missing module becomes a ReaderError."""
    assert get_reader_class("can") is CanReader
    assert issubclass(get_reader_class("replay"), ReaderABC)
    BACKENDS["broken-test-kind"] = "daq_agent.readers.no_such_module:Nope"
    try:
        with pytest.raises(ReaderError, match="broken-test-kind"):
            get_reader_class("broken-test-kind")
    finally:
        del BACKENDS["broken-test-kind"]


class FlakyVirtualReader(CanReader):
    """A CanReader whose first ``fail_opens`` opens fail, like an adapter not plugged in yet."""

    def __init__(self, *args: Any, fail_opens: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fail_opens = fail_opens
        self.open_times: list[float] = []

    def _open(self) -> None:
        self.open_times.append(time.monotonic())
        if len(self.open_times) <= self.fail_opens:
            raise OSError(f"adapter absent (attempt {len(self.open_times)})")
        super()._open()


def test_failed_opens_back_off_exponentially_then_read(db: Any, channel: str, sender: Any) -> None:
    """Failed opens are retried after the core back-off's delays (full jitter under a cap that
    doubles); once open, frames flow and no reopen counts."""
    ring: RingBuffer[Sample] = RingBuffer(10)
    errors: list[BaseException] = []
    policy = RetryPolicy(initial_s=0.1, max_s=1.0)
    seed = 5
    twin = Backoff(policy, random.Random(seed))  # the same rng gives the same delays
    expected = [twin.failure() for _ in range(3)]
    assert expected == sorted(expected)  # this seed's delays grow, so the gaps must too
    reader = FlakyVirtualReader(
        "flaky",
        {"interface": "virtual", "channel": channel},
        CantoolsDecoder(db),
        ring.put,
        fail_opens=3,
        on_error=lambda _r, exc: errors.append(exc),
        retry=policy,
        rng=random.Random(seed),
    )
    data = db.get_message_by_name("StdOne").encode({"Word": 9})
    with reader:
        assert reader.wait_state(ReaderState.RUNNING, timeout=10)
        sender.send(can.Message(arbitration_id=1, is_extended_id=False, data=data))
        assert [s.values for s in ring.get_batch(5, timeout=5)] == [(9,)]
    gaps = [b - a for a, b in itertools.pairwise(reader.open_times)]
    assert len(gaps) == 3
    for gap, delay, cap in zip(gaps, expected, (0.1, 0.2, 0.4), strict=True):
        assert delay <= cap
        assert delay <= gap < delay + 0.5
    assert [str(e) for e in errors] == [f"adapter absent (attempt {i})" for i in (1, 2, 3)]
    assert reader.counters.get("failures") == 3
    assert reader.counters.get("opens") == 1
    assert reader.counters.get("reopens") == 0


def test_readers_use_the_core_backoff_with_reader_defaults(db: Any, channel: str) -> None:
    """Without a policy a reader backs off under READER_RETRY: caps 0.1 s doubling up to 5 s."""
    reader = make_reader(channel, db, RingBuffer(10))
    assert isinstance(reader.backoff, Backoff)
    assert reader.backoff.policy is READER_RETRY
    caps = []
    for _ in range(9):
        assert 0.0 <= reader.backoff.failure() <= READER_RETRY.max_s
        caps.append(reader.backoff.cap())
    assert caps == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]


@pytest.mark.hardware
def test_socketcan_vcan_round_trip(db: Any) -> None:
    """On a SocketCAN vcan interface, frames arrive with kernel timestamps (needs vcan0)."""
    import os

    if os.environ.get("DAQ_HARDWARE") != "1" or not os.path.exists("/sys/class/net/vcan0"):
        pytest.skip("needs DAQ_HARDWARE=1 and a vcan0 interface")
    ring: RingBuffer[Sample] = RingBuffer(100)
    data = db.get_message_by_name("StdOne").encode({"Word": 77})
    reader = CanReader(
        "vcan", {"interface": "socketcan", "channel": "vcan0"}, CantoolsDecoder(db), ring.put
    )
    with reader, can.Bus("vcan0", interface="socketcan") as bus:
        assert reader.wait_state(ReaderState.RUNNING, timeout=5)
        before = time.time_ns()
        bus.send(can.Message(arbitration_id=1, is_extended_id=False, data=data))
        got = ring.get_batch(1, timeout=5)
    assert [s.values for s in got] == [(77,)]
    assert abs(got[0].timestamp_ns - before) < 1_000_000_000


def test_public_surface_is_sorted_and_resolves() -> None:
    """daq_agent.readers exports a sorted __all__ whose names all resolve (lazily for readers)."""
    import daq_agent.readers as readers

    assert readers.__all__ == sorted(readers.__all__)
    for name in readers.__all__:
        assert getattr(readers, name) is not None
    with pytest.raises(AttributeError):
        _ = readers.NoSuchReader


def test_reader_dropped_without_shutdown_logs_it(db: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A started reader garbage-collected without stop() logs 'was not properly shut down'."""
    import gc

    reader = CanReader(
        "forgotten", {"interface": "no-such-interface"}, CantoolsDecoder(db), lambda _s: None
    )
    reader.start()
    assert reader.wait_state(ReaderState.FAILED, timeout=5)
    deadline = time.monotonic() + 5
    while reader.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not reader.is_alive()
    with caplog.at_level("WARNING", logger="daq_agent.readers.base"):
        del reader
        gc.collect()
    assert "forgotten was not properly shut down" in caplog.text


def test_a_socket_bus_gets_a_larger_receive_buffer() -> None:
    """A udp_multicast bus (a socket, like SocketCAN) gets a receive buffer above the kernel's
    default, so a burst while the reader waits for the GIL is not dropped by the kernel; a bus
    without a socket is left alone."""

    group = f"239.74.{random.randint(1, 250)}.{random.randint(1, 250)}"
    with can.Bus(
        interface="udp_multicast", channel=group, port=43_000 + random.randint(0, 999)
    ) as bus:
        import socket

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as plain:
            default = plain.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        size = enlarge_receive_buffer(bus)
        assert size is not None
        assert size > default
        assert enlarge_receive_buffer(bus) == size  # never shrunk, idempotent
    with can.Bus(interface="virtual", channel=f"rcvbuf-{uuid.uuid4().hex}") as virtual:
        assert enlarge_receive_buffer(virtual) is None


@pytest.mark.parametrize(
    ("exc", "words"),
    [
        (OSError(97, "Address family not supported by protocol"), "SocketCAN"),
        (OSError(19, "No such device"), "ip link"),
        (PermissionError(13, "Permission denied: '/dev/ttyUSB0'"), "dialout"),
        (FileNotFoundError(2, "No such file or directory: '/dev/ttyUSB7'"), "plugged in"),
        (OSError(110, "Connection timed out"), ""),
    ],
)
def test_open_failures_name_their_likely_cause(exc: OSError, words: str) -> None:
    from daq_agent.readers.base import explain_open_error

    hint = explain_open_error(exc)
    assert (words in hint) if words else hint == ""
