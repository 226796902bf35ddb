"""The README's main job with more repeats: fedckpt against FL4Health-style synchronous saves.

    .venv/bin/python benchmarks/main_job.py                  # medians of 5 runs of each (~4 min)
    .venv/bin/python benchmarks/main_job.py --repeats 9 --json main_job.json

Runs ``examples/flower_app/compare.py``: ``flwr run`` of the Flower App in ``examples/flower_app``
(10 clients, 5 rounds, the 305 KB MLP) with ``checkpointing="sync"`` and with fedckpt, interleaved
(the order reverses every repeat), each run with a fresh local Ray on 127.0.0.1. It prints the
medians of the blocked time (everything checkpointing made the clients and the server wait for,
restores included) and of the ServerApp's wall time, with fedckpt's as ratios of sync's;
``--json`` writes the summary with every run's figures.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "flower_app"))
import compare  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = compare.argument_parser()
    parser.description = __doc__
    parser.set_defaults(repeats=5)
    parser.add_argument("--json", default=None, help="write the summary, every run's figures included, here")
    args = parser.parse_args(argv)
    summary = compare.compare(args)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
