"""The example's ClientApp (Flower Message API): local training with fedckpt checkpoints and per-round state.

The checkpoint directory is the run's (``context.run_config["checkpoint-dir"]``); the training
settings come with each round's message. The app holds nothing between rounds: its state comes
back from fedckpt, in whichever Ray worker runs the round.
"""

from __future__ import annotations

import os
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedckpt import LatestTorchModuleCheckpointer
from fedckpt.flower import ClientCheckpoints, client_checkpoint_dir
from fedckpt.retention import LatestN

import task

app = ClientApp()


def client_dir(context: Context) -> str:
    """This client's directory under the run's checkpoint directory."""
    return client_checkpoint_dir(os.path.join(str(context.run_config["checkpoint-dir"]), "clients"), context)


def client_checkpoints(context: Context, msg: Message) -> ClientCheckpoints:
    """This client's checkpoints: the model it trained, the global model it received, its state; with
    the run's ``keep-rounds`` (``run.py --keep-rounds``), the newest rounds of each are kept; the model
    files are named ``.pt`` or ``.safetensors`` as the run's ``model-format`` says."""
    directory = client_dir(context)
    config = msg.content["config"]
    keep_rounds = int(config.get("keep-rounds", 0))
    keep = LatestN(keep_rounds) if keep_rounds else None
    suffix = str(config.get("model-format", "pt"))  # run.py --model-format: .pt (FL4Health's habit) or .safetensors
    return ClientCheckpoints(
        directory,
        pre_aggregation=LatestTorchModuleCheckpointer(directory, f"pre_latest.{suffix}", keep=keep),
        post_aggregation=LatestTorchModuleCheckpointer(directory, f"post_latest.{suffix}", keep=keep),
        keep=keep,
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local SGD steps from the global model, with the optimizer state carried over from earlier rounds."""
    return train_round(msg, context, client_checkpoints(context, msg))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on local validation data; post-aggregation checkpoint of it."""
    return evaluate_round(msg, context, client_checkpoints(context, msg))


def train_round(msg: Message, context: Context, checkpoints: ClientCheckpoints) -> Message:
    """A round of local training and its checkpoints (``benchmarks/flower_baselines.py`` passes others)."""
    config = msg.content["config"]
    model = received_model(msg)
    train_data, val_data = local_data(context, config)
    server_round = int(config["server-round"])  # on a GPU (--num-gpus-per-client), model and data are there
    optimizer = torch.optim.SGD(model.parameters(), lr=float(config["lr"]), momentum=0.9)
    restored = checkpoints.restore_state(server_round, optimizer)
    local_steps = (int(restored["local_steps"]) if restored else 0) + int(config["local-steps"])
    started = time.perf_counter()
    train_loss = task.train(
        model, optimizer, train_data, int(config["local-steps"]), int(config["batch-size"]),
        float(config["simulated-accelerator-ms"]) / 1000,
    )  # fmt: skip
    train_seconds = time.perf_counter() - started
    val_loss, val_accuracy = task.evaluate(model, val_data)
    checkpoints.after_local_training(
        model, val_loss, {"val - prediction - accuracy": val_accuracy}, server_round=server_round
    )
    checkpoints.save_state(server_round, optimizer, local_steps=local_steps)
    optimizer_bytes = sum(
        value.nbytes for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)
    )
    metrics = {
        "train-loss": train_loss,
        "val-loss": val_loss,
        "local-steps-total": local_steps,
        "num-examples": len(train_data[1]),
        "fedckpt-blocked-s": checkpoints.blocked.seconds,
        **blocked_by_activity(checkpoints),
        "local-train-s": train_seconds,
        # What was checkpointed, for the run's summary and its estimate of synchronous saves.
        "checkpoint-saves": 2,
        "checkpoint-bytes": task.model_bytes(model) + optimizer_bytes,
    }
    arrays = ArrayRecord({name: tensor.cpu() for name, tensor in model.state_dict().items()})
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


def evaluate_round(msg: Message, context: Context, checkpoints: ClientCheckpoints) -> Message:
    """The global model's loss and accuracy here, and its post-aggregation checkpoint."""
    config = msg.content["config"]
    model = received_model(msg)
    _, val_data = local_data(context, config)
    loss, accuracy = task.evaluate(model, val_data)
    server_round = int(config["server-round"])
    checkpoints.after_receiving_global_model(
        model, loss, {"val - prediction - accuracy": accuracy}, server_round=server_round
    )
    metrics = {
        "loss": loss,
        "accuracy": accuracy,
        "num-examples": len(val_data[1]),
        "fedckpt-blocked-s": checkpoints.blocked.seconds,
        **blocked_by_activity(checkpoints),
        "checkpoint-saves": 1,
        "checkpoint-bytes": task.model_bytes(model),
    }
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def blocked_by_activity(checkpoints: ClientCheckpoints) -> dict[str, float]:
    """The client's blocked time by activity, as metrics the server adds up over clients."""
    return {f"fedckpt-blocked-{activity}-s": seconds for activity, seconds in checkpoints.blocked.by_activity.items()}


def device_of(config: ConfigRecord) -> str:
    """Where the round trains: "cuda" when the run gives each client a share of a GPU, else "cpu"."""
    return str(config.get("device", "cpu"))


def local_data(context: Context, config: ConfigRecord) -> tuple[tuple, tuple]:
    """This client's (training, validation) data, on the round's device."""
    features = task.num_features(str(config["model"]))
    data = task.client_data(int(context.node_config["partition-id"]), int(config["seed"]), features)
    device = device_of(config)
    return task.split(tuple(tensor.to(device) for tensor in data))


def received_model(msg: Message) -> torch.nn.Module:
    """The model the server sent, in the shape the round's config gives, on the round's device."""
    config = msg.content["config"]
    model = task.build(str(config["model"]), int(config["width"]), int(config["depth"]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model.to(device_of(config))
