"""``python -m daq_agent.serialdefs``: print the JSON Schema of frame-definition files."""

from __future__ import annotations

import json
import sys

from daq_agent.serialdefs.schema import json_schema


def main() -> int:
    """Print the schema to stdout."""
    json.dump(json_schema(), sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
