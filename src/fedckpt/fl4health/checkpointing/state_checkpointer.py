"""FL4Health 0.4's state checkpointers: the named attributes of a client or server, saved in the background.

``save_state`` gathers each attribute in ``snapshot_attrs`` through its snapshotter and hands the
dict to fedckpt's state saves (:class:`fedckpt.state.PerRoundStateCheckpointer`): it returns once
the state is copied, and the file is written by the writer pool. Loads and ``checkpoint_exists``
wait for the pending saves of their own file, from any process. Files are ``torch.save``'s format.

The checkpointers work on any object that has the attributes: FL4Health's ``BasicClient`` and
``FlServer``, or a plain class standing in for them. The default attributes whose classes belong to
FL4Health or Flower (``reports_manager``, the loss meters and metric managers, ``history``) are not
type-checked: any picklable object will do.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from fedckpt.fl4health.utils.snapshotter import (
    AbstractSnapshotter,
    BytesSnapshotter,
    EnumSnapshotter,
    HistorySnapshotter,
    LRSchedulerSnapshotter,
    OptimizerSnapshotter,
    SerializableObjectSnapshotter,
    SingletonSnapshotter,
    StringSnapshotter,
    T,
    TorchModuleSnapshotter,
)
from fedckpt.runtime import lifecycle
from fedckpt.state import PerRoundStateCheckpointer

log = logging.getLogger("fedckpt")

SnapshotAttrs = dict[str, tuple[AbstractSnapshotter, Any]]
# Expected types that take any value (FL4Health's own classes are not imported, so not checked).
_UNCHECKED: tuple[Any, ...] = (object, Any)


class StateCheckpointer(ABC):
    """Saves and loads the attributes named in ``snapshot_attrs`` of an object (see subclasses).

    Args:
        checkpoint_dir: directory of the state file (created by the writer if missing), or a URL.
        checkpoint_name: the file's name; if None, subclasses derive one at the first save or load.
            Both can be changed later with :meth:`set_checkpoint_path`.
        snapshot_attrs: attribute name -> (snapshotter, expected type). An attribute is either of the
            expected type or a dict of such values; ``object`` (or ``Any``) accepts anything.
        storage_options, overlap: as for :class:`fedckpt.state.PerRoundStateCheckpointer`.
    """

    def __init__(
        self,
        checkpoint_dir: Path | str,
        checkpoint_name: str | None,
        snapshot_attrs: SnapshotAttrs,
        *,
        storage_options: Mapping[str, Any] | None = None,
        overlap: bool | None = None,
    ) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_name = checkpoint_name
        self.checkpoint_path: str | None = None
        if checkpoint_name is not None:
            self.checkpoint_path = os.path.join(checkpoint_dir, checkpoint_name)
        self.snapshot_attrs = snapshot_attrs
        self.snapshot_ckpt: dict[str, Any] = {}
        self.storage_options = storage_options
        self.overlap = overlap
        self._stores: dict[str, PerRoundStateCheckpointer] = {}  # one per directory used, for flush()

    def set_checkpoint_path(self, checkpoint_dir: Path | str, checkpoint_name: str) -> None:
        """Save to and load from ``checkpoint_dir/checkpoint_name`` from now on."""
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_name = checkpoint_name
        self.checkpoint_path = os.path.join(checkpoint_dir, checkpoint_name)

    def _store(self, action: str) -> tuple[PerRoundStateCheckpointer, str]:
        if self.checkpoint_name is None or self.checkpoint_dir is None:
            raise ValueError(f"Checkpoint path is not set but {action} has been called.")
        directory = os.fspath(self.checkpoint_dir)
        if directory not in self._stores:
            self._stores[directory] = PerRoundStateCheckpointer(
                directory, storage_options=self.storage_options, overlap=self.overlap
            )
        return self._stores[directory], self.checkpoint_name

    def save_checkpoint(self, checkpoint_dict: dict[str, Any]) -> None:
        """Snapshot ``checkpoint_dict`` now (one copy) and write it to the checkpoint path in the background."""
        store, name = self._store("save_checkpoint")
        log.info("Saving the state as %s", self.checkpoint_path)
        store.save_checkpoint(name, checkpoint_dict)

    def load_checkpoint(self) -> dict[str, Any]:
        """The saved state (after the pending saves of its file). ``FileNotFoundError`` if there is none."""
        store, name = self._store("load_checkpoint")
        return store.load_checkpoint(name)

    def checkpoint_exists(self) -> bool:
        """Whether the state file exists, counting saves issued (by any process) but not yet written."""
        store, name = self._store("checkpoint_exists")
        return store.checkpoint_exists(name)

    def add_to_snapshot_attr(self, name: str, snapshotter: AbstractSnapshotter, input_type: type[T]) -> None:
        """Save and load attribute ``name`` too, with ``snapshotter``; its values are of ``input_type``."""
        self.snapshot_attrs.update({name: (snapshotter, input_type)})

    def delete_from_snapshot_attr(self, name: str) -> None:
        """Stop saving and loading attribute ``name``."""
        del self.snapshot_attrs[name]

    def save_state(self) -> None:
        """Snapshot every attribute of ``snapshot_attrs`` and save them as one file, in the background.

        When this returns the values are copied: changing the object afterwards does not change the save.
        """
        try:
            for attr_name, (snapshotter, expected_type) in self.snapshot_attrs.items():
                self.snapshot_ckpt.update(self._save_snapshot(snapshotter, attr_name, expected_type))
            self.save_checkpoint(self.snapshot_ckpt)
        finally:
            self.snapshot_ckpt.clear()  # it holds live tensors: the save has its own copy

    def load_state(self, attributes: list[str] | None = None) -> None:
        """Load the saved state into the object: ``attributes`` (default: all of ``snapshot_attrs``)."""
        self._load_state(attributes, wait=True)

    def _load_state(self, attributes: list[str] | None, wait: bool) -> None:
        if attributes is None:
            attributes = list(self.snapshot_attrs)
            if not attributes:
                log.warning("self.snapshot_attrs is empty, which may be undesired behavior.")
        store, name = self._store("load_state")
        self.snapshot_ckpt = store.load_checkpoint(name, wait=wait)
        try:
            for attr in attributes:
                snapshotter, expected_type = self.snapshot_attrs[attr]
                self._load_snapshot(snapshotter, attr, expected_type)
        finally:
            self.snapshot_ckpt.clear()
        log.info("Loaded the checkpointed state from %s", self.checkpoint_path)

    @abstractmethod
    def get_attribute(self, name: str) -> Any:
        """The value of attribute ``name`` of the object being saved or loaded."""

    @abstractmethod
    def set_attribute(self, name: str, value: Any) -> None:
        """Set attribute ``name`` of the object being loaded."""

    def saved_keys(self) -> list[str]:
        """The keys of every file this checkpointer saved (for a module's ``flush``)."""
        return sorted({key for store in self._stores.values() for key in store.saved_keys()})

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every save made through this checkpointer is durable; raise if one failed."""
        lifecycle.coordinator().flush(self.saved_keys(), timeout=timeout)

    def _dict_wrap_attr(self, name: str, expected_type: Any) -> dict[str, Any]:
        """The attribute as a dict: one value under ``"None"``, or the attribute's own dict of values."""
        attribute = self.get_attribute(name)
        if expected_type in _UNCHECKED or isinstance(attribute, expected_type):
            return {"None": attribute}
        if isinstance(attribute, dict):
            for key, value in attribute.items():
                if not isinstance(value, expected_type):
                    raise ValueError(f"Incompatible type of attribute {type(attribute)} for key {key}")
            return attribute
        raise ValueError(f"Incompatible type of attribute {type(attribute)}, expected {expected_type}")

    def _save_snapshot(self, snapshotter: AbstractSnapshotter, name: str, expected_type: Any) -> dict[str, Any]:
        return {name: snapshotter.save_attribute(self._dict_wrap_attr(name, expected_type))}

    def _load_snapshot(self, snapshotter: AbstractSnapshotter, name: str, expected_type: Any) -> None:
        if name not in self.snapshot_ckpt:
            raise KeyError(
                f"The state at {self.checkpoint_path} has no attribute {name!r}: {sorted(self.snapshot_ckpt)}"
            )
        attribute = self._dict_wrap_attr(name, expected_type)
        snapshotter.load_attribute(self.snapshot_ckpt[name], attribute)
        self.set_attribute(name, attribute["None"] if list(attribute) == ["None"] else attribute)


def _get(target: Any, name: str) -> Any:
    try:
        return getattr(target, name)
    except AttributeError:
        raise AttributeError(
            f"{type(target).__name__} has no attribute {name!r} to checkpoint: set it, or leave it out with "
            f"delete_from_snapshot_attr({name!r})"
        ) from None


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
        return _get(self.client, name)

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
        return self.server_model if name == "model" else _get(self.server, name)

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
