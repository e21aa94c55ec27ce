"""daq-agent: CAN and serial frames decoded, timestamped and streamed to Sift or a local server."""

__version__ = "0.1.0"
