"""When to save: score functions and the best-score decision. Pure functions, no I/O."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from fedckpt.errors import ScoreError

Scalar = bool | bytes | float | int | str
CheckpointScoreFunctionType = Callable[[float, Mapping[str, Scalar]], float]


def latest_score(loss: float, metrics: Mapping[str, Scalar]) -> float:
    """Score of a checkpointer that always saves: the value is never compared."""
    return 0.0


def loss_score(loss: float, metrics: Mapping[str, Scalar]) -> float:
    """Score a model by its loss."""
    return loss


def metric_score_function(metric_key: str) -> CheckpointScoreFunctionType:
    """Score a model by ``metrics[metric_key]``; a missing key raises ``KeyError`` at once."""

    def metric_score(loss: float, metrics: Mapping[str, Scalar]) -> float:
        if metric_key not in metrics:
            raise KeyError(f"Could not find '{metric_key}' in metrics dict. Available keys are: {sorted(metrics)}")
        value = metrics[metric_key]
        try:
            return float(value)
        except (TypeError, ValueError) as error:
            raise ScoreError(f"Metric '{metric_key}' has value {value!r}, which is not a number") from error

    metric_score.__name__ = f"metric_score[{metric_key}]"
    return metric_score


def as_score(value: object, score_name: str) -> float:
    """The score as a float, or a ``TypeError`` that names the score."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as error:
        raise ScoreError(f"The {score_name} score must be a number, got {value!r}") from error


def is_improvement(score: float, best_score: float | None, maximize: bool) -> bool:
    """Whether ``score`` is at least as good as ``best_score`` (always true when there is none).

    Two differences from FL4Health, on purpose: a best score of ``0.0`` counts as a score
    (FL4Health tests ``if self.best_score:``), and a NaN score is never an improvement (FL4Health
    saves a first NaN and afterwards never saves again, since every comparison with NaN fails).
    """
    if math.isnan(score):
        return False
    if best_score is None or math.isnan(best_score):
        return True
    return score >= best_score if maximize else score <= best_score
