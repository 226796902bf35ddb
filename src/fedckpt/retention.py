"""Which rounds of a checkpoint to keep: retention policies, and where each round's version lives.

A checkpointer given ``keep=`` writes each save twice over: the plain name (always the newest save,
as FL4Health code expects) and the round's own version beside it, ``<stem>.round-<r><suffix>``. After
the save is durable, its writer asks the policy which versions to keep and removes the others
(``fedckpt.runtime.writer.retention_step``). Policies are pure and small: frozen dataclasses with one
decision method, :meth:`RetentionPolicy.keep`, so users can write their own.
"""

from __future__ import annotations

import math
import operator
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from fedckpt.errors import ScoreError
from fedckpt.storage.paths import Location

VERSION_MARK = ".round-"
ROUND_DIGITS = 5  # zero-padded, so that a directory listing sorts by round up to round 99999


@dataclass(frozen=True)
class Version:
    """One kept round of a checkpoint, as a policy sees it."""

    round: int
    scores: Mapping[str, float] = field(default_factory=dict)  # what its BestN policies rank it by


class RetentionPolicy(ABC):
    """Decides which versions of one checkpoint stay on storage."""

    @abstractmethod
    def keep(self, versions: Sequence[Version]) -> set[int]:
        """The rounds of ``versions`` to keep (the others are deleted)."""

    def metrics(self) -> set[str]:
        """The metrics each save must be scored by (a save missing one raises ``ScoreError``)."""
        return set()


def _positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class LatestN(RetentionPolicy):
    """Keep the ``n`` newest rounds."""

    n: int

    def __post_init__(self) -> None:
        _positive("LatestN's n", self.n)

    def keep(self, versions: Sequence[Version]) -> set[int]:
        return set(sorted(version.round for version in versions)[-self.n :])


@dataclass(frozen=True)
class EveryNRounds(RetentionPolicy):
    """Keep the rounds ``r`` with ``r % k == 0``."""

    k: int

    def __post_init__(self) -> None:
        _positive("EveryNRounds' k", self.k)

    def keep(self, versions: Sequence[Version]) -> set[int]:
        return {version.round for version in versions if version.round % self.k == 0}


@dataclass(frozen=True)
class BestN(RetentionPolicy):
    """Keep the ``n`` best rounds by ``metric`` (``"loss"``, or a key of the metrics dict; for a state
    checkpoint, a key of the state): lowest with ``mode="min"``, highest with ``"max"``. A tie goes to
    the newer round; a NaN score is never among the best."""

    n: int
    metric: str = "loss"
    mode: Literal["min", "max"] = "min"

    def __post_init__(self) -> None:
        _positive("BestN's n", self.n)
        if self.mode not in ("min", "max"):
            raise ValueError(f"BestN's mode must be 'min' or 'max', got {self.mode!r}")
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"BestN's metric must be a non-empty string, got {self.metric!r}")

    def keep(self, versions: Sequence[Version]) -> set[int]:
        sign = 1.0 if self.mode == "min" else -1.0
        scored = [
            (sign * version.scores[self.metric], -version.round)
            for version in versions
            if not math.isnan(version.scores.get(self.metric, math.nan))
        ]
        return {-negated_round for _, negated_round in sorted(scored)[: self.n]}

    def metrics(self) -> set[str]:
        return {self.metric}


@dataclass(frozen=True)
class AnyOf(RetentionPolicy):
    """Keep a round if any of ``policies`` keeps it."""

    policies: tuple[RetentionPolicy, ...]

    def __init__(self, *policies: RetentionPolicy) -> None:
        if not policies:
            raise ValueError("AnyOf needs at least one policy")
        for policy in policies:
            if not isinstance(policy, RetentionPolicy):
                raise TypeError(f"AnyOf takes retention policies, got {type(policy).__name__}")
        object.__setattr__(self, "policies", tuple(policies))

    def keep(self, versions: Sequence[Version]) -> set[int]:
        return set().union(*(policy.keep(versions) for policy in self.policies))

    def metrics(self) -> set[str]:
        return set().union(*(policy.metrics() for policy in self.policies))


def check_policy(keep: object) -> RetentionPolicy | None:
    """``keep`` as a checkpointer's policy, or a ``TypeError`` naming what it is instead."""
    if keep is None or isinstance(keep, RetentionPolicy):
        return keep
    raise TypeError(f"keep= takes a retention policy (LatestN, EveryNRounds, BestN, AnyOf), got {keep!r}")


def scores_for(
    policy: RetentionPolicy, loss: float | None, metrics: Mapping[str, object], where: str
) -> dict[str, float]:
    """The scores ``policy`` ranks a save by: ``"loss"`` is ``loss`` (else ``metrics["loss"]``), any
    other metric ``metrics[name]``. A missing or non-numeric one raises ``ScoreError`` naming ``where``."""
    scores = {}
    for name in sorted(policy.metrics()):
        value = loss if name == "loss" and loss is not None else metrics.get(name)
        if value is None:
            raise ScoreError(f"{where}: the retention policy ranks by {name!r}, which this save does not have "
                             f"(available: {sorted(metrics)})")  # fmt: skip
        try:
            scores[name] = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError) as error:
            raise ScoreError(f"{where}: {name!r} is {value!r}, which is not a number") from error
    return scores


def check_round(server_round: object) -> int | None:
    """``server_round`` as a version's round, or a ``ValueError`` naming it."""
    if server_round is None:
        return None
    try:
        checked = operator.index(server_round)  # an int, or numpy's
    except TypeError:
        checked = -1
    if isinstance(server_round, bool) or checked < 0:
        raise ValueError(f"server_round must be a non-negative int, got {server_round!r}")
    return checked


def _split(name: str) -> tuple[str, str]:
    """(stem, suffix) of a checkpoint's file name: ``model.safetensors`` -> (``model``, ``.safetensors``)."""
    stem, dot, suffix = name.rpartition(".")
    return (stem, dot + suffix) if stem else (name, "")


def version_path(path: str, server_round: int) -> str:
    """Where round ``server_round``'s version of the checkpoint ``path`` lives (beside it)."""
    location = Location.of(path)
    stem, suffix = _split(location.name)
    return str(location.parent.join(f"{stem}{VERSION_MARK}{server_round:0{ROUND_DIGITS}d}{suffix}"))


def version_round(path: str, name: str) -> int | None:
    """The round of ``name`` (a file name beside ``path``) if it is a version of ``path``, else None."""
    stem, suffix = _split(Location.of(path).name)
    match = re.fullmatch(re.escape(stem + VERSION_MARK) + r"(\d+)" + re.escape(suffix), name)
    return int(match.group(1)) if match else None
