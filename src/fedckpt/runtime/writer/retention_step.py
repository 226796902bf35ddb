"""The writer's deletion step: a save's round version, then the versions its policy drops.

Runs on an I/O thread right after the save's plain name is durable, before the save's outcome goes
out, so a flush that saw the save done sees its deletions done too. The decision is made afresh from
storage every time: a step cut off by a crash (a writer killed mid-deletion) is finished by the next
save of the key, and kept versions are never touched.

A save of round ``r`` when versions of later rounds exist means the run was resumed from an older
round: those later versions belong to the abandoned run and are removed, so the kept rounds always
form one history and the round a resume started from stays until the policy drops it.
"""

from __future__ import annotations

from ray import cloudpickle

from fedckpt.errors import SaveLostError
from fedckpt.retention import RetentionPolicy, Version, version_path
from fedckpt.runtime import failpoints
from fedckpt.runtime.messages import SaveRequest, VersionRequest
from fedckpt.storage.base import RoundVersion, Storage, storage_for


class RetentionError(RuntimeError):
    """The save is durable under its plain name, but keeping its round or deleting dropped rounds failed."""


def next_round(request: SaveRequest, sequence: tuple[int, int]) -> int:
    """The round a save without one is kept as: the next number of its name, after the round of the
    save its plain name holds and after every version kept (the same number again for a save sent
    twice, which its plain name may hold already)."""
    storage = storage_for(request.key, request.storage_options)
    current = storage.read_entry(request.key)
    if current is not None and tuple(current.sequence) == tuple(sequence) and current.server_round is not None:
        return current.server_round
    newest = max(storage.versions_of(request.key).recorded, default=0)
    if current is not None and current.server_round is not None:
        newest = max(newest, current.server_round)
    return newest + 1


def keep_round(request: SaveRequest, sequence: tuple[int, int]) -> None:
    """Make ``request``'s round version (if its policy keeps it) and delete the versions it drops."""
    assert request.version is not None
    step: VersionRequest = request.version
    policy: RetentionPolicy = cloudpickle.loads(step.policy)
    storage = storage_for(request.key, request.storage_options)
    listing = storage.versions_of(request.key)
    for leftover in listing.leftovers:  # deletions a crash cut off
        storage.remove_leftover(leftover)
    server_round = step.server_round
    assert server_round is not None  # numbered before the save was written (next_round)
    history = [Version(r, version.entry.scores or {}) for r, version in listing.recorded.items() if r < server_round]
    kept = policy.keep([*history, Version(server_round, step.scores)])
    # Later rounds than this save's belong to a run abandoned by a resume from an older round.
    dropped = [version for r, version in sorted(listing.recorded.items()) if r > server_round or r not in kept]
    if server_round in kept:
        _make_version(storage, request, sequence, server_round, sum(version.entry.bytes for version in dropped))
    for version in dropped:
        failpoints.reach("retention.removing", key=request.key)
        _remove(storage, version)


def _make_version(
    storage: Storage, request: SaveRequest, sequence: tuple[int, int], server_round: int, freed_bytes: int
) -> None:
    target = version_path(request.key, server_round)
    try:
        made = storage.make_version(request.key, sequence, target, freed_bytes)
    except Exception as error:
        raise RetentionError(
            f"round {server_round} could not be kept as {target}: {type(error).__name__}: {error}"
        ) from error
    if made:
        return
    entry = storage.read_entry(target)
    if entry is None or tuple(entry.sequence) < tuple(sequence):
        raise SaveLostError(
            f"round {server_round}'s version of {request.key} was not kept: a newer save replaced the checkpoint "
            "before its version was made"
        )


def _remove(storage: Storage, version: RoundVersion) -> None:
    try:
        storage.remove_version(version)
    except Exception as error:
        raise RetentionError(
            f"the version of round {version.server_round} ({version.path}) could not be deleted: "
            f"{type(error).__name__}: {error}; the next save of the checkpoint tries again"
        ) from error
