"""A Flower client's first round in a fresh worker process: blocked time with and without the
background warm-up (joining the writer pool and connecting to this node's writers while it trains).

    .venv/bin/python benchmarks/client_warm_up.py [--repeats 6]

Each run is a new Ray actor (a fresh process, as Flower's ClientApp actors are) that builds
``ClientCheckpoints``, restores, "trains" for 0.5 s, and saves the pre-aggregation model, its state
and the post-aggregation model; the driver created the pool first, as a ServerApp does. With and
without the warm-up, interleaved (the order alternates); medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_ADDRESS", "local")

import ray  # noqa: E402
import torch  # noqa: E402

EXAMPLE = str(Path(__file__).resolve().parent.parent / "examples" / "flower_simulation")


@ray.remote(num_cpus=1)
class FreshClientProcess:
    def first_round(self, directory: str, warm_up: bool) -> float:
        """Blocked seconds of one client's first round in this process."""
        sys.path.insert(0, EXAMPLE)
        from fedckpt import LatestTorchModuleCheckpointer
        from fedckpt.flower import ClientCheckpoints
        from fedckpt.runtime import lifecycle

        import task

        if not warm_up:
            lifecycle.warm_up_in_background = lambda: None
        checkpoints = ClientCheckpoints(
            directory,
            pre_aggregation=[LatestTorchModuleCheckpointer(directory, "pre.safetensors")],
            post_aggregation=[LatestTorchModuleCheckpointer(directory, "post.safetensors")],
        )
        model = task.Net(256, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        checkpoints.restore_state(1, optimizer)
        time.sleep(0.5)  # stands in for local training
        for parameter in model.parameters():
            parameter.grad = torch.randn_like(parameter)
        optimizer.step()
        checkpoints.after_local_training(model, 0.5, {})
        checkpoints.save_state(1, optimizer, local_steps=1)
        checkpoints.after_receiving_global_model(model, 0.4, {})
        return checkpoints.blocked_seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args(argv)
    import fedckpt

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    fedckpt.init()  # the ServerApp's pool
    blocked: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as root:
        for repeat in range(args.repeats):
            for warm_up in (True, False) if repeat % 2 == 0 else (False, True):
                process = FreshClientProcess.remote()
                directory = os.path.join(root, f"{repeat}-{warm_up}")
                blocked[warm_up].append(ray.get(process.first_round.remote(directory, warm_up)))
                ray.kill(process)
                print(f"[{repeat + 1}/{args.repeats}] warm-up {'on' if warm_up else 'off'}: "
                      f"{blocked[warm_up][-1] * 1000:.1f} ms", file=sys.stderr)  # fmt: skip
        fedckpt.flush()
    on, off = statistics.median(blocked[True]), statistics.median(blocked[False])
    print(f"first client round, blocked (median of {args.repeats}): warm-up on {on * 1000:.1f} ms, "
          f"off {off * 1000:.1f} ms, on/off {on / off:.2f}x")  # fmt: skip
    fedckpt.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
