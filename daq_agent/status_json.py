"""The agent's ``/status.json``: the status snapshot and the latest value of every channel.

Served by :class:`~daq_agent.metrics.MetricsServer` (``run --metrics-port``) for
``daq-agent monitor --agent URL``. The document::

    {"version": 1, "time_ns": <the agent's clock, ns since the epoch>,
     "status": <AgentStatus.as_dict()>,
     "channels": [{"flow", "name", "value", "unit", "label", "timestamp_ns", "rate", "count"}]}

``value`` is as a person reads it (a signed enum key as its signed number; a non-finite float as
``"nan"``/``"inf"``; bytes as hex); ``label`` is the enum label ("" when none); ``rate`` is the
flow's samples per second over the last few seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from daq_agent.pipeline.latest import LatestValues
from daq_agent.pipeline.status import AgentStatus

__all__ = ["STATUS_JSON_PATH", "STATUS_JSON_VERSION", "status_document", "status_route"]

STATUS_JSON_PATH = "/status.json"
STATUS_JSON_VERSION = 1


def status_document(status: AgentStatus, latest: LatestValues | None) -> dict[str, Any]:
    """The document of ``/status.json`` for one snapshot."""
    return {
        "version": STATUS_JSON_VERSION,
        "time_ns": time.time_ns(),
        "status": status.as_dict(),
        "channels": latest.document() if latest is not None else [],
    }


def status_route(
    status: Callable[[], AgentStatus], latest: LatestValues | None
) -> dict[str, Callable[[], dict[str, Any]]]:
    """The ``json_routes`` of a :class:`~daq_agent.metrics.MetricsServer` serving the document."""
    return {STATUS_JSON_PATH: lambda: status_document(status(), latest)}
