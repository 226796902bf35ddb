"""``PerRoundStateCheckpointer``: per-round state for restarts, saved in the background."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedckpt.checkpointers import wait_until_readable
from fedckpt.kept_rounds import KeptRounds
from fedckpt.retention import RetentionPolicy
from fedckpt.runtime import lifecycle, stats
from fedckpt.runtime.messages import SaveRequest
from fedckpt.snapshot import STATE, Snapshot, snapshot_state
from fedckpt.storage import reading
from fedckpt.storage.base import Storage, storage_for, storage_options_for
from fedckpt.storage.paths import checkpoint_key, checkpoint_path_in

log = logging.getLogger("fedckpt")

# The manifest's score field of a state saved with its round holds the round, under this name.
ROUND_SCORE_NAME = "server_round"


@dataclass(frozen=True)
class StateSnapshot:
    """A state taken by :meth:`PerRoundStateCheckpointer.snapshot_checkpoint`, not yet saved."""

    path: str
    snapshot: Snapshot
    scores: dict[str, float] = field(default_factory=dict)  # what a retention policy ranks it by


class PerRoundStateCheckpointer:
    """Saves, loads and checks dictionaries of state (models, optimizers, counters, ...).

    Files are ``torch.save``'s format: ``torch.load(path, weights_only=False)`` reads them. CUDA
    tensors in a state (an optimizer's on a GPU) are copied straight from the device into the staging
    memory; ``overlap`` as for ``TorchModuleCheckpointer`` (default: the process's setting).

    ``keep``: a retention policy (:mod:`fedckpt.retention`): each save's round is kept as its own file
    beside the plain name, which always holds the newest save. ``BestN`` ranks states by one of their
    own top-level entries (``BestN(2, metric="val_loss")`` by ``state["val_loss"]``).
    """

    def __init__(
        self,
        checkpoint_dir: str | Path,
        *,
        storage_options: Mapping[str, Any] | None = None,
        overlap: bool | None = None,
        keep: RetentionPolicy | None = None,
    ) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.kept_rounds = KeptRounds(keep)
        self.storage_options = storage_options  # for a URL directory; see TorchModuleCheckpointer
        self.overlap = overlap
        self._saved_keys: set[str] = set()

    def _storage(self, path: str) -> Storage:
        return storage_for(path, self.storage_options)

    def _path(self, checkpoint_name: str) -> str:
        return checkpoint_path_in(self.checkpoint_dir, checkpoint_name)

    def existing(self, *checkpoint_names: str) -> list[str]:
        """Those of ``checkpoint_names`` that exist, after their pending saves (one round trip for all)."""
        paths = [self._path(name) for name in checkpoint_names]
        wait_until_readable(*paths)
        return [name for name, path in zip(checkpoint_names, paths, strict=True) if self._storage(path).exists(path)]

    def save_checkpoint(
        self, checkpoint_name: str, checkpoint_dict: Mapping[str, Any], server_round: int | None = None
    ) -> None:
        """Snapshot ``checkpoint_dict`` now and write it in the background.

        ``server_round``, if given, is recorded in the checkpoint's manifest entry (``fedckpt ls``
        shows it; :meth:`saved_round` reads it back without loading the state). With a retention
        policy it is the round the save is kept as (None: the next number of this name).
        """
        self.save_snapshot(self.snapshot_checkpoint(checkpoint_name, checkpoint_dict), server_round)

    def snapshot_checkpoint(self, checkpoint_name: str, checkpoint_dict: Mapping[str, Any]) -> StateSnapshot:
        """The first half of :meth:`save_checkpoint`: take the snapshot now, save it later.

        For a save that must wait for something (the server's round commit waits until the
        round's other saves are durable) while the state goes on changing.
        """
        path = self._path(checkpoint_name)
        if not isinstance(checkpoint_dict, Mapping):
            raise TypeError(f"State for {path} must be a dict, got {type(checkpoint_dict).__name__}")
        scores = self.kept_rounds.scores(None, checkpoint_dict, path)  # a ScoreError names the metric
        try:
            with stats.recorder.timed("blocked_seconds"):
                return StateSnapshot(path, snapshot_state(checkpoint_dict), scores)
        except TypeError as error:
            raise TypeError(f"State for {path} cannot be saved: {error}") from error

    def save_snapshot(
        self, state: StateSnapshot, server_round: int | None = None, *, round_clients: int | None = None
    ) -> None:
        """The second half of :meth:`save_checkpoint`: write a snapshot taken earlier, in the background.
        ``round_clients``: for a server state kept by round, the clients whose states its round commits."""
        log.info("Saving state as %s", state.path)
        key = checkpoint_key(state.path)
        self._saved_keys.add(key)
        score = None if server_round is None else float(server_round)
        version = self.kept_rounds.request_scored(server_round, state.scores, round_clients)
        request = SaveRequest(
            key,
            STATE,
            score,
            None if score is None else ROUND_SCORE_NAME,
            storage_options=storage_options_for(key, self.storage_options),
            version=version,
        )
        with stats.recorder.timed("blocked_seconds"):
            lifecycle.coordinator().save([request], state.snapshot, overlap=self.overlap)

    def saved_round(self, checkpoint_name: str) -> int | None:
        """The round a checkpoint on storage was saved with (see :meth:`save_checkpoint`), or None.

        Reads the manifest entry only; call :meth:`existing` first to see pending saves of it.
        """
        path = self._path(checkpoint_name)
        entry = self._storage(path).read_entry(path)
        if entry is None or entry.score_name != ROUND_SCORE_NAME or entry.score is None:
            return None
        return int(entry.score)

    def versions(self, checkpoint_name: str) -> list[int]:
        """The rounds a retention policy keeps of ``checkpoint_name``, sorted (after its pending saves
        and their deletions). The plain name is not among them unless the policy keeps its round."""
        path = self._path(checkpoint_name)
        wait_until_readable(path)
        return self.kept_rounds.rounds(path, self.storage_options)

    def load_checkpoint(
        self,
        checkpoint_name: str,
        mmap: bool = False,
        wait: bool = True,
        *,
        map_location: Any = None,
        server_round: int | None = None,
    ) -> dict[str, Any]:
        """The saved state (waits for pending saves of it). Raises ``FileNotFoundError`` if absent.

        ``mmap=True`` maps tensor data instead of reading it; ``wait=False`` skips the wait, for a
        caller that just waited (:meth:`existing`). ``map_location`` is ``torch.load``'s; a CUDA device
        reads each tensor into page-locked memory and copies it to the device without blocking.
        ``server_round``: that round's version (see :meth:`versions`) instead of the newest save.
        """
        path = self._path(checkpoint_name)
        if wait:
            wait_until_readable(path)
        if server_round is not None:
            path = self.kept_rounds.path_of(path, server_round, self.storage_options)
        log.info("Loading state from checkpoint at %s", path)
        try:
            return reading.read_state_checkpoint(
                path, self.storage_options, lambda source: reading.read_state(source, mmap, map_location)
            )
        except FileNotFoundError:
            raise FileNotFoundError(f"No state checkpoint at {path}") from None

    def checkpoint_exists(self, checkpoint_name: str, **kwargs: Any) -> bool:
        """Whether the checkpoint exists, counting saves already issued but not yet written."""
        if "checkpoint_path" in kwargs:
            raise ValueError(
                "Previously this checkpoint supported sending a path, but it now requires a checkpoint_name only"
            )
        path = self._path(checkpoint_name)
        wait_until_readable(path)
        return self._storage(path).exists(path)

    def saved_keys(self) -> list[str]:
        """The keys of every file saved through this checkpointer (what :meth:`flush` waits for)."""
        return sorted(self._saved_keys)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every save made through this checkpointer is durable; raise if one failed."""
        lifecycle.coordinator().flush(self.saved_keys(), timeout=timeout)
