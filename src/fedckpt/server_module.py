"""``ServerCheckpointAndStateModule``: a Flower server's model checkpoints and state, saved in the background.

The server holds parameters (Flower's ``ArrayRecord``, legacy ``Parameters`` or a list of
ndarrays), not a model: ``maybe_checkpoint`` loads them into ``model`` and hands the model to the
same asynchronous checkpointers the clients use.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fedckpt.checkpoint_module import (
    CheckpointAndStateModule,
    ModelCheckpointers,
    as_checkpointer_list,
    check_unique_paths,
    checkpoint_model,
)
from fedckpt.checkpointers import TorchModuleCheckpointer
from fedckpt.policies import Scalar
from fedckpt.state import PerRoundStateCheckpointer

log = logging.getLogger("fedckpt")


def parameters_as_state_dict(parameters: Any, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Flower parameters as a state dict; ``names`` orders the arrays of unnamed kinds.

    Accepts an ``ArrayRecord`` (its own names), a legacy ``Parameters``, a list of ndarrays or
    tensors (in ``names`` order), or a mapping of names to arrays. Flower is needed for its own
    kinds only (it is an optional dependency).
    """
    if sys.modules.get("flwr") is not None:  # only an imported Flower can have made an ArrayRecord or Parameters
        from flwr.app import ArrayRecord
        from flwr.common import Parameters, parameters_to_ndarrays

        if isinstance(parameters, ArrayRecord):
            return dict(parameters.to_torch_state_dict())
        if isinstance(parameters, Parameters):
            parameters = parameters_to_ndarrays(parameters)
    if isinstance(parameters, Mapping):
        return {name: torch.as_tensor(value) for name, value in parameters.items()}
    if isinstance(parameters, (list, tuple)):
        if len(parameters) != len(names):
            raise ValueError(f"Got {len(parameters)} arrays for a model with {len(names)} state-dict entries")
        return {name: torch.as_tensor(np.asarray(value)) for name, value in zip(names, parameters, strict=True)}
    raise TypeError(
        "Expected parameters as an ArrayRecord, flwr.common.Parameters, a list of ndarrays or a state dict, "
        f"got {type(parameters).__name__}"
    )


class ServerCheckpointAndStateModule(CheckpointAndStateModule):
    """Holds the server's model checkpointers and its state checkpointer.

    Args:
        model: the architecture the global parameters are loaded into before a model checkpoint.
            Required when ``model_checkpointers`` are given.
        model_checkpointers: checkpointer(s) of the global model.
        state_checkpointer: saves server state (round, global arrays, strategy state, history).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        model_checkpointers: ModelCheckpointers = None,
        state_checkpointer: PerRoundStateCheckpointer | None = None,
    ) -> None:
        self.model = model
        self.model_checkpointers = as_checkpointer_list(model_checkpointers)
        check_unique_paths(self.model_checkpointers)
        if self.model_checkpointers and model is None:
            raise ValueError("Model checkpointers were given but no model to load the server's parameters into")
        self.state_checkpointer = state_checkpointer

    def maybe_checkpoint(
        self, parameters: Any, loss: float, metrics: Mapping[str, Scalar], *, server_round: int | None = None
    ) -> None:
        """Load ``parameters`` into the model and run the model checkpointers (one snapshot for all).
        ``server_round``: the round their retention policies keep the save as."""
        if not self.model_checkpointers:
            log.info("No model checkpointers specified. Skipping.")
            return
        assert self.model is not None
        state_dict = parameters_as_state_dict(parameters, list(self.model.state_dict()))
        self.model.load_state_dict(state_dict)
        checkpoint_model(self.model_checkpointers, self.model, loss, metrics, server_round)

    def model_checkpointers_in_use(self) -> list[TorchModuleCheckpointer]:
        return list(self.model_checkpointers or ())
