"""The save methods ``fedckpt bench --device cuda`` compares, on a model on a GPU.

Each method has the same steps: ``save`` (the call, what the caller's thread waits for), ``staged``
(until its copy of the state is complete: from then on the model may change freely), ``durable``
(until it is on storage; the same as ``staged`` for a method that writes nothing or writes in the
call), ``before_step`` (what a training loop must do before its next optimizer step: wait for a
copy that is still running, where the method's contract says so) and ``saved`` (the last save read
back, to check it). ``mutates_after_call`` says whether the model may be changed in place as soon as
the call returned (else only after ``staged``).
"""

from __future__ import annotations

import os
import warnings
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

import fedckpt
from fedckpt.checkpointers import LatestTorchModuleCheckpointer


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach() for name, tensor in model.state_dict().items()}


class GpuMethod(ABC):
    """One way to save a model that lives on a GPU."""

    name: ClassVar[str]
    writes: ClassVar[bool] = True  # False: a copy only, no file
    mutates_after_call: ClassVar[bool] = True

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def prepare(self, model: nn.Module) -> None:
        """Untimed set-up for ``model`` (buffers, threads)."""
        return None

    @abstractmethod
    def save(self, model: nn.Module) -> Any:
        """Start a save of ``model``; returns a handle for the other steps."""

    def staged(self, handle: Any) -> None:
        """Block until the save's copy of the state is complete."""
        return None

    def durable(self, handle: Any) -> None:
        """Block until the save is on storage."""
        self.staged(handle)

    def before_step(self, handle: Any) -> None:
        """Before the next optimizer step after a save (the method's contract for in-place changes)."""
        return None

    @abstractmethod
    def saved(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The last save, read back onto the CPU (``model`` gives the names, shapes and dtypes)."""

    def close(self) -> None:
        return None

    def path(self, suffix: str) -> str:
        return os.path.join(self.directory, f"checkpoint{suffix}")


class PinnedCopy(GpuMethod):
    """The floor: every tensor copied (``non_blocking``) into reused pinned buffers, on the caller's
    stream (``side=False``: the stream waits for the copy) or on a side stream after it (``side=True``:
    only the next optimizer step waits for the copy's event). No file."""

    writes = False

    def __init__(self, directory: str, side: bool = False) -> None:
        super().__init__(directory)
        self.side = side
        self.buffers: dict[str, torch.Tensor] = {}
        self.stream: torch.cuda.Stream | None = None

    def prepare(self, model: nn.Module) -> None:
        self.buffers = {
            name: torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            for name, tensor in state_of(model).items()
        }
        self.stream = torch.cuda.Stream() if self.side else None

    def save(self, model: nn.Module) -> torch.cuda.Event:
        current = torch.cuda.current_stream()
        stream = self.stream or current
        if self.stream is not None:
            self.stream.wait_stream(current)
        with torch.cuda.stream(stream):
            for name, tensor in state_of(model).items():
                self.buffers[name].copy_(tensor, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
        return done

    def staged(self, handle: torch.cuda.Event) -> None:
        handle.synchronize()

    def before_step(self, handle: torch.cuda.Event) -> None:
        torch.cuda.current_stream().wait_event(handle)

    def saved(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {name: buffer.clone() for name, buffer in self.buffers.items()}


class PinnedCopyCaller(PinnedCopy):
    name = "pinned copy (caller's stream): floor"


class PinnedCopySide(PinnedCopy):
    name = "pinned copy (side stream, step waits)"
    mutates_after_call = False

    def __init__(self, directory: str) -> None:
        super().__init__(directory, side=True)


class Fedckpt(GpuMethod):
    """``LatestTorchModuleCheckpointer.maybe_checkpoint`` (safetensors); ``wait_staged()``; ``flush()``."""

    overlap: ClassVar[bool] = False

    def __init__(self, directory: str) -> None:
        super().__init__(directory)
        self.checkpointer = LatestTorchModuleCheckpointer(directory, "model.safetensors", overlap=self.overlap)

    def save(self, model: nn.Module) -> None:
        self.checkpointer.maybe_checkpoint(model, 0.0, {})

    def staged(self, handle: None) -> None:
        fedckpt.wait_staged()

    def durable(self, handle: None) -> None:
        self.checkpointer.flush()

    def saved(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return self.checkpointer.load_state_dict()

    def close(self) -> None:
        self.checkpointer.flush()


class FedckptDefault(Fedckpt):
    name = "fedckpt (default mode)"


class FedckptOverlap(Fedckpt):
    name = "fedckpt (overlap mode)"
    overlap = True
    mutates_after_call = False  # optimizer steps and load_state_dict wait by themselves; anything else after staged


class TorchSave(GpuMethod):
    """``torch.save(model.state_dict(), path)``: copies each tensor to the CPU, then writes (page cache)."""

    name = "torch.save"

    def save(self, model: nn.Module) -> None:
        torch.save(model.state_dict(), self.path(".pt"))

    def saved(self, model: nn.Module) -> dict[str, torch.Tensor]:
        loaded: dict[str, torch.Tensor] = torch.load(self.path(".pt"), map_location="cpu", weights_only=True)
        return loaded


class Dcp(GpuMethod):
    """``torch.distributed.checkpoint.async_save`` without a process group (dcp assumes one process)."""

    def prepare(self, model: nn.Module) -> None:
        # Single process, no process group: dcp says so on every call; and slot reuse is on purpose.
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
        warnings.filterwarnings("ignore", message=".*Detected an existing checkpoint.*")
        self.last: Any = None

    def _async_save(self, model: nn.Module, **options: Any) -> Any:
        import torch.distributed.checkpoint as dcp

        if self.last is not None:  # one upload at a time (as a training loop would)
            self._upload(self.last).result()
        self.last = dcp.async_save({"model": model.state_dict()}, checkpoint_id=self.path(".dcp"), **options)
        return self.last

    @staticmethod
    def _upload(handle: Any) -> Any:
        return getattr(handle, "upload_completion", handle)  # an AsyncSaveResponse, or the upload future itself

    def durable(self, handle: Any) -> None:
        self.staged(handle)
        self._upload(handle).result()

    def close(self) -> None:
        if getattr(self, "last", None) is not None:
            self._upload(self.last).result()

    def saved(self, model: nn.Module) -> dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp

        target = {"model": {name: torch.empty_like(tensor, device="cpu") for name, tensor in state_of(model).items()}}
        dcp.load(target, checkpoint_id=self.path(".dcp"))
        return target["model"]


class DcpDefault(Dcp):
    name = "dcp.async_save (default)"

    def save(self, model: nn.Module) -> Any:
        return self._async_save(model)


class DcpPinned(Dcp):
    """With a reused ``DefaultStager``: pinned memory, staging in a background thread with
    non-blocking copies. Its contract: change nothing in place before ``staging_completion``."""

    name = "dcp.async_save (DefaultStager, pinned)"
    mutates_after_call = False

    def prepare(self, model: nn.Module) -> None:
        super().prepare(model)
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        self.stager = DefaultStager(
            StagingOptions(
                use_pinned_memory=True, use_shared_memory=False, use_async_staging=True, use_non_blocking_copy=True
            )
        )

    def save(self, model: nn.Module) -> Any:
        return self._async_save(model, async_stager=self.stager)

    def staged(self, handle: Any) -> None:
        completion = getattr(handle, "staging_completion", None)
        if completion is not None:
            completion.result()

    def before_step(self, handle: Any) -> None:
        self.staged(handle)

    def close(self) -> None:
        super().close()
        stager = getattr(self, "stager", None)
        if stager is not None:
            stager.close()


SAVE_METHODS: tuple[type[GpuMethod], ...] = (
    PinnedCopyCaller, FedckptDefault, FedckptOverlap, TorchSave, DcpDefault, DcpPinned,
)  # fmt: skip
LOOP_METHODS: tuple[type[GpuMethod], ...] = (
    PinnedCopyCaller, PinnedCopySide, FedckptDefault, FedckptOverlap, TorchSave, DcpDefault, DcpPinned,
)  # fmt: skip
