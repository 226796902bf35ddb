"""The ServerApp: FedAvg with the global model checkpointed after every round, and a run that
resumes after its last durable round when started again on the same ``checkpoint-dir``."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedckpt import (
    BestLossTorchModuleCheckpointer,
    LatestTorchModuleCheckpointer,
    PerRoundStateCheckpointer,
    ServerCheckpointAndStateModule,
)
from fedckpt.flower import ServerCheckpoints, run_checkpoint_dir

from fedckpt_app import task
from fedckpt_app.client_app import checkpointing
from fedckpt_app.sync_checkpoints import SyncServerSaves

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` rounds in all: a resumed run runs only those not yet done."""
    started = time.perf_counter()
    root = run_checkpoint_dir(context)
    server_dir = f"{root}/server"
    torch.manual_seed(0)  # the same initial model in every run: a resumed run replaces it by its own
    model = task.make_model(int(context.run_config["model-width"]))
    initial = ArrayRecord(model.state_dict())
    rounds = int(context.run_config["num-server-rounds"])
    strategy = FedAvg(train_metrics_aggr_fn=add_up_client_figures, evaluate_metrics_aggr_fn=add_up_client_figures)
    if checkpointing(context) == "sync":
        saves = SyncServerSaves(server_dir, model)
        result = strategy.start(grid, initial, rounds, evaluate_fn=saves)
        server = ServerFigures(0, saves.blocked.seconds, dict(saves.blocked.by_activity), saves.saves)
    else:
        module = ServerCheckpointAndStateModule(
            model=model,
            model_checkpointers=[
                LatestTorchModuleCheckpointer(server_dir, "global_latest.pt"),
                BestLossTorchModuleCheckpointer(server_dir, "global_best.pt"),  # by the clients' eval_loss
            ],
            state_checkpointer=PerRoundStateCheckpointer(server_dir),
        )
        checkpoints = ServerCheckpoints(module)
        result = checkpoints.start(strategy, grid, initial, rounds)
        earlier = checkpoints.resumed_from_round  # rounds an earlier run on this directory had done
        ran = f"rounds {earlier + 1}-{rounds}" if earlier < rounds else "no round (raise num-server-rounds for more)"
        log(INFO, f"fedckpt: ran {ran}, after {earlier} done before; checkpoints in {root}")
        server = ServerFigures(earlier, checkpoints.blocked_seconds, dict(checkpoints.blocked.by_activity),
                            checkpoints.saves_written)  # fmt: skip
    if context.run_config.get("summary-file"):
        summary = run_summary(context, result, server, time.perf_counter() - started, model_bytes(model))
        with open(str(context.run_config["summary-file"]), "w") as out:
            json.dump(summary, out)


def add_up_client_figures(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """FedAvg's weighted average of the clients' metrics, except the figures of their checkpoints
    (blocked times, saves), which add up; ``clients`` counts the replies."""
    aggregated = aggregate_metricrecords(records, weighting_key)
    replies = [metrics for record in records for metrics in record.metric_records.values()]
    for key in {key for reply in replies for key in reply if key.startswith(("blocked-", "checkpoint-saves"))}:
        aggregated[key] = sum(float(reply.get(key, 0.0)) for reply in replies)
    aggregated["clients"] = len(replies)
    return aggregated


@dataclass(frozen=True)
class ServerFigures:
    """What the server's checkpoints did in this run: the round it resumed after, the time it waited
    on them (in all and by call), and the checkpoints written (fedckpt's: by every client too)."""

    resumed_from: int
    blocked: float
    blocked_by_activity: dict[str, float]
    saves: int


def model_bytes(model: torch.nn.Module) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())


def run_summary(
    context: Context, result: Result, server: ServerFigures, wall: float, model_bytes: int
) -> dict[str, Any]:
    """The run's figures, for ``summary-file``: the time the clients and the server waited on their
    checkpoints (in all and by call), the ServerApp's wall time, and what the run was."""
    this_run = [r for r in result.train_metrics_clientapp if r > server.resumed_from]
    histories = (result.train_metrics_clientapp, result.evaluate_metrics_clientapp)

    def clients_total(key: str) -> float:
        return sum(float(history[r].get(key, 0.0)) for history in histories for r in this_run if r in history)

    activities = sorted({key for history in histories for metrics in history.values() for key in metrics
                         if key.startswith("blocked-") and key != "blocked-s"})  # fmt: skip
    by_activity = {f"client {key[len('blocked-') : -len('-s')]}": clients_total(key) for key in activities}
    by_activity.update({f"server {activity}": seconds for activity, seconds in server.blocked_by_activity.items()})
    return {
        "checkpointing": checkpointing(context),
        "rounds_completed": max(this_run, default=server.resumed_from),
        "resumed_from_round": server.resumed_from,
        "blocked_seconds": round(clients_total("blocked-s") + server.blocked, 4),
        "blocked_by_activity": {name: round(seconds, 4) for name, seconds in sorted(by_activity.items())},
        "wall_seconds": round(wall, 3),
        "num_clients": max(
            (int(metrics.get("clients", 0)) for metrics in result.train_metrics_clientapp.values()), default=0
        ),
        "num_rounds": int(context.run_config["num-server-rounds"]),
        "model_bytes": model_bytes,
        "checkpoints_written": server.saves + int(clients_total("checkpoint-saves")),
        "checkpoint_dir": run_checkpoint_dir(context),
    }
