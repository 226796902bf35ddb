"""FL4Health-style synchronous checkpoints: the baseline ``compare.py`` measures fedckpt against.

``checkpointing = "sync"`` in the run config swaps fedckpt for these: the same files under the same
names, each written by a ``torch.save`` that training waits for, and the client's state read back
with ``torch.load``, as FL4Health's checkpointers do. They time themselves as fedckpt's do, so that
both runs report their blocked time the same way.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from flwr.app import ArrayRecord
from torch import nn

from fedckpt.flower.timing import BlockedTime

STATE_NAME = "client_state.pt"


class SyncClientCheckpoints:
    """The calls of ``fedckpt.flower.ClientCheckpoints``, each a blocking ``torch.save``/``torch.load``.

    The best pre-aggregation loss so far is kept in the client's state (a ClientApp keeps nothing
    between rounds), so that the best model is saved only when it improves, as fedckpt's is.
    """

    def __init__(self, directory: str) -> None:
        self.blocked = BlockedTime()
        self.directory = directory
        self.best_loss = math.inf
        self.saves = 0
        os.makedirs(directory, exist_ok=True)

    def _save(self, obj: object, name: str, activity: str) -> None:
        with self.blocked.measure(activity):
            torch.save(obj, os.path.join(self.directory, name))
        self.saves += 1

    def restore_state(self, server_round: int, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        path = os.path.join(self.directory, STATE_NAME)
        with self.blocked.measure("restore"):
            if not os.path.exists(path):
                return None
            state = torch.load(path, weights_only=False)
            optimizer.load_state_dict(state["optimizer"])
        self.best_loss = state["best_pre_aggregation_loss"]
        return state

    def after_local_training(self, model: nn.Module, loss: float, metrics: dict, *, server_round: int) -> None:
        if loss < self.best_loss:
            self.best_loss = loss
            self._save(model, "pre_aggregation_best.pt", "pre_aggregation")

    def save_state(self, server_round: int, optimizer: torch.optim.Optimizer) -> None:
        state = {"server_round": server_round, "optimizer": optimizer.state_dict()}
        self._save({**state, "best_pre_aggregation_loss": self.best_loss}, STATE_NAME, "save_state")

    def after_receiving_global_model(self, model: nn.Module, loss: float, metrics: dict, *, server_round: int) -> None:
        self._save(model, "post_aggregation_latest.pt", "post_aggregation")


class SyncServerSaves:
    """The server's checkpoints after each round, as a Flower ``evaluate_fn``: the global model and
    the round's state, each with ``torch.save``. (fedckpt's server also keeps the best global model:
    it does more work than this baseline.)"""

    def __init__(self, directory: str, model: nn.Module) -> None:
        self.blocked = BlockedTime()
        self.directory = directory
        self.model = model
        self.saves = 0
        os.makedirs(directory, exist_ok=True)

    def __call__(self, server_round: int, arrays: ArrayRecord) -> None:
        if server_round == 0:  # Flower evaluates the initial model as round 0: nothing to save yet
            return
        with self.blocked.measure("end_of_round"):
            state_dict = arrays.to_torch_state_dict()
            self.model.load_state_dict(state_dict)
            torch.save(self.model, os.path.join(self.directory, "global_latest.pt"))
            state = {"server_round": server_round, "arrays": state_dict}
            torch.save(state, os.path.join(self.directory, "server_state.pt"))
        self.saves += 2
