"""``daq-agent service``: install the agent as a systemd service.

``service install`` writes the unit (the hardened template shipped in ``daq_agent/data``, with
``ExecStart`` pointed at this installation's ``daq-agent`` and the config's directory) and, if
none exists yet, a config skeleton to edit. It never overwrites a config, nor a unit that differs
without ``--force``; it creates no key file (the key is the user's to place, mode 0600). With
``--root DIR`` every path is written under DIR (packaging, or a look before installing).
``service unit`` prints the unit it would write.

Nothing here talks to systemd unless asked: ``--enable`` runs ``systemctl daemon-reload`` and
``systemctl enable`` (not ``--now``: the config needs editing first).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from daq_agent.core.errors import ConfigError, DaqError

_TEMPLATE_EXEC = "/opt/daq-agent/bin/daq-agent"
_TEMPLATE_CONFIG_DIR = "/etc/daq-agent"
_UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.\\-]+$")


@dataclass(frozen=True)
class Layout:
    """Where the service's files go (absolute paths on the target system)."""

    unit_name: str
    unit_dir: Path
    config_dir: Path
    executable: str
    api_key_file: Path | None

    @property
    def unit_path(self) -> Path:
        return self.unit_dir / f"{self.unit_name}.service"

    @property
    def config_path(self) -> Path:
        return self.config_dir / "config.yaml"


def add_subparser(subparsers: Any) -> None:
    """Register ``service``."""
    parser = subparsers.add_parser(
        "service",
        help="install the agent as a systemd service",
        description="Write the hardened systemd unit and a config skeleton.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    install = actions.add_parser(
        "install", help="write the unit and, if there is none, a config skeleton"
    )
    unit = actions.add_parser("unit", help="print the unit that install would write")
    for sub in (install, unit):
        sub.add_argument("--name", default="daq-agent", help="the unit's name (default: daq-agent)")
        sub.add_argument(
            "--config-dir",
            type=Path,
            default=Path(_TEMPLATE_CONFIG_DIR),
            help="the config's directory (default: /etc/daq-agent)",
        )
        sub.add_argument(
            "--exec",
            dest="executable",
            default=None,
            metavar="PATH",
            help="the daq-agent executable the unit runs (default: this installation's)",
        )
        sub.add_argument(
            "--api-key-file",
            type=Path,
            default=None,
            metavar="FILE",
            help="load this root-only file as the Sift API key credential (a sift target)",
        )
        sub.set_defaults(func=_do_service)
    install.add_argument(
        "--unit-dir",
        type=Path,
        default=Path("/etc/systemd/system"),
        help="where the unit goes (default: /etc/systemd/system)",
    )
    install.add_argument(
        "--root",
        type=Path,
        default=None,
        metavar="DIR",
        help="write every file under DIR instead of / (the unit's paths stay absolute)",
    )
    install.add_argument("--asset", default=None, help="the asset in the skeleton (the hostname)")
    install.add_argument("--force", action="store_true", help="replace a unit that differs")
    install.add_argument(
        "--enable", action="store_true", help="then run systemctl daemon-reload and enable"
    )


def default_executable() -> str:
    """This installation's ``daq-agent``: beside the interpreter (a venv), else on PATH."""
    beside = Path(sys.executable).parent / "daq-agent"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside.absolute())
    found = shutil.which("daq-agent")
    if found:
        return str(Path(found).absolute())
    return f"{Path(sys.executable).absolute()} -m daq_agent.cli"


def render_unit(layout: Layout) -> str:
    """The unit's text for ``layout``, from the shipped template."""
    text = resources.files("daq_agent.data").joinpath("daq-agent.service").read_text()
    config = str(layout.config_path)
    exec_start = f"ExecStart={layout.executable} run --no-live {shlex.quote(config)}"
    text, n = re.subn(r"^ExecStart=.*$", lambda _m: exec_start, text, count=1, flags=re.M)
    if n != 1:  # the template is ours: a test keeps it in shape
        raise DaqError("the unit template has no ExecStart= line")
    docs = f"Documentation=man:systemd.service(5) file://{layout.config_path}"
    text = re.sub(r"^Documentation=.*$", lambda _m: docs, text, count=1, flags=re.M)
    if layout.api_key_file is None:
        # a missing credential file fails the start: only a sift target loads one
        text = re.sub(
            r"^LoadCredential=.*$",
            "# LoadCredential=sift-api-key:/etc/daq-agent/sift.key  (a sift target's key: "
            "re-run `daq-agent service install --api-key-file FILE`)",
            text,
            count=1,
            flags=re.M,
        )
    else:
        key = f"LoadCredential=sift-api-key:{layout.api_key_file}"
        text = re.sub(r"^LoadCredential=.*$", lambda _m: key, text, count=1, flags=re.M)
    if layout.unit_name != "daq-agent":
        for key in ("StateDirectory", "ConfigurationDirectory"):
            text = re.sub(
                rf"^{key}=daq-agent$", f"{key}={layout.unit_name}", text, count=1, flags=re.M
            )
        text = text.replace(
            "DAQ_AGENT_STATE_DIR=%S/daq-agent", f"DAQ_AGENT_STATE_DIR=%S/{layout.unit_name}"
        )
    if layout.config_dir != Path(_TEMPLATE_CONFIG_DIR):
        # ConfigurationDirectory= only makes sense under /etc
        text = re.sub(r"^ConfigurationDirectory=.*\n", "", text, count=1, flags=re.M)
    header = (
        f"# Written by `daq-agent service install` for {config}.\n"
        "# Re-run it (with --force) after upgrading the agent; edit the config, not this file.\n"
    )
    return header + text


def render_skeleton(layout: Layout, asset: str) -> str:
    """A config to edit: the local target, one SocketCAN bus, commented alternatives."""
    text = resources.files("daq_agent.data").joinpath("config-skeleton.yaml").read_text()
    return text.format(
        asset=asset,
        config=layout.config_path,
        config_dir=layout.config_dir,
        unit_name=layout.unit_name,
        key_file=layout.api_key_file or layout.config_dir / "sift.key",
    )


def _layout(args: argparse.Namespace) -> Layout:
    if not _UNIT_NAME.match(args.name):
        raise ConfigError(f"--name: {args.name!r} is not a unit name (letters, digits, :_.-)")
    config_dir = args.config_dir
    if not config_dir.is_absolute():
        raise ConfigError(f"--config-dir: {config_dir} must be an absolute path")
    key = args.api_key_file
    if key is not None and not key.is_absolute():
        raise ConfigError(f"--api-key-file: {key} must be an absolute path")
    return Layout(
        unit_name=args.name,
        unit_dir=getattr(args, "unit_dir", Path("/etc/systemd/system")),
        config_dir=config_dir,
        executable=args.executable or default_executable(),
        api_key_file=key,
    )


def _under(root: Path | None, path: Path) -> Path:
    return path if root is None else root / path.relative_to(path.anchor)


def _write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


def _do_service(args: argparse.Namespace) -> int:
    layout = _layout(args)
    unit = render_unit(layout)
    if args.action == "unit":
        sys.stdout.write(unit)
        return 0
    return _install(args, layout, unit)


def _install(args: argparse.Namespace, layout: Layout, unit: str) -> int:
    out = sys.stdout
    root: Path | None = args.root
    unit_path = _under(root, layout.unit_path)
    config_path = _under(root, layout.config_path)
    if args.enable and root is not None:
        raise ConfigError("--enable: not with --root (the files are not on this system)")
    try:
        if unit_path.exists() and unit_path.read_text() != unit and not args.force:
            print(
                f"daq-agent service install: {unit_path} exists and differs; "
                "re-run with --force to replace it (`daq-agent service unit` shows the new one)",
                file=sys.stderr,
            )
            return 2
        _write(unit_path, unit, 0o644)
        out.write(f"wrote {unit_path}\n")
        if config_path.exists():
            out.write(f"kept {config_path} (it exists)\n")
        else:
            asset = args.asset or os.uname().nodename.split(".")[0] or "bench"
            _write(config_path, render_skeleton(layout, asset), 0o644)
            out.write(f"wrote {config_path} (a skeleton: edit it)\n")
    except OSError as exc:
        raise DaqError(f"{exc.filename or unit_path}: cannot write: {exc.strerror or exc}") from exc
    if layout.api_key_file is not None and not _under(root, layout.api_key_file).exists():
        out.write(
            f"note: {layout.api_key_file} does not exist yet; the service cannot start without it"
            f' (install -m 0600 /dev/stdin {layout.api_key_file} <<<"$SIFT_API_KEY")\n'
        )
    if args.enable:
        for command in (["systemctl", "daemon-reload"], ["systemctl", "enable", layout.unit_name]):
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise DaqError(f"{' '.join(command)} failed: {result.stderr.strip()}")
        out.write(f"enabled {layout.unit_name}\n")
    out.write(
        "next:\n"
        f"  edit {layout.config_path}, then: daq-agent check {layout.config_path}\n"
        + ("" if args.enable else "  systemctl daemon-reload\n")
        + f"  systemctl enable --now {layout.unit_name}\n"
        f"  journalctl -u {layout.unit_name} -f   # the log (reload: systemctl reload)\n"
    )
    return 0
