"""``ServerCheckpoints``: a ServerApp's rounds with global-model checkpoints, server state and resume.

:meth:`ServerCheckpoints.start` runs the rounds of a Message API strategy exactly as
``Strategy.start`` does (train, aggregate, federated evaluation, centralized evaluation), calling
the strategy with the true round numbers. After each round it checkpoints the global model and
saves the server state: the round, the global arrays, the attributes the rounds reassigned in
the strategy and in every strategy it wraps (FedAdam's moments, also inside a differential-privacy
wrapper, FedAvgM's momentum, ...), the server process's random generators (a DP wrapper's noise)
and the metrics history. A run started on
a directory that holds such a state continues after its round instead of starting at round 1.

The server state is the round's commit record, so it is written only once every save issued up to
the end of the round (the clients' states and checkpoints included) is durable: a resumed run
finds each client's state of that very round. That wait runs in a background thread while the
next round trains; the server blocks only if a round's saves are still not written when the
next round ends (backpressure).
"""

from __future__ import annotations

import io
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common import log as progress  # Flower's own log: the lines Strategy.start prints
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedckpt.flower import strategy_state
from fedckpt.flower.timing import BlockedTime
from fedckpt.runtime import lifecycle
from fedckpt.server_module import ServerCheckpointAndStateModule
from fedckpt.state import StateSnapshot

log = logging.getLogger("fedckpt")

HISTORY_FIELDS = ("train_metrics_clientapp", "evaluate_metrics_clientapp", "evaluate_metrics_serverapp")
EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


class ServerCheckpoints:
    """Runs a strategy's rounds with checkpoints after each, resuming from the last durable round.

    Args:
        module: the server's model checkpointers and state checkpointer (one is required).
        state_name: file name of the server state in the state checkpointer's directory.
        loss_key: the metric used as the loss of the global model: taken from the centralized
            evaluation if it reports it, else from the aggregated federated evaluation.

    After :meth:`start`, ``resumed_from_round`` is the round the run continued after (0 for a
    fresh run), ``blocked_seconds`` the time the server waited on fedckpt, and ``saves_written``,
    ``bytes_written`` and ``bytes_linked`` what the writer pool did while Ray was up (clients' and
    server's checkpoints; linked bytes were identical content, hard-linked instead of written).
    """

    def __init__(
        self, module: ServerCheckpointAndStateModule, state_name: str = "server_state.pt", loss_key: str = "loss"
    ) -> None:
        if module.state_checkpointer is None:
            raise ValueError("ServerCheckpoints needs a module with a state checkpointer, to save rounds and resume")
        self.module = module
        self.state_name = state_name
        self.loss_key = loss_key
        self.resumed_from_round = 0
        self.saves_written = 0
        self.bytes_written = 0
        self.bytes_linked = 0
        self.blocked = BlockedTime()
        self._commit: threading.Thread | None = None
        self._commit_error: BaseException | None = None

    @property
    def blocked_seconds(self) -> float:
        return self.blocked.seconds

    def start(
        self,
        strategy: Strategy,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
    ) -> Result:
        """Run rounds ``resumed_from_round + 1 .. num_rounds`` of ``strategy`` (arguments as ``Strategy.start``).

        Every save, of the server and of the clients, is flushed before this returns or raises.
        """
        lifecycle.start_writers_when_ray_is_up()  # so the clients' first saves need not wait for it
        try:
            return self._run(
                strategy, grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn
            )
        finally:
            with self.blocked.measure():
                try:
                    self._wait_for_commit()
                finally:
                    lifecycle.flush()  # Flower shuts Ray down once main() returns
            stats = lifecycle.coordinator().writer_stats()
            self.saves_written = sum(writer.saved for writer in stats)
            self.bytes_written = sum(writer.bytes_written for writer in stats)
            self.bytes_linked = sum(writer.bytes_linked for writer in stats)

    def _run(
        self,
        strategy: Strategy,
        grid: Grid,
        arrays: ArrayRecord,
        num_rounds: int,
        timeout: float,
        train_config: ConfigRecord | None,
        evaluate_config: ConfigRecord | None,
        evaluate_fn: EvaluateFn | None,
    ) -> Result:
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        configured = strategy_state.configuration(strategy)  # what the rounds reassign is the strategy's state
        result = Result()
        with self.blocked.measure():
            saved = self.module.maybe_load_state(self.state_name)
            self.module.resume_best_scores()
        if saved is not None:
            arrays = self._restore(saved, strategy, result)
        elif evaluate_fn:
            initial = evaluate_fn(0, arrays)
            progress(INFO, "Initial global evaluation results: %s", initial)
            if initial is not None:
                result.evaluate_metrics_serverapp[0] = initial
        result.arrays = arrays
        started = time.time()
        for server_round in range(self.resumed_from_round + 1, num_rounds + 1):
            progress(INFO, "")
            progress(INFO, "[ROUND %s/%s]", server_round, num_rounds)
            replies = grid.send_and_receive(
                messages=strategy.configure_train(server_round, arrays, train_config, grid), timeout=timeout
            )
            aggregated, train_metrics = strategy.aggregate_train(server_round, replies)
            if aggregated is not None:
                arrays = result.arrays = aggregated
            if train_metrics is not None:
                result.train_metrics_clientapp[server_round] = train_metrics
            replies = grid.send_and_receive(
                messages=strategy.configure_evaluate(server_round, arrays, evaluate_config, grid), timeout=timeout
            )
            evaluate_metrics = strategy.aggregate_evaluate(server_round, replies)
            if evaluate_metrics is not None:
                result.evaluate_metrics_clientapp[server_round] = evaluate_metrics
            central_metrics = evaluate_fn(server_round, arrays) if evaluate_fn else None
            if central_metrics is not None:
                result.evaluate_metrics_serverapp[server_round] = central_metrics
            with self.blocked.measure():
                self._checkpoint(server_round, arrays, evaluate_metrics, central_metrics, strategy, configured, result)
            self._report_round(server_round, num_rounds, evaluate_metrics, central_metrics)
        progress(INFO, "")
        progress(INFO, "Strategy execution finished in %.2fs", time.time() - started)
        for line in io.StringIO(str(result)):
            progress(INFO, "\t%s", line.rstrip("\n"))
        return result

    def _report_round(
        self,
        server_round: int,
        num_rounds: int,
        evaluate_metrics: MetricRecord | None,
        central_metrics: MetricRecord | None,
    ) -> None:
        """One line per round: the global model's loss and accuracy where reported, the checkpoints
        the pool has written and the time the server has waited on fedckpt."""
        metrics = {**_scalars(evaluate_metrics), **_scalars(central_metrics)}
        figures = [f"{name} {metrics[name]:.4g}" for name in (self.loss_key, "accuracy") if name in metrics]
        written = sum(stats.saved for stats in lifecycle.coordinator().writer_stats())
        progress(
            INFO,
            "[ROUND %s/%s] %s%d checkpoints written, server blocked %.3f s",
            server_round,
            num_rounds,
            "".join(f"{figure}, " for figure in figures),
            written,
            self.blocked.seconds,
        )

    def _checkpoint(
        self,
        server_round: int,
        arrays: ArrayRecord,
        evaluate_metrics: MetricRecord | None,
        central_metrics: MetricRecord | None,
        strategy: Strategy,
        configured: dict[str, Any],
        result: Result,
    ) -> None:
        """The global model's checkpoints now; the server state that commits ``server_round`` once durable."""
        metrics = {**_scalars(evaluate_metrics), **_scalars(central_metrics)}
        loss = metrics.get(self.loss_key, math.nan)  # NaN: best-loss checkpointers skip, latest ones save
        if self.loss_key not in metrics:
            log.warning("Round %s reported no %r metric: the global model's loss is NaN", server_round, self.loss_key)
        state_dict = dict(arrays.to_torch_state_dict())
        self.module.maybe_checkpoint(state_dict, loss, metrics)
        assert self.module.state_checkpointer is not None
        state = self.module.state_checkpointer.snapshot_checkpoint(
            self.state_name,
            {
                "server_round": server_round,
                "arrays": state_dict,
                "strategy_state": strategy_state.learned(strategy, configured),
                "rng": strategy_state.rng(),
                "history": {field: _plain(getattr(result, field)) for field in HISTORY_FIELDS},
            },
        )
        self._wait_for_commit()  # commits stay in round order
        self._commit = threading.Thread(target=self._commit_round, args=(state,), name="fedckpt-round-commit")
        self._commit.start()

    def _commit_round(self, state: StateSnapshot) -> None:
        """Save the server state once everything issued before it is durable."""
        try:
            lifecycle.flush()
            assert self.module.state_checkpointer is not None
            self.module.state_checkpointer.save_snapshot(state)
        except BaseException as error:  # raised in the server's thread by _wait_for_commit
            self._commit_error = error

    def _wait_for_commit(self) -> None:
        if self._commit is not None:
            self._commit.join()
            self._commit = None
        if self._commit_error is not None:
            error, self._commit_error = self._commit_error, None
            raise error

    def _restore(self, saved: dict[str, Any], strategy: Strategy, result: Result) -> ArrayRecord:
        self.resumed_from_round = int(saved["server_round"])
        strategy_state.restore(strategy, saved.get("strategy_state", {"": saved.get("strategy", {})}))
        if "rng" in saved:
            strategy_state.restore_rng(saved["rng"])
        for field, rounds in saved.get("history", {}).items():
            getattr(result, field).update({int(r): MetricRecord(values) for r, values in rounds.items()})
        progress(INFO, "Resuming after round %s from %s", self.resumed_from_round, self.state_name)
        return ArrayRecord(saved["arrays"])


def _scalars(record: MetricRecord | None) -> dict[str, float]:
    if record is None:
        return {}
    return {name: float(value) for name, value in record.items() if isinstance(value, (int, float))}


def _plain(history: Mapping[int, MetricRecord]) -> dict[int, dict[str, Any]]:
    return {server_round: dict(record) for server_round, record in history.items()}
