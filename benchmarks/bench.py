"""The side-by-side save benchmark as a script: the same runner as ``fedckpt bench``, same options.

Run:  .venv/bin/python benchmarks/bench.py [--cases NAME ...] [--repeats N] [--dir DIR] [--json FILE] [--quick]
"""

from __future__ import annotations

import os
import sys

# Before Ray is imported (fedckpt imports it): keep Ray on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from fedckpt.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
