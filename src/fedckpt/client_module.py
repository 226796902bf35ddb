"""``ClientCheckpointAndStateModule``: routes a client's checkpoints by mode, snapshotting once."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, overload

from torch import nn

from fedckpt.checkpoint_module import (
    CheckpointAndStateModule,
    ModelCheckpointers,
    as_checkpointer_list,
    check_unique_paths,
    checkpoint_model,
)
from fedckpt.checkpointers import TorchModuleCheckpointer
from fedckpt.fl4health.checkpointing.state_checkpointer import ClientStateCheckpointer
from fedckpt.modes import CheckpointMode
from fedckpt.policies import Scalar
from fedckpt.state import PerRoundStateCheckpointer

log = logging.getLogger("fedckpt")


def parse_mode(mode: Any) -> CheckpointMode:
    try:
        return mode if isinstance(mode, CheckpointMode) else CheckpointMode(getattr(mode, "value", mode))
    except ValueError:
        raise ValueError(f"Unrecognized mode for checkpointing: {mode!s}") from None


class ClientCheckpointAndStateModule(CheckpointAndStateModule):
    """Holds a client's pre-aggregation and post-aggregation model checkpointers and its state checkpointer.

    It serves FL4Health 0.3's API and 0.4's: the state methods take either form (see :meth:`save_state`).

    Args:
        pre_aggregation: checkpointer(s) for the local model after local training.
        post_aggregation: checkpointer(s) for the model after receiving the global model.
        state_checkpointer: saves client state, to restart interrupted training: a
            ``PerRoundStateCheckpointer`` (0.3: named dicts) or a ``ClientStateCheckpointer`` (0.4: a
            client's attributes).
    """

    def __init__(
        self,
        pre_aggregation: ModelCheckpointers = None,
        post_aggregation: ModelCheckpointers = None,
        state_checkpointer: PerRoundStateCheckpointer | ClientStateCheckpointer | None = None,
    ) -> None:
        self.pre_aggregation = as_checkpointer_list(pre_aggregation)
        self.post_aggregation = as_checkpointer_list(post_aggregation)
        check_unique_paths(self.pre_aggregation, self.post_aggregation)
        self.state_checkpointer = state_checkpointer

    def maybe_checkpoint(
        self,
        model: nn.Module,
        loss: float,
        metrics: Mapping[str, Scalar],
        mode: CheckpointMode,
        *,
        server_round: int | None = None,
    ) -> None:
        """Run the checkpointers of ``mode``; the model is snapshotted once for all that save.
        ``server_round``: the round their retention policies keep the save as."""
        checkpointers = self.checkpointers_of(mode)
        if checkpointers is None:
            log.info("No %s checkpoint specified. Skipping.", mode.value)
            return
        checkpoint_model(checkpointers, model, loss, metrics, server_round)

    def checkpointers_of(self, mode: CheckpointMode) -> list[TorchModuleCheckpointer] | None:
        """The pre- or post-aggregation checkpointers (None if none were given)."""
        return self.pre_aggregation if parse_mode(mode) == CheckpointMode.PRE_AGGREGATION else self.post_aggregation

    def model_checkpointers_in_use(self) -> list[TorchModuleCheckpointer]:
        return [*(self.pre_aggregation or ()), *(self.post_aggregation or ())]

    @overload
    def save_state(self, state_checkpoint_name: str, state: dict[str, Any]) -> None: ...
    @overload
    def save_state(self, client: Any) -> None: ...
    def save_state(self, client_or_name: Any, state: dict[str, Any] | None = None) -> None:
        """Save the client's state in the background. Two forms, told apart by the first argument's type:

        - ``save_state(state_checkpoint_name: str, state: dict)`` (FL4Health 0.3): saves ``state`` under
          that name in the directory of the ``PerRoundStateCheckpointer``.
        - ``save_state(client)`` (FL4Health 0.4): saves the attributes of ``client`` that the
          ``ClientStateCheckpointer`` names (its ``snapshot_attrs``), to its checkpoint path.

        Either way the state is copied before this returns. A form that does not match the state
        checkpointer raises ``TypeError``; no state checkpointer raises ``ValueError``.
        """
        if _is_name(client_or_name):
            if state is None:
                raise TypeError("save_state(state_checkpoint_name, state) was given no state to save")
            self._state_checkpointer(PerRoundStateCheckpointer, "save_state")
            super().save_state(client_or_name, state)
        else:
            if state is not None:
                raise TypeError("save_state(client) takes no state: the ClientStateCheckpointer reads the client")
            self._state_checkpointer(ClientStateCheckpointer, "save_state").save_client_state(client_or_name)

    @overload
    def maybe_load_state(self, state_checkpoint_name: str) -> dict[str, Any] | None: ...
    @overload
    def maybe_load_state(self, client: Any) -> bool: ...
    def maybe_load_state(self, client_or_name: Any) -> dict[str, Any] | bool | None:
        """Load the client's state, if there is one (saves issued earlier, by any process, count).

        - ``maybe_load_state(state_checkpoint_name: str)`` (FL4Health 0.3): the saved dict, or None.
        - ``maybe_load_state(client)`` (FL4Health 0.4): loads the saved attributes into ``client`` and
          returns True, or returns False if there is no saved state.
        """
        if _is_name(client_or_name):
            self._state_checkpointer(PerRoundStateCheckpointer, "maybe_load_state")
            return super().maybe_load_state(client_or_name)
        checkpointer = self._state_checkpointer(ClientStateCheckpointer, "maybe_load_state")
        return checkpointer.maybe_load_client_state(client_or_name)

    def _state_checkpointer(self, kind: type[Any], method: str) -> Any:
        """The state checkpointer, checked to be of the ``kind`` the form of the call needs."""
        if self.state_checkpointer is None:
            action = "save state but" if method == "save_state" else "load state, but"  # FL4Health's messages
            raise ValueError(f"Attempting to {action} no state checkpointer is specified")
        if not isinstance(self.state_checkpointer, kind):
            have = type(self.state_checkpointer).__name__
            takes = "a client" if isinstance(self.state_checkpointer, ClientStateCheckpointer) else "a checkpoint name"
            raise TypeError(
                f"This form of {method} needs a {kind.__name__}, but the state checkpointer is a {have}: "
                f"call {method} with {takes}"
            )
        return self.state_checkpointer


def _is_name(value: Any) -> bool:
    """A state checkpoint's name (0.3's form), as opposed to a client object (0.4's)."""
    return isinstance(value, str | os.PathLike)
