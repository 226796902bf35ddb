"""Mirror of ``fl4health.parameter_exchange.packing_exchanger``: full exchange with extras packed after it."""

from __future__ import annotations

from typing import Generic, TypeVar

from fedckpt.fl4health.parameter_exchange.full_exchanger import FullParameterExchanger, NDArrays
from fedckpt.fl4health.parameter_exchange.parameter_packer import ParameterPacker

T = TypeVar("T")


class FullParameterExchangerWithPacking(FullParameterExchanger, Generic[T]):
    """A full exchanger whose parameters carry extras, packed and unpacked by ``parameter_packer``."""

    def __init__(self, parameter_packer: ParameterPacker[T]) -> None:
        self.parameter_packer = parameter_packer

    def pack_parameters(self, model_weights: NDArrays, additional_parameters: T) -> NDArrays:
        return self.parameter_packer.pack_parameters(model_weights, additional_parameters)

    def unpack_parameters(self, packed_parameters: NDArrays) -> tuple[NDArrays, T]:
        return self.parameter_packer.unpack_parameters(packed_parameters)
