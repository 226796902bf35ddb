"""``ClientCheckpointAndStateModule``: routes a client's checkpoints by mode, snapshotting once."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import nn

from fedckpt.checkpoint_module import (
    CheckpointAndStateModule,
    ModelCheckpointers,
    as_checkpointer_list,
    check_unique_paths,
    checkpoint_model,
)
from fedckpt.checkpointers import TorchModuleCheckpointer
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

    Args:
        pre_aggregation: checkpointer(s) for the local model after local training.
        post_aggregation: checkpointer(s) for the model after receiving the global model.
        state_checkpointer: saves per-round client state, to restart interrupted training.
    """

    def __init__(
        self,
        pre_aggregation: ModelCheckpointers = None,
        post_aggregation: ModelCheckpointers = None,
        state_checkpointer: PerRoundStateCheckpointer | None = None,
    ) -> None:
        self.pre_aggregation = as_checkpointer_list(pre_aggregation)
        self.post_aggregation = as_checkpointer_list(post_aggregation)
        check_unique_paths(self.pre_aggregation, self.post_aggregation)
        self.state_checkpointer = state_checkpointer

    def maybe_checkpoint(
        self, model: nn.Module, loss: float, metrics: Mapping[str, Scalar], mode: CheckpointMode
    ) -> None:
        """Run the checkpointers of ``mode``; the model is snapshotted once for all that save."""
        mode = parse_mode(mode)
        checkpointers = self.pre_aggregation if mode == CheckpointMode.PRE_AGGREGATION else self.post_aggregation
        if checkpointers is None:
            log.info("No %s checkpoint specified. Skipping.", mode.value)
            return
        checkpoint_model(checkpointers, model, loss, metrics)

    def model_checkpointers_in_use(self) -> list[TorchModuleCheckpointer]:
        return [*(self.pre_aggregation or ()), *(self.post_aggregation or ())]
