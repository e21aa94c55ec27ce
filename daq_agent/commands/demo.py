"""``daq-agent demo [--duration 20]``: the whole product on one machine, in about 20 seconds.

1. the agent starts with ``configs/demo.yaml``: the embedded local ingestion server (SQLite store
   under the state directory), the ingestion config and a run, the ring, the flusher, a reader
   on the demo bus (python-can ``udp_multicast``) and one per serial device of the config;
2. the simulators start as their own processes: ``daq-agent simulate can`` on the same bus with
   the bench database's traffic, ``daq-agent simulate serial`` on a pty for each serial device
   (the device's port is pointed at that pty), and ``simulate modbus`` (on a free port) or
   ``simulate scpi`` (on a pty) for each polled device, whose URL is pointed at it;
3. the live status shows for ``--duration`` seconds; then the simulator is stopped, the agent
   drains and stops;
4. the summary: frames sent, received, decoded, unknown, delivered, stored (counted back from the
   SQLite store for this run) and per-flow counts.

Exit code 0 only if every decoded frame was stored (and at least one was).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from daq_agent.agent import Agent
from daq_agent.commands.run import drive_agent, stop_signals
from daq_agent.config import AgentConfig, DeviceConfig, LocalTarget, SerialConfig, load_config
from daq_agent.core.errors import ConfigError, DaqError
from daq_agent.pipeline.status import AgentStatus
from daq_agent.readers.base import ReaderState

__all__ = ["DemoResult", "add_subparser", "find_demo_config", "run_demo"]

log = logging.getLogger("daq_agent.demo")

_REPO_ROOT = Path(__file__).resolve().parents[2]
_DEFAULT_CONFIG = Path("configs/demo.yaml")


def add_subparser(subparsers: Any) -> None:
    """Register ``demo``."""
    parser = subparsers.add_parser(
        "demo",
        help="run the local server, the CAN simulator and the agent together for ~20 s",
        description="Simulated bench traffic through the agent into the local server.",
    )
    parser.add_argument("--duration", type=float, default=20.0, metavar="S", help="seconds (20)")
    parser.add_argument(
        "--config", type=Path, default=None, metavar="FILE", help="demo config (configs/demo.yaml)"
    )
    parser.add_argument("--state-dir", type=Path, default=None, help="where the store lives")
    parser.add_argument(
        "--channel", default=None, help="override the bus channel (a multicast group)"
    )
    parser.add_argument(
        "--port", type=int, default=None, help="override the udp_multicast port of the bus"
    )
    parser.add_argument(
        "--rate", type=float, default=None, metavar="N", help="simulator frames/s (cycle times)"
    )
    parser.add_argument("--no-live", action="store_true", help="no live status line")
    parser.set_defaults(func=_do_demo)


def find_demo_config(path: Path | None = None) -> Path:
    """The demo config: ``path``, else ``configs/demo.yaml`` here or in the source tree.

    Raises:
        ConfigError: none exists.
    """
    candidates = [path] if path is not None else [_DEFAULT_CONFIG, _REPO_ROOT / _DEFAULT_CONFIG]
    for candidate in candidates:
        if candidate is not None and candidate.is_file():
            return candidate
    raise ConfigError(f"no demo config at {' or '.join(str(c) for c in candidates)}")


@dataclasses.dataclass(frozen=True, slots=True)
class DemoResult:
    """What the demo did.

    Attributes:
        status: the agent's final status.
        sent: CAN frames the simulator reports it sent (None if it did not say).
        stored: samples of this run counted in the store.
        per_flow: stored samples per flow.
    """

    status: AgentStatus
    sent: int | None
    stored: int
    per_flow: dict[str, int]
    db_path: Path | None = None
    run_name: str = ""

    @property
    def ok(self) -> bool:
        """True when every decoded frame was stored, and there was at least one."""
        s = self.status
        return (
            s.decoded > 0
            and self.stored == s.decoded
            and s.flusher.delivered == s.decoded
            and s.balanced
        )

    def summary(self) -> list[str]:
        """The demo's report lines."""
        s = self.status
        lines = [
            "",
            "== daq-agent demo ==",
            f"CAN frames sent (sim.) {self.sent if self.sent is not None else '?'}",
            f"frames received         {s.received}",
            f"decoded                 {s.decoded}",
            f"unknown                 {s.unknown}",
            f"errors                  {s.errors}",
            f"dropped (ring)          {s.ring.dropped}",
            f"delivered               {s.flusher.delivered}",
            f"stored                  {self.stored}",
            "per flow (stored):",
        ]
        width = max((len(n) for n in self.per_flow), default=0)
        lines.extend(f"  {name:<{width}}  {count}" for name, count in sorted(self.per_flow.items()))
        lines.append("")
        lines.extend(s.summary())
        verdict = (
            "OK: every decoded frame was stored"
            if self.ok
            else f"FAILED: {s.decoded} decoded, {self.stored} stored"
        )
        lines.append(verdict)
        lines.extend(self.next_steps())
        return lines

    def next_steps(self) -> list[str]:
        """How to look at what was stored: the browsing commands, with this run's names."""
        if self.db_path is None:
            return []
        db = shlex.quote(str(self.db_path))
        exe = _executable()
        run = f" --run {shlex.quote(self.run_name)}" if self.run_name else ""
        busiest = max(self.per_flow, key=lambda flow: self.per_flow[flow], default="")
        flow = f" --flow {shlex.quote(busiest)}" if busiest else ""
        return [
            "",
            "Look at what was stored:",
            f"  {exe} runs --db {db}",
            f"  {exe} channels --db {db}{run}",
            f"  {exe} export --db {db}{run}{flow} --wide",
            f"  {exe} export --db {db}{run} --format parquet --output demo-parquet/",
            f"  {exe} plot --db {db}{run} --channel 'Pack*' --output demo.png",
            f"  {exe} monitor --config configs/demo.yaml   (live, while a simulator runs)",
        ]


def _executable() -> str:
    """How to call ``daq-agent`` from here: its name if it is on PATH, else its path (e.g.
    ``.venv/bin/daq-agent`` after ``make demo``)."""
    if shutil.which("daq-agent"):
        return "daq-agent"
    beside = Path(sys.executable).parent / "daq-agent"
    if not beside.exists():
        return f"{sys.executable} -m daq_agent.cli"
    try:
        return shlex.quote(os.path.relpath(beside))
    except ValueError:
        return shlex.quote(str(beside))


def _simulator_command(config: AgentConfig, rate: float | None, duration: float) -> list[str]:
    bus = config.buses[0]
    command = [
        sys.executable,
        "-m",
        "daq_agent.cli",
        "-q",
        "simulate",
        "can",
        "--interface",
        bus.interface,
        "--json",
        # outlive the demo window; the demo stops it
        "--duration",
        str(duration + 30.0),
    ]
    for database in bus.databases:
        command += ["--dbc", str(database)]
    if bus.channel is not None:
        command += ["--channel", str(bus.channel)]
    for key, value in bus.options.items():  # e.g. the udp_multicast port
        command += ["--bus-option", f"{key}={json.dumps(value)}"]
    if rate is not None:
        command += ["--rate", str(rate)]
    else:
        command.append("--cycle-times")
    return command


def _start_simulator(name: str, arguments: list[str]) -> tuple[subprocess.Popen[str], str]:
    """Start ``daq-agent -q simulate ARGUMENTS`` for the device ``name``; returns once it
    printed where it is (its first line: a pty's path or a URL), with that line.

    Raises:
        DaqError: the simulator did not start.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "daq_agent.cli", "-q", "simulate", *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline().strip()  # once the pty or the server exists
    if not line:
        _, err = _stop_process(process)
        raise DaqError(f"the simulator for {name!r} did not start: {err.strip()[-300:]}")
    return process, line


def _simulate_serial(device: SerialConfig, link: Path) -> tuple[subprocess.Popen[str], str]:
    """``simulate serial`` for a serial device, its pty linked at ``link``; (process, port)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    arguments = ["serial", "--defs", str(device.defs), "--link", str(link)]
    process, _ = _start_simulator(device.name, arguments)
    return process, str(link)


def _simulate_device(device: DeviceConfig, link: Path) -> tuple[subprocess.Popen[str], str]:
    """``simulate modbus`` (a server on a free port) or ``simulate scpi`` (a pty linked at
    ``link``) for a polled device; (process, the URL the device is to use)."""
    if device.kind == "modbus":
        arguments = ["modbus", "--map", str(device.map), "--port", "0", "--unit", "0"]
        if device.url.startswith("rtu+tcp://"):
            arguments += ["--framer", "rtu"]
        elif not device.url.startswith("tcp://"):
            raise ConfigError(
                f"the demo simulates Modbus over TCP only, not {device.url!r}",
                key=f"devices.{device.name}.url",
            )
        process, url = _start_simulator(device.name, arguments)
        return process, url
    link.parent.mkdir(parents=True, exist_ok=True)
    arguments = ["scpi", "--queries", str(device.map), "--link", str(link)]
    process, _ = _start_simulator(device.name, arguments)
    return process, str(link)


def _stop_process(process: subprocess.Popen[str]) -> tuple[str, str]:
    """SIGINT, then kill after 10 s; returns (stdout, stderr)."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        out, err = process.communicate(timeout=10.0)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    return out or "", err or ""


def _stop_simulator(process: subprocess.Popen[str]) -> int | None:
    """Stop the CAN simulator (SIGINT, then kill) and return the frames it says it sent."""
    out, _ = _stop_process(process)
    for line in reversed(out.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return int(json.loads(line)["frames"])
            except (ValueError, KeyError, TypeError):
                return None
    return None


def _settle(agent: Agent, quiet_s: float = 0.3, limit_s: float = 5.0) -> None:
    """Wait until the readers have received nothing new for ``quiet_s`` (frames in flight)."""
    deadline = time.monotonic() + limit_s
    last = agent.status().received
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        agent.wait(0.05)
        now = agent.status().received
        if now != last:
            last, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since >= quiet_s:
            return


def run_demo(
    config: AgentConfig,
    *,
    duration: float = 20.0,
    rate: float | None = None,
    live: bool = False,
    out: Any = None,
) -> DemoResult:
    """Run the agent and the simulator together for ``duration`` seconds, then count back.

    Raises:
        ConfigError: the config has no bus to simulate, or its target is not the local server.
        DaqError: the agent or the store failed.
    """
    if not config.buses:
        raise ConfigError("the demo needs a bus to simulate", key="buses")
    target = config.target
    if not isinstance(target, LocalTarget):
        raise ConfigError("the demo counts back from the local server: use the local target")
    out = out or sys.stdout
    device_sims: list[subprocess.Popen[str]] = []
    try:  # each device on its own simulator: serial ones on a pty, polled ones as they speak
        serial = []
        for device in config.serial:
            link = config.state_dir / f"demo-{device.name}-{os.getpid()}.pty"
            process, port = _simulate_serial(device, link)
            device_sims.append(process)
            serial.append(dataclasses.replace(device, port=port))
        polled = []
        for polled_device in config.devices:
            link = config.state_dir / f"demo-{polled_device.name}-{os.getpid()}.pty"
            process, url = _simulate_device(polled_device, link)
            device_sims.append(process)
            polled.append(dataclasses.replace(polled_device, url=url))
    except BaseException:
        for process in device_sims:
            _stop_process(process)
        raise
    config = dataclasses.replace(config, serial=tuple(serial), devices=tuple(polled))
    agent = Agent(config)
    simulator: subprocess.Popen[str] | None = None
    sent: int | None = None

    def stop_simulator() -> None:
        nonlocal sent
        if simulator is not None:
            sent = _stop_simulator(simulator)
        _settle(agent)

    with stop_signals(agent):
        try:
            agent.start()
        except BaseException:
            for process in device_sims:
                _stop_process(process)
            raise
        try:
            for reader in agent.readers:
                if not reader.wait_state(ReaderState.RUNNING, timeout=10.0):
                    raise DaqError(f"bus {reader.name} did not open: {reader.counters.last_error}")
            serial_text = "".join(f" + serial {d.name}" for d in config.serial) + "".join(
                f" + {d.kind} {d.name}" for d in config.devices
            )
            print(
                f"demo: run {agent.run_name} -> {agent.target_uri}; "
                f"{len(agent.plan.flows)} flows; simulator on {config.buses[0].interface} "
                f"{config.buses[0].channel or ''}{serial_text} for {duration:.0f} s",
                file=out,
                flush=True,
            )
            env = dict(os.environ)
            simulator = subprocess.Popen(
                _simulator_command(config, rate, duration),
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                env=env,
            )
        except BaseException:
            agent.stop(drain=False)
            if simulator is not None:
                _stop_simulator(simulator)
            for process in device_sims:
                _stop_process(process)
            raise
        try:
            final = drive_agent(
                agent, duration=duration, out=out, live=live, before_stop=stop_simulator
            )
        finally:  # after the agent stopped reading, so no reader sees its port vanish
            for process in device_sims:
                _stop_process(process)
    from daq_agent.server.store import Store

    with Store.open(target.db_path, readonly=True) as store:
        stored = store.count_samples(run_id=agent.run_id) if agent.run_id else store.count_samples()
        per_flow = store.flow_counts(run_id=agent.run_id or None)
    return DemoResult(
        status=final,
        sent=sent,
        stored=stored,
        per_flow=per_flow,
        db_path=target.db_path,
        run_name=agent.run_name or "",
    )


def _do_demo(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    if args.state_dir is not None:
        env["DAQ_AGENT_STATE_DIR"] = str(args.state_dir)
    config = load_config(find_demo_config(args.config), env=env)
    if (args.channel is not None or args.port is not None) and config.buses:
        bus = config.buses[0]
        if args.channel is not None:
            bus = dataclasses.replace(bus, channel=args.channel)
        if args.port is not None:
            bus = dataclasses.replace(bus, options={**bus.options, "port": args.port})
        config = dataclasses.replace(config, buses=(bus, *config.buses[1:]))
    live = not args.no_live and sys.stdout.isatty()
    result = run_demo(config, duration=args.duration, rate=args.rate, live=live)
    for line in result.summary():
        print(line)
    return 0 if result.ok else 1
