"""The on-disk formats: which file layout a checkpoint has, and where each byte goes in it.

* ``module``: a model checkpoint. A safetensors file (:mod:`.safetensors_file`): the state-dict
  tensors, plus the model's pickled structure (without tensor data) in the header metadata.
  ``load_state_dict`` reads the tensors without running pickle; ``load_checkpoint`` rebuilds the
  ``nn.Module``.
* ``state``: a per-round state checkpoint in ``torch.save``'s zip format (:mod:`.torch_zip`): the
  records torch's own pickling produced (:mod:`.torch_records`), so ``torch.load(path,
  weights_only=False)`` (``mmap=True`` too) reads it.

The caller's snapshot gives byte views and tensor metadata; these modules decide the order of the
bytes in a file. Writing needs neither torch nor its zip writer: a writer process that imports
torch spends about 1.3 s of CPU on it, taken from training on a busy node (only ``torch_records``,
used on the caller side, imports torch). Reading is in :mod:`fedckpt.storage.reading`.
"""

from __future__ import annotations

import json
from typing import Any

import safetensors

MODULE = "module"
STATE = "state"

# One metadata key holding JSON: the file is the same bytes (and checksum) whoever writes it.
METADATA_KEY = "fedckpt"
MODULE_FORMAT_VERSION = "module/1"


def file_format(path: str) -> str:
    """``module`` for a fedckpt model file, ``state`` for a torch zip file, ``unknown`` otherwise."""
    with open(path, "rb") as file:
        head = file.read(9)
    if head[:2] == b"PK":
        return STATE
    if len(head) == 9 and head[8:9] == b"{":
        try:
            with safetensors.safe_open(path, framework="numpy") as handle:
                if description(handle).get("format", "").startswith("module/"):
                    return MODULE
        except Exception:
            return "unknown"
    return "unknown"


def description(handle: Any) -> dict[str, str]:
    """The fedckpt metadata of an open safetensors file (empty if it has none)."""
    metadata = handle.metadata() or {}
    try:
        return json.loads(metadata.get(METADATA_KEY, "{}"))
    except ValueError:
        return {}
