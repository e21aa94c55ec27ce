"""Live views: ``daq-agent monitor`` (decoded values and the pipeline's health, in a terminal).

The screen (:mod:`daq_agent.monitor.app`, Textual) is drawn from a view model
(:mod:`daq_agent.monitor.model`) fed by a source (:mod:`daq_agent.monitor.sources`): a running
agent's ``/status.json``, or readers of the monitor's own on a bus or a log.
"""

from __future__ import annotations

from daq_agent.monitor.model import (
    HealthRow,
    MonitorModel,
    SignalRow,
    SortKey,
    format_age,
    format_rate,
    format_value,
)
from daq_agent.monitor.sources import AgentSource, DirectSource, MonitorSource, status_url

__all__ = [
    "AgentSource",
    "DirectSource",
    "HealthRow",
    "MonitorModel",
    "MonitorSource",
    "SignalRow",
    "SortKey",
    "format_age",
    "format_rate",
    "format_value",
    "status_url",
]
