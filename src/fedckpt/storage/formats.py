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
import struct
import warnings
from typing import Any

import safetensors
import torch
from torch import nn

from fedckpt.skeleton import EXTRA_TENSOR_PREFIX, SKELETON_TENSOR_TAG
from fedckpt.snapshot import MODULE, STATE
from fedckpt.storage.direct import BLOCK, HashingFile

# One metadata key holding JSON: the file is the same bytes (and checksum) whoever writes it.
METADATA_KEY = "fedckpt"
MODULE_FORMAT_VERSION = "module/1"


def safetensors_header(layout: dict[str, Any]) -> bytes:
    """The safetensors header (length prefix, JSON, space padding to a block) of a module snapshot."""
    header: dict[str, Any] = {
        name: {"dtype": code, "shape": list(shape), "data_offsets": [begin, end]}
        for name, code, shape, begin, end in layout["tensors"]
    }
    description = {"format": MODULE_FORMAT_VERSION, "skeleton": base64.b64encode(layout["skeleton"]).decode()}
    header["__metadata__"] = {METADATA_KEY: json.dumps(description, sort_keys=True)}
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    # Spaces pad the header so that the data section starts on a block boundary: the writer can then
    # send the staged data to disk as it is (direct I/O). JSON ignores them; safetensors allows them.
    text += b" " * (-(len(text) + 8) % BLOCK)
    return struct.pack("<Q", len(text)) + text


def write_module_file(header: bytes, data: memoryview, path: str) -> None:
    """Write a module snapshot as one safetensors file: ``header`` (:func:`safetensors_header`),
    then the data region as staged.

    The staged data is already in safetensors order, so this is one sequential write. The caller
    knows the file's checksum already (it is the checksum of ``header`` and ``data``).
    """
    out = HashingFile(path, checksum=False)
    try:
        out.write(header)
        out.write(data)
    finally:
        out.close()


def write_state_file(layout: dict[str, Any], data: memoryview, path: str) -> str:
    """Write the records collected from torch's own pickling in torch's zip format; return its checksum.

    Buffered, unlike model files: a state is read back soon (a Flower client restores it at the
    start of its next round), and from the page cache that read is a memory copy, not a disk read.
    """
    out = HashingFile(path, direct=False)
    try:
        writer = torch._C.PyTorchFileWriter(
            out, torch.serialization.get_crc32_options(), torch.serialization._get_storage_alignment()
        )
        for name, begin, end in layout["records"]:
            if not name.startswith("data/"):  # data.pkl, version, byteorder...: small
                writer.write_record(name, bytes(data[begin:end]), end - begin)
                continue
            with warnings.catch_warnings():  # the staged bytes are read-only; torch only reads them
                warnings.simplefilter("ignore", UserWarning)
                storage = (
                    torch.frombuffer(data, dtype=torch.uint8, count=end - begin, offset=begin)
                    if end > begin
                    else torch.empty(0, dtype=torch.uint8)
                )
            writer.write_record(name, storage.untyped_storage(), end - begin)
        writer.write_end_of_file()
    finally:
        checksum = out.close()
    assert checksum is not None
    return checksum


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


def read_state(path: str, mmap: bool = False) -> Any:
    """Load a state checkpoint (runs pickle: load only files you trust); ``mmap`` maps tensor data."""
    return torch.load(path, weights_only=False, mmap=mmap)
