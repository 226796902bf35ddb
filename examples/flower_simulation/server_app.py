"""The example's ServerApp: FedAvg over the clients, with the server's checkpoints, state and resume."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedckpt import (
    BestLossTorchModuleCheckpointer,
    LatestTorchModuleCheckpointer,
    PerRoundStateCheckpointer,
    ServerCheckpointAndStateModule,
)
from fedckpt.flower import ServerCheckpoints

import task

# Client metrics that add up over clients instead of being averaged.
TOTALS = ("fedckpt-blocked-s", "local-train-s", "checkpoint-bytes", "checkpoint-saves")


@dataclass
class Options:
    num_clients: int
    num_rounds: int
    checkpoint_dir: str
    checkpointing: str = "fedckpt"
    seed: int = 0
    width: int = 256
    depth: int = 2
    local_steps: int = 5
    batch_size: int = 32
    lr: float = 0.05
    simulated_accelerator_ms: float = 0.0  # > 0: SIMULATED accelerator-bound clients (see task.train)


@dataclass
class Outcome:
    """What a run did, filled in by the ServerApp for ``run.py``'s summary."""

    result: Result | None = None
    resumed_from_round: int = 0
    server_blocked_seconds: float = 0.0
    server_checkpoint_bytes: int = 0
    checkpoints_written: int = 0
    bytes_written: int | None = None  # by fedckpt's writers (None for the baselines)
    bytes_linked: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def aggregate(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """FedAvg's weighted average, except for the totals, which are summed over clients."""
    aggregated = aggregate_metricrecords(records, weighting_key)
    replies = [next(iter(record.metric_records.values())) for record in records]
    for key in TOTALS:
        if any(key in reply for reply in replies):
            aggregated[key] = sum(float(reply[key]) for reply in replies if key in reply)
    return aggregated


def make_server_app(options: Options, outcome: Outcome) -> ServerApp:
    """A ServerApp for ``options`` that records what happened in ``outcome``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(options.seed)
        initial = ArrayRecord(task.Net(options.width, options.depth).state_dict())
        config = ConfigRecord(
            {
                "checkpoint-dir": os.path.abspath(options.checkpoint_dir),
                "checkpointing": options.checkpointing,
                "seed": options.seed,
                "width": options.width,
                "depth": options.depth,
                "local-steps": options.local_steps,
                "batch-size": options.batch_size,
                "lr": options.lr,
                "simulated-accelerator-ms": options.simulated_accelerator_ms,
            }
        )
        strategy = FedAvg(
            min_train_nodes=options.num_clients,
            min_evaluate_nodes=options.num_clients,
            min_available_nodes=options.num_clients,
            train_metrics_aggr_fn=aggregate,
            evaluate_metrics_aggr_fn=aggregate,
        )
        server_dir = os.path.join(options.checkpoint_dir, "server")
        if options.checkpointing == "fedckpt":
            module = ServerCheckpointAndStateModule(
                model=task.Net(options.width, options.depth),
                model_checkpointers=[
                    LatestTorchModuleCheckpointer(server_dir, "global_latest.safetensors"),
                    BestLossTorchModuleCheckpointer(server_dir, "global_best.safetensors"),
                ],
                state_checkpointer=PerRoundStateCheckpointer(server_dir),
            )
            run = ServerCheckpoints(module, state_name="server_state.pt", loss_key="loss")
            outcome.result = run.start(
                strategy, grid, initial, options.num_rounds, train_config=config, evaluate_config=config
            )
            outcome.resumed_from_round = run.resumed_from_round
            outcome.server_blocked_seconds = run.blocked_seconds
            outcome.checkpoints_written = run.saves_written
            outcome.bytes_written, outcome.bytes_linked = run.bytes_written, run.bytes_linked
            rounds_run = options.num_rounds - run.resumed_from_round
            outcome.server_checkpoint_bytes = 2 * task.model_bytes(module.model) * rounds_run  # latest + state
        else:
            evaluate_fn = _sync_server_saves(options, server_dir, outcome) if options.checkpointing == "sync" else None
            outcome.result = strategy.start(
                grid, initial, options.num_rounds, train_config=config, evaluate_config=config, evaluate_fn=evaluate_fn
            )

    return app


def _sync_server_saves(options: Options, server_dir: str, outcome: Outcome):
    """FL4Health-style server saves: the global model and the server state, with ``torch.save``."""
    os.makedirs(server_dir, exist_ok=True)
    model = task.Net(options.width, options.depth)

    def save(server_round: int, arrays: ArrayRecord) -> None:
        if server_round == 0:
            return None
        start = time.perf_counter()
        state_dict = arrays.to_torch_state_dict()
        model.load_state_dict(state_dict)
        torch.save(model, os.path.join(server_dir, "global_latest.pt"))
        torch.save({"server_round": server_round, "arrays": state_dict}, os.path.join(server_dir, "server_state.pt"))
        outcome.server_blocked_seconds += time.perf_counter() - start
        outcome.checkpoints_written += 2
        return None

    return save
