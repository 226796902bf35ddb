"""A model's skeleton: its pickled structure with every tensor replaced by its state-dict name.

Pickling a module tree costs about 20 us per submodule, a good part of saving a small model. A
Flower ClientApp builds a new model every round, so the snapshot's per-model plan never helps
there. But two models of the same structure pickle to the same bytes, and describing a structure
as a tuple of plain attribute values costs about a tenth of pickling it. So skeletons are cached
by that description (:func:`structure_key`) across model instances.

The description covers everything the skeleton pickle holds: each module's class, its attributes
in order, their values (exact types: ``1``, ``1.0`` and ``True`` differ, and floats by their bits),
which state-dict name each parameter and buffer has, and which child is which module. A model with
anything else in its attributes (a non-empty hook dict, a list of objects, a tensor that is not a
parameter or buffer, a class with its own pickling) has no description and is pickled every time.
"""

from __future__ import annotations

import copyreg
import io
import pickle
import struct
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from fedckpt import _compat

SKELETON_TENSOR_TAG = "fedckpt.tensor"
EXTRA_TENSOR_PREFIX = "__fedckpt_extra__."
CACHE_CAPACITY = 64

_PLAIN = frozenset({type(None), int, str, bytes, torch.dtype})
_FLOAT = struct.Struct("<d")
_cache: OrderedDict[tuple, bytes] = OrderedDict()
_class_ok: dict[type, bool] = {}


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


_UNKNOWN: Any = object()


def skeleton_of(
    model: nn.Module, modules: list[nn.Module], names_by_id: dict[int, str], key: tuple | None = _UNKNOWN
) -> tuple[bytes, dict[str, torch.Tensor]]:
    """The skeleton of ``model`` (whose module tree is ``modules``), and the tensors it holds that
    are neither parameters nor buffers (saved as extra tensors). ``key``: its :func:`structure_key`,
    if the caller has it already."""
    if key is _UNKNOWN:
        key = structure_key(modules, names_by_id)
    if key is not None and key in _cache:
        _cache.move_to_end(key)
        return _cache[key], {}
    extras: dict[str, torch.Tensor] = {}
    buffer = io.BytesIO()
    try:
        _SkeletonPickler(buffer, dict(names_by_id), extras).dump(model)
    except Exception as error:
        raise TypeError(f"The model of type {type(model).__name__} cannot be pickled: {error}") from error
    pickled = buffer.getvalue()
    if key is not None and not extras:
        _cache[key] = pickled
        while len(_cache) > CACHE_CAPACITY:
            _cache.popitem(last=False)
    return pickled, extras


def structure_key(modules: list[nn.Module], names_by_id: dict[int, str]) -> tuple | None:
    """A description of everything the skeleton of the tree ``modules`` holds, or None if there
    is something in it this does not describe (see the module docstring)."""
    index_of = {id(module): index for index, module in enumerate(modules)}
    key: list[Any] = []
    for module in modules:
        cls = type(module)
        if not _class_ok.get(cls, False) and not _check_class(cls):
            return None
        key.append(cls)
        for name, value in module.__dict__.items():
            kind = type(value)
            if kind in _PLAIN:
                key.append((kind, value))
            elif kind is bool:
                key.append((bool, value))
            elif kind is float:
                key.append((float, _FLOAT.pack(value)))
            elif name == _compat.MODULE_PARAMETERS or name == _compat.MODULE_BUFFERS:
                names = _tensor_names(value, names_by_id)
                if names is None:
                    return None
                key.append(names)
            elif name == _compat.MODULE_CHILDREN:
                key.append(tuple((child, index_of.get(id(module_), -1)) for child, module_ in value.items()))
            elif kind in (dict, OrderedDict, set) and not value:  # hooks, the non-persistent buffer names
                key.append(kind)
            elif kind in (tuple, list) and all(type(item) in _PLAIN or type(item) is bool for item in value):
                key.append((kind, *((type(item), item) for item in value)))
            elif name == _compat.MODULE_NOT_PICKLED:  # left out by Module.__getstate__
                continue
            else:
                return None
    return tuple(key)


def _tensor_names(tensors: Any, names_by_id: dict[int, str]) -> tuple | None:
    if type(tensors) not in (dict, OrderedDict):
        return None
    return tuple(
        (name, None if tensor is None else (names_by_id.get(id(tensor)), type(tensor), tensor.requires_grad))
        for name, tensor in tensors.items()
    )


def _check_class(cls: type) -> bool:
    """Whether instances of ``cls`` pickle as their ``__dict__`` (as ``nn.Module`` does)."""
    ok = (
        cls.__getstate__ is nn.Module.__getstate__
        and cls.__reduce_ex__ is object.__reduce_ex__
        and cls.__reduce__ is object.__reduce__
        and not copyreg._slotnames(cls)
        and not hasattr(cls, "__getnewargs__")
        and not hasattr(cls, "__getnewargs_ex__")
    )
    _class_ok[cls] = ok
    return ok
