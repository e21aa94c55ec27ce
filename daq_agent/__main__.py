"""``python -m daq_agent``: the ``daq-agent`` command line."""

import sys

from daq_agent.cli import main

sys.exit(main())
