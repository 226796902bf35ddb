"""The example's ServerApp: FedAvg over the clients, with the server's checkpoints, state and resume."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

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
from fedckpt.retention import LatestN

import task

# Client metrics that add up over clients instead of being averaged (and those starting with BLOCKED_PREFIX).
TOTALS = ("fedckpt-blocked-s", "local-train-s", "checkpoint-bytes", "checkpoint-saves")
BLOCKED_PREFIX = "fedckpt-blocked-"  # + an activity (restore, save_state, ...) + "-s": its share of the total


@dataclass
class Options:
    """The run's training settings (the checkpoint directory is in the run config: ``checkpoint-dir``)."""

    num_clients: int
    num_rounds: int
    seed: int = 0
    model: str = "mlp"  # or "cnn" (task.MODELS)
    model_format: str = "pt"  # the clients' model files: "pt" (torch.save's format) or "safetensors"
    width: int = 256
    depth: int = 2
    local_steps: int = 5
    batch_size: int = 32
    lr: float = 0.05
    simulated_accelerator_ms: float = 0.0  # > 0: SIMULATED accelerator-bound clients (see task.train)
    # > 0: each client holds this share of a GPU (Ray's num_gpus; 0.25: four clients per GPU) and trains there
    num_gpus_per_client: float = 0.0
    keep_rounds: int = 0  # > 0: keep this many newest rounds of every checkpoint (LatestN), and resume from any
    resume_round: int | None = None  # with keep_rounds: restart from this complete round (0: the newest complete)


@dataclass
class Outcome:
    """What a run did, filled in by the ServerApp for ``run.py``'s summary."""

    result: Result | None = None
    resumed_from_round: int = 0
    server_blocked_seconds: float = 0.0
    server_blocked_by_activity: dict[str, float] = field(default_factory=dict)
    server_checkpoint_bytes: int = 0
    checkpoints_written: int = 0
    bytes_written: int | None = None  # by fedckpt's writers (None for the baselines)
    bytes_linked: int | None = None


def aggregate(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """FedAvg's weighted average, except for the totals, which are summed over clients."""
    aggregated = aggregate_metricrecords(records, weighting_key)
    replies = [next(iter(record.metric_records.values())) for record in records]
    blocked = {key for reply in replies for key in reply if key.startswith(BLOCKED_PREFIX)}
    for key in (*TOTALS, *sorted(blocked)):
        if any(key in reply for reply in replies):
            aggregated[key] = sum(float(reply[key]) for reply in replies if key in reply)
    return aggregated


def fedavg(options: Options) -> FedAvg:
    """FedAvg over every client, every round."""
    return FedAvg(
        min_train_nodes=options.num_clients,
        min_evaluate_nodes=options.num_clients,
        min_available_nodes=options.num_clients,
        train_metrics_aggr_fn=aggregate,
        evaluate_metrics_aggr_fn=aggregate,
    )


def initial_arrays(options: Options) -> ArrayRecord:
    """The first global model, the same for every run with this seed."""
    torch.manual_seed(options.seed)
    return ArrayRecord(task.build(options.model, options.width, options.depth).state_dict())


def round_config(options: Options) -> ConfigRecord:
    """What the clients need to train and evaluate, sent with every round."""
    return ConfigRecord(
        {
            "seed": options.seed,
            "model": options.model,
            "width": options.width,
            "depth": options.depth,
            "local-steps": options.local_steps,
            "batch-size": options.batch_size,
            "lr": options.lr,
            "simulated-accelerator-ms": options.simulated_accelerator_ms,
            "device": "cuda" if options.num_gpus_per_client > 0 else "cpu",
            "keep-rounds": options.keep_rounds,
            "model-format": options.model_format,
        }
    )


def make_server_app(options: Options, outcome: Outcome) -> ServerApp:
    """A ServerApp for ``options`` that records what happened in ``outcome``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        initial = initial_arrays(options)
        root = str(context.run_config["checkpoint-dir"])
        server_dir = os.path.join(root, "server")
        keep = LatestN(options.keep_rounds) if options.keep_rounds else None
        module = ServerCheckpointAndStateModule(
            model=task.build(options.model, options.width, options.depth),
            model_checkpointers=[
                LatestTorchModuleCheckpointer(server_dir, "global_latest.safetensors", keep=keep),
                BestLossTorchModuleCheckpointer(server_dir, "global_best.safetensors"),
            ],
            state_checkpointer=PerRoundStateCheckpointer(server_dir, keep=keep),
        )
        clients_dir = os.path.join(root, "clients") if keep is not None else None
        checkpoints = ServerCheckpoints(module, state_name="server_state.pt", loss_key="loss", clients_dir=clients_dir)
        if options.resume_round is not None:
            checkpoints.resume(round=options.resume_round or None)
        config = round_config(options)
        outcome.result = checkpoints.start(
            fedavg(options), grid, initial, options.num_rounds, train_config=config, evaluate_config=config
        )
        outcome.resumed_from_round = checkpoints.resumed_from_round
        outcome.server_blocked_seconds = checkpoints.blocked_seconds
        outcome.server_blocked_by_activity = dict(checkpoints.blocked.by_activity)
        outcome.checkpoints_written = checkpoints.saves_written
        outcome.bytes_written, outcome.bytes_linked = checkpoints.bytes_written, checkpoints.bytes_linked
        rounds_run = options.num_rounds - checkpoints.resumed_from_round
        outcome.server_checkpoint_bytes = 2 * task.model_bytes(module.model) * rounds_run  # latest + state

    return app
