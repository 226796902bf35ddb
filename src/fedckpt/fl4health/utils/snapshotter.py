"""FL4Health 0.4's snapshotters: how one kind of attribute goes into a state checkpoint and back.

A state checkpointer hands each snapshotter the attribute as a dict (a single object under the key
``"None"``, or the attribute's own dict of named objects). ``save_attribute`` returns what to save;
it may hold live tensors (``state_dict()``), since the state checkpointer copies everything before
``save_state`` returns. ``load_attribute`` puts the saved values back: in place for modules,
optimizers and schedulers, by replacing the dict's values for the others.

The value snapshotters take any picklable object: nothing here checks for FL4Health's classes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import Enum
from typing import Any, Generic, TypeVar

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

T = TypeVar("T")


class AbstractSnapshotter(ABC, Generic[T]):
    """Saves and loads the state of one kind of attribute."""

    @abstractmethod
    def save_attribute(self, attribute: dict[str, T]) -> dict[str, Any]:
        """What to save of ``attribute`` (a dict of named objects), by the same names."""

    @abstractmethod
    def load_attribute(self, attribute_snapshot: dict[str, Any], attribute: dict[str, T]) -> None:
        """Put ``attribute_snapshot`` (what :meth:`save_attribute` returned) back into ``attribute``."""


class OptimizerSnapshotter(AbstractSnapshotter[Optimizer]):
    """Optimizers: their ``state`` (momentum buffers, steps); the parameter groups are the live ones."""

    def save_attribute(self, attribute: dict[str, Optimizer]) -> dict[str, Any]:
        return {key: optimizer.state_dict()["state"] for key, optimizer in attribute.items()}

    def load_attribute(self, attribute_snapshot: dict[str, Any], attribute: dict[str, Optimizer]) -> None:
        for key, optimizer in attribute.items():
            state_dict = optimizer.state_dict()
            state_dict["state"] = attribute_snapshot[key]
            optimizer.load_state_dict(state_dict)


class LRSchedulerSnapshotter(AbstractSnapshotter[LRScheduler]):
    """Learning-rate schedulers, through their state dicts."""

    def save_attribute(self, attribute: dict[str, LRScheduler]) -> dict[str, Any]:
        return {key: scheduler.state_dict() for key, scheduler in attribute.items()}

    def load_attribute(self, attribute_snapshot: dict[str, Any], attribute: dict[str, LRScheduler]) -> None:
        for key, scheduler in attribute.items():
            scheduler.load_state_dict(attribute_snapshot[key])


class TorchModuleSnapshotter(AbstractSnapshotter[nn.Module]):
    """Modules, through their state dicts (loaded into the live modules)."""

    def save_attribute(self, attribute: dict[str, nn.Module]) -> dict[str, Any]:
        return {key: model.state_dict() for key, model in attribute.items()}

    def load_attribute(self, attribute_snapshot: dict[str, Any], attribute: dict[str, nn.Module]) -> None:
        for key, model in attribute.items():
            model.load_state_dict(attribute_snapshot[key])


class _ValueSnapshotter(AbstractSnapshotter[T]):
    """Saves the objects themselves (pickled when the state is saved) and loads by replacing them."""

    def save_attribute(self, attribute: dict[str, T]) -> dict[str, Any]:
        return attribute

    def load_attribute(self, attribute_snapshot: dict[str, Any], attribute: dict[str, T]) -> None:
        for key in attribute:
            attribute[key] = attribute_snapshot[key]


class SerializableObjectSnapshotter(_ValueSnapshotter[Any]):
    """Any picklable object: FL4Health's ``MetricManager``, ``LossMeter``, ``ReportsManager``, or a stand-in."""


class SingletonSnapshotter(_ValueSnapshotter[int | float | bool]):
    """Numbers and booleans."""


class HistorySnapshotter(_ValueSnapshotter[Any]):
    """Flower's ``History`` (or any picklable object in its place)."""


class StringSnapshotter(_ValueSnapshotter[str]):
    """Strings."""


class BytesSnapshotter(_ValueSnapshotter[bytes]):
    """Bytes."""


class EnumSnapshotter(_ValueSnapshotter[Enum]):
    """Enum members (FL4Health also uses it for booleans)."""


__all__ = [
    "AbstractSnapshotter",
    "BytesSnapshotter",
    "EnumSnapshotter",
    "HistorySnapshotter",
    "LRSchedulerSnapshotter",
    "OptimizerSnapshotter",
    "SerializableObjectSnapshotter",
    "SingletonSnapshotter",
    "StringSnapshotter",
    "T",
    "TorchModuleSnapshotter",
]
