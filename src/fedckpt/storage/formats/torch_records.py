"""The records of a ``torch.save`` file for a state, with their pickled part reused across states of
one structure.

A per-round state (an optimizer's state dict, counters) has the same structure every round; only
its tensor values change, and often its tensors are new objects (a Flower client builds a new
optimizer every round). ``torch.save`` pickles a state object by object through a Python hook
(about 250 us for an SGD state of six tensors). Describing the structure as a key costs a fraction
of that, and two states with equal keys pickle to the same ``data.pkl``: so it is pickled once, and
only the tensors' storages are viewed anew at every save.

The key holds everything ``data.pkl`` depends on: the containers (dict, list, tuple) in order,
every leaf with its exact type (``1``, ``1.0`` and ``True`` differ), which objects appear more than
once (pickle writes a reference the second time), and for every tensor its dtype, shape, stride,
offset, ``requires_grad`` and which storage it views, with that storage's size. Numbers are the
exception: a round counter changes every round. The key holds only how pickle encodes each int
(one, two or four bytes) and float (eight), and the cached ``data.pkl`` is a template whose number
bytes are written anew at each save. A state holding anything else (objects of other classes,
non-empty sets, tensors with Python attributes, on another device, or of another layout) has no
key and is pickled in full every time.

A storage on a CUDA device is named by torch's own pickling without its bytes being touched
(``skip_data``), and its record is a flat byte view of the device memory: the caller's transport
copies it from the GPU straight into the staging memory (``torch.save`` would first copy it to the
CPU, blocking). Tensors on other accelerators (``mps``, ``xpu``) take ``torch.save``'s own path.
"""

from __future__ import annotations

import logging
import pickletools
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedckpt import _compat

log = logging.getLogger("fedckpt")

CACHE_CAPACITY = 64
TEMPLATE_MAX_BYTES = 1 << 16  # a larger data.pkl is cached only as it is (finding its numbers costs)
_LEAVES = frozenset({type(None), bool})
_SHARED = frozenset({str, bytes})  # memoized by pickle: their identity counts
# How pickle's protocol 2 writes a number: the opcode, and the struct of its argument.
_NUMBER_FORMATS = {"BININT1": struct.Struct("<B"), "BININT2": struct.Struct("<H"), "BININT": struct.Struct("<i"),
                   "BINFLOAT": struct.Struct(">d")}  # fmt: skip


@dataclass
class _Template:
    """The records of one structure: (name, bytes) or (name, storage number) for tensor data; and
    where in ``data.pkl`` each number of the state is written (empty when the numbers are in the key)."""

    records: list[tuple[str, bytes | int]]
    number_slots: list[tuple[int, struct.Struct]]


_cache: OrderedDict[tuple, _Template] = OrderedDict()
# Structures seen once: a template is made at the second sighting, so that a state whose structure
# changes at every save (a server's growing history) never pays for making one.
_seen_once: OrderedDict[int, None] = OrderedDict()


# A record's bytes: a view of host memory, or a flat uint8 tensor over a CUDA storage.
RecordView = np.ndarray | torch.Tensor


class _RecordCollector:
    """Stands in for torch's zip writer: keeps each record torch.save would write, in order."""

    def __init__(self) -> None:
        self.records: list[tuple[str, RecordView | None]] = []  # None: a storage named under skip_data
        self.storages: list[torch.UntypedStorage] = []
        self.storage_names: set[str] = set()
        self.named_sizes: list[int] = []  # under skip_data: each storage's size, in the order named

    def write_record(self, name: str, data: Any, nbytes: int) -> None:
        if isinstance(data, str):
            data = data.encode()
        if isinstance(data, bytes):
            view = np.frombuffer(data, dtype=np.uint8)
        else:  # an UntypedStorage already on the CPU: view its bytes
            self.storages.append(data)
            self.storage_names.add(name)
            view = storage_view(data)
        self.records.append((name, view))

    def write_record_metadata(self, name: str, nbytes: int) -> None:
        """A storage named without its bytes (``skip_data``): :meth:`fill` puts it in its place."""
        self.storage_names.add(name)
        self.named_sizes.append(nbytes)
        self.records.append((name, None))

    def fill(self, storages: list[torch.UntypedStorage]) -> bool:
        """Put ``storages`` (in the order pickling meets them: :func:`describe`'s) in the places named
        under ``skip_data``; False, and nothing changed, if their number or sizes do not match."""
        if [storage.nbytes() for storage in storages] != self.named_sizes:
            return False
        placed = iter(storages)
        self.records = [(name, storage_view(next(placed)) if view is None else view) for name, view in self.records]
        self.storages = list(storages)
        return True


def storage_view(storage: torch.UntypedStorage) -> RecordView:
    """A storage's bytes, flat: a numpy view on the CPU, a uint8 tensor over the storage on a GPU."""
    if storage.device.type == "cpu":
        return np.asarray(_HostBytes(storage))
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (storage.nbytes(),), (1,))


class _HostBytes:
    """A CPU storage's bytes as numpy takes them (the array's base: it keeps the storage alive). A
    third of the cost of a uint8 tensor over the storage and its ``.numpy()``: a state of many small
    tensors makes one per tensor on every save."""

    __slots__ = ("__array_interface__", "storage")

    def __init__(self, storage: torch.UntypedStorage) -> None:
        self.storage = storage
        self.__array_interface__ = {
            "data": (storage.data_ptr(), False), "shape": (storage.nbytes(),), "typestr": "|u1", "version": 3
        }  # fmt: skip


def state_records(state: Any) -> list[tuple[str, RecordView]]:
    """The records ``torch.save(state)`` writes, in order, as byte views (storages not copied)."""
    return _records(state, describe(state))


def module_records(model: Any, structure: tuple | None, tensors: list[torch.Tensor]) -> list[tuple[str, RecordView]]:
    """The records ``torch.save(model)`` writes for an ``nn.Module``, the pickle reused across models
    of one architecture.

    ``structure`` is the model's :func:`fedckpt.skeleton.structure_key` (None: not described, pickled
    in full), ``tensors`` its state dict's tensors in order, which is the order pickling meets them
    (each module's parameters, then its buffers, then its children). The key adds each tensor's
    dtype, shape, stride, storage and device; the first model of a key is pickled in full and checked
    to meet its storages in that order, or it is not cached. That check needs the storages torch's
    pickling meets, which it copies to the CPU first when they are on a GPU: a model with GPU tensors
    is pickled in full every time (a class may lay out its state dict in its own order).
    """
    described = None
    if structure is not None:
        storages: dict[int, int] = {}
        found: list[torch.UntypedStorage] = []
        keys = []
        for tensor in tensors:
            tensor_key = _tensor_key(tensor, storages, found)
            if tensor_key is None:
                break
            keys.append(tensor_key)
        else:
            if all(storage.device.type == "cpu" for storage in found):
                described = _Described(("module", structure, tuple(keys)), found, [])
    return _records(model, described, first_sighting=True)


def _records(state: Any, described: _Described | None, first_sighting: bool = False) -> list[tuple[str, RecordView]]:
    """The records of ``state`` from the template of its description, or from torch's own pickling
    (made a template at the second sighting of the description, or the first with ``first_sighting``)."""
    if described is not None:
        template = _cache.get(described.key)
        if template is not None:
            _cache.move_to_end(described.key)
            return _fill(template, described)
        if any(storage.device.type != "cpu" for storage in described.storages):
            collector = _RecordCollector()
            _compat.torch_save_records(state, collector, skip_data=True)  # names them; no copy to the CPU
            if collector.fill(described.storages):
                _remember(state, described, collector, first_sighting)
                return collector.records  # type: ignore[return-value]  # fill left no None
            log.warning("fedckpt: torch's pickling named the storages of a state otherwise than expected; "
                        "its GPU tensors are copied to the CPU first")  # fmt: skip
    collector = _RecordCollector()
    # torch.save's own pickling, so the file is exactly what torch.save would write.
    _compat.torch_save_records(state, collector)
    if described is not None and _same_storages(collector.storages, described.storages):
        _remember(state, described, collector, first_sighting)
    return collector.records  # type: ignore[return-value]  # without skip_data every record has its view


def _fill(template: _Template, described: _Described) -> list[tuple[str, RecordView]]:
    records = []
    for name, data in template.records:
        if isinstance(data, int):
            records.append((name, storage_view(described.storages[data])))
        elif name == "data.pkl" and template.number_slots:
            pickled = bytearray(data)
            for (position, encoding), number in zip(template.number_slots, described.numbers, strict=True):
                encoding.pack_into(pickled, position, number)
            records.append((name, np.frombuffer(pickled, dtype=np.uint8)))
        else:
            records.append((name, np.frombuffer(data, dtype=np.uint8)))
    return records


def _remember(state: Any, described: _Described, collector: _RecordCollector, first_sighting: bool = False) -> None:
    """Cache the records of this structure, with the places of its numbers in ``data.pkl`` (at its
    second sighting, unless ``first_sighting``)."""
    fingerprint = hash(described.key)
    if not first_sighting and fingerprint not in _seen_once:
        _seen_once[fingerprint] = None
        while len(_seen_once) > CACHE_CAPACITY:
            _seen_once.popitem(last=False)
        return
    numbers = iter(range(len(collector.storages)))
    records = [
        (name, next(numbers) if name in collector.storage_names else view.tobytes())  # type: ignore[union-attr]
        for name, view in collector.records
    ]
    pickled = next(data for name, data in records if name == "data.pkl")
    assert isinstance(pickled, bytes)
    slots: list[tuple[int, struct.Struct]] = []
    if described.numbers:
        if len(pickled) > TEMPLATE_MAX_BYTES:
            return
        found = _number_slots(state, pickled, len(described.numbers))
        if found is None:
            return
        slots = found
    _cache[described.key] = _Template(records, slots)
    while len(_cache) > CACHE_CAPACITY:
        _cache.popitem(last=False)


def _number_slots(state: Any, pickled: bytes, count: int) -> list[tuple[int, struct.Struct]] | None:
    """Where each number of ``state`` is written in its ``data.pkl``, in order: found by pickling
    it once more with every number changed (by its lowest bit, which keeps each int's encoding),
    and comparing the two opcode streams. None if they do not line up as expected."""
    twin = _with_numbers_flipped(state, {})
    collector = _RecordCollector()
    _compat.torch_save_records(twin, collector, skip_data=True)  # only its data.pkl is read: no storage copied
    other = next(view.tobytes() for name, view in collector.records if name == "data.pkl")  # type: ignore[union-attr]
    ops, other_ops = list(pickletools.genops(pickled)), list(pickletools.genops(other))
    if len(ops) != len(other_ops) or len(pickled) != len(other):
        return None
    slots = []
    for (op, arg, position), (other_op, other_arg, _) in zip(ops, other_ops, strict=True):
        if op.name != other_op.name:
            return None
        if arg != other_arg and op.name in _NUMBER_FORMATS:
            slots.append((position + 1, _NUMBER_FORMATS[op.name]))  # the argument follows the opcode
    return slots if len(slots) == count else None


def _with_numbers_flipped(value: Any, copies: dict[int, Any]) -> Any:
    """A copy of the containers of ``value`` with every int and float changed, and everything else
    (tensors, strings) the same objects; shared containers stay shared."""
    kind = type(value)
    if kind is int:
        return value ^ 1
    if kind is float:
        return struct.unpack("<d", struct.pack("<Q", struct.unpack("<Q", struct.pack("<d", value))[0] ^ 1))[0]
    if kind not in (dict, list, tuple):
        return value
    if id(value) in copies:
        return copies[id(value)]
    if kind is dict:
        copy: Any = {}
        copies[id(value)] = copy
        for key, item in value.items():
            copy[_with_numbers_flipped(key, copies)] = _with_numbers_flipped(item, copies)
        return copy
    if kind is list:
        copy = []
        copies[id(value)] = copy
        copy.extend(_with_numbers_flipped(item, copies) for item in value)
        return copy
    copy = tuple(_with_numbers_flipped(item, copies) for item in value)
    copies[id(value)] = copy
    return copy


def _same_storages(recorded: list[torch.UntypedStorage], described: list[torch.UntypedStorage]) -> bool:
    """Whether the walk met the storages in the order torch's pickling recorded them."""
    return len(recorded) == len(described) and all(
        _compat.storage_identity(a) == _compat.storage_identity(b) for a, b in zip(recorded, described, strict=True)
    )


@dataclass
class _Described:
    key: tuple
    storages: list[torch.UntypedStorage]  # in the order pickling meets them
    numbers: list[int | float]  # the state's numbers, in the order pickling writes them


def describe(state: Any) -> _Described | None:
    """The key of ``state``, its storages and its numbers, or None (see the module docstring)."""
    key: list[Any] = []
    numbers: list[int | float] = []
    seen: dict[int, int] = {}  # id of an object pickle memoizes -> its index, for references
    storages: dict[int, int] = {}  # storage -> its record number
    found: list[torch.UntypedStorage] = []
    append = key.append
    stack = [state]
    while stack:
        value = stack.pop()
        kind = type(value)
        if kind in _LEAVES:
            append((kind, value))
            continue
        if kind is int:
            encoding = _int_encoding(value)
            append((int, encoding or value))  # an int outside 32 bits is part of the key itself
            if encoding is not None:
                numbers.append(value)
            continue
        if kind is float:
            append(float)
            numbers.append(value)
            continue
        index = seen.get(id(value))
        if index is not None:
            append(("ref", index))
            continue
        if kind in _SHARED:
            seen[id(value)] = len(seen)
            append((kind, value))
        elif kind is dict:
            seen[id(value)] = len(seen)
            append((dict, len(value)))
            for item in reversed(value.items()):  # the stack pops them in order: key, then value
                stack.append(item[1])
                stack.append(item[0])
        elif kind is list or kind is tuple:
            seen[id(value)] = len(seen)
            append((kind, len(value)))
            stack.extend(reversed(value))
        elif kind is torch.Tensor:
            seen[id(value)] = len(seen)
            tensor_key = _tensor_key(value, storages, found)
            if tensor_key is None:
                return None
            append(tensor_key)
        elif kind is torch.dtype:
            append((kind, value))
        else:
            return None
    return _Described(tuple(key), found, numbers)


def _int_encoding(value: int) -> str | None:
    """The opcode pickle's protocol 2 writes ``value`` with, if its argument has a fixed size."""
    if 0 <= value < 1 << 8:
        return "BININT1"
    if 0 <= value < 1 << 16:
        return "BININT2"
    if -(1 << 31) <= value < 1 << 31:
        return "BININT"
    return None


_FOREIGN_LOGGED: set[str] = set()


def _tensor_key(tensor: torch.Tensor, storages: dict[int, int], found: list[torch.UntypedStorage]) -> tuple | None:
    device = tensor.device
    kind = device.type
    if kind not in ("cpu", "cuda") and kind not in _FOREIGN_LOGGED:
        _FOREIGN_LOGGED.add(kind)
        log.warning(
            "fedckpt: a state holds tensors on %s: torch.save's own pickling copies them to the CPU (.cpu(), "
            "blocking); only CUDA tensors are copied straight into staging memory",
            kind,
        )
    if (
        kind not in ("cpu", "cuda")
        or tensor.layout != torch.strided
        or tensor.is_quantized
        or tensor.__getstate__()  # Python attributes: torch pickles them with it, as __getstate__ gives them
        or _compat.tensor_serialization_metadata(tensor)  # its conjugate and negative bits, among others
    ):
        return None
    storage = tensor.untyped_storage()
    identity = _compat.storage_identity(storage)
    number = storages.get(identity)
    if number is None:
        number = storages[identity] = len(found)
        found.append(storage)
    return (
        tensor.dtype, tuple(tensor.shape), tensor.stride(), tensor.storage_offset(), tensor.requires_grad,
        number, storage.nbytes(), device,  # the device is in data.pkl (its location tag)
    )  # fmt: skip
