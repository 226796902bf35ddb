"""The save methods the benchmark compares, behind one interface: ``save`` (what the caller waits for)
and ``wait`` (until that save is durable)."""

from __future__ import annotations

import copy
import os
import warnings
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import ray
import torch
from torch import nn

from fedckpt.checkpointers import LatestTorchModuleCheckpointer
from fedckpt.runtime import lifecycle
from fedckpt.state import PerRoundStateCheckpointer


@dataclass
class HostBytes:
    """Every state-dict tensor's bytes, back to back in one preallocated host buffer.

    The floor copies into ``buffer``; the raw-write baseline writes it out.
    """

    buffer: np.ndarray
    pairs: list[tuple[np.ndarray, np.ndarray]]

    @classmethod
    def of(cls, saved: nn.Module | dict) -> HostBytes:
        from fedckpt.bench.measure import tensors_of

        # Byte views of the live tensors stay valid while they are mutated in place.
        sources = [tensor.detach().reshape(-1).view(torch.uint8).numpy() for tensor in tensors_of(saved)]
        buffer = np.empty(sum(source.nbytes for source in sources), dtype=np.uint8)
        pairs, offset = [], 0
        for source in sources:
            pairs.append((source, buffer[offset : offset + source.nbytes]))
            offset += source.nbytes
        host = cls(buffer, pairs)
        host.copy()  # touches every page of the buffer, so the floor never pays for page faults
        return host

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes)

    @property
    def tensors(self) -> int:
        return len(self.pairs)

    def copy(self) -> None:
        for source, destination in self.pairs:
            np.copyto(destination, source)


def save_and_fsync(obj: Any, path: str) -> None:
    """``torch.save`` to ``path``, then fsync the file: the bytes are on storage when it returns."""
    with open(path, "wb") as file:
        torch.save(obj, file)
        file.flush()
        os.fsync(file.fileno())


def node_writer_pids() -> list[int]:
    """The processes of fedckpt's writers on this node (the pool started)."""
    node = ray.get_runtime_context().get_node_id()
    return sorted({stats.pid for stats in lifecycle.coordinator().writer_stats() if stats.node_id == node})


class SaveMethod(ABC):
    """One way to save a model. ``save`` is the part the caller waits for; ``wait`` blocks until durable.

    ``slot`` picks the target: slot 0 is the checkpoint saved over and over; bursts use slots 1..n so
    every save of a burst goes to its own file (or checkpointer).
    """

    name: ClassVar[str]
    reaches_storage: ClassVar[bool] = True  # False: no durable time and no persist throughput
    warmups: ClassVar[int] = 1
    saves_states: ClassVar[bool] = True  # whether it applies to a state dict as well as to a model

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def prepare(self, model: nn.Module, host: HostBytes) -> None:
        """Untimed set-up for one model."""
        return None

    @abstractmethod
    def save(self, model: nn.Module, slot: int) -> Any:
        """Start a save of ``model``; returns a handle for ``wait``."""

    def wait(self, handle: Any) -> None:
        """Block until the save behind ``handle`` is durable (a no-op for synchronous methods)."""
        return None

    def close(self) -> None:
        """Release what ``prepare`` or the saves set up."""
        return None

    def helper_pids(self) -> list[int]:
        """Other processes that do this method's work (their CPU time counts as its own)."""
        return []

    def path(self, slot: int, suffix: str = ".pt") -> str:
        return os.path.join(self.directory, f"slot{slot}{suffix}")


class Floor(SaveMethod):
    """A warm ``numpy.copyto`` of every tensor's bytes into a preallocated buffer: no method can block less
    and still take a copy."""

    name = "floor"
    reaches_storage = False
    warmups = 2

    def prepare(self, model: nn.Module, host: HostBytes) -> None:
        self.host = host

    def save(self, model: nn.Module, slot: int) -> None:
        self.host.copy()


class TorchSave(SaveMethod):
    """``torch.save(model, path)`` into the page cache, as FL4Health does: durable only whenever the OS flushes."""

    name = "torch.save"
    reaches_storage = False

    def save(self, model: nn.Module, slot: int) -> None:
        torch.save(model, self.path(slot))


class TorchSaveFsync(SaveMethod):
    """``torch.save`` then ``fsync``, in the caller: durable when it returns."""

    name = "torch.save + fsync"

    def save(self, model: nn.Module, slot: int) -> None:
        save_and_fsync(model, self.path(slot))


class HandRolledAsync(SaveMethod):
    """``copy.deepcopy(model.state_dict())`` in the caller, ``torch.save`` + fsync in one background thread."""

    name = "hand-rolled async"

    def __init__(self, directory: str) -> None:
        super().__init__(directory)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-hand-rolled")

    def save(self, model: nn.Module | dict, slot: int) -> Future:
        state = copy.deepcopy(model.state_dict() if isinstance(model, nn.Module) else model)
        return self.executor.submit(save_and_fsync, state, self.path(slot))

    def wait(self, handle: Future) -> None:
        handle.result()

    def close(self) -> None:
        self.executor.shutdown(wait=True)


class DcpAsyncSave(SaveMethod):
    """``torch.distributed.checkpoint.async_save``: stages a copy, writes (and fsyncs) in a thread."""

    name = "dcp.async_save"
    saves_states = False  # optimizer state dicts have integer keys, which dcp's flattening does not take

    def prepare(self, model: nn.Module, host: HostBytes) -> None:
        # Without a process group dcp warns on every save that it assumes a single process: true here.
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
        # Slot 0 is saved over on every repeat, on purpose (as the other methods overwrite their file).
        warnings.filterwarnings("ignore", message=".*Detected an existing checkpoint.*")

    def save(self, model: nn.Module, slot: int) -> Any:
        import torch.distributed.checkpoint as dcp

        return dcp.async_save({"model": model.state_dict()}, checkpoint_id=self.path(slot, ".dcp"))

    def wait(self, handle: Any) -> None:
        # Newer staging modes return an AsyncSaveResponse; the default returns the upload future itself.
        getattr(handle, "upload_completion", handle).result()


class Fedckpt(SaveMethod):
    """``LatestTorchModuleCheckpointer.maybe_checkpoint`` for a model, ``PerRoundStateCheckpointer.save_checkpoint``
    for a state; durable after the checkpointer's ``flush()``."""

    name = "fedckpt"
    model_suffix = ".safetensors"

    def __init__(self, directory: str) -> None:
        super().__init__(directory)
        self.checkpointers: dict[int, LatestTorchModuleCheckpointer] = {}
        self.states = PerRoundStateCheckpointer(directory)

    def save(self, model: nn.Module | dict, slot: int) -> LatestTorchModuleCheckpointer | PerRoundStateCheckpointer:
        if not isinstance(model, nn.Module):
            self.states.save_checkpoint(f"slot{slot}.pt", model)
            return self.states
        checkpointer = self.checkpointers.get(slot)
        if checkpointer is None:
            checkpointer = self.checkpointers[slot] = LatestTorchModuleCheckpointer(
                self.directory, f"slot{slot}{self.model_suffix}"
            )
        checkpointer.maybe_checkpoint(model, 0.0, {})
        return checkpointer

    def wait(self, handle: LatestTorchModuleCheckpointer | PerRoundStateCheckpointer) -> None:
        handle.flush()

    def helper_pids(self) -> list[int]:
        """The writers on this node (their processes write the files)."""
        return node_writer_pids()

    def close(self) -> None:
        for checkpointer in self.checkpointers.values():
            checkpointer.flush()  # nothing may still be writing when the runner removes the directory
        self.states.flush()


class FedckptPt(Fedckpt):
    """fedckpt with FL4Health's ``.pt`` model names: the file ``torch.save(model)`` writes."""

    name = "fedckpt .pt"
    model_suffix = ".pt"


class NoCheckpoint(SaveMethod):
    """The training loop's baseline: no save at all."""

    name = "no checkpoint"
    reaches_storage = False
    warmups = 0

    def save(self, model: nn.Module, slot: int) -> None:
        return None


SAVE_METHODS: tuple[type[SaveMethod], ...] = (
    Floor, TorchSave, TorchSaveFsync, HandRolledAsync, DcpAsyncSave, Fedckpt, FedckptPt,
)  # fmt: skip
LOOP_METHODS: tuple[type[SaveMethod], ...] = (NoCheckpoint, TorchSave, HandRolledAsync, Fedckpt)
