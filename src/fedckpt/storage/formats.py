"""The two on-disk formats, one job each.

* ``module``: a model checkpoint. A safetensors file: the state-dict tensors, plus the model's
  pickled structure (without tensor data) in the header metadata. ``load_state_dict`` reads the
  tensors without running pickle; ``load_checkpoint`` rebuilds the ``nn.Module``.
* ``state``: a per-round state checkpoint, byte for byte what ``torch.save`` writes, so
  ``torch.load(path, weights_only=False)`` reads it.
"""

from __future__ import annotations

import base64
import json
import pickle
import warnings
from typing import Any

import numpy as np
import safetensors
import torch
from safetensors import TensorSpec, serialize_file
from torch import nn

from fedckpt.snapshot import (
    EXTRA_TENSOR_PREFIX,
    MODULE,
    SKELETON_TENSOR_TAG,
    STATE,
)

# One metadata key: safetensors writes its metadata map in no fixed order, and the same snapshot
# should give the same bytes (and sha256) whichever writer writes it.
METADATA_KEY = "fedckpt"
MODULE_FORMAT_VERSION = "module/1"


def write_module_file(payload: dict[str, Any], path: str) -> None:
    """Write a module snapshot as safetensors, straight from the snapshot's memory (no copy)."""
    arrays: dict[str, np.ndarray] = payload["arrays"]
    specs = {
        name: TensorSpec(
            dtype=payload["dtypes"][name], shape=array.shape, data_ptr=array.ctypes.data, data_len=array.nbytes
        )
        for name, array in arrays.items()
    }
    description = {"format": MODULE_FORMAT_VERSION, "skeleton": base64.b64encode(payload["skeleton"]).decode()}
    metadata = {METADATA_KEY: json.dumps(description, sort_keys=True)}
    serialize_file(specs, path, metadata=metadata)  # `arrays` stays referenced until this returns


def write_state_file(payload: dict[str, Any], path: str) -> None:
    """Write the records collected from torch's own pickling as torch's zip format."""
    with open(path, "wb") as file:
        writer = torch._C.PyTorchFileWriter(
            file, torch.serialization.get_crc32_options(), torch.serialization._get_storage_alignment()
        )
        for name, data in payload["records"]:
            if isinstance(data, bytes):
                writer.write_record(name, data, len(data))
            else:
                with warnings.catch_warnings():  # the snapshot is read-only shared memory; torch only reads it
                    warnings.simplefilter("ignore", UserWarning)
                    storage = torch.from_numpy(data).untyped_storage()
                writer.write_record(name, storage, data.nbytes)
        writer.write_end_of_file()


WRITERS = {MODULE: write_module_file, STATE: write_state_file}


def file_format(path: str) -> str:
    """``module`` for a fedckpt model file, ``state`` for a torch zip file, ``unknown`` otherwise."""
    with open(path, "rb") as file:
        head = file.read(9)
    if head[:2] == b"PK":
        return STATE
    if len(head) == 9 and head[8:9] == b"{":
        try:
            with safetensors.safe_open(path, framework="pt") as handle:
                if _description(handle).get("format", "").startswith("module/"):
                    return MODULE
        except Exception:
            return "unknown"
    return "unknown"


def _description(handle: Any) -> dict[str, str]:
    metadata = handle.metadata() or {}
    try:
        return json.loads(metadata.get(METADATA_KEY, "{}"))
    except ValueError:
        return {}


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a module checkpoint, by state-dict name; no pickle is run."""
    from safetensors.torch import load_file

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
    import io

    from safetensors.torch import load_file

    with safetensors.safe_open(path, framework="pt") as handle:
        skeleton = base64.b64decode(_description(handle)["skeleton"])
    tensors = load_file(path)
    return _SkeletonUnpickler(io.BytesIO(skeleton), tensors).load()


def read_state(path: str) -> Any:
    """Load a state checkpoint (runs pickle: load only files you trust)."""
    return torch.load(path, weights_only=False)
