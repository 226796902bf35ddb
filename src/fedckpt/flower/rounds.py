"""``CheckpointedRounds``: the user's strategy as Flower's round loop sees it under ``ServerCheckpoints``.

``ServerCheckpoints`` runs Flower's own loop, ``Strategy.start`` (``fedckpt._compat.run_strategy_rounds``
says what of it fedckpt relies on), with this wrapper in place of the user's strategy. The wrapper
hands every call on to that strategy and adds two things:

- the true round numbers: a resumed run continues after its last durable round, while Flower's
  loop counts its rounds from 1, so round ``r`` of the loop is round ``offset + r`` of the run;
- the end of each round: what the round produced (the global arrays, the aggregated and the
  centralized evaluation) is recorded in ``history`` and handed to ``end_round``, which checkpoints
  it, once the round's last call is over (``aggregate_evaluate``, or the centralized
  ``evaluate_fn`` where one is given).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


@dataclass(frozen=True)
class RoundOutcome:
    """What one round left: the global arrays after it, and its evaluation metrics (None: not reported)."""

    server_round: int
    arrays: ArrayRecord
    evaluate_metrics: MetricRecord | None
    central_metrics: MetricRecord | None
    clients_trained: int = 0  # training replies the round aggregated (each client's state is part of the round)


class CheckpointedRounds(Strategy):
    """Hands each call of Flower's loop on to ``strategy`` with the true round number, and each
    finished round to ``end_round``.

    Args:
        strategy: the user's strategy.
        offset: the rounds done before this run (a resume continues after them).
        arrays: the global arrays the loop starts from.
        history: the metrics of the rounds so far, by true round number (those restored on a
            resume); the rounds run here are added as they end.
        end_round: called with each round's outcome once the round is over (it checkpoints it).
        evaluate_fn: the user's centralized evaluation, or None; Flower gets :meth:`evaluate` in
            its place when there is one.
    """

    def __init__(
        self,
        strategy: Strategy,
        offset: int,
        arrays: ArrayRecord,
        history: Result,
        end_round: Callable[[RoundOutcome], None],
        evaluate_fn: EvaluateFn | None = None,
    ) -> None:
        self.strategy = strategy
        self.offset = offset
        self.arrays = arrays
        self.history = history
        self.end_round = end_round
        self.evaluate_fn = evaluate_fn
        self.rounds_ended: list[int] = []
        self._evaluate_metrics: MetricRecord | None = None
        self._clients_trained = 0

    @classmethod
    def around(cls, strategy: Strategy, *args: Any, **kwargs: Any) -> CheckpointedRounds:
        """The wrapper of ``strategy`` (arguments as the constructor's), of a subclass named after
        ``strategy``'s class: Flower's loop logs "Starting <class name> strategy"."""
        named = type(type(strategy).__name__, (cls,), {"__module__": cls.__module__})
        return named(strategy, *args, **kwargs)  # type: ignore[no-any-return]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.arrays = arrays
        return self.strategy.configure_train(self.offset + server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._clients_trained = sum(1 for reply in replies if not reply.has_error())
        aggregated, metrics = self.strategy.aggregate_train(self.offset + server_round, replies)
        if metrics is not None:
            self.history.train_metrics_clientapp[self.offset + server_round] = metrics
        return aggregated, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.arrays = arrays  # the loop's global arrays after this round's aggregation
        return self.strategy.configure_evaluate(self.offset + server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        metrics = self.strategy.aggregate_evaluate(self.offset + server_round, replies)
        if metrics is not None:
            self.history.evaluate_metrics_clientapp[self.offset + server_round] = metrics
        self._evaluate_metrics = metrics
        if self.evaluate_fn is None:  # the round's last call
            self._round_over(self.offset + server_round, None)
        return metrics

    def summary(self) -> None:
        self.strategy.summary()

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """The centralized evaluation Flower's loop calls (given only with the user's ``evaluate_fn``);
        after a round, the round's last call."""
        assert self.evaluate_fn is not None
        if server_round == 0 and self.offset:
            return None  # the run that saved the state evaluated the initial arrays
        self.arrays = arrays
        metrics = self.evaluate_fn(self.offset + server_round, arrays)
        if metrics is not None:
            self.history.evaluate_metrics_serverapp[self.offset + server_round] = metrics
        if server_round > 0:
            self._round_over(self.offset + server_round, metrics)
        return metrics

    def _round_over(self, server_round: int, central_metrics: MetricRecord | None) -> None:
        self.rounds_ended.append(server_round)
        outcome = RoundOutcome(
            server_round, self.arrays, self._evaluate_metrics, central_metrics, self._clients_trained
        )
        self.end_round(outcome)
        self._evaluate_metrics = None
        self._clients_trained = 0
