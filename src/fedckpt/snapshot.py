"""Caller-side snapshots: a model or a state as plain host data (numpy arrays and bytes).

The snapshot holds numpy *views* of CPU tensors wherever it can; the runtime then copies it once
into Ray's object store (``ray.put``), which is the moment the state is frozen. Tensors whose dtype
numpy lacks (bfloat16, float8) travel as same-width integer views plus a dtype tag.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

MODULE = "module"
STATE = "state"
SKELETON_TENSOR_TAG = "fedckpt.tensor"
EXTRA_TENSOR_PREFIX = "__fedckpt_extra__."

# dtypes the safetensors format can hold, by torch name.
SAFETENSORS_DTYPES = {
    "float64",
    "float32",
    "float16",
    "bfloat16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint64",
    "uint32",
    "uint16",
    "uint8",
    "bool",
    "complex64",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
}
# dtypes numpy lacks, carried as integer views of the same width.
_INTEGER_VIEW = {
    torch.bfloat16: torch.int16,
    **{
        dtype: torch.uint8
        for name in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu")
        if (dtype := getattr(torch, name, None)) is not None
    },
}


@dataclass
class Snapshot:
    """Host data for one save: ``payload`` is what travels to the writer, ``nbytes`` its size."""

    kind: str
    payload: dict[str, Any]
    nbytes: int


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def tensor_to_host_array(tensor: torch.Tensor, name: str) -> np.ndarray:
    """A contiguous CPU numpy view of ``tensor`` (a copy only where the tensor is not one already)."""
    if tensor.layout != torch.strided:
        raise TypeError(f"Tensor '{name}' has layout {tensor.layout}; only dense (strided) tensors are supported")
    if tensor.device.type == "meta":
        raise TypeError(f"Tensor '{name}' is on the meta device and holds no data to save")
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.to("cpu")
    tensor = tensor.resolve_conj().resolve_neg().contiguous()
    if dtype_name(tensor.dtype) not in SAFETENSORS_DTYPES:
        raise TypeError(
            f"Tensor '{name}' has dtype {tensor.dtype}, which safetensors cannot store; "
            f"supported: {sorted(SAFETENSORS_DTYPES)}"
        )
    if tensor.dtype in _INTEGER_VIEW:
        tensor = tensor.view(_INTEGER_VIEW[tensor.dtype])
    return tensor.numpy()


def host_array_to_tensor(array: np.ndarray, name_of_dtype: str) -> torch.Tensor:
    """Inverse of :func:`tensor_to_host_array`: a tensor sharing ``array``'s memory."""
    tensor = torch.from_numpy(array)
    dtype = torch_dtype(name_of_dtype)
    return tensor.view(dtype) if tensor.dtype != dtype else tensor


class _SkeletonPickler(pickle.Pickler):
    """Pickles a module with every tensor replaced by a reference to its state-dict name."""

    def __init__(self, file: io.BytesIO, names_by_id: dict[int, str], extras: dict[str, torch.Tensor]):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._names_by_id = names_by_id
        self._extras = extras

    def persistent_id(self, obj: Any) -> Any:
        if not isinstance(obj, torch.Tensor):
            return None
        name = self._names_by_id.get(id(obj))
        if name is None:  # a tensor attribute that is neither a parameter nor a buffer
            name = f"{EXTRA_TENSOR_PREFIX}{len(self._extras)}"
            self._names_by_id[id(obj)] = name
            self._extras[name] = obj
        return (SKELETON_TENSOR_TAG, name, isinstance(obj, nn.Parameter), bool(obj.requires_grad))


def snapshot_module(model: nn.Module) -> Snapshot:
    """The model's tensors by state-dict name, and its pickled structure without tensor data."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected a torch.nn.Module to checkpoint, got {type(model).__name__}")
    tensors = {
        name: value for name, value in model.state_dict(keep_vars=True).items() if isinstance(value, torch.Tensor)
    }
    names_by_id: dict[int, str] = {}
    for name, tensor in tensors.items():
        names_by_id.setdefault(id(tensor), name)
    extras: dict[str, torch.Tensor] = {}
    buffer = io.BytesIO()
    try:
        _SkeletonPickler(buffer, names_by_id, extras).dump(model)
    except Exception as error:
        raise TypeError(f"The model of type {type(model).__name__} cannot be pickled: {error}") from error
    tensors.update(extras)
    arrays = {name: tensor_to_host_array(tensor, name) for name, tensor in tensors.items()}
    dtypes = {name: dtype_name(tensor.dtype) for name, tensor in tensors.items()}
    skeleton = buffer.getvalue()
    nbytes = sum(array.nbytes for array in arrays.values()) + len(skeleton)
    return Snapshot(MODULE, {"arrays": arrays, "dtypes": dtypes, "skeleton": skeleton}, nbytes)


class _RecordCollector:
    """Stands in for torch's zip writer: keeps each record torch.save would write, in order."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes | np.ndarray]] = []

    def write_record(self, name: str, data: Any, nbytes: int) -> None:
        if isinstance(data, str):
            self.records.append((name, data.encode()))
        elif isinstance(data, bytes):
            self.records.append((name, data))
        else:  # an UntypedStorage already on the CPU: view its bytes
            view = torch.empty(0, dtype=torch.uint8).set_(data, 0, (nbytes,), (1,))
            self.records.append((name, view.numpy()))


def snapshot_state(state: Any) -> Snapshot:
    """Any picklable object as the records of a ``torch.save`` file (loadable with ``torch.load``)."""
    collector = _RecordCollector()
    try:
        # torch.save's own pickling, so the file is exactly what torch.save would write.
        torch.serialization._save(
            state, collector, pickle, torch.serialization.DEFAULT_PROTOCOL, _disable_byteorder_record=False
        )
    except Exception as error:
        raise TypeError(f"The state cannot be pickled: {type(error).__name__}: {error}") from error
    nbytes = sum(len(data) if isinstance(data, bytes) else data.nbytes for _, data in collector.records)
    return Snapshot(STATE, {"records": collector.records}, nbytes)
