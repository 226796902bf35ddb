"""Mirror of ``fl4health.parameter_exchange.parameter_packer``: extras packed after a model's arrays.

FL4Health's ``SparseCooParameterPacker`` is not provided (see the README).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Generic, TypeVar

import numpy as np

from fedckpt.fl4health.parameter_exchange.full_exchanger import NDArrays

T = TypeVar("T")


class ParameterPacker(ABC, Generic[T]):
    """Packs extra values after a model's arrays, and splits them apart again."""

    @abstractmethod
    def pack_parameters(self, model_weights: NDArrays, additional_parameters: T) -> NDArrays:
        """``model_weights`` followed by ``additional_parameters``, as one list of arrays."""

    @abstractmethod
    def unpack_parameters(self, packed_parameters: NDArrays) -> tuple[NDArrays, T]:
        """The model's arrays and the extras, split apart."""


class ParameterPackerWithControlVariates(ParameterPacker[NDArrays]):
    """SCAFFOLD: the model's arrays followed by its control variates.

    Args:
        size_of_model_params: how many of the packed arrays are the model's.
    """

    def __init__(self, size_of_model_params: int) -> None:
        self.size_of_model_params = size_of_model_params

    def pack_parameters(self, model_weights: NDArrays, additional_parameters: NDArrays) -> NDArrays:
        return model_weights + additional_parameters

    def unpack_parameters(self, packed_parameters: NDArrays) -> tuple[NDArrays, NDArrays]:
        size = self.size_of_model_params
        return packed_parameters[:size], packed_parameters[size:]


class _LastArrayPacker(ParameterPacker[T]):
    """One extra value, packed as a last array."""

    def pack_parameters(self, model_weights: NDArrays, additional_parameters: T) -> NDArrays:
        return model_weights + [np.array(additional_parameters)]

    def unpack_parameters(self, packed_parameters: NDArrays) -> tuple[NDArrays, T]:
        if not packed_parameters:
            raise ValueError("No packed parameters to unpack")
        return packed_parameters[:-1], self._value(packed_parameters[-1])

    @abstractmethod
    def _value(self, packed: np.ndarray) -> T:
        """The extra value, from its array."""


class ParameterPackerWithClippingBit(_LastArrayPacker[float]):
    """Adaptive clipping (DP): the model's arrays followed by the clipping bit."""

    def _value(self, packed: np.ndarray) -> float:
        return packed.item()


class ParameterPackerAdaptiveConstraint(_LastArrayPacker[float]):
    """Adaptive constraints (FedProx and kin): the model's arrays followed by the loss weight."""

    def _value(self, packed: np.ndarray) -> float:
        return float(packed)


class ParameterPackerWithLayerNames(_LastArrayPacker[list[str]]):
    """Adaptive layer exchange: the model's arrays followed by their layer names."""

    def _value(self, packed: np.ndarray) -> list[str]:
        return packed.tolist()
