"""The ClientApp: local training from the global model, with fedckpt checkpoints and the optimizer's
state carried from round to round.

A ClientApp keeps nothing between rounds, and each round may run in another worker, so the
checkpoints are opened in every handler: the state saved last round comes back from fedckpt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedckpt import BestLossTorchModuleCheckpointer, LatestTorchModuleCheckpointer
from fedckpt.flower import ClientCheckpoints, client_checkpoint_dir, run_checkpoint_dir

from fedckpt_app import task
from fedckpt_app.sync_checkpoints import SyncClientCheckpoints

app = ClientApp()
CHECKPOINTING = ("fedckpt", "sync")  # the run config's checkpointing: fedckpt, or compare.py's baseline


def open_checkpoints(context: Context) -> ClientCheckpoints | SyncClientCheckpoints:
    """This client's checkpoints, under ``<checkpoint-dir>/clients/client_<partition-id>``: the best
    locally trained model (by validation loss), the latest global model it received, and its state."""
    directory = client_checkpoint_dir(f"{run_checkpoint_dir(context)}/clients", context)
    if checkpointing(context) == "sync":
        return SyncClientCheckpoints(directory)
    return ClientCheckpoints(
        directory,
        pre_aggregation=BestLossTorchModuleCheckpointer(directory, "pre_aggregation_best.pt"),
        post_aggregation=LatestTorchModuleCheckpointer(directory, "post_aggregation_latest.pt"),
    )


def checkpointing(context: Context) -> str:
    """The run config's ``checkpointing``: a ValueError names any other value."""
    mode = str(context.run_config.get("checkpointing", "fedckpt"))
    if mode not in CHECKPOINTING:
        raise ValueError(f"checkpointing={mode!r} in the run config: expected one of {CHECKPOINTING}")
    return mode


# The calls either kind of checkpoints measures its blocked time in.
ACTIVITIES = ("restore", "pre_aggregation", "post_aggregation", "save_state", "flush", "end_of_round")


def blocked_metrics(checkpoints: ClientCheckpoints | SyncClientCheckpoints) -> dict[str, float]:
    """The time this handler waited on its checkpoints, in all and by call (``restore``, ``save_state``,
    ...), as metrics the ServerApp adds up over clients (``compare.py`` reports them)."""
    # Every reply carries the same keys (Flower aggregates only equal MetricRecords), zero where unused.
    measured = {**dict.fromkeys(ACTIVITIES, 0.0), **checkpoints.blocked.by_activity}
    by_activity = {f"blocked-{activity}-s": seconds for activity, seconds in measured.items()}
    # fedckpt's writers count the checkpoints they write; the baseline's clients count their own.
    saves = {"checkpoint-saves": checkpoints.saves} if isinstance(checkpoints, SyncClientCheckpoints) else {}
    return {"blocked-s": checkpoints.blocked.seconds, **by_activity, **saves}


@dataclass
class RoundInputs:
    """What a handler starts from: the round, this client's checkpoints, the global model and the data."""

    server_round: int
    checkpoints: ClientCheckpoints | SyncClientCheckpoints
    model: torch.nn.Module
    train_data: tuple[torch.Tensor, torch.Tensor]
    val_data: tuple[torch.Tensor, torch.Tensor]


def round_inputs(msg: Message, context: Context) -> RoundInputs:
    """The server's round and global model, and this partition's data, on the GPU the client was given
    (if any)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = task.make_model(int(context.run_config["model-width"]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    train_data, val_data = task.load_data(int(context.node_config["partition-id"]))
    return RoundInputs(
        server_round=int(msg.content["config"]["server-round"]),
        checkpoints=open_checkpoints(context),
        model=model.to(device),
        train_data=(train_data[0].to(device), train_data[1].to(device)),
        val_data=(val_data[0].to(device), val_data[1].to(device)),
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local SGD with momentum restored from the previous round; checkpoints after training."""
    inputs = round_inputs(msg, context)
    model, checkpoints = inputs.model, inputs.checkpoints
    optimizer = torch.optim.SGD(model.parameters(), lr=float(context.run_config["lr"]), momentum=0.9)
    checkpoints.restore_state(inputs.server_round, optimizer)  # None in the first round: nothing to restore
    steps, batch_size = int(context.run_config["local-steps"]), int(context.run_config["batch-size"])
    train_loss = task.train(model, optimizer, inputs.train_data, steps, batch_size)
    val_loss, val_accuracy = task.evaluate(model, inputs.val_data)
    checkpoints.after_local_training(model, val_loss, {"val_accuracy": val_accuracy}, server_round=inputs.server_round)
    checkpoints.save_state(inputs.server_round, optimizer)  # returns after a copy; written in the background
    metrics = MetricRecord(
        {"train_loss": train_loss, "num-examples": len(inputs.train_data[1]), **blocked_metrics(checkpoints)}
    )
    arrays = ArrayRecord({name: tensor.cpu() for name, tensor in model.state_dict().items()})
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The global model's loss and accuracy on local validation data; its post-aggregation checkpoint."""
    inputs = round_inputs(msg, context)
    loss, accuracy = task.evaluate(inputs.model, inputs.val_data)
    inputs.checkpoints.after_receiving_global_model(
        inputs.model, loss, {"eval_acc": accuracy}, server_round=inputs.server_round
    )
    metrics = MetricRecord(
        {"eval_loss": loss, "eval_acc": accuracy, "num-examples": len(inputs.val_data[1]),
         **blocked_metrics(inputs.checkpoints)}
    )  # fmt: skip
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
