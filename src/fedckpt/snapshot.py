"""Caller-side snapshots: what to copy, as byte views of live memory and tensor metadata.

A snapshot lists the tensors of a model (or the records ``torch.save`` would write for a state)
as flat byte views of the live memory, plus a small layout; the file format
(:mod:`fedckpt.storage.formats`) decides the order of the bytes in the file, which is the order
they are staged in. Nothing is copied until :meth:`Snapshot.copy_into` fills a staging buffer: that single
copy is the moment the state is frozen, and the only part of a save the caller waits for.

A tensor on a CUDA device stays there: its view is a flat uint8 tensor over its device memory, which
the transport copies straight into the staging memory (:mod:`fedckpt.runtime.cuda`). Tensors on other
accelerators (``mps``, ``xpu``) are copied to the CPU here, with ``.to("cpu")``.
"""

from __future__ import annotations

import functools
import logging
import operator
import pickle
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fedckpt import _compat
from fedckpt.skeleton import skeleton_of, structure_key
from fedckpt.storage.direct import BLOCK
from fedckpt.storage.formats import MODULE, STATE
from fedckpt.storage.formats.safetensors_file import SAFETENSORS_CODES, TensorInfo, data_section
from fedckpt.storage.formats.torch_records import module_records, state_records
from fedckpt.storage.formats.torch_zip import BLOCK_ALIGNED_RECORD_BYTES

log = logging.getLogger("fedckpt")

# A source's bytes, flat uint8: a view of host memory, or a tensor over the memory of a CUDA device.
ByteView = np.ndarray | torch.Tensor
_ZEROS = np.zeros(BLOCK, dtype=np.uint8)  # what pads a staged record to a block boundary


@dataclass(frozen=True)
class DevicePart:
    """A source in a CUDA device's memory, and where its bytes go in the staged data."""

    offset: int
    view: torch.Tensor  # flat uint8, contiguous, on its device

    @property
    def nbytes(self) -> int:
        return self.view.numel()


@dataclass
class Snapshot:
    """One save's bytes (as views of live memory, in file order) and their layout.

    ``layout`` travels to the writer: for a module, ``tensors`` (the file's
    ``TensorEntry`` list, :mod:`fedckpt.storage.formats.safetensors_file`) and the pickled
    ``skeleton``; for a state (or a ``.pt`` model), ``records`` (name, begin, end) and ``direct``.
    """

    kind: str
    nbytes: int
    sources: list[ByteView]  # flat uint8 views of live memory, in file order
    layout: dict[str, Any]

    @functools.cached_property
    def packed_layout(self) -> bytes:
        """The layout as one pickle (Ray would serialize thousands of tuples one by one), made
        once per snapshot: a reused snapshot reuses it too."""
        return pickle.dumps(self.layout, protocol=pickle.HIGHEST_PROTOCOL)

    @functools.cached_property
    def device_parts(self) -> list[DevicePart]:
        """The sources in CUDA memory (none: a snapshot of host memory only), with their offsets."""
        parts, offset = [], 0
        for view in self.sources:
            if isinstance(view, torch.Tensor):
                parts.append(DevicePart(offset, view))
            offset += nbytes_of(view)
        return parts

    def copy_into(self, buffer: np.ndarray) -> None:
        """Copy every byte in host memory into ``buffer`` (uint8, at least ``nbytes`` long), each at its
        offset: the blocking copy. The bytes of :attr:`device_parts` are the transport's to copy.

        numpy, not torch: a torch copy wakes the OpenMP pool, whose threads then spin for a while
        and starve the writer and Ray's RPC threads of the CPUs (measured: +5-15 ms per save on 2 cores).
        """
        if not self.sources:
            return
        if not self.device_parts:
            np.concatenate(self.sources, out=buffer[: self.nbytes])  # one call, however many tensors
            return
        offset = 0
        for view in self.sources:
            size = nbytes_of(view)
            if isinstance(view, np.ndarray):
                buffer[offset : offset + size] = view
            offset += size


def nbytes_of(view: ByteView) -> int:
    return int(view.size) if isinstance(view, np.ndarray) else view.numel()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_FOREIGN_LOGGED: set[str] = set()


def contiguous_tensor(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """``tensor`` as a dense, contiguous tensor, on the CPU or on its CUDA device (a copy only where
    it is not one already; a tensor on another accelerator is copied to the CPU)."""
    if tensor.layout != torch.strided:
        raise TypeError(f"Tensor '{name}' has layout {tensor.layout}; only dense (strided) tensors are supported")
    if tensor.device.type == "meta":
        raise TypeError(f"Tensor '{name}' is on the meta device and holds no data to save")
    if dtype_name(tensor.dtype) not in SAFETENSORS_CODES:
        raise TypeError(
            f"Tensor '{name}' has dtype {tensor.dtype}, which safetensors cannot store; "
            f"supported: {sorted(SAFETENSORS_CODES)}"
        )
    tensor = tensor.detach()
    device = tensor.device.type
    if device not in ("cpu", "cuda"):
        if device not in _FOREIGN_LOGGED:
            _FOREIGN_LOGGED.add(device)
            log.warning("fedckpt: tensors on %s are copied to the CPU with .to('cpu') (blocking) before they are "
                        "staged; only CUDA tensors are copied straight into staging memory", device)  # fmt: skip
        tensor = tensor.to("cpu")
    # On a GPU these run on the caller's current stream, before the copy's (which waits for it).
    return tensor.resolve_conj().resolve_neg().contiguous()


def byte_view(tensor: torch.Tensor) -> ByteView:
    """The bytes of a contiguous tensor, flat uint8, no copy: a numpy view on the CPU, a tensor on a GPU."""
    flat = tensor.reshape(-1).view(torch.uint8)
    return flat if tensor.device.type == "cuda" else flat.numpy()


@dataclass
class _ModulePlan:
    """What can be reused from a model's last save while its attributes are the same objects:
    the pickled structure, and the byte views of tensors whose memory did not move."""

    pickled: bytes
    extras: dict[str, torch.Tensor]
    attributes: list[tuple]  # each submodule's attributes and tensors; held so their ids cannot be reused
    tensors: dict[str, torch.Tensor]  # the state dict this plan was made from
    submodules: list[nn.Module]  # the module tree below the model (never the model: see _plans)
    structure: tuple | None  # the skeleton's structure key (None: a structure it does not describe)
    views: dict[str, tuple[torch.Tensor, int, torch.Size, tuple, ByteView]] = field(default_factory=dict)
    last: Snapshot | None = None  # the last snapshot, reusable when no tensor moved


def _module_attributes(modules: list[nn.Module]) -> list[tuple]:
    """Each module's attribute values, parameters (and whether they require grad: freezing a layer
    changes the pickled structure), buffers and children. The contents of those dicts matter:
    replacing a parameter or a child keeps the dict but changes the model."""
    attributes = []
    for m in modules:
        parameters, buffers, children = _compat.module_registries(m)
        attributes.append(
            (
                *m.__dict__.values(),
                *parameters.values(),
                *[p is not None and p.requires_grad for p in parameters.values()],
                *buffers.values(),
                *children.values(),
            )
        )
    return attributes


# Attribute values compared by value; anything else (tensors, numpy arrays, objects) by identity:
# an array's ``==`` is elementwise, and equal tensors of another dtype or device are another model.
_VALUE_TYPES = frozenset({int, float, complex, str, bytes, bool, type(None), torch.dtype, torch.device})


def _same(old: Any, new: Any) -> bool:
    return old is new or (type(old) is type(new) and type(old) in _VALUE_TYPES and old == new)


def _unchanged(old: list[tuple], new: list[tuple]) -> bool:
    """True when every attribute is the same object (or an equal plain value) as before.

    Changes inside a container attribute (appending to a list) are not seen; reassigning any
    attribute, parameter or buffer, or calling train()/eval(), is.
    """
    if len(old) != len(new):
        return False
    for old_values, new_values in zip(old, new, strict=True):
        if len(old_values) != len(new_values):
            return False
        if not all(map(operator.is_, old_values, new_values)) and not all(map(_same, old_values, new_values)):
            return False
    return True


# model -> its last plan; weak, so a checkpointer never keeps a model alive. A plan must not refer to
# its model: a value that refers to its weak key keeps it alive for good (a Flower ClientApp builds
# a new model every round, and each would stay in memory).
_plans: weakref.WeakKeyDictionary[nn.Module, _ModulePlan] = weakref.WeakKeyDictionary()


def _plan_of(model: nn.Module) -> _ModulePlan:
    """Pickle the module's structure, or reuse the last plan when no attribute changed since.

    Pickling a module tree costs ~20 us per submodule (25 ms for 1,000 layers), and walking it
    for the state dict a few more: both would dominate the save of many small tensors. Tensor
    values never come from the plan. A new model of a structure seen before reuses its skeleton
    (:mod:`fedckpt.skeleton`).
    """
    cached = _plans.get(model)
    # Walking the cached module list is enough: a replaced child shows in its parent's attributes.
    if (
        cached is not None
        and not cached.extras
        and _unchanged(cached.attributes, _module_attributes([model, *cached.submodules]))
    ):
        return cached
    modules = list(model.modules())
    attributes = _module_attributes(modules)
    tensors = {
        name: value for name, value in model.state_dict(keep_vars=True).items() if isinstance(value, torch.Tensor)
    }
    names_by_id: dict[int, str] = {}
    for name, tensor in tensors.items():
        names_by_id.setdefault(id(tensor), name)
    structure = structure_key(modules, names_by_id)
    pickled, extras = skeleton_of(model, modules, names_by_id, structure)
    plan = _ModulePlan(pickled, extras, attributes, {**tensors, **extras}, modules[1:], structure)
    _plans[model] = plan
    return plan


def _byte_view_of(plan: _ModulePlan, name: str, tensor: torch.Tensor) -> tuple[ByteView, bool]:
    """The tensor's bytes, and whether they are the last save's view (same tensor, same memory laid
    out the same way: a ``.data`` swap to a transposed view keeps the pointer and a square shape)."""
    cached = plan.views.get(name)
    if (
        cached is not None
        and cached[0] is tensor
        and cached[1] == tensor.data_ptr()
        and cached[2] == tensor.shape
        and cached[3] == tensor.stride()
    ):
        return cached[4], True
    dense = contiguous_tensor(tensor, name)
    view = byte_view(dense)
    if dense.data_ptr() == tensor.data_ptr() and not dense.is_neg() and not dense.is_conj():  # not a copy
        plan.views[name] = (tensor, tensor.data_ptr(), tensor.shape, tensor.stride(), view)
    return view, False


def snapshot_module(model: nn.Module) -> Snapshot:
    """The model's tensors by state-dict name, and its pickled structure without tensor data."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected a torch.nn.Module to checkpoint, got {type(model).__name__}")
    plan = _plan_of(model)
    tensors = plan.tensors
    views, reused = {}, True
    for name, tensor in tensors.items():
        views[name], from_cache = _byte_view_of(plan, name, tensor)
        reused = reused and from_cache
    if reused and plan.last is not None:
        return plan.last  # same tensors in the same memory: the same byte views and layout
    entries = data_section(
        {
            name: TensorInfo(
                dtype_name(tensor.dtype), tensor.element_size(), tuple(tensor.shape), nbytes_of(views[name])
            )
            for name, tensor in tensors.items()
        }
    )
    sources = [views[name] for name, *_ in entries]
    offset = sum(nbytes_of(view) for view in sources)
    snapshot = Snapshot(MODULE, offset, sources, {"tensors": entries, "skeleton": plan.pickled})
    plan.last = snapshot if len(plan.views) == len(tensors) else None
    return snapshot


def snapshot_state(state: Any) -> Snapshot:
    """Any picklable object as the records of a ``torch.save`` file (loadable with ``torch.load``)."""
    try:
        collected = state_records(state)
    except Exception as error:
        raise TypeError(f"The state cannot be pickled: {type(error).__name__}: {error}") from error
    return _records_snapshot(collected)


def snapshot_torch_module(model: nn.Module) -> Snapshot:
    """The model as the records of the file ``torch.save(model)`` writes (``.pt`` names), its pickle
    made once per architecture: a new model of a structure seen before (a Flower client builds one
    every round) reuses it, and only its tensors' memory is viewed anew."""
    try:
        plan = _plan_of(model)  # the structure key, reused while the model's attributes are the same
        structure = None if plan.extras else plan.structure
        collected = module_records(model, structure, list(plan.tensors.values()))
    except Exception as error:
        message = str(error) if isinstance(error, TypeError) else f"{type(error).__name__}: {error}"
        raise TypeError(f"The model of type {type(model).__name__} cannot be saved: {message}") from error
    return _records_snapshot(collected, model=True)


def _records_snapshot(collected: list, model: bool = False) -> Snapshot:
    """The records staged back to back, a large one from a block boundary, as in the file
    (:mod:`fedckpt.storage.formats.torch_zip`). A model's file is written past the page cache (a
    state's is read back next round, so it stays there)."""
    records, sources, offset = [], [], 0
    for name, view in collected:
        size = nbytes_of(view)
        padding = -offset % BLOCK if size >= BLOCK_ALIGNED_RECORD_BYTES else 0
        if padding:
            sources.append(_ZEROS[:padding])
            offset += padding
        records.append((name, offset, offset + size))
        sources.append(view)
        offset += size
    return Snapshot(STATE, offset, sources, {"records": records, "direct": model})
