"""Subcommands of the ``daq-agent`` command line, one module each."""
