"""The example's run with other checkpoints: FL4Health-style synchronous saves (``sync``), or none.

The clients, the training, the server and the summary are those of the fedckpt run; only the
checkpoints differ. ``sync`` saves what the fedckpt run saves, under the same ``.pt`` names, each
with a ``torch.save`` that training waits for (what FL4Health does), and restores the client's state
with ``torch.load``; ``none`` saves nothing (the wall-time floor). ``run.py --checkpointing sync``
runs it, and ``run.py --compare`` runs it beside fedckpt.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from torch import nn

from fedckpt.flower.timing import BlockedTime

import client_app
import server_app
import task
from server_app import Options, Outcome

MODES = ("fedckpt", "sync", "none")


class NoCheckpoints:
    """Stands in for the example's ``ClientCheckpoints`` (the same calls) and saves nothing."""

    def __init__(self) -> None:
        self.blocked = BlockedTime()

    def restore_state(self, server_round: int, optimizer: Any = None) -> dict | None:
        return None

    def save_state(self, server_round: int, optimizer: Any = None, **extra: Any) -> None:
        pass

    def after_local_training(self, model: nn.Module, loss: float, metrics: dict, *, server_round: int = 0) -> None:
        pass

    def after_receiving_global_model(
        self, model: nn.Module, loss: float, metrics: dict, *, server_round: int = 0
    ) -> None:
        pass


class SyncCheckpoints(NoCheckpoints):
    """FL4Health-style: every checkpoint is a ``torch.save`` that training waits for."""

    def __init__(self, checkpoint_dir: str) -> None:
        super().__init__()
        os.makedirs(checkpoint_dir, exist_ok=True)
        self.directory = checkpoint_dir

    def _save(self, obj: object, name: str, activity: str) -> None:
        with self.blocked.measure(activity):
            torch.save(obj, os.path.join(self.directory, name))

    def restore_state(self, server_round: int, optimizer: Any = None) -> dict | None:
        path = os.path.join(self.directory, "client_state.pt")
        if not os.path.exists(path):
            return None
        with self.blocked.measure("restore"):
            state = torch.load(path, weights_only=False)
            if optimizer is not None:
                optimizer.load_state_dict(state["optimizer"])
        return state

    def save_state(self, server_round: int, optimizer: Any = None, **extra: Any) -> None:
        state = {"server_round": server_round, "optimizer": optimizer.state_dict(), **extra}
        self._save(state, "client_state.pt", "save_state")

    def after_local_training(self, model: nn.Module, loss: float, metrics: dict, *, server_round: int = 0) -> None:
        self._save(model, "pre_latest.pt", "pre_aggregation")

    def after_receiving_global_model(
        self, model: nn.Module, loss: float, metrics: dict, *, server_round: int = 0
    ) -> None:
        self._save(model, "post_latest.pt", "post_aggregation")


def make_client_app(mode: str) -> ClientApp:
    """The example's client rounds with the checkpoints of ``mode`` (``sync`` or ``none``)."""
    app = ClientApp()

    def checkpoints(context: Context) -> NoCheckpoints:
        return SyncCheckpoints(client_app.client_dir(context)) if mode == "sync" else NoCheckpoints()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return client_app.train_round(msg, context, checkpoints(context))  # type: ignore[arg-type]

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return client_app.evaluate_round(msg, context, checkpoints(context))  # type: ignore[arg-type]

    return app


def make_server_app(mode: str, options: Options, outcome: Outcome) -> ServerApp:
    """The example's FedAvg rounds; for ``sync``, the server's saves with ``torch.save`` after each."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        initial = server_app.initial_arrays(options)
        server_dir = os.path.join(str(context.run_config["checkpoint-dir"]), "server")
        evaluate_fn = sync_server_saves(options, server_dir, outcome) if mode == "sync" else None
        config = server_app.round_config(options)
        outcome.result = server_app.fedavg(options).start(
            grid, initial, options.num_rounds, train_config=config, evaluate_config=config, evaluate_fn=evaluate_fn
        )

    return app


def sync_server_saves(options: Options, server_dir: str, outcome: Outcome) -> Callable[[int, ArrayRecord], None]:
    """FL4Health-style server saves: the global model and the server state, with ``torch.save``."""
    os.makedirs(server_dir, exist_ok=True)
    model = task.build(options.model, options.width, options.depth)
    blocked = BlockedTime()

    def save(server_round: int, arrays: ArrayRecord) -> None:
        if server_round == 0:
            return None
        with blocked.measure("end_of_round"):
            state_dict = arrays.to_torch_state_dict()
            model.load_state_dict(state_dict)
            torch.save(model, os.path.join(server_dir, "global_latest.pt"))
            state = {"server_round": server_round, "arrays": state_dict}
            torch.save(state, os.path.join(server_dir, "server_state.pt"))
        outcome.server_blocked_seconds = blocked.seconds
        outcome.server_blocked_by_activity = dict(blocked.by_activity)
        outcome.checkpoints_written += 2
        outcome.server_checkpoint_bytes += 2 * task.model_bytes(model)
        return None

    return save
