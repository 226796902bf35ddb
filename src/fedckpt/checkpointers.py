"""The ``TorchModuleCheckpointer`` family: FL4Health's API, with non-blocking saves.

A checkpointer decides in the caller whether a score is worth saving (cheap and synchronous, so
a missing metric raises at once), snapshots the model, and hands the snapshot to the runtime. The
file appears in the background; loads and ``flush()`` wait for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn

from fedckpt.kept_rounds import KeptRounds
from fedckpt.policies import (
    CheckpointScoreFunctionType,
    Scalar,
    as_score,
    is_improvement,
    latest_score,
    loss_score,
    metric_score_function,
)
from fedckpt.retention import RetentionPolicy
from fedckpt.runtime import lifecycle, overlap_hooks, stats
from fedckpt.runtime.messages import SaveRequest, VersionRequest
from fedckpt.snapshot import MODULE, STATE, Snapshot, snapshot_module, snapshot_torch_module
from fedckpt.storage import reading
from fedckpt.storage.base import storage_for, storage_options_for
from fedckpt.storage.paths import checkpoint_key, checkpoint_path_in
from fedckpt.storage.reading import Device

log = logging.getLogger("fedckpt")


def wait_until_readable(*paths: str) -> None:
    """Wait for pending saves of ``paths`` (from any process) if a runtime may hold some."""
    lifecycle.coordinator().wait_readable(*(checkpoint_key(path) for path in paths))


def model_file_format(path: str) -> str:
    """What a model checkpoint's name asks for: safetensors for ``.safetensors``, else the file
    ``torch.save(model)`` writes (``.pt``, ``.pth``, ``.pkl``, ``.ckpt``, ...), which
    ``torch.load(path, weights_only=False)`` returns as the ``nn.Module``, as FL4Health's users expect."""
    return MODULE if path.endswith(".safetensors") else STATE


def snapshot_model(model: nn.Module, file_format: str) -> Snapshot:
    """The snapshot of ``model`` for a file of ``file_format`` (see :func:`model_file_format`)."""
    if file_format == MODULE:
        return snapshot_module(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected a torch.nn.Module to checkpoint, got {type(model).__name__}")
    return snapshot_torch_module(model)


def snapshot_and_save(
    requests: list[SaveRequest], model: nn.Module, file_format: str, overlap: bool | None = None
) -> None:
    """Snapshot ``model`` once for ``requests`` (all of ``file_format``) and save it in the background.

    In overlap mode (``overlap``, else the process default) the model's ``load_state_dict`` waits for
    the copy of a GPU save (:mod:`fedckpt.runtime.overlap_hooks`): its hook is off while it is snapshot.
    """
    coordinator = lifecycle.coordinator()
    overlapping = coordinator.overlap_for(overlap)
    with stats.recorder.timed("blocked_seconds"):
        hooked = overlapping and isinstance(model, nn.Module)
        with overlap_hooks.unhooked(model) if hooked else contextlib.nullcontext():
            coordinator.save(requests, snapshot_model(model, file_format), overlap=overlapping)


def _read_model(source: reading.Source, file_format: str, device: Device = None) -> Any:
    if file_format == MODULE:
        return reading.read_module(source, device)
    return reading.read_state(source, map_location=device)


def _read_tensors_or_model(source: reading.Source, file_format: str, device: Device = None) -> Any:
    """A module file's tensors (no pickle run), else what ``torch.save`` saved."""
    if file_format == MODULE:
        return reading.read_state_dict(source, device)
    return reading.read_state(source, map_location=device)


class TorchModuleCheckpointer(ABC):
    """Base class of model checkpointers. Subclasses implement ``maybe_checkpoint``.

    Args:
        checkpoint_dir: directory of the checkpoint (created by the writer if missing).
        checkpoint_name: file name inside ``checkpoint_dir`` (or a path inside it); it may not escape
            it. Checked at the first save or load, so a checkpointer used only for its decisions may
            be built with empty ones, as in FL4Health. ``.safetensors`` names get safetensors files;
            any other name gets ``torch.save``'s format (see :func:`model_file_format`).
        storage_options: fsspec options when ``checkpoint_dir`` is a URL (``s3://...``); default:
            ``fedckpt.init(storage_options=...)``, else the standard environment.
        overlap: for a model on a GPU, let the copy of a save overlap the next training steps, only
            in-place mutations waiting for it (see ``fedckpt.init``); default: the process's setting.
        keep: a retention policy (:mod:`fedckpt.retention`): each save's round is kept as its own file
            beside the plain name, which always holds the newest save, and the writer deletes the rounds
            the policy drops once the newer save is durable. None: one file, overwritten by each save.
    """

    def __init__(
        self,
        checkpoint_dir: str,
        checkpoint_name: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        overlap: bool | None = None,
        keep: RetentionPolicy | None = None,
    ) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_name = checkpoint_name
        self.storage_options = storage_options
        self.overlap = overlap
        self.kept_rounds = KeptRounds(keep)
        self._checkpoint_path: str | None = None

    @property
    def checkpoint_path(self) -> str:
        """``checkpoint_dir/checkpoint_name``; a ``ValueError`` naming what is wrong with them."""
        if self._checkpoint_path is None:
            self._checkpoint_path = checkpoint_path_in(self.checkpoint_dir, self.checkpoint_name)
        return self._checkpoint_path

    @property
    def file_format(self) -> str:
        return model_file_format(self.checkpoint_path)

    @abstractmethod
    def maybe_checkpoint(
        self, model: nn.Module, loss: float, metrics: Mapping[str, Scalar], *, server_round: int | None = None
    ) -> None:
        """Decide from ``loss`` and ``metrics`` whether to save ``model``, and if so start the save.
        ``server_round``: the round a retention policy keeps it as (else the next number of this name)."""

    def save_model(
        self,
        model: nn.Module,
        score: float | None = None,
        score_name: str | None = None,
        *,
        server_round: int | None = None,
        loss: float | None = None,
        metrics: Mapping[str, Scalar] | None = None,
    ) -> None:
        """Snapshot ``model`` and save it in the background (for subclasses' ``maybe_checkpoint``)."""
        request = self.save_request(score, score_name, server_round=server_round, loss=loss, metrics=metrics)
        snapshot_and_save([request], model, request.kind, self.overlap)

    def save_request(
        self,
        score: float | None,
        score_name: str | None,
        *,
        server_round: int | None = None,
        loss: float | None = None,
        metrics: Mapping[str, Scalar] | None = None,
        version: VersionRequest | None = None,
    ) -> SaveRequest:
        """The save of this checkpoint; with a retention policy, scored now (a missing metric raises),
        unless ``version`` was (:meth:`kept_round`)."""
        if version is None:
            version = self.kept_round(server_round, loss, metrics)
        key = checkpoint_key(self.checkpoint_path)
        options = storage_options_for(key, self.storage_options)
        return SaveRequest(key, self.file_format, score, score_name, storage_options=options, version=version)

    def kept_round(
        self, server_round: int | None, loss: float | None, metrics: Mapping[str, Scalar] | None
    ) -> VersionRequest | None:
        """What a save asks its writer to keep (None without a policy): its round and scores, checked
        now, before its path is (a checkpointer used only for its decisions may have no path)."""
        return self.kept_rounds.request(server_round, loss, metrics or {}, self.checkpoint_name)

    def versions(self) -> list[int]:
        """The rounds a retention policy keeps of this checkpoint, sorted (after its pending saves and
        their deletions). The plain name is not among them unless the policy keeps its round."""
        wait_until_readable(self.checkpoint_path)
        return self.kept_rounds.rounds(self.checkpoint_path, self.storage_options)

    def _path_to_load(self, path_to_checkpoint: str | None, server_round: int | None) -> str:
        if server_round is not None and path_to_checkpoint is not None:
            raise ValueError("Pass a path or a server_round to load, not both")
        path = self.checkpoint_path if path_to_checkpoint is None else os.fspath(path_to_checkpoint)
        wait_until_readable(path)
        if server_round is None:
            return path
        return self.kept_rounds.path_of(path, server_round, self.storage_options)

    def load_checkpoint(
        self, path_to_checkpoint: str | None = None, *, device: Device = None, server_round: int | None = None
    ) -> nn.Module:
        """The saved ``nn.Module`` (waits for pending saves of it). Runs pickle: trusted files only.

        A file written by ``torch.save`` (FL4Health's format) loads too. ``device`` (a CUDA device):
        its tensors are read into page-locked memory and copied to the device without blocking (ordered
        on the current stream); else they are where they were saved (safetensors: on the CPU).
        ``server_round``: that round's version (see :meth:`versions`) instead of the newest save.
        """
        path = self._path_to_load(path_to_checkpoint, server_round)
        return reading.read_checkpoint(path, self.storage_options, partial(_read_model, device=device))

    def load_state_dict(
        self, path_to_checkpoint: str | None = None, *, device: Device = None, server_round: int | None = None
    ) -> dict:
        """The saved tensors by state-dict name. A safetensors file is read without running pickle;
        a ``torch.save`` file of the module needs pickle (load only files you trust). ``device`` and
        ``server_round``: as for :meth:`load_checkpoint`."""
        path = self._path_to_load(path_to_checkpoint, server_round)
        saved = reading.read_checkpoint(path, self.storage_options, partial(_read_tensors_or_model, device=device))
        if isinstance(saved, nn.Module):
            return saved.state_dict()
        if isinstance(saved, Mapping) and all(isinstance(value, torch.Tensor) for value in saved.values()):
            return dict(saved)  # a state dict saved with torch.save
        raise ValueError(f"{path} holds a {type(saved).__name__}, not a model or its state dict")

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every save of this checkpoint issued so far is durable; raise if one failed."""
        lifecycle.coordinator().flush([checkpoint_key(self.checkpoint_path)], timeout=timeout)


class FunctionTorchModuleCheckpointer(TorchModuleCheckpointer):
    """Saves when ``checkpoint_score_function(loss, metrics)`` is at least as good as the best so far."""

    has_best_score: ClassVar[bool] = True  # a bar that a checkpointer built anew reads back from storage

    def __init__(
        self,
        checkpoint_dir: str,
        checkpoint_name: str,
        checkpoint_score_function: CheckpointScoreFunctionType,
        checkpoint_score_name: str | None = None,
        maximize: bool = False,
        *,
        storage_options: Mapping[str, Any] | None = None,
        overlap: bool | None = None,
        keep: RetentionPolicy | None = None,
    ) -> None:
        super().__init__(checkpoint_dir, checkpoint_name, storage_options=storage_options, overlap=overlap, keep=keep)
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

    def decide(
        self, loss: float, metrics: Mapping[str, Scalar], *, server_round: int | None = None
    ) -> SaveRequest | None:
        """Score the model now; return the save to make, or None. ``best_score`` is left alone until
        the save was accepted (:meth:`accepted`): a save that raises leaves the bar where it was."""
        score = as_score(self.checkpoint_score_function(loss, metrics), self.checkpoint_score_name)
        version = self.kept_round(server_round, loss, metrics)  # bad input raises whatever the decision
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
        return self.save_request(score, self.checkpoint_score_name, version=version)

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
        entry = storage_for(self.checkpoint_path, self.storage_options).read_entry(self.checkpoint_path)
        on_disk = entry.score if entry is not None and entry.score_name == self.checkpoint_score_name else None
        if on_disk is not None and is_improvement(on_disk, self.best_score, self.maximize):
            self.best_score = on_disk
        return self.best_score

    def maybe_checkpoint(
        self, model: nn.Module, loss: float, metrics: Mapping[str, Scalar], *, server_round: int | None = None
    ) -> None:
        """Save ``model`` in the background if its score is the best so far (``server_round``: see
        :meth:`TorchModuleCheckpointer.maybe_checkpoint`)."""
        request = self.decide(loss, metrics, server_round=server_round)
        if request is not None:
            snapshot_and_save([request], model, request.kind, self.overlap)
            self.accepted(request)


class LatestTorchModuleCheckpointer(FunctionTorchModuleCheckpointer):
    """Saves the model on every call."""

    has_best_score: ClassVar[bool] = False

    def __init__(
        self,
        checkpoint_dir: str,
        checkpoint_name: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        overlap: bool | None = None,
        keep: RetentionPolicy | None = None,
    ) -> None:
        super().__init__(
            checkpoint_dir, checkpoint_name, latest_score, "Latest", False,
            storage_options=storage_options, overlap=overlap, keep=keep,
        )  # fmt: skip

    def resume_best_score(self) -> float | None:
        return None  # it has no bar to resume

    def decide(
        self, loss: float, metrics: Mapping[str, Scalar], *, server_round: int | None = None
    ) -> SaveRequest | None:
        log.info("Saving latest checkpoint %s", self.checkpoint_path)
        return self.save_request(
            None, self.checkpoint_score_name, server_round=server_round, loss=loss, metrics=metrics
        )


class BestLossTorchModuleCheckpointer(FunctionTorchModuleCheckpointer):
    """Saves the model when its loss is the lowest so far."""

    def __init__(
        self,
        checkpoint_dir: str,
        checkpoint_name: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        overlap: bool | None = None,
        keep: RetentionPolicy | None = None,
    ) -> None:
        super().__init__(
            checkpoint_dir, checkpoint_name, loss_score, "Loss", False,
            storage_options=storage_options, overlap=overlap, keep=keep,
        )  # fmt: skip


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
        *,
        storage_options: Mapping[str, Any] | None = None,
        overlap: bool | None = None,
        keep: RetentionPolicy | None = None,
    ) -> None:
        self.metric_key = f"{prefix}{metric}"
        score = metric_score_function(self.metric_key)
        super().__init__(
            checkpoint_dir, checkpoint_name, score, metric, maximize,
            storage_options=storage_options, overlap=overlap, keep=keep,
        )  # fmt: skip
