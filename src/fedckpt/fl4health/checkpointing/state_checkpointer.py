"""Mirror of ``fl4health.checkpointing.state_checkpointer`` (FL4Health 0.4): a client's or a server's state.

The checkpointers work on any object that has the attributes: FL4Health's ``BasicClient`` and
``FlServer``, or a plain class standing in for them. The default attributes whose classes belong to
FL4Health or Flower (``reports_manager``, the loss meters and metric managers, ``history``) are not
type-checked: any picklable object will do. Saving and loading is :class:`StateCheckpointer`'s
(:mod:`fedckpt.fl4health.checkpointing.attribute_state`): in the background, one copy at the call.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from fedckpt.fl4health.checkpointing.attribute_state import SnapshotAttrs, StateCheckpointer, attribute_of
from fedckpt.fl4health.utils.snapshotter import (
    BytesSnapshotter,
    EnumSnapshotter,
    HistorySnapshotter,
    LRSchedulerSnapshotter,
    OptimizerSnapshotter,
    SerializableObjectSnapshotter,
    SingletonSnapshotter,
    StringSnapshotter,
    TorchModuleSnapshotter,
)

log = logging.getLogger("fedckpt")

__all__ = [
    "ClientStateCheckpointer",
    "NnUnetServerStateCheckpointer",
    "ServerStateCheckpointer",
    "SnapshotAttrs",
    "StateCheckpointer",
    "client_snapshot_attrs",
    "server_snapshot_attrs",
]


def client_snapshot_attrs() -> SnapshotAttrs:
    """FL4Health's default attributes of a client: enough to resume per round or inside the training loop."""
    return {
        "model": (TorchModuleSnapshotter(), nn.Module),
        "optimizers": (OptimizerSnapshotter(), Optimizer),
        "lr_schedulers": (LRSchedulerSnapshotter(), LRScheduler),
        "total_steps": (SingletonSnapshotter(), int),
        "total_epochs": (SingletonSnapshotter(), int),
        "reports_manager": (SerializableObjectSnapshotter(), object),
        "train_loss_meter": (SerializableObjectSnapshotter(), object),
        "train_metric_manager": (SerializableObjectSnapshotter(), object),
    }


def server_snapshot_attrs() -> SnapshotAttrs:
    """FL4Health's default attributes of a server (``model`` is the one passed to the save or load)."""
    return {
        "model": (TorchModuleSnapshotter(), nn.Module),
        "current_round": (SingletonSnapshotter(), int),
        "reports_manager": (SerializableObjectSnapshotter(), object),
        "server_name": (StringSnapshotter(), str),
        "history": (HistorySnapshotter(), object),
    }


class ClientStateCheckpointer(StateCheckpointer):
    """Saves and loads a client's attributes (default: :func:`client_snapshot_attrs`).

    With no ``checkpoint_name`` the file is ``client_{client.client_name}_state.pt``.
    """

    def __init__(
        self,
        checkpoint_dir: Path | str,
        checkpoint_name: str | None = None,
        snapshot_attrs: SnapshotAttrs | None = None,
        *,
        storage_options: Mapping[str, Any] | None = None,
        overlap: bool | None = None,
    ) -> None:
        attrs = client_snapshot_attrs() if snapshot_attrs is None else snapshot_attrs
        super().__init__(checkpoint_dir, checkpoint_name, attrs, storage_options=storage_options, overlap=overlap)
        self.client: Any = None

    def maybe_set_default_checkpoint_name(self) -> None:
        """Name the file after the client if no name was given."""
        if self.client is None:
            raise ValueError("Attempting to save client state but client is None")
        if self.checkpoint_name is None:
            self.set_checkpoint_path(self.checkpoint_dir, f"client_{self.client.client_name}_state.pt")

    def save_client_state(self, client: Any) -> None:
        """Save ``client``'s attributes in the background (copied before this returns)."""
        self.client = client
        try:
            self.maybe_set_default_checkpoint_name()
            self.save_state()
        finally:
            self.client = None

    def maybe_load_client_state(self, client: Any, attributes: list[str] | None = None) -> bool:
        """Load the saved state into ``client`` (``attributes``, default all); False if there is none."""
        self.client = client
        try:
            self.maybe_set_default_checkpoint_name()
            if self.checkpoint_exists():
                self._load_state(attributes, wait=False)  # checkpoint_exists waited for the pending saves
                log.info("State checkpoint successfully loaded from: %s", self.checkpoint_path)
                return True
            log.info("No state checkpoint found at: %s", self.checkpoint_path)
            return False
        finally:
            self.client = None

    def get_attribute(self, name: str) -> Any:
        if self.client is None:
            raise ValueError("Client is not set.")
        return attribute_of(self.client, name)

    def set_attribute(self, name: str, value: Any) -> None:
        if self.client is None:
            raise ValueError("Client is not set.")
        setattr(self.client, name, value)


class ServerStateCheckpointer(StateCheckpointer):
    """Saves and loads a server's attributes and its model (default: :func:`server_snapshot_attrs`).

    With no ``checkpoint_name`` the file is ``server_{server.server_name}_state.pt``.
    """

    def __init__(
        self,
        checkpoint_dir: Path | str,
        checkpoint_name: str | None = None,
        snapshot_attrs: SnapshotAttrs | None = None,
        *,
        storage_options: Mapping[str, Any] | None = None,
        overlap: bool | None = None,
    ) -> None:
        attrs = server_snapshot_attrs() if snapshot_attrs is None else snapshot_attrs
        super().__init__(checkpoint_dir, checkpoint_name, attrs, storage_options=storage_options, overlap=overlap)
        self.server: Any = None
        self.server_model: nn.Module | None = None

    def maybe_set_default_checkpoint_name(self) -> None:
        """Name the file after the server if no name was given."""
        if self.server is None:
            raise ValueError("Attempting to save server state but server is None")
        if self.checkpoint_name is None:
            self.set_checkpoint_path(self.checkpoint_dir, f"server_{self.server.server_name}_state.pt")

    def save_server_state(self, server: Any, model: nn.Module) -> None:
        """Save ``server``'s attributes and ``model`` (servers hold parameters, not a model) in the background."""
        self.server, self.server_model = server, model
        try:
            self.maybe_set_default_checkpoint_name()
            self.save_state()
        finally:
            self.server, self.server_model = None, None

    def maybe_load_server_state(
        self, server: Any, model: nn.Module, attributes: list[str] | None = None
    ) -> nn.Module | None:
        """Load the saved state into ``server`` and ``model``; the model, or None if there is no state."""
        self.server, self.server_model = server, model
        try:
            self.maybe_set_default_checkpoint_name()
            if self.checkpoint_exists():
                self._load_state(attributes, wait=False)  # checkpoint_exists waited for the pending saves
                log.info("State checkpoint successfully loaded from: %s", self.checkpoint_path)
                return self.server_model
            log.info("No state checkpoint found at: %s", self.checkpoint_path)
            return None
        finally:
            self.server, self.server_model = None, None

    def get_attribute(self, name: str) -> Any:
        if self.server is None:
            raise ValueError("Server is not set.")
        return self.server_model if name == "model" else attribute_of(self.server, name)

    def set_attribute(self, name: str, value: Any) -> None:
        if self.server is None:
            raise ValueError("Server is not set.")
        if name == "model":
            self.server_model = value
        else:
            setattr(self.server, name, value)


class NnUnetServerStateCheckpointer(ServerStateCheckpointer):
    """The server state of FL4Health's nnU-Net server: the defaults and its plans, heads and configuration."""

    def __init__(
        self,
        checkpoint_dir: Path | str,
        checkpoint_name: str | None = None,
        *,
        storage_options: Mapping[str, Any] | None = None,
        overlap: bool | None = None,
    ) -> None:
        attrs = server_snapshot_attrs()
        attrs.update(
            {
                "nnunet_plans_bytes": (BytesSnapshotter(), bytes),
                "num_segmentation_heads": (SingletonSnapshotter(), int),
                "num_input_channels": (SingletonSnapshotter(), int),
                "global_deep_supervision": (EnumSnapshotter(), bool),
                "nnunet_config": (EnumSnapshotter(), Enum),
            }
        )
        super().__init__(checkpoint_dir, checkpoint_name, attrs, storage_options=storage_options, overlap=overlap)
