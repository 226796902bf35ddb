"""The ``TorchModuleCheckpointer`` family: FL4Health's API, with non-blocking saves.

A checkpointer decides in the caller whether a score is worth saving (cheap and synchronous, so
a missing metric raises at once), snapshots the model, and hands the snapshot to the runtime. The
file appears in the background; loads and ``flush()`` wait for it.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping

from torch import nn

from fedckpt.policies import (
    CheckpointScoreFunctionType,
    Scalar,
    as_score,
    is_improvement,
    latest_score,
    loss_score,
    metric_score_function,
)
from fedckpt.runtime import lifecycle
from fedckpt.runtime.messages import SaveRequest
from fedckpt.snapshot import MODULE, snapshot_module
from fedckpt.storage import formats, manifest, reading
from fedckpt.storage.paths import checkpoint_key, checkpoint_path_in

log = logging.getLogger("fedckpt")


def wait_until_readable(*paths: str) -> None:
    """Wait for pending saves of ``paths`` (from any process) if a runtime may hold some."""
    lifecycle.coordinator().wait_readable(*(checkpoint_key(path) for path in paths))


class TorchModuleCheckpointer(ABC):
    """Base class of model checkpointers. Subclasses implement ``maybe_checkpoint``.

    Args:
        checkpoint_dir: directory of the checkpoint (created by the writer if missing).
        checkpoint_name: file name inside ``checkpoint_dir``; it may not escape it.
    """

    def __init__(self, checkpoint_dir: str, checkpoint_name: str) -> None:
        self.checkpoint_path = checkpoint_path_in(checkpoint_dir, checkpoint_name)

    @abstractmethod
    def maybe_checkpoint(self, model: nn.Module, loss: float, metrics: Mapping[str, Scalar]) -> None:
        """Decide from ``loss`` and ``metrics`` whether to save ``model``, and if so start the save."""

    def save_model(self, model: nn.Module, score: float | None = None, score_name: str | None = None) -> None:
        """Snapshot ``model`` and save it in the background (for subclasses' ``maybe_checkpoint``)."""
        snapshot = snapshot_module(model)
        lifecycle.coordinator().save([self.save_request(score, score_name)], snapshot)

    def save_request(self, score: float | None, score_name: str | None) -> SaveRequest:
        return SaveRequest(checkpoint_key(self.checkpoint_path), MODULE, score, score_name)

    def load_checkpoint(self, path_to_checkpoint: str | None = None) -> nn.Module:
        """The saved ``nn.Module`` (waits for pending saves of it). Runs pickle: trusted files only.

        A file written by ``torch.save`` (FL4Health's format) loads too.
        """
        path = self.checkpoint_path if path_to_checkpoint is None else os.fspath(path_to_checkpoint)
        wait_until_readable(path)
        if formats.file_format(path) == MODULE:
            return reading.read_module(path)
        return reading.read_state(path)

    def load_state_dict(self, path_to_checkpoint: str | None = None) -> dict:
        """The saved tensors by state-dict name, read with safetensors: no pickle is run."""
        path = self.checkpoint_path if path_to_checkpoint is None else os.fspath(path_to_checkpoint)
        wait_until_readable(path)
        if formats.file_format(path) != MODULE:
            raise ValueError(f"{path} is not a fedckpt model checkpoint (safetensors); use load_checkpoint")
        return reading.read_state_dict(path)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every save of this checkpoint issued so far is durable; raise if one failed."""
        lifecycle.coordinator().flush([checkpoint_key(self.checkpoint_path)], timeout=timeout)


class FunctionTorchModuleCheckpointer(TorchModuleCheckpointer):
    """Saves when ``checkpoint_score_function(loss, metrics)`` is at least as good as the best so far."""

    def __init__(
        self,
        checkpoint_dir: str,
        checkpoint_name: str,
        checkpoint_score_function: CheckpointScoreFunctionType,
        checkpoint_score_name: str | None = None,
        maximize: bool = False,
    ) -> None:
        super().__init__(checkpoint_dir, checkpoint_name)
        self.best_score: float | None = None
        self.checkpoint_score_function = checkpoint_score_function
        if checkpoint_score_name is None:
            checkpoint_score_name = getattr(checkpoint_score_function, "__name__", "score")
            log.warning("No checkpoint_score_name provided; using the function's name %r", checkpoint_score_name)
        self.checkpoint_score_name = checkpoint_score_name
        self.maximize = maximize
        self.comparison_str = ">=" if maximize else "<="

    def _should_checkpoint(self, comparison_score: float) -> bool:
        """Whether ``comparison_score`` is at least as good as the best score (always true at first)."""
        return is_improvement(comparison_score, self.best_score, self.maximize)

    def decide(self, loss: float, metrics: Mapping[str, Scalar]) -> SaveRequest | None:
        """Score the model now; return the save to make, or None. ``best_score`` is left alone until
        the save was accepted (:meth:`accepted`): a save that raises leaves the bar where it was."""
        score = as_score(self.checkpoint_score_function(loss, metrics), self.checkpoint_score_name)
        if not self._should_checkpoint(score):
            log.info(
                "Not checkpointing %s: %s score %s is not %s best score %s",
                self.checkpoint_path,
                self.checkpoint_score_name,
                score,
                self.comparison_str,
                self.best_score,
            )
            return None
        log.info(
            "Checkpointing %s: %s score %s %s best score %s",
            self.checkpoint_path,
            self.checkpoint_score_name,
            score,
            self.comparison_str,
            self.best_score,
        )
        return self.save_request(score, self.checkpoint_score_name)

    def accepted(self, request: SaveRequest) -> None:
        """The save :meth:`decide` asked for was taken: its score is the bar from now on."""
        if request.score is not None:
            self.best_score = request.score

    def resume_best_score(self) -> float | None:
        """Take ``best_score`` from the checkpoint on disk (after its pending saves), if it has one.

        A checkpointer built anew (a new run, or a Flower ClientApp, which is rebuilt every round)
        otherwise starts with no best score, and its first save would replace a better model.
        Returns the best score now in force.
        """
        wait_until_readable(self.checkpoint_path)
        entry = manifest.read_entry(self.checkpoint_path)
        on_disk = entry.score if entry is not None and entry.score_name == self.checkpoint_score_name else None
        if on_disk is not None and is_improvement(on_disk, self.best_score, self.maximize):
            self.best_score = on_disk
        return self.best_score

    def maybe_checkpoint(self, model: nn.Module, loss: float, metrics: Mapping[str, Scalar]) -> None:
        """Save ``model`` in the background if its score is the best so far."""
        request = self.decide(loss, metrics)
        if request is not None:
            lifecycle.coordinator().save([request], snapshot_module(model))
            self.accepted(request)


class LatestTorchModuleCheckpointer(FunctionTorchModuleCheckpointer):
    """Saves the model on every call."""

    def __init__(self, checkpoint_dir: str, checkpoint_name: str) -> None:
        super().__init__(checkpoint_dir, checkpoint_name, latest_score, "Latest", False)

    def resume_best_score(self) -> float | None:
        return None  # it has no bar to resume

    def decide(self, loss: float, metrics: Mapping[str, Scalar]) -> SaveRequest | None:
        log.info("Saving latest checkpoint %s", self.checkpoint_path)
        return self.save_request(None, self.checkpoint_score_name)


class BestLossTorchModuleCheckpointer(FunctionTorchModuleCheckpointer):
    """Saves the model when its loss is the lowest so far."""

    def __init__(self, checkpoint_dir: str, checkpoint_name: str) -> None:
        super().__init__(checkpoint_dir, checkpoint_name, loss_score, "Loss", False)


class BestMetricTorchModuleCheckpointer(FunctionTorchModuleCheckpointer):
    """Saves the model when ``metrics[prefix + metric]`` is the best so far.

    A missing metric raises ``KeyError`` in the caller, before anything is saved.
    """

    def __init__(
        self,
        checkpoint_dir: str,
        checkpoint_name: str,
        metric: str,
        prefix: str = "val - prediction - ",
        maximize: bool = False,
    ) -> None:
        self.metric_key = f"{prefix}{metric}"
        super().__init__(checkpoint_dir, checkpoint_name, metric_score_function(self.metric_key), metric, maximize)
