"""A client's state kept in Flower's ``context.state`` as well as on storage.

Flower keeps a simulated client's ``Context`` in memory across the rounds of a run (not across a
restart). Restoring from it costs a few copies; restoring from the state file costs a wait for
pending saves and a ``torch.load``. So a client's state is also put there when it is saved, and
read from the file only when the context holds none (after a restart). Flower ships the context
with each message, so this is worth it for small states only (``max_bytes``).

The state's tensors go into an ``ArrayRecord`` and the rest of its structure, pickled with
references to them, into a ``ConfigRecord``.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context

RECORD = "fedckpt.client_state"  # the ConfigRecord: structure, round, slot
ARRAYS = "fedckpt.client_state.arrays"
TENSOR_TAG = "fedckpt.tensor"


class _TensorsOut(pickle.Pickler):
    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors: dict[str, torch.Tensor] = {}

    def persistent_id(self, obj: Any) -> Any:
        if not isinstance(obj, torch.Tensor):
            return None
        name = str(len(self.tensors))
        self.tensors[name] = obj.detach()
        return (TENSOR_TAG, name, obj.requires_grad)


class _TensorsIn(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, arrays: ArrayRecord) -> None:
        super().__init__(file)
        self.arrays = arrays

    def persistent_load(self, pid: Any) -> Any:
        tag, name, requires_grad = pid
        if tag != TENSOR_TAG:
            raise pickle.UnpicklingError(f"unknown persistent id {tag!r} in a client state")
        return torch.from_numpy(self.arrays[name].numpy()).requires_grad_(requires_grad)


def state_bytes(state: Any) -> int:
    """The tensor bytes of a (nested) state: what keeping it in the context costs per message."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(value) for value in state)
    return 0


def keep(context: Context, state: dict[str, Any], server_round: int, slot: int) -> None:
    """Put a copy of ``state`` (saved in ``slot`` for ``server_round``) into ``context.state``."""
    buffer = io.BytesIO()
    pickler = _TensorsOut(buffer)
    pickler.dump(state)
    arrays = ArrayRecord(torch_state_dict=pickler.tensors)  # copies: later changes do not reach it
    context.state[RECORD] = ConfigRecord({"structure": buffer.getvalue(), "round": server_round, "slot": slot})
    context.state[ARRAYS] = arrays


def forget(context: Context) -> None:
    for name in (RECORD, ARRAYS):
        if name in context.state:
            del context.state[name]


def kept(context: Context) -> tuple[int, int] | None:
    """(round, slot) of the state the context holds, or None."""
    record = context.state.get(RECORD)
    return None if record is None else (int(record["round"]), int(record["slot"]))


def restore(context: Context) -> dict[str, Any]:
    """The state the context holds (tensors are fresh copies)."""
    record, arrays = context.state[RECORD], context.state[ARRAYS]
    return _TensorsIn(io.BytesIO(record["structure"]), arrays).load()
