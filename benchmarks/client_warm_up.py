"""A Flower client's first round in a fresh worker process against its second: blocked time with and
without the background warm-up (joining the writer pool, connecting to this node's writers, making
staging segments ready and paying the first save's and load's one-time costs while it trains).

    .venv/bin/python benchmarks/client_warm_up.py [--repeats 6]

Each run is a new Ray actor (a fresh process, as Flower's ClientApp actors are) that runs two rounds
of one client: each builds ``ClientCheckpoints``, restores, "trains" for 0.5 s, and saves the
pre-aggregation model (``.pt``), its state and the post-aggregation model; the driver created the
pool first, as a ServerApp does. With and without the warm-up, interleaved (the order alternates);
medians, and the first round as a multiple of the second.
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
    def two_rounds(self, directory: str, warm_up: bool) -> tuple[float, float]:
        """Blocked seconds of a client's first round in this process, and of its second."""
        sys.path.insert(0, EXAMPLE)
        from fedckpt import LatestTorchModuleCheckpointer
        from fedckpt.flower import ClientCheckpoints
        from fedckpt.runtime import lifecycle

        import task

        if not warm_up:
            lifecycle.warm_up_in_background = lambda: None
        blocked = []
        for server_round in (1, 2):
            checkpoints = ClientCheckpoints(
                directory,
                pre_aggregation=[LatestTorchModuleCheckpointer(directory, "pre.pt")],
                post_aggregation=[LatestTorchModuleCheckpointer(directory, "post.pt")],
            )
            model = task.Net(256, 2)  # a new model every round, as a ClientApp builds
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            checkpoints.restore_state(server_round, optimizer)
            time.sleep(0.5)  # stands in for local training
            for parameter in model.parameters():
                parameter.grad = torch.randn_like(parameter)
            optimizer.step()
            checkpoints.after_local_training(model, 0.5, {}, server_round=server_round)
            checkpoints.save_state(server_round, optimizer, local_steps=server_round)
            checkpoints.after_receiving_global_model(model, 0.4, {}, server_round=server_round)
            blocked.append(checkpoints.blocked_seconds)
        return blocked[0], blocked[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args(argv)
    import fedckpt

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    fedckpt.init()  # the ServerApp's pool
    first: dict[bool, list[float]] = {True: [], False: []}
    second: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as root:
        for repeat in range(args.repeats):
            for warm_up in (True, False) if repeat % 2 == 0 else (False, True):
                process = FreshClientProcess.remote()
                directory = os.path.join(root, f"{repeat}-{warm_up}")
                rounds = ray.get(process.two_rounds.remote(directory, warm_up))
                first[warm_up].append(rounds[0])
                second[warm_up].append(rounds[1])
                ray.kill(process)
                print(f"[{repeat + 1}/{args.repeats}] warm-up {'on' if warm_up else 'off'}: first round "
                      f"{rounds[0] * 1000:.1f} ms, second {rounds[1] * 1000:.1f} ms", file=sys.stderr)  # fmt: skip
        fedckpt.flush()
    for warm_up in (True, False):
        one, two = statistics.median(first[warm_up]), statistics.median(second[warm_up])
        print(f"warm-up {'on ' if warm_up else 'off'}: first round {one * 1000:.1f} ms, second {two * 1000:.1f} ms, "
              f"first/second {one / two:.2f}x (medians of {args.repeats})")  # fmt: skip
    fedckpt.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
