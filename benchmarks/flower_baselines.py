"""The baselines of the Flower benchmarks: the example's run with FL4Health-style saves, or none.

    .venv/bin/python benchmarks/flower_baselines.py --checkpointing sync [options of the example's run.py]
    .venv/bin/python benchmarks/flower_baselines.py --checkpointing none --num-rounds 3

The same as ``examples/flower_simulation/run.py --checkpointing sync|none`` (the baselines live in
the example, ``baselines.py``, so that ``run.py --compare`` can measure them): the clients, the
training, the server and the JSON summary are the example's; only the checkpoints differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "flower_simulation"))
import run as example  # noqa: E402  (it keeps Ray on loopback, which must come before Ray's import)

MODES = ("sync", "none")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpointing", choices=MODES, required=True)
    args, run_options = parser.parse_known_args(argv)
    return example.main(["--checkpointing", args.checkpointing, *run_options])


if __name__ == "__main__":
    sys.exit(main())
