"""The three ways the example can checkpoint a client, behind one interface.

- ``fedckpt``: :class:`fedckpt.flower.ClientCheckpoints` (background saves, resumable state).
- ``sync``: what FL4Health does, a synchronous ``torch.save`` per checkpoint (the baseline).
- ``none``: no checkpoints (the wall-time floor).
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import nn

from fedckpt import LatestTorchModuleCheckpointer
from fedckpt.flower import ClientCheckpoints

MODES = ("fedckpt", "sync", "none")


class NoCheckpoints:
    blocked_seconds = 0.0
    saves = 0

    def restore_state(self, server_round: int, optimizer: Any = None) -> dict | None:
        return None

    def save_state(self, server_round: int, optimizer: Any = None, **extra: Any) -> None:
        pass

    def after_local_training(self, model: nn.Module, loss: float, metrics: dict) -> None:
        pass

    def after_receiving_global_model(self, model: nn.Module, loss: float, metrics: dict) -> None:
        pass


class SyncCheckpoints(NoCheckpoints):
    """FL4Health-style: every checkpoint is a ``torch.save`` that training waits for."""

    def __init__(self, checkpoint_dir: str) -> None:
        os.makedirs(checkpoint_dir, exist_ok=True)
        self.directory = checkpoint_dir
        self.blocked_seconds = 0.0
        self.saves = 0

    def _timed_save(self, obj: object, name: str) -> None:
        start = time.perf_counter()
        torch.save(obj, os.path.join(self.directory, name))
        self.blocked_seconds += time.perf_counter() - start
        self.saves += 1

    def restore_state(self, server_round: int, optimizer: Any = None) -> dict | None:
        path = os.path.join(self.directory, "client_state.pt")
        if not os.path.exists(path):
            return None
        start = time.perf_counter()
        state = torch.load(path, weights_only=False)
        self.blocked_seconds += time.perf_counter() - start
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        return state

    def save_state(self, server_round: int, optimizer: Any = None, **extra: Any) -> None:
        state = {"server_round": server_round, "optimizer": optimizer.state_dict(), **extra}
        self._timed_save(state, "client_state.pt")

    def after_local_training(self, model: nn.Module, loss: float, metrics: dict) -> None:
        self._timed_save(model, "pre_latest.pt")

    def after_receiving_global_model(self, model: nn.Module, loss: float, metrics: dict) -> None:
        self._timed_save(model, "post_latest.pt")


def client_checkpoints(mode: str, checkpoint_dir: str, context: Any) -> Any:
    """The client's checkpointing for ``mode`` (see the module docstring)."""
    if mode == "fedckpt":
        return ClientCheckpoints(
            checkpoint_dir,
            pre_aggregation=LatestTorchModuleCheckpointer(checkpoint_dir, "pre_latest.safetensors"),
            post_aggregation=LatestTorchModuleCheckpointer(checkpoint_dir, "post_latest.safetensors"),
        )
    if mode == "sync":
        return SyncCheckpoints(checkpoint_dir)
    if mode == "none":
        return NoCheckpoints()
    raise ValueError(f"Unknown checkpointing mode {mode!r}; expected one of {MODES}")
