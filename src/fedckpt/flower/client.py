"""``ClientCheckpoints``: a Flower ClientApp's checkpoints and state, for one node.

A ClientApp keeps nothing between rounds, and each round may run in another Ray worker. So the
helper is built anew in every handler: it takes the best scores of its checkpointers from the
checkpoints on disk, and restores the client's state from the state file the previous round saved
(read-your-writes: a load waits for that save wherever it was issued).

State is kept in two slots that saves alternate between. A restore takes the newest state from a
round *before* the current one, so a round that a crash interrupted, and that runs again after a
resume, starts from the same state as the first time. A save goes to the slot of its round's
parity unless that slot holds the state to keep: a client that takes part in every round then
finds the previous round's state in the slot of that round's parity, and reads only that file.

Optionally (given the handler's ``context``), a small state is also kept in ``context.state``,
which Flower holds in memory across the rounds of a run: a restore then costs a few copies and
reads the file only after a restart. Off by default: Flower's simulation carries the context
through Ray with every message, and on a local disk that costs more than reading the file back
(``benchmarks/restore.py``: 7x the file at 0.3 MB). It pays where reading back is slow.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedckpt.checkpoint_module import ModelCheckpointers, with_best_scores
from fedckpt.client_module import ClientCheckpointAndStateModule
from fedckpt.flower import context_state
from fedckpt.flower.timing import BlockedTime
from fedckpt.modes import CheckpointMode
from fedckpt.policies import Scalar
from fedckpt.retention import RetentionPolicy
from fedckpt.runtime import lifecycle, threads
from fedckpt.state import PerRoundStateCheckpointer
from fedckpt.storage.paths import Location

SLOTS = (0, 1)
FIRST_ROUND = 1  # Flower's first server round
ROUND_KEY = "server_round"
# With a context, states up to this size are also kept in ``context.state`` (larger ones cost Flower
# more to carry with every message than any storage takes to read them back).
CONTEXT_STATE_MAX_BYTES = 1 << 20


def _slot_for(server_round: int, keep: int | None) -> int:
    """The slot a save of ``server_round`` goes to: the one of the round's parity, unless it holds the
    state to keep."""
    parity = SLOTS[server_round % 2]
    return parity if parity != keep else SLOTS[1 - parity]


def run_checkpoint_dir(context: Any, key: str = "checkpoint-dir") -> str:
    """The checkpoint directory in the run config (``context.run_config[key]``), ``~`` expanded.

    Raises ``ValueError`` if the key is missing, or names a relative path: under ``flwr run`` the
    apps run in the SuperLink's processes, whose working directory is not the one ``flwr run`` was
    typed in, so a relative path would put the checkpoints somewhere nobody looks for them (and a
    run started from another directory would not resume). URLs (``s3://bucket/run``) pass as given.
    """
    if key not in context.run_config:
        raise ValueError(f"the run config has no {key!r}: add it to [tool.flwr.app.config] in the app's pyproject.toml")
    configured = str(context.run_config[key])
    if Location.of(configured).is_url:
        return configured
    expanded = os.path.expanduser(configured)
    if not os.path.isabs(expanded):
        raise ValueError(
            f"run config {key}={configured!r} is a relative path: give an absolute path (or ~/..., or "
            "a URL); the apps do not run in the directory flwr run was started from"
        )
    return expanded


def client_checkpoint_dir(root: str | Path, context: Any) -> str:
    """``root/client_<partition-id>`` for a simulated node (``client_<node-id>`` elsewhere)."""
    node = context.node_config.get("partition-id", context.node_id)
    return str(Location.of(root).join(f"client_{node}"))  # root may be a URL


class ClientCheckpoints:
    """The checkpoints of one Flower client, built in each ``@app.train()`` / ``@app.evaluate()`` call.

    Args:
        checkpoint_dir: this client's directory (see :func:`client_checkpoint_dir`); the state
            files go there.
        pre_aggregation: checkpointer(s) of the local model after local training.
        post_aggregation: checkpointer(s) of the global model the client received.
        state_name: base name of the state files (``<state_name>.0.pt`` and ``.1.pt``).
        context: the handler's Flower ``Context``, to also keep states of at most
            ``context_state_max_bytes`` of tensors in ``context.state`` and restore from there
            (for storage slower to read back than Flower is to carry the state; see above).
        keep: a retention policy (:mod:`fedckpt.retention`) for the state: it is then saved as
            ``<state_name>.pt`` with each round's version beside it (no slots: a restore takes the
            newest version from an earlier round), so that ``ServerCheckpoints.resume(round=r)`` can
            restart the run from any complete round.

    ``blocked_seconds`` adds up the time the calls below kept the client waiting, and
    ``blocked.by_activity`` splits it by call (``restore``, ``save_state``, ``pre_aggregation``,
    ``post_aggregation``, ``flush``). A best-score checkpointer reads the score of the checkpoint it
    has on storage (``resume_best_score``) before its first save here: a handler that does not save
    it never reads it. A handler that restores its state trains next, so :meth:`restore_state`
    starts reading its pre-aggregation checkpointers' scores on a background thread, and the
    training hides the read; otherwise the first save reads them, inside that call.
    """

    def __init__(
        self,
        checkpoint_dir: str | Path,
        pre_aggregation: ModelCheckpointers = None,
        post_aggregation: ModelCheckpointers = None,
        state_name: str = "client_state",
        context: Any = None,
        context_state_max_bytes: int = CONTEXT_STATE_MAX_BYTES,
        keep: RetentionPolicy | None = None,
    ) -> None:
        self.blocked = BlockedTime()
        self.keep = keep
        self.module = ClientCheckpointAndStateModule(
            pre_aggregation, post_aggregation, PerRoundStateCheckpointer(checkpoint_dir, keep=keep)
        )
        self.state_name = state_name
        self.context = context
        self.context_state_max_bytes = context_state_max_bytes
        self._rounds: dict[int, int | None] | None = None  # slot -> round of the state in it
        self._restored: tuple[int, int] | None = None  # (server round, slot) a restore read from
        self._resumed_modes: set[CheckpointMode] = set()
        self._reading_scores: Future[None] | None = None  # the pre-aggregation scores, read while training
        lifecycle.warm_up_in_background()  # joining the pool overlaps with the round's training

    @property
    def blocked_seconds(self) -> float:
        return self.blocked.seconds

    def after_local_training(
        self, model: nn.Module, loss: float, metrics: Mapping[str, Scalar], *, server_round: int | None = None
    ) -> None:
        """Pre-aggregation checkpoints of the locally trained ``model`` (background save); ``server_round``
        is the round the checkpointers' retention policies keep it as."""
        with self.blocked.measure("pre_aggregation"):
            self._resume_best_scores(CheckpointMode.PRE_AGGREGATION)
            self.module.maybe_checkpoint(
                model, loss, metrics, CheckpointMode.PRE_AGGREGATION, server_round=server_round
            )

    def after_receiving_global_model(
        self, model: nn.Module, loss: float, metrics: Mapping[str, Scalar], *, server_round: int | None = None
    ) -> None:
        """Post-aggregation checkpoints of the global ``model`` this client received (background save);
        ``server_round`` as for :meth:`after_local_training`."""
        with self.blocked.measure("post_aggregation"):
            self._resume_best_scores(CheckpointMode.POST_AGGREGATION)
            self.module.maybe_checkpoint(
                model, loss, metrics, CheckpointMode.POST_AGGREGATION, server_round=server_round
            )

    def _resume_best_scores(self, mode: CheckpointMode) -> None:
        """Let ``mode``'s best-score checkpointers compare against their checkpoints on storage, on
        their first use: a handler that never saves them (an evaluate round's pre-aggregation ones)
        never reads them. The read started by :meth:`restore_state` is waited for (its error raised)."""
        if mode is CheckpointMode.PRE_AGGREGATION and self._reading_scores is not None:
            reading, self._reading_scores = self._reading_scores, None
            reading.result()
        elif mode not in self._resumed_modes:
            self._resumed_modes.add(mode)
            self.module.resume_best_scores(self.module.checkpointers_of(mode) or [])

    def _read_pre_aggregation_scores_in_background(self) -> None:
        """Start reading the pre-aggregation checkpointers' scores on storage on a background thread (the
        handler trains meanwhile); :meth:`_resume_best_scores` waits for it. Every save of them issued
        so far is waited for first, as for a read in the call."""
        mode = CheckpointMode.PRE_AGGREGATION
        checkpointers = with_best_scores(self.module.checkpointers_of(mode) or [])
        if mode in self._resumed_modes or not checkpointers:
            return
        self._resumed_modes.add(mode)
        self._reading_scores = threads.background_calls.submit(partial(self.module.resume_best_scores, checkpointers))

    def restore_state(self, server_round: int, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any] | None:
        """The state saved in the newest earlier round, loaded into ``optimizer``; None if none (always
        in round 1, which has no earlier round).

        Returns the whole saved dict (``server_round``, ``optimizer`` and the extras given to
        :meth:`save_state`). Training comes next: the pre-aggregation checkpointers' scores are read
        meanwhile, in the background.
        """
        with self.blocked.measure("restore"):
            state = self._saved_state(server_round)
            if state is not None and optimizer is not None and "optimizer" in state:
                optimizer.load_state_dict(state["optimizer"])
            self._read_pre_aggregation_scores_in_background()
        return state

    def _saved_state(self, server_round: int) -> dict[str, Any] | None:
        """The state :meth:`restore_state` returns: from the context, the kept versions or the slots.
        Flower numbers rounds from 1: the first has no earlier round, and reads nothing."""
        if server_round <= FIRST_ROUND:
            return None
        if self._kept_in_context(server_round) is not None:
            return context_state.restore(self.context)
        assert self.module.state_checkpointer is not None
        if self.keep is not None:
            kept = self._version_to_restore(server_round)
            if kept is None:
                return None
            return self.module.state_checkpointer.load_checkpoint(self.kept_state_name, server_round=kept)
        state = self._previous_round_state(server_round)
        if state is None:
            slot = self._slot_to_restore(server_round)
            if slot is None:
                return None
            state = self.module.state_checkpointer.load_checkpoint(self._slot_name(slot), wait=False)
            self._restored = (server_round, slot)
        return state

    def save_state(self, server_round: int, optimizer: torch.optim.Optimizer | None = None, **extra: Any) -> None:
        """Save this round's state (background save): ``optimizer``'s state dict and ``extra``."""
        state: dict[str, Any] = {ROUND_KEY: server_round, **extra}
        if optimizer is not None:
            state["optimizer"] = optimizer.state_dict()
        with self.blocked.measure("save_state"):
            assert self.module.state_checkpointer is not None
            if self.keep is not None:  # each round its own version
                slot = SLOTS[0]
                self.module.state_checkpointer.save_checkpoint(self.kept_state_name, state, server_round=server_round)
            else:
                slot = _slot_for(server_round, keep=self._slot_to_keep(server_round))
                self.module.state_checkpointer.save_checkpoint(self._slot_name(slot), state, server_round=server_round)
            if self._rounds is not None:
                self._rounds[slot] = server_round
            if self.context is not None:
                if context_state.state_bytes(state) <= self.context_state_max_bytes:
                    context_state.keep(self.context, state, server_round, slot)
                else:
                    context_state.forget(self.context)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until this client's saves are durable (not needed per round: the server flushes)."""
        with self.blocked.measure("flush"):
            self.module.flush(timeout)

    @property
    def kept_state_name(self) -> str:
        """The state's name with a retention policy (its versions are beside it)."""
        return f"{self.state_name}.pt"

    def _version_to_restore(self, server_round: int) -> int | None:
        """With a retention policy: the newest round kept before ``server_round``."""
        assert self.module.state_checkpointer is not None
        earlier = [r for r in self.module.state_checkpointer.versions(self.kept_state_name) if r < server_round]
        return max(earlier, default=None)

    def _previous_round_state(self, server_round: int) -> dict[str, Any] | None:
        """The state of round ``server_round - 1`` (``server_round`` is after the first) from the slot
        of that round's parity (after its pending saves), if it holds that round: the newest earlier
        round there can be, found without reading either slot's manifest entry. None otherwise (the
        client skipped that round, or the slots are laid out otherwise): the entries decide."""
        slot = (server_round - 1) % len(SLOTS)
        assert self.module.state_checkpointer is not None
        try:
            state = self.module.state_checkpointer.load_checkpoint(self._slot_name(slot))
        except FileNotFoundError:
            return None
        if not isinstance(state, dict) or state.get(ROUND_KEY) != server_round - 1:
            return None
        self._restored = (server_round, slot)
        return state

    def _slot_to_keep(self, server_round: int) -> int | None:
        """The slot a save of ``server_round`` must not overwrite: the one holding the state a restore
        of that round takes (a round run again after a crash restores it again)."""
        kept = self._kept_in_context(server_round)
        if kept is not None:
            return kept
        if self._restored is not None and self._restored[0] == server_round:
            return self._restored[1]
        return self._slot_to_restore(server_round)

    def _slot_name(self, slot: int) -> str:
        return f"{self.state_name}.{slot}.pt"

    def _slot_rounds(self) -> dict[int, int | None]:
        """The round of the state in each slot (after pending saves of both), from the manifest
        entries; a state saved without its round there is read (mapped) to find it."""
        if self._rounds is None:
            checkpointer = self.module.state_checkpointer
            assert checkpointer is not None
            names = {self._slot_name(slot): slot for slot in SLOTS}
            self._rounds = {}
            for name in checkpointer.existing(*names):
                saved_round = checkpointer.saved_round(name)
                if saved_round is None:
                    saved = checkpointer.load_checkpoint(name, mmap=True, wait=False).get(ROUND_KEY)
                    saved_round = saved if isinstance(saved, int) else None
                self._rounds[names[name]] = saved_round
        return self._rounds

    def _kept_in_context(self, server_round: int) -> int | None:
        """The slot of the state kept in the context, if that is the newest state before ``server_round``.

        The context holds the last state this client saved in this run; after a restart it holds none.
        """
        kept = context_state.kept(self.context) if self.context is not None else None
        return kept[1] if kept is not None and kept[0] < server_round else None

    def _slot_to_restore(self, server_round: int) -> int | None:
        """The slot holding the newest state from a round before ``server_round``."""
        earlier = [
            (saved_round, slot)
            for slot, saved_round in self._slot_rounds().items()
            if saved_round is not None and saved_round < server_round
        ]
        return max(earlier)[1] if earlier else None
