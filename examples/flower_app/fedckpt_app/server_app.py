"""The ServerApp: FedAvg with the global model checkpointed after every round, and a run that
resumes after its last durable round when started again on the same ``checkpoint-dir``."""

from __future__ import annotations

from logging import INFO

import torch
from flwr.app import ArrayRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedckpt import (
    BestLossTorchModuleCheckpointer,
    LatestTorchModuleCheckpointer,
    PerRoundStateCheckpointer,
    ServerCheckpointAndStateModule,
)
from fedckpt.flower import ServerCheckpoints, run_checkpoint_dir

from fedckpt_app import task

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` rounds in all: a resumed run runs only those not yet done."""
    root = run_checkpoint_dir(context)
    server_dir = f"{root}/server"
    torch.manual_seed(0)  # the same initial model in every run: a resumed run replaces it by its own
    model = task.make_model(int(context.run_config["model-width"]))
    initial = ArrayRecord(model.state_dict())
    module = ServerCheckpointAndStateModule(
        model=model,
        model_checkpointers=[
            LatestTorchModuleCheckpointer(server_dir, "global_latest.pt"),
            BestLossTorchModuleCheckpointer(server_dir, "global_best.pt"),  # by the clients' eval_loss
        ],
        state_checkpointer=PerRoundStateCheckpointer(server_dir),
    )
    rounds = int(context.run_config["num-server-rounds"])
    checkpoints = ServerCheckpoints(module)
    checkpoints.start(FedAvg(), grid, initial, rounds)
    earlier = checkpoints.resumed_from_round  # rounds an earlier run on this directory had done
    ran = f"rounds {earlier + 1}-{rounds}" if earlier < rounds else "no round (raise num-server-rounds for more)"
    log(INFO, f"fedckpt: ran {ran}, after {earlier} done before; checkpoints in {root}")
