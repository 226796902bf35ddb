"""Reading the two formats of :mod:`fedckpt.storage.formats` back into torch objects.

A checkpoint is read from its local file in place (mapped where that is faster), or, on an object
store, from a seekable file over its current version that fetches ranges as they are read
(:func:`read_checkpoint`, :mod:`fedckpt.storage.object_file`): each tensor is read straight into its
own memory, so a load holds the checkpoint and a bounded buffer, never a copy of the whole object.

A load onto a CUDA device (``device=``, ``map_location=``) reads the bytes into page-locked host memory
(torch's caching host allocator) and copies each tensor to the device without blocking, ordered on
the current stream: the returned tensors are ready for whatever that stream runs next.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import io
import json
import os
import pickle
import struct
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, BinaryIO, TypeVar

import safetensors
import safetensors.torch
import torch
from torch import nn

from fedckpt.skeleton import EXTRA_TENSOR_PREFIX, SKELETON_TENSOR_TAG

# posix, the local backend, comes with the loaders rather than with a first load: importing it reads
# files, and each read waits again for the GIL behind whatever else the process runs (with Flower
# starting its simulation beside a ServerApp, a server's first look for its state took 0.1 s, not 1 ms).
from fedckpt.storage import formats, posix  # noqa: F401
from fedckpt.storage.base import storage_for
from fedckpt.storage.formats.safetensors_file import SAFETENSORS_CODES
from fedckpt.storage.host_memory import copy_to_host, host_bytes
from fedckpt.storage.small_state import load_small_state

Source = str | BinaryIO  # a local file's path, or a seekable binary file of a version (an object store's)
Device = str | torch.device | None  # where a load puts the tensors (None: where they were saved, or the CPU)
T = TypeVar("T")


def cuda_device(device: Any) -> torch.device | None:
    """``device`` as a ``torch.device`` if it names a CUDA device, else None (``torch.load``'s other
    ``map_location`` forms: a dict, a function, ``"cpu"``)."""
    if isinstance(device, (str, torch.device)):
        parsed = torch.device(device)
        return parsed if parsed.type == "cuda" else None
    return None


def read_checkpoint(path: str, storage_options: Mapping[str, Any] | None, read: Callable[[Source, str], T]) -> T:
    """``read(source, format)`` of checkpoint ``path``'s current version, its format one of ``module``,
    ``state`` or ``unknown``. ``FileNotFoundError`` if it has none. On an object store ``read`` may
    run again, on a newer version, if the one it was reading was deleted under it."""

    def read_version(entry: Any, file: BinaryIO) -> T:
        assert entry is not None  # a version on an object store is always named by its entry
        return read(file, entry.format)

    return _read_current(path, storage_options, lambda local: read(local, formats.file_format(local)), read_version)


def read_state_checkpoint(path: str, storage_options: Mapping[str, Any] | None, read: Callable[[Source], T]) -> T:
    """:func:`read_checkpoint` for a state, which is a torch zip file whatever its name: its format is
    not looked up (a local file's first bytes: an open and a read, on every restore)."""
    return _read_current(path, storage_options, read, lambda _entry, file: read(file))


def _read_current(
    path: str,
    storage_options: Mapping[str, Any] | None,
    read_local: Callable[[str], T],
    read_version: Callable[[Any, BinaryIO], T],
) -> T:
    """``read_local`` of a local file's path, else ``read_version`` of the object store's current
    version (its entry and an open file)."""
    storage = storage_for(path, storage_options)
    local = storage.local_path(path)
    if local is not None:
        return read_local(local)
    return storage.read_current(path, read_version)


# safetensors dtype code -> torch dtype, for every code fedckpt writes.
_DTYPES = {code: getattr(torch, name) for name, code in SAFETENSORS_CODES.items() if hasattr(torch, name)}


def _header(file: BinaryIO) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file, and where its data section starts."""
    file.seek(0)
    (length,) = struct.unpack("<Q", _read_exactly(file, 8))
    return json.loads(_read_exactly(file, length)), 8 + length


def _read_exactly(file: BinaryIO, count: int) -> bytes:
    data = file.read(count)
    if len(data) != count:
        raise ValueError(f"Truncated safetensors file: {len(data)} of {count} bytes")
    return data


@dataclasses.dataclass(frozen=True)
class TensorSpan:
    """One tensor of a safetensors file: its bytes ``begin``-``stop`` of the data section."""

    name: str
    dtype: torch.dtype
    shape: list[int]
    begin: int
    stop: int


def _tensor_spans(header: dict[str, Any]) -> list[TensorSpan]:
    """The header's tensors in file order, checked to fill the data section back to back."""
    spans, end = [], 0
    items = sorted((info["data_offsets"], name, info) for name, info in header.items() if name != "__metadata__")
    for (begin, stop), name, info in items:
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"Tensor {name!r} has dtype {info['dtype']!r}, which fedckpt does not read")
        shape = [int(size) for size in info["shape"]]
        if stop - begin != torch.Size(shape).numel() * dtype.itemsize or begin != end:
            raise ValueError(f"Tensor {name!r}: bytes {begin}-{stop} do not hold shape {shape} of {dtype} after {end}")
        spans.append(TensorSpan(name, dtype, shape, begin, stop))
        end = stop
    return spans


def _file_tensors(file: BinaryIO, header: dict[str, Any], data_start: int) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, each read straight into a tensor of its own (no other copy):
    from an object store's file all in one read (:meth:`ObjectFile.read_views`)."""
    tensors, views = {}, []
    for span in _tensor_spans(header):
        raw = host_bytes(span.stop - span.begin)
        views.append(memoryview(raw.numpy()))
        tensors[span.name] = raw.view(span.dtype).reshape(span.shape)
    read_views = getattr(file, "read_views", None)
    if read_views is not None:
        read_views(data_start, views)
        return tensors
    file.seek(data_start)
    for view in views:
        done = 0
        while done < len(view):
            got = file.readinto(view[done:])
            if not got:
                raise ValueError("Truncated safetensors file: a tensor ends past the end of the file")
            done += got
    return tensors


def page_locked(nbytes: int) -> torch.Tensor:
    """A page-locked host buffer from torch's caching host allocator (reused once its copies completed)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def _device_tensors(
    file: BinaryIO, header: dict[str, Any], data_start: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file on ``device``: the data section read into one page-locked
    buffer, then each tensor copied to the device without blocking (the buffer goes back to torch's
    caching host allocator, which reuses it only once those copies completed)."""
    spans = _tensor_spans(header)
    end = spans[-1].stop if spans else 0
    pinned = page_locked(end)
    whole = memoryview(pinned.numpy())
    read_views = getattr(file, "read_views", None)
    if read_views is not None:
        read_views(data_start, [whole])
    else:
        file.seek(data_start)
        done = 0
        while done < end:
            got = file.readinto(whole[done:])  # type: ignore[attr-defined]
            if not got:
                raise ValueError("Truncated safetensors file: a tensor ends past the end of the file")
            done += got
    tensors = {}
    for span in spans:
        host = pinned[span.begin : span.stop]
        if span.begin % span.dtype.itemsize:  # not laid out by fedckpt (which aligns every tensor): an aligned copy
            host = host.clone()
        tensors[span.name] = host.view(span.dtype).reshape(span.shape).to(device, non_blocking=True)
    return tensors


def _module_file(source: Source, device: Device = None) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """fedckpt's metadata in a module file's safetensors header, and the file's tensors (on ``device``)."""
    cuda = cuda_device(device)
    if cuda is not None:
        with open(source, "rb") if isinstance(source, str) else contextlib.nullcontext(source) as file:
            header, data_start = _header(file)
            metadata = header.get("__metadata__") or {}
            description = json.loads(metadata.get(formats.METADATA_KEY, "{}"))
            return description, _device_tensors(file, header, data_start, cuda)
    description, tensors = _module_file_on_host(source)
    if device is not None:
        tensors = {name: tensor.to(device) for name, tensor in tensors.items()}
    return description, tensors


def _module_file_on_host(source: Source) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    if isinstance(source, str):
        with safetensors.safe_open(source, framework="pt") as handle:
            description = formats.description(handle)
        return description, safetensors.torch.load_file(source)
    header, data_start = _header(source)
    metadata = header.get("__metadata__") or {}
    return json.loads(metadata.get(formats.METADATA_KEY, "{}")), _file_tensors(source, header, data_start)


def read_state_dict(source: Source, device: Device = None) -> dict[str, torch.Tensor]:
    """The tensors of a module checkpoint, by state-dict name (on ``device``); no pickle is run."""
    if isinstance(source, str) and device is None:
        tensors = safetensors.torch.load_file(source)
    else:
        tensors = _module_file(source, device)[1]
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


def read_module(source: Source, device: Device = None) -> nn.Module:
    """Rebuild the ``nn.Module`` saved in a module checkpoint (runs pickle, like ``torch.load``), its
    tensors on ``device``."""
    description, tensors = _module_file(source, device)
    skeleton = base64.b64decode(description["skeleton"])
    return _SkeletonUnpickler(io.BytesIO(skeleton), tensors).load()


# A state file this large is read mapped, then copied out: one copy from the page cache, where a
# full read has torch also check every record's CRC-32 (twice as slow at 100 MB, benchmarks/restore.py).
# The copies land on huge pages (storage/host_memory.py).
MAPPED_READ_MIN_BYTES = 1 << 20


def read_state(source: Source, mmap: bool = False, map_location: Any = None) -> Any:
    """Load a state checkpoint (runs pickle: load only files you trust); ``mmap`` maps a local file's
    tensor data, else every tensor is in memory. ``map_location`` is ``torch.load``'s; a CUDA device
    takes each storage through page-locked memory to the device without blocking."""
    cuda = cuda_device(map_location)
    if cuda is not None:
        to_device = partial(_storage_to_device, device=cuda)
        if isinstance(source, str):  # mapped: each storage is read once, into page-locked memory
            return torch.load(source, weights_only=False, mmap=True, map_location=to_device)
        return torch.load(source, weights_only=False, map_location=to_device)
    if not isinstance(source, str):  # torch reads each record into its storage with readinto
        return torch.load(source, weights_only=False, map_location=map_location)
    path = source
    small = os.path.getsize(path) < MAPPED_READ_MIN_BYTES
    if small and not mmap and map_location is None:
        try:
            return load_small_state(path)
        except Exception:  # NeedsTorchLoad, or a damaged file: torch.load gives the error users know
            pass
    if mmap or small:
        return torch.load(path, weights_only=False, mmap=mmap, map_location=map_location)
    if map_location is None:  # mapped, then each storage copied out into memory of its own
        return torch.load(path, weights_only=False, mmap=True, map_location=copy_to_host)
    return copy.deepcopy(torch.load(path, weights_only=False, mmap=True, map_location=map_location))


def _storage_to_device(storage: torch.UntypedStorage, location: str, device: torch.device) -> torch.UntypedStorage:
    """``torch.load``'s ``map_location`` for a CUDA device: the storage's bytes into page-locked memory,
    then to ``device`` without blocking (ordered on its current stream)."""
    pinned = page_locked(storage.nbytes()).untyped_storage()
    pinned.copy_(storage)
    on_device = torch.UntypedStorage(storage.nbytes(), device=device)
    on_device.copy_(pinned, non_blocking=True)
    return on_device
