"""What the client and server modules share: checkpointer lists, one snapshot per call, state access."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from fedckpt.checkpointers import FunctionTorchModuleCheckpointer, TorchModuleCheckpointer, snapshot_and_save
from fedckpt.policies import Scalar
from fedckpt.runtime import lifecycle
from fedckpt.runtime.messages import SaveRequest
from fedckpt.state import PerRoundStateCheckpointer
from fedckpt.storage.paths import checkpoint_key

if TYPE_CHECKING:
    from fedckpt.fl4health.checkpointing.state_checkpointer import StateCheckpointer

ModelCheckpointers = TorchModuleCheckpointer | Sequence[TorchModuleCheckpointer] | None

log = logging.getLogger("fedckpt")


def as_checkpointer_list(checkpointers: ModelCheckpointers) -> list[TorchModuleCheckpointer] | None:
    if checkpointers is None:
        return None
    if isinstance(checkpointers, TorchModuleCheckpointer):
        return [checkpointers]
    listed = list(checkpointers)
    for checkpointer in listed:
        if not isinstance(checkpointer, TorchModuleCheckpointer):
            raise TypeError(f"Expected TorchModuleCheckpointer instances, got {type(checkpointer).__name__}")
    return listed


def check_unique_paths(*groups: list[TorchModuleCheckpointer] | None) -> None:
    """``ValueError`` if two checkpointers would write the same file (compared as absolute paths)."""
    paths = [checkpointer.checkpoint_path for group in groups if group for checkpointer in group]
    if len({checkpoint_key(path) for path in paths}) != len(paths):
        formatted = "\n".join(paths)
        raise ValueError(
            "The paths of all of your checkpointers should be unique otherwise overwrites are possible and data "
            f"will be lost. The current paths are:\n{formatted}"
        )


def checkpoint_model(
    checkpointers: list[TorchModuleCheckpointer],
    model: nn.Module,
    loss: float,
    metrics: Mapping[str, Scalar],
    server_round: int | None = None,
) -> None:
    """Let each checkpointer decide, then snapshot ``model`` once for all that want it. ``server_round``:
    the round the checkpointers' retention policies keep the save as."""
    deciding: list[FunctionTorchModuleCheckpointer] = []
    requests: list[SaveRequest] = []
    for checkpointer in checkpointers:
        if type(checkpointer).maybe_checkpoint is FunctionTorchModuleCheckpointer.maybe_checkpoint:
            assert isinstance(checkpointer, FunctionTorchModuleCheckpointer)
            request = checkpointer.decide(loss, metrics, server_round=server_round)
            if request is not None:
                deciding.append(checkpointer)
                requests.append(request)
        elif server_round is None:  # a user subclass with its own logic (perhaps without server_round)
            checkpointer.maybe_checkpoint(model, loss, metrics)
        else:
            checkpointer.maybe_checkpoint(model, loss, metrics, server_round=server_round)
    for file_format in sorted({request.kind for request in requests}):  # one snapshot per file format
        chosen = [
            (saver, request) for saver, request in zip(deciding, requests, strict=True) if request.kind == file_format
        ]
        # One snapshot for all: it overlaps the next steps only if every checkpointer taking it allows it.
        coordinator = lifecycle.coordinator()
        overlap = all(coordinator.overlap_for(saver.overlap) for saver, _ in chosen)
        snapshot_and_save([request for _, request in chosen], model, file_format, overlap)
        for saver, request in chosen:
            saver.accepted(request)


def with_best_scores(checkpointers: Iterable[TorchModuleCheckpointer]) -> list[FunctionTorchModuleCheckpointer]:
    """Those of ``checkpointers`` that keep a best score, which a checkpointer built anew reads back
    from storage (a latest-model checkpointer has none)."""
    return [c for c in checkpointers if isinstance(c, FunctionTorchModuleCheckpointer) and c.has_best_score]


class CheckpointAndStateModule(ABC):
    """Base of the client and server modules: state saves and loads, best-score resumption, flush."""

    state_checkpointer: PerRoundStateCheckpointer | StateCheckpointer | None  # 0.3's, or 0.4's (fedckpt.fl4health)

    @abstractmethod
    def model_checkpointers_in_use(self) -> list[TorchModuleCheckpointer]:
        """Every model checkpointer of this module."""

    def save_state(self, state_checkpoint_name: str, state: dict[str, Any]) -> None:
        """Save ``state`` under ``state_checkpoint_name`` in the state checkpointer's directory."""
        if self.state_checkpointer is None:
            raise ValueError("Attempting to save state but no state checkpointer is specified")
        self.state_checkpointer.save_checkpoint(state_checkpoint_name, state)

    def maybe_load_state(self, state_checkpoint_name: str) -> dict[str, Any] | None:
        """The saved state, or None if there is none (saves issued earlier, anywhere, count)."""
        if self.state_checkpointer is None:
            raise ValueError("Attempting to load state, but no state checkpointer is specified")
        if self.state_checkpointer.checkpoint_exists(state_checkpoint_name):
            return self.state_checkpointer.load_checkpoint(state_checkpoint_name)
        log.info("State checkpointer is defined but no state checkpoint exists.")
        return None

    def resume_best_scores(self, checkpointers: Sequence[TorchModuleCheckpointer] | None = None) -> None:
        """Let each best-score checkpointer (of ``checkpointers``; default: all of this module's)
        compare against the checkpoint it already has on disk.

        For code that builds its checkpointers anew in every process or run (a Flower ClientApp
        each round, a resumed server): without it a fresh checkpointer's first score always saves.
        """
        chosen = self.model_checkpointers_in_use() if checkpointers is None else checkpointers
        for checkpointer in with_best_scores(chosen):
            checkpointer.resume_best_score()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every save of this module's checkpointers is durable; raise if one failed."""
        keys = [checkpoint_key(checkpointer.checkpoint_path) for checkpointer in self.model_checkpointers_in_use()]
        if self.state_checkpointer is not None:
            keys.extend(self.state_checkpointer.saved_keys())
        lifecycle.coordinator().flush(keys, timeout=timeout)
