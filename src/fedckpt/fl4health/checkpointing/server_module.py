"""Mirror of ``fl4health.checkpointing.server_module`` (FL4Health 0.4): the server's model checkpoints and state.

A server holds Flower ``Parameters``, not a model: the module loads them into its ``model`` through
a parameter exchanger (FL4Health's, or :mod:`fedckpt.fl4health.parameter_exchange`'s) before the
model checkpointers run (one snapshot for all that save) or the ``ServerStateCheckpointer`` saves.
Everything saves in the background. Flower is imported only inside the methods that convert.

Not provided: FL4Health's ``SparseCooServerCheckpointAndStateModule`` (its hydration rests on
FL4Health's sparse exchange), and ``OpacusServerCheckpointAndStateModule`` and
``DpScaffoldServerCheckpointAndStateModule`` (they require FL4Health's Opacus checkpointers).
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from torch import nn

from fedckpt.checkpoint_module import (
    CheckpointAndStateModule,
    ModelCheckpointers,
    as_checkpointer_list,
    check_unique_paths,
    checkpoint_model,
)
from fedckpt.checkpointers import TorchModuleCheckpointer
from fedckpt.fl4health.checkpointing.state_checkpointer import ServerStateCheckpointer
from fedckpt.fl4health.parameter_exchange.full_exchanger import NDArrays
from fedckpt.fl4health.parameter_exchange.packing_exchanger import FullParameterExchangerWithPacking
from fedckpt.fl4health.parameter_exchange.parameter_packer import (
    ParameterPackerAdaptiveConstraint,
    ParameterPackerWithClippingBit,
    ParameterPackerWithControlVariates,
    ParameterPackerWithLayerNames,
)
from fedckpt.policies import Scalar

if TYPE_CHECKING:
    from flwr.common import Parameters

log = logging.getLogger("fedckpt")

__all__ = [
    "AdaptiveConstraintServerCheckpointAndStateModule",
    "BaseServerCheckpointAndStateModule",
    "ClippingBitServerCheckpointAndStateModule",
    "ExchangerType",
    "LayerNamesServerCheckpointAndStateModule",
    "ModelCheckpointers",
    "NnUnetServerCheckpointAndStateModule",
    "PackingServerCheckpointAndAndStateModule",
    "ScaffoldServerCheckpointAndStateModule",
]


class ExchangerType(Protocol):
    """What the modules need of a parameter exchanger (FL4Health's exchangers have it)."""

    def push_parameters(self, model: nn.Module, initial_model: nn.Module | None = None, config: Any = None) -> NDArrays:
        """The model's parameters as arrays."""

    def pull_parameters(self, parameters: NDArrays, model: nn.Module, config: Any = None) -> None:
        """Load arrays into the model."""


def as_ndarrays(server_parameters: Parameters | NDArrays) -> NDArrays:
    """Flower ``Parameters`` (or a list of arrays, taken as is) as a list of numpy arrays."""
    if isinstance(server_parameters, list | tuple):
        return list(server_parameters)
    from flwr.common import parameters_to_ndarrays

    return parameters_to_ndarrays(server_parameters)


class BaseServerCheckpointAndStateModule(CheckpointAndStateModule):
    """The server's model checkpointers and its state checkpointer.

    Args:
        model: the architecture the server parameters are loaded into (required with model checkpointers,
            and to load state).
        parameter_exchanger: routes the server parameters into ``model`` (required with ``model``).
        model_checkpointers: checkpointer(s) of the global model.
        state_checkpointer: saves the server's attributes and the model, to restart interrupted training.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        parameter_exchanger: ExchangerType | None = None,
        model_checkpointers: ModelCheckpointers = None,
        state_checkpointer: ServerStateCheckpointer | None = None,
    ) -> None:
        self.model = model
        self.parameter_exchanger = parameter_exchanger
        self.model_checkpointers = as_checkpointer_list(model_checkpointers)
        self.state_checkpointer = state_checkpointer
        if self.model_checkpointers:
            self._validate_model_checkpointer_components()
        check_unique_paths(self.model_checkpointers)

    def _validate_model_checkpointer_components(self) -> None:
        if self.model is None:
            raise ValueError("Checkpointer(s) is (are) defined but no model is defined to hydrate")
        if self.parameter_exchanger is None:
            raise ValueError("Checkpointer(s) is (are) defined but no parameter_exchanger is defined to hydrate")

    def model_checkpointers_in_use(self) -> list[TorchModuleCheckpointer]:
        return list(self.model_checkpointers or ())

    def maybe_checkpoint(
        self,
        server_parameters: Parameters,
        loss: float,
        metrics: Mapping[str, Scalar],
        *,
        server_round: int | None = None,
    ) -> None:
        """Load ``server_parameters`` into the model and run the model checkpointers on it (``server_round``:
        the round their retention policies keep the save as)."""
        if not self.model_checkpointers:
            log.info("No model checkpointers specified. Skipping any checkpointing.")
            return
        self._hydrate_model_for_checkpointing(server_parameters)
        assert self.model is not None  # checked by _hydrate_model_for_checkpointing
        checkpoint_model(self.model_checkpointers, self.model, loss, metrics, server_round)

    def _exchange_parts(self) -> tuple[nn.Module, Any]:
        if self.model is None:
            raise ValueError("Hydrate model for checkpoint called but self.model is None")
        if self.parameter_exchanger is None:
            raise ValueError("Hydrate model for checkpoint called but self.parameter_exchanger is None")
        return self.model, self.parameter_exchanger

    def _hydrate_model_for_checkpointing(self, server_parameters: Parameters) -> None:
        """Load the server's parameters into ``self.model`` (subclasses unpack them first)."""
        model, exchanger = self._exchange_parts()
        exchanger.pull_parameters(as_ndarrays(server_parameters), model)

    def save_state(self, server: Any, server_parameters: Parameters) -> None:  # type: ignore[override]
        """Save the server's attributes and its parameters (as the model) in the background."""
        if self.state_checkpointer is None:
            raise ValueError("Attempting to save state but no state checkpointer is specified")
        self._hydrate_model_for_checkpointing(server_parameters)
        assert self.model is not None
        self.state_checkpointer.save_server_state(server, self.model)

    def maybe_load_state(self, server: Any) -> Parameters | None:  # type: ignore[override]
        """Load the saved state into ``server`` and the model; the model's parameters, or None if no state."""
        if self.state_checkpointer is None:
            raise ValueError("Attempting to load state, but no state checkpointer is specified")
        if self.model is None:
            raise ValueError(
                "Attempting to load state but self.model is None, make sure to pass the model architecture "
                "to checkpointing module"
            )
        server_model = self.state_checkpointer.maybe_load_server_state(server, self.model)
        if server_model is None:  # FL4Health tests the model's truth value, which an empty Sequential fails
            return None
        _, exchanger = self._exchange_parts()
        from flwr.common import ndarrays_to_parameters

        return ndarrays_to_parameters(exchanger.push_parameters(server_model))


class PackingServerCheckpointAndAndStateModule(BaseServerCheckpointAndStateModule):
    """For parameters that carry extras after the model's arrays: unpacked before the model is loaded.

    ``parameter_exchanger`` must unpack (``unpack_parameters``), as ``FullParameterExchangerWithPacking`` does.
    The name, with its doubled "And", is FL4Health's.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        parameter_exchanger: FullParameterExchangerWithPacking | None = None,
        model_checkpointers: ModelCheckpointers = None,
        state_checkpointer: ServerStateCheckpointer | None = None,
    ) -> None:
        if parameter_exchanger is not None and not hasattr(parameter_exchanger, "unpack_parameters"):
            raise TypeError("Parameter exchanger must be of based type FullParameterExchangerWithPacking")
        super().__init__(model, parameter_exchanger, model_checkpointers, state_checkpointer)

    def _hydrate_model_for_checkpointing(self, server_parameters: Parameters) -> None:
        model, exchanger = self._exchange_parts()
        model_ndarrays, _ = exchanger.unpack_parameters(as_ndarrays(server_parameters))
        exchanger.pull_parameters(model_ndarrays, model)


class _PackerModule(PackingServerCheckpointAndAndStateModule):
    """A packing module whose exchanger is built from the model (none without a model, as in FL4Health)."""

    def __init__(
        self,
        model: nn.Module | None = None,
        model_checkpointers: ModelCheckpointers = None,
        state_checkpointer: ServerStateCheckpointer | None = None,
    ) -> None:
        exchanger = None if model is None else FullParameterExchangerWithPacking(self._packer(model))
        super().__init__(model, exchanger, model_checkpointers, state_checkpointer)

    @abstractmethod
    def _packer(self, model: nn.Module) -> Any:
        """The packer of this kind of parameters, for ``model``."""


class ScaffoldServerCheckpointAndStateModule(_PackerModule):
    """SCAFFOLD: the server parameters are the model's arrays followed by the control variates."""

    def _packer(self, model: nn.Module) -> ParameterPackerWithControlVariates:
        return ParameterPackerWithControlVariates(len(model.state_dict()))


class AdaptiveConstraintServerCheckpointAndStateModule(_PackerModule):
    """Adaptive constraints (FedProx, Ditto, MR-MTL): the model's arrays followed by a loss weight."""

    def _packer(self, model: nn.Module) -> ParameterPackerAdaptiveConstraint:
        return ParameterPackerAdaptiveConstraint()


class ClippingBitServerCheckpointAndStateModule(_PackerModule):
    """DP with adaptive clipping: the model's arrays followed by the clipping bit."""

    def _packer(self, model: nn.Module) -> ParameterPackerWithClippingBit:
        return ParameterPackerWithClippingBit()


class LayerNamesServerCheckpointAndStateModule(_PackerModule):
    """Adaptive layer exchange: the model's arrays followed by their layer names."""

    def _packer(self, model: nn.Module) -> ParameterPackerWithLayerNames:
        return ParameterPackerWithLayerNames()


class NnUnetServerCheckpointAndStateModule(BaseServerCheckpointAndStateModule):
    """For FL4Health's nnU-Net server, whose model is known only after the clients reported: the model
    may be set later (``module.model = ...``); model checkpointers need only the parameter exchanger."""

    def _validate_model_checkpointer_components(self) -> None:
        if self.parameter_exchanger is None:
            raise ValueError("Checkpointer(s) is (are) defined but no parameter_exchanger is defined to hydrate")
