"""The bottom layer: what every other package shares and nothing below it defines.

:mod:`~daq_agent.core.sample` (the :class:`Sample` a reader hands on), :mod:`~daq_agent.core.model`
(flows, channels, data types, the telemetry config), :mod:`~daq_agent.core.clock` (nanosecond
timestamps), :mod:`~daq_agent.core.backoff` (the one back-off) and :mod:`~daq_agent.core.errors`
(the error tree). It imports nothing from the rest of the package.
"""
