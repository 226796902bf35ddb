"""Reading the two formats of :mod:`fedckpt.storage.formats` back into torch objects."""

from __future__ import annotations

import base64
import copy
import io
import os
import pickle
from typing import Any

import safetensors
import torch
from safetensors.torch import load_file
from torch import nn

from fedckpt.skeleton import EXTRA_TENSOR_PREFIX, SKELETON_TENSOR_TAG
from fedckpt.storage.formats import description


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a module checkpoint, by state-dict name; no pickle is run."""
    tensors = load_file(path)
    return {name: tensor for name, tensor in tensors.items() if not name.startswith(EXTRA_TENSOR_PREFIX)}


class _SkeletonUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, tensors: dict[str, torch.Tensor]):
        super().__init__(file)
        self._tensors = tensors
        self._rebuilt: dict[str, torch.Tensor] = {}

    def persistent_load(self, pid: Any) -> Any:
        tag, name, is_parameter, requires_grad = pid
        if tag != SKELETON_TENSOR_TAG:
            raise pickle.UnpicklingError(f"Unknown persistent id {tag!r} in a fedckpt module checkpoint")
        if name not in self._rebuilt:  # tied weights come back as one object
            tensor = self._tensors[name]
            if is_parameter:
                tensor = nn.Parameter(tensor, requires_grad=requires_grad)
            elif requires_grad:
                tensor.requires_grad_(True)
            self._rebuilt[name] = tensor
        return self._rebuilt[name]


def read_module(path: str) -> nn.Module:
    """Rebuild the ``nn.Module`` saved in a module checkpoint (runs pickle, like ``torch.load``)."""
    with safetensors.safe_open(path, framework="pt") as handle:
        skeleton = base64.b64decode(description(handle)["skeleton"])
    tensors = load_file(path)
    return _SkeletonUnpickler(io.BytesIO(skeleton), tensors).load()


# A state file this large is read mapped, then copied out: one copy from the page cache, where a
# full read has torch also check every record's CRC-32 (twice as slow at 100 MB, benchmarks/restore.py).
MAPPED_READ_MIN_BYTES = 1 << 20


def read_state(path: str, mmap: bool = False) -> Any:
    """Load a state checkpoint (runs pickle: load only files you trust); ``mmap`` maps tensor data,
    else every tensor is in memory."""
    if mmap or os.path.getsize(path) < MAPPED_READ_MIN_BYTES:
        return torch.load(path, weights_only=False, mmap=mmap)
    return copy.deepcopy(torch.load(path, weights_only=False, mmap=True))
