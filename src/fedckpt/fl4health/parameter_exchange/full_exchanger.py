"""Mirror of ``fl4health.parameter_exchange.full_exchanger``: every state-dict entry, in order."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import nn

NDArrays = list[np.ndarray]


class FullParameterExchanger:
    """Exchanges a model's whole state dict as a list of arrays, in the state dict's order."""

    def push_parameters(
        self, model: nn.Module, initial_model: nn.Module | None = None, config: dict[str, Any] | None = None
    ) -> NDArrays:
        """The model's state-dict values as numpy arrays (the order ``pull_parameters`` relies on)."""
        return [value.cpu().numpy() for value in model.state_dict().values()]

    def pull_parameters(self, parameters: NDArrays, model: nn.Module, config: dict[str, Any] | None = None) -> None:
        """Load ``parameters`` (in state-dict order) into ``model``."""
        names = list(model.state_dict())
        if len(parameters) != len(names):  # FL4Health zips and drops extras silently
            raise ValueError(f"Got {len(parameters)} arrays for a model with {len(names)} state-dict entries")
        state_dict = OrderedDict((name, torch.tensor(value)) for name, value in zip(names, parameters, strict=True))
        model.load_state_dict(state_dict, strict=True)
