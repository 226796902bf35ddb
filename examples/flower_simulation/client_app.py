"""The example's ClientApp (Flower Message API): local training with checkpoints and per-round state.

Everything a round needs comes in the message's config (checkpoint directory and mode, model
shape, local steps), so the app holds nothing between rounds; its state comes back from fedckpt.
"""

from __future__ import annotations

import os
import time

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedckpt.flower import client_checkpoint_dir

import task
from checkpointing import client_checkpoints

app = ClientApp()


def _setup(msg: Message, context: Context):
    config = msg.content["config"]
    model = task.Net(int(config["width"]), int(config["depth"]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    partition = int(context.node_config["partition-id"])
    train_data, val_data = task.split(task.client_data(partition, int(config["seed"])))
    directory = client_checkpoint_dir(os.path.join(str(config["checkpoint-dir"]), "clients"), context)
    return config, model, train_data, val_data, client_checkpoints(str(config["checkpointing"]), directory, context)


def _checkpointed(config, saves: int, nbytes: int) -> dict[str, int]:
    """What this call checkpointed (for the run's summary and its synchronous-save estimate)."""
    if config["checkpointing"] == "none":
        saves = nbytes = 0
    return {"checkpoint-saves": saves, "checkpoint-bytes": nbytes}


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local SGD steps from the global model, with the optimizer state carried over from earlier rounds."""
    config, model, train_data, val_data, checkpoints = _setup(msg, context)
    server_round = int(config["server-round"])
    optimizer = torch.optim.SGD(model.parameters(), lr=float(config["lr"]), momentum=0.9)
    restored = checkpoints.restore_state(server_round, optimizer)
    steps_before = int(restored["local_steps"]) if restored else 0
    started = time.perf_counter()
    train_loss = task.train(
        model, optimizer, train_data, int(config["local-steps"]), int(config["batch-size"]),
        float(config["simulated-accelerator-ms"]) / 1000,
    )  # fmt: skip
    train_seconds = time.perf_counter() - started
    val_loss, val_accuracy = task.evaluate(model, val_data)
    checkpoints.after_local_training(model, val_loss, {"val - prediction - accuracy": val_accuracy})
    checkpoints.save_state(server_round, optimizer, local_steps=steps_before + int(config["local-steps"]))
    optimizer_bytes = sum(
        value.nbytes for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)
    )
    metrics = {
        "train-loss": train_loss,
        "val-loss": val_loss,
        "local-steps-total": steps_before + int(config["local-steps"]),
        "num-examples": len(train_data[1]),
        "fedckpt-blocked-s": checkpoints.blocked_seconds,
        "local-train-s": train_seconds,
        **_checkpointed(config, saves=2, nbytes=task.model_bytes(model) + optimizer_bytes),
    }
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on local validation data; post-aggregation checkpoint of it."""
    config, model, _, val_data, checkpoints = _setup(msg, context)
    loss, accuracy = task.evaluate(model, val_data)
    checkpoints.after_receiving_global_model(model, loss, {"val - prediction - accuracy": accuracy})
    metrics = {
        "loss": loss,
        "accuracy": accuracy,
        "num-examples": len(val_data[1]),
        "fedckpt-blocked-s": checkpoints.blocked_seconds,
        **_checkpointed(config, saves=1, nbytes=task.model_bytes(model)),
    }
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
