"""The ClientApp: local training from the global model, with fedckpt checkpoints and the optimizer's
state carried from round to round.

A ClientApp keeps nothing between rounds, and each round may run in another worker, so the
checkpoints are opened in every handler: the state saved last round comes back from fedckpt.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedckpt import BestLossTorchModuleCheckpointer, LatestTorchModuleCheckpointer
from fedckpt.flower import ClientCheckpoints, client_checkpoint_dir, run_checkpoint_dir

from fedckpt_app import task

app = ClientApp()


def open_checkpoints(context: Context) -> ClientCheckpoints:
    """This client's checkpoints, under ``<checkpoint-dir>/clients/client_<partition-id>``: the best
    locally trained model (by validation loss), the latest global model it received, and its state."""
    directory = client_checkpoint_dir(f"{run_checkpoint_dir(context)}/clients", context)
    return ClientCheckpoints(
        directory,
        pre_aggregation=BestLossTorchModuleCheckpointer(directory, "pre_aggregation_best.pt"),
        post_aggregation=LatestTorchModuleCheckpointer(directory, "post_aggregation_latest.pt"),
    )


def received_model(msg: Message, context: Context, device: torch.device) -> torch.nn.Module:
    """The global model from the server's message, on ``device``."""
    model = task.make_model(int(context.run_config["model-width"]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model.to(device)


def local_data(context: Context, device: torch.device) -> tuple[tuple, tuple]:
    train_data, val_data = task.load_data(int(context.node_config["partition-id"]))
    return tuple(t.to(device) for t in train_data), tuple(t.to(device) for t in val_data)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local SGD with momentum restored from the previous round; checkpoints after training."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    server_round = int(msg.content["config"]["server-round"])
    checkpoints = open_checkpoints(context)
    model = received_model(msg, context, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=float(context.run_config["lr"]), momentum=0.9)
    checkpoints.restore_state(server_round, optimizer)  # None in the first round: nothing to restore
    train_data, val_data = local_data(context, device)
    train_loss = task.train(
        model, optimizer, train_data, int(context.run_config["local-steps"]), int(context.run_config["batch-size"])
    )
    val_loss, val_accuracy = task.evaluate(model, val_data)
    checkpoints.after_local_training(model, val_loss, {"val_accuracy": val_accuracy}, server_round=server_round)
    checkpoints.save_state(server_round, optimizer)  # returns after a copy; written in the background
    metrics = MetricRecord({"train_loss": train_loss, "num-examples": len(train_data[1])})
    arrays = ArrayRecord(model.state_dict())
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The global model's loss and accuracy on local validation data; its post-aggregation checkpoint."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    server_round = int(msg.content["config"]["server-round"])
    checkpoints = open_checkpoints(context)
    model = received_model(msg, context, device)
    _, val_data = local_data(context, device)
    loss, accuracy = task.evaluate(model, val_data)
    checkpoints.after_receiving_global_model(model, loss, {"eval_acc": accuracy}, server_round=server_round)
    metrics = MetricRecord({"eval_loss": loss, "eval_acc": accuracy, "num-examples": len(val_data[1])})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
