"""Sinks: where the flusher delivers samples (see :mod:`daq_agent.pipeline.sink`).

:class:`~daq_agent.sinks.sift.SiftSink` streams to Sift, or to the local server (which speaks the
same API), through Sift's own streaming client.
"""
