"""GPU saves: fedckpt (both modes) beside the pinned-copy floor, torch.save and dcp.async_save, on a GPU.

    python benchmarks/gpu.py --out results/gpu                  # every case (a few minutes on an H200)
    python benchmarks/gpu.py --out results/gpu --cases fp32-256mb --repeats 3

The same as ``fedckpt bench --device cuda --out DIR``; what is measured, and the targets evaluated, are
in ``fedckpt.bench.gpu``'s docstring and benchmarks/README.md ("GPU saves"). Writes ``gpu.json`` and
``gpu.txt`` under ``--out``. Without a CUDA device it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported: loopback


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for gpu.json and gpu.txt")
    parser.add_argument("--cases", nargs="+", metavar="NAME", help="fp32-256mb fp32-2gb bf16-512mb-loop (default: all)")
    parser.add_argument("--repeats", type=int, help="saves (loops) per method; default: each case's own")
    parser.add_argument("--dir", help="where the checkpoints are written (default: the system temp dir)")
    parser.add_argument(
        "--budget-seconds", type=float, default=240.0, help="past it, cases stop repeating (default 240)"
    )
    args = parser.parse_args(argv)
    from fedckpt.bench.gpu import CudaUnavailable, run_gpu_bench

    try:
        run_gpu_bench(args.out, args.cases, args.repeats, args.dir, args.budget_seconds)
    except CudaUnavailable as error:
        print(f"benchmarks/gpu.py: {error}; run it on a machine with a GPU", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
