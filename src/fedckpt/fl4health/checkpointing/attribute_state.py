"""FL4Health 0.4's ``StateCheckpointer``: named attributes of an object, saved in the background as one file.

``save_state`` gathers each attribute in ``snapshot_attrs`` through its snapshotter and hands the
dict to fedckpt's state saves (:class:`fedckpt.state.PerRoundStateCheckpointer`): it returns once
the state is copied, and the file is written by the writer pool. Loads and ``checkpoint_exists``
wait for the pending saves of their own file, from any process. Files are ``torch.save``'s format.
Which object, and which attributes, is the subclasses' part
(:mod:`fedckpt.fl4health.checkpointing.state_checkpointer`).
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedckpt.fl4health.utils.snapshotter import AbstractSnapshotter, T
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


def attribute_of(target: Any, name: str) -> Any:
    """``getattr``, with an ``AttributeError`` that says how to leave the attribute out."""
    try:
        return getattr(target, name)
    except AttributeError:
        raise AttributeError(
            f"{type(target).__name__} has no attribute {name!r} to checkpoint: set it, or leave it out with "
            f"delete_from_snapshot_attr({name!r})"
        ) from None
