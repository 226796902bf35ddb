"""Load test: many simulated clients, each saving a pre-, a post-aggregation and a state checkpoint
per round, from several Ray worker processes at once.

Checks what must hold under load: every final checkpoint is the newest one its client issued, no
process holds more snapshot bytes in flight than its budget, and the writer pool stays the same
size whatever the number of clients. Reports saves per second and peak memory.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import ray
import ray.cloudpickle
import torch

# This module lives beside the tests, not in an installed package: Ray workers get its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

WIDTH = 16  # a Linear(16, 16): the load is in the number of saves, not in bytes


@dataclass
class StressResult:
    clients: int
    rounds: int
    workers: int
    saves: int
    seconds: float
    saves_per_second: float
    wrong_checkpoints: int
    peak_inflight_bytes: int
    inflight_budget_bytes: int
    peak_worker_rss_bytes: int
    peak_object_store_bytes: int  # Ray's plasma use, sampled while the load ran
    writers: int
    writer_counts: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _client_dir(root: str, client: int) -> str:
    return os.path.join(root, f"client_{client:05d}")


def _model(client: int, server_round: int) -> torch.nn.Module:
    model = torch.nn.Linear(WIDTH, WIDTH)
    with torch.no_grad():
        model.weight.fill_(float(client))
        model.bias.fill_(float(server_round))
    return model


@ray.remote(num_cpus=0)
def _run_shard(root: str, clients: list[int], rounds: int, budget: int) -> dict[str, int]:
    """One worker process: every round, each of its clients saves pre, post and state."""
    import resource

    import fedckpt
    from fedckpt import (
        CheckpointMode,
        ClientCheckpointAndStateModule,
        LatestTorchModuleCheckpointer,
        PerRoundStateCheckpointer,
    )
    from fedckpt.runtime import lifecycle

    fedckpt.init(max_inflight_bytes=budget)
    peak = 0
    for server_round in range(rounds):
        for client in clients:
            directory = _client_dir(root, client)
            module = ClientCheckpointAndStateModule(
                pre_aggregation=LatestTorchModuleCheckpointer(directory, "pre.safetensors"),
                post_aggregation=LatestTorchModuleCheckpointer(directory, "post.safetensors"),
                state_checkpointer=PerRoundStateCheckpointer(directory),
            )
            model = _model(client, server_round)
            module.maybe_checkpoint(model, 0.0, {}, CheckpointMode.PRE_AGGREGATION)
            module.save_state("state.pt", {"client": client, "round": server_round, "steps": torch.arange(4)})
            module.maybe_checkpoint(model, 0.0, {}, CheckpointMode.POST_AGGREGATION)
            peak = max(peak, lifecycle.coordinator().inflight_bytes())
    lifecycle.coordinator().flush()
    return {"peak_inflight": peak, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


class _ObjectStoreSampler(threading.Thread):
    """Samples the cluster's object-store (plasma) use every ``period`` seconds; keeps the peak."""

    def __init__(self, period: float = 0.5) -> None:
        super().__init__(daemon=True, name="fedckpt-object-store-sampler")
        self.period = period
        self.stop = threading.Event()
        self.peak_bytes = 0

    def run(self) -> None:
        from ray._private.internal_api import memory_summary  # Ray's own `ray memory --stats-only`

        address = ray.get_runtime_context().gcs_address
        while not self.stop.is_set():
            summary = memory_summary(address=address, stats_only=True)
            used = re.search(r"Plasma memory usage (\d+) MiB", summary)
            if used:
                self.peak_bytes = max(self.peak_bytes, int(used.group(1)) << 20)
            self.stop.wait(self.period)


def run_stress(root: str, clients: int, rounds: int, workers: int, budget: int = 64 << 20) -> StressResult:
    """Run the load on the current Ray instance; checkpoints go under ``root``."""
    from fedckpt.runtime import lifecycle
    from fedckpt.storage.reading import read_state, read_state_dict

    lifecycle.coordinator().start_writers()

    def writer_counts() -> dict[str, int]:
        stats = lifecycle.coordinator().writer_stats()
        return {key: sum(getattr(s, key) for s in stats) for key in ("saved", "superseded", "failed", "abandoned")}

    shards = [list(range(start, clients, workers)) for start in range(workers)]
    before = writer_counts()  # the pool may have served others before: count this run's saves only
    sampler = _ObjectStoreSampler()
    sampler.start()
    started = time.perf_counter()
    try:
        reports = ray.get([_run_shard.remote(root, shard, rounds, budget) for shard in shards if shard])
    finally:
        seconds = time.perf_counter() - started
        sampler.stop.set()
        sampler.join()
    wrong = 0
    last = rounds - 1
    for client in range(clients):
        directory = _client_dir(root, client)
        for name in ("pre.safetensors", "post.safetensors"):
            tensors = read_state_dict(os.path.join(directory, name))
            if float(tensors["weight"][0, 0]) != client or float(tensors["bias"][0]) != last:
                wrong += 1
        state = read_state(os.path.join(directory, "state.pt"))
        if state["client"] != client or state["round"] != last:
            wrong += 1
    after = writer_counts()
    counts = {key: after[key] - before[key] for key in after}
    saves = clients * rounds * 3
    return StressResult(
        clients=clients,
        rounds=rounds,
        workers=workers,
        saves=saves,
        seconds=round(seconds, 2),
        saves_per_second=round(saves / seconds, 1),
        wrong_checkpoints=wrong,
        peak_inflight_bytes=max(report["peak_inflight"] for report in reports),
        inflight_budget_bytes=budget,
        peak_worker_rss_bytes=max(report["rss"] for report in reports),
        peak_object_store_bytes=sampler.peak_bytes,
        writers=len(lifecycle.coordinator().writer_stats()),
        writer_counts=counts,
    )
