"""A Flower client's first round in a fresh worker process against a later one (its third): blocked
time with and without the background warm-up (joining the writer pool, connecting to this node's
writers, making staging segments ready and paying the first save's and load's one-time costs while
it trains).

    .venv/bin/python benchmarks/client_warm_up.py [--repeats 6]

Each run is a new Ray actor (a fresh process, as Flower's ClientApp actors are) that runs three
rounds of one client (the second makes the state's cached template, see
``fedckpt.storage.formats.torch_records``; the third is a round as every later one). Each round
builds ``ClientCheckpoints``, restores, "trains" for 0.5 s, and saves the pre-aggregation model
(``.pt``), its state and the post-aggregation model, then waits 0.2 s (the server's aggregation);
the driver created the pool first, as a ServerApp does. With and without the warm-up, interleaved
(the order alternates); medians, and the first round as a multiple of the third.
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
    def rounds(self, directory: str, warm_up: bool) -> list[dict[str, float]]:
        """Blocked seconds of a client's first three rounds in this process, by activity."""
        sys.path.insert(0, EXAMPLE)
        from fedckpt import LatestTorchModuleCheckpointer
        from fedckpt.flower import ClientCheckpoints
        from fedckpt.runtime import lifecycle

        import task

        if not warm_up:
            lifecycle.warm_up_in_background = lambda: None
        blocked = []
        for server_round in (1, 2, 3):
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
            blocked.append(dict(checkpoints.blocked.by_activity))
            time.sleep(0.2)  # the server aggregates and the other clients run before the next round
        return blocked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args(argv)
    import fedckpt

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    fedckpt.init()  # the ServerApp's pool
    rounds: dict[bool, list[list[dict[str, float]]]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as root:
        for repeat in range(args.repeats):
            for warm_up in (True, False) if repeat % 2 == 0 else (False, True):
                process = FreshClientProcess.remote()
                directory = os.path.join(root, f"{repeat}-{warm_up}")
                rounds[warm_up].append(ray.get(process.rounds.remote(directory, warm_up)))
                ray.kill(process)
                first, _, later = (sum(blocked.values()) * 1000 for blocked in rounds[warm_up][-1])
                print(f"[{repeat + 1}/{args.repeats}] warm-up {'on' if warm_up else 'off'}: first round "
                      f"{first:.1f} ms, third {later:.1f} ms", file=sys.stderr)  # fmt: skip
        fedckpt.flush()
    for warm_up in (True, False):
        one, two = (statistics.median(sum(run[index].values()) for run in rounds[warm_up]) for index in (0, 2))
        activities = sorted(rounds[warm_up][0][0])
        split = ", ".join(
            f"{activity} {statistics.median(run[0].get(activity, 0) for run in rounds[warm_up]) * 1000:.2f}/"
            f"{statistics.median(run[2].get(activity, 0) for run in rounds[warm_up]) * 1000:.2f}"
            for activity in activities
        )
        print(f"warm-up {'on ' if warm_up else 'off'}: first round {one * 1000:.1f} ms, third {two * 1000:.1f} ms, "
              f"first/third {one / two:.2f}x (medians of {args.repeats}); ms first/third: {split}")  # fmt: skip
    fedckpt.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
