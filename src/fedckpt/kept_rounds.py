"""A checkpointer's retention policy, on the caller's side: what a save asks its writer to keep, and
which rounds are kept (see :mod:`fedckpt.retention`)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from fedckpt.retention import RetentionPolicy, check_policy, check_round, scores_for, version_path
from fedckpt.runtime.messages import VersionRequest
from fedckpt.storage.base import storage_for


class KeptRounds:
    """``keep=`` of a checkpointer: None keeps one file per name, as FL4Health does."""

    def __init__(self, keep: RetentionPolicy | None) -> None:
        self.policy = check_policy(keep)
        self._pickled: bytes | None = None

    def request(
        self, server_round: object, loss: float | None, metrics: Mapping[str, Any], where: str
    ) -> VersionRequest | None:
        """What a save of ``where`` asks its writer to keep; checked here, so bad input raises in the caller."""
        return self.request_scored(server_round, self.scores(loss, metrics, where))

    def scores(self, loss: float | None, metrics: Mapping[str, Any], where: str) -> dict[str, float]:
        """What the policy ranks a save by, taken now (a missing or bad metric raises ``ScoreError``)."""
        return {} if self.policy is None else scores_for(self.policy, loss, metrics, where)

    def request_scored(
        self, server_round: object, scores: dict[str, float], round_clients: int | None = None
    ) -> VersionRequest | None:
        """:meth:`request` with the scores taken earlier (:meth:`scores`); ``round_clients``: for a
        server state, the clients whose states its round commits (see :mod:`fedckpt.round_table`)."""
        checked = check_round(server_round)
        if self.policy is None:
            return None
        if self._pickled is None:
            self._pickled = _pickled_by_value(self.policy)
        return VersionRequest(checked, scores, self._pickled, round_clients)

    @staticmethod
    def rounds(path: str, storage_options: Mapping[str, Any] | None) -> list[int]:
        """The rounds kept of the checkpoint ``path`` (call after its pending saves are written)."""
        return sorted(storage_for(path, storage_options).versions_of(path).recorded)

    def path_of(self, path: str, server_round: object, storage_options: Mapping[str, Any] | None) -> str:
        """Round ``server_round``'s version of ``path``; a ``FileNotFoundError`` naming the rounds kept."""
        checked = check_round(server_round)
        assert checked is not None
        kept = self.rounds(path, storage_options)
        if checked not in kept:
            raise FileNotFoundError(f"No version of round {checked} of {path}: the rounds kept are {kept}")
        return version_path(path, checked)


def _pickled_by_value(policy: RetentionPolicy) -> bytes:
    """``policy`` for the writer, which may not import the module of a user's own policy class (a
    script, a test module): that module is pickled by value, fedckpt's own by reference."""
    from ray import cloudpickle

    module = sys.modules.get(type(policy).__module__)
    by_value = (
        module is not None
        and module.__name__.partition(".")[0] not in ("fedckpt", "__main__")
        and module.__name__ not in cloudpickle.list_registry_pickle_by_value()
    )
    if by_value:
        cloudpickle.register_pickle_by_value(module)
    try:
        return cloudpickle.dumps(policy)
    finally:
        if by_value:
            cloudpickle.unregister_pickle_by_value(module)
