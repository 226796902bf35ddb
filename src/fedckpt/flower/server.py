"""``ServerCheckpoints``: a ServerApp's rounds with global-model checkpoints, server state and resume.

:meth:`ServerCheckpoints.start` runs Flower's own round loop, ``Strategy.start`` (train,
aggregate, federated evaluation, centralized evaluation), with the strategy wrapped
(:class:`~fedckpt.flower.rounds.CheckpointedRounds`) so that it is called with the true round
numbers and each finished round is handed back here. After each round it checkpoints the global
model and saves the server state: the round, the global arrays, the attributes the rounds
reassigned in the strategy and in every strategy it wraps (FedAdam's moments, also inside a
differential-privacy wrapper, FedAvgM's momentum, ...), the server process's random generators (a
DP wrapper's noise) and the metrics history. A run started on a directory that holds such a state
continues after its round instead of starting at round 1.

With retention policies (``keep=`` on the state checkpointer, on ``ClientCheckpoints`` and on the
model checkpointers), every round is kept as its own version, and :meth:`ServerCheckpoints.resume`
restarts the run from any *complete* round (its server state and every state of a client that
trained in it kept and durable; :mod:`fedckpt.round_table`), the newest by default.

On a resume Flower's own progress lines count the rounds this run runs ("[ROUND 1/2]" for round 4
of 5); the line fedckpt prints after each round gives the run's round ("[ROUND 4/5] ...").

The server state is the round's commit record, so it is written only once every save issued up to
the end of the round (the clients' states and checkpoints included) is durable: a resumed run
finds each client's state of that very round. That wait runs in a background thread while the
next round trains; the server blocks only if a round's saves are still not written when the
next round ends (backpressure).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping
from importlib.metadata import version
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common import log as progress  # Flower's own log: the lines Strategy.start prints
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedckpt import _compat
from fedckpt.errors import ScoreError
from fedckpt.flower import strategy_state
from fedckpt.flower.rounds import CheckpointedRounds, EvaluateFn, RoundOutcome
from fedckpt.flower.timing import BlockedTime
from fedckpt.round_table import CLIENT_STATE, RoundRow, complete_rounds, drop_rounds_after, round_table
from fedckpt.runtime import lifecycle, threads
from fedckpt.server_module import ServerCheckpointAndStateModule
from fedckpt.state import StateSnapshot

log = logging.getLogger("fedckpt")

HISTORY_FIELDS = ("train_metrics_clientapp", "evaluate_metrics_clientapp", "evaluate_metrics_serverapp")


class ServerCheckpoints:
    """Runs a strategy's rounds with checkpoints after each, resuming from the last durable round.

    Args:
        module: the server's model checkpointers and state checkpointer (one is required).
        state_name: file name of the server state in the state checkpointer's directory.
        loss_key: the metric used as the loss of the global model: taken from the centralized
            evaluation if it reports it, else from the aggregated federated evaluation. The default is
            what Flower's app templates report. If the first evaluated round reports other metrics
            only, that is a :class:`~fedckpt.errors.ScoreError` naming them, raised before anything of
            the round is saved; a round without evaluation has a NaN loss (best-loss checkpointers skip it).
        clients_dir: where the clients' directories are (the server state's directory may be it). Given
            this, each round records how many clients trained in it, and a round is complete only once
            that many client states of it are kept below ``clients_dir``.
        client_state: the clients' state name (``ClientCheckpoints(keep=...)`` saves ``<state_name>.pt``).

    After :meth:`start`, ``resumed_from_round`` is the round the run continued after (0 for a
    fresh run), ``blocked_seconds`` the time the server waited on fedckpt, and ``saves_written``,
    ``bytes_written`` and ``bytes_linked`` what the writer pool did while Ray was up (clients' and
    server's checkpoints; linked bytes were identical content, hard-linked instead of written).
    """

    def __init__(
        self,
        module: ServerCheckpointAndStateModule,
        state_name: str = "server_state.pt",
        loss_key: str = "eval_loss",
        *,
        clients_dir: str | None = None,
        client_state: str = CLIENT_STATE,
    ) -> None:
        if module.state_checkpointer is None:
            raise ValueError("ServerCheckpoints needs a module with a state checkpointer, to save rounds and resume")
        self.module = module
        self.state_name = state_name
        self.loss_key = loss_key
        self._loss_received = False  # a round without it is then a round without evaluation, not an error
        self.resumed_from_round = 0
        self.saves_written = 0
        self.bytes_written = 0
        self.bytes_linked = 0
        self.blocked = BlockedTime()
        self.clients_dir = clients_dir
        self.client_state = client_state
        self._commit: threading.Thread | None = None
        self._commit_error: BaseException | None = None
        self._resume_round: int | None = None

    @property
    def _state_dir(self) -> str:
        assert self.module.state_checkpointer is not None
        return str(self.module.state_checkpointer.checkpoint_dir)

    def rounds(self) -> list[RoundRow]:
        """The rounds kept on storage, each with whether it is complete (after every pending save)."""
        lifecycle.flush()
        assert self.module.state_checkpointer is not None
        return round_table(
            self._state_dir, self.state_name, self.client_state, self.clients_dir,
            self.module.state_checkpointer.storage_options,
        )  # fmt: skip

    def resume(self, round: int | None = None) -> int | None:  # noqa: A002 (the issue's name for it)
        """Make the next :meth:`start` continue after complete round ``round`` (default: the newest
        complete one); returns it, or None if no round is kept (then :meth:`start` continues after the
        newest server state, as without retention). A ``ValueError`` names the complete rounds if
        ``round`` is not one of them. The kept rounds after it belong to the run it abandons: they
        are deleted when the run starts."""
        rows = self.rounds()
        complete = complete_rounds(rows)
        if round is None:
            self._resume_round = max(complete, default=None)
            return self._resume_round
        if round not in complete:
            row = next((row for row in rows if row.server_round == round), None)
            why = "no version of it is kept" if row is None else (
                "its server state is not kept" if not row.server_state
                else f"{row.clients_kept} of its {row.clients_committed} client states are kept"
            )  # fmt: skip
            raise ValueError(f"Round {round} cannot be resumed from: {why}; complete rounds: {complete}")
        self._resume_round = round
        return round

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
        try:
            return self._run(
                strategy, grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn
            )
        finally:
            with self.blocked.measure("flush"):
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
        if type(strategy).start is not Strategy.start:
            log.warning(
                "%s overrides Strategy.start: ServerCheckpoints runs Flower's own round loop, not that override",
                type(strategy).__name__,
            )
        configured = strategy_state.configuration(strategy)  # what the rounds reassign is the strategy's state
        history = Result()  # by true round number, the restored rounds' included: saved with each round
        with self.blocked.measure("open"):
            saved = self._saved_state()  # before the pool starts: no pool, no pending save to ask about
            self.module.resume_best_scores()
        # So that the clients' first saves need not wait for the pool, nor the first round for pickling.
        lifecycle.start_writers_when_ray_is_up(models=[] if self.module.model is None else [self.module.model])
        threads.background_calls.submit(strategy_state.prime_rng)  # not in the first round's end
        if saved is not None:
            arrays = self._restore(saved, strategy, history)
        restored = {field: dict(getattr(history, field)) for field in HISTORY_FIELDS}

        def end_round(outcome: RoundOutcome) -> None:
            with self.blocked.measure("end_of_round"):
                self._checkpoint(outcome, strategy, configured, history)
            self._report_round(outcome, num_rounds)

        rounds = CheckpointedRounds.around(strategy, self.resumed_from_round, arrays, history, end_round, evaluate_fn)
        result = _compat.run_strategy_rounds(
            rounds, grid, arrays, max(num_rounds - self.resumed_from_round, 0), timeout, train_config, evaluate_config,
            rounds.evaluate if evaluate_fn is not None else None,
        )  # fmt: skip
        expected = list(range(self.resumed_from_round + 1, num_rounds + 1))
        if rounds.rounds_ended != expected:  # no round may run without its checkpoint
            raise RuntimeError(
                f"Flower {version('flwr')}'s Strategy.start ended rounds {rounds.rounds_ended}, not {expected}, as "
                "fedckpt expects: its round loop changed (see run_strategy_rounds in fedckpt/_compat.py)"
            )
        # Flower's result counts this run's rounds from 1: as the run's rounds, after the restored ones.
        for field in HISTORY_FIELDS:
            ran = {self.resumed_from_round + r: metrics for r, metrics in getattr(result, field).items()}
            setattr(result, field, {**restored[field], **ran})
        result.arrays = rounds.arrays  # also where no round aggregated (Flower leaves it empty)
        return result

    def _report_round(self, outcome: RoundOutcome, num_rounds: int) -> None:
        """One line per round: the global model's loss and accuracy where reported, the checkpoints
        the pool has written and the time the server has waited on fedckpt."""
        metrics = {**_scalars(outcome.evaluate_metrics), **_scalars(outcome.central_metrics)}
        figures = [f"{name} {metrics[name]:.4g}" for name in (self.loss_key, "accuracy") if name in metrics]
        written = sum(stats.saved for stats in lifecycle.coordinator().writer_stats())
        progress(
            INFO,
            "[ROUND %s/%s] %s%d checkpoints written, server blocked %.3f s",
            outcome.server_round,
            num_rounds,
            "".join(f"{figure}, " for figure in figures),
            written,
            self.blocked.seconds,
        )

    def _checkpoint(
        self, outcome: RoundOutcome, strategy: Strategy, configured: dict[str, Any], history: Result
    ) -> None:
        """The global model's checkpoints now; the server state that commits the round once durable."""
        server_round = outcome.server_round
        metrics = {**_scalars(outcome.evaluate_metrics), **_scalars(outcome.central_metrics)}
        loss = metrics.get(self.loss_key, math.nan)  # NaN: best-loss checkpointers skip, latest ones save
        if self.loss_key in metrics:
            self._loss_received = True
        elif metrics and not self._loss_received:  # evaluated, under other names: a wrong loss_key
            raise ScoreError(
                f"ServerCheckpoints(loss_key={self.loss_key!r}): round {server_round}'s evaluation reported "
                f"{', '.join(repr(name) for name in sorted(metrics))} but no {self.loss_key!r}. Pass the metric "
                "your evaluation names the loss as loss_key (Flower's templates report 'eval_loss'). Nothing of "
                "this round was saved; earlier rounds are kept."
            )
        else:
            log.warning("Round %s reported no %r metric: the global model's loss is NaN", server_round, self.loss_key)
        state_dict = dict(outcome.arrays.to_torch_state_dict())
        self.module.maybe_checkpoint(state_dict, loss, metrics, server_round=server_round)
        assert self.module.state_checkpointer is not None
        state = self.module.state_checkpointer.snapshot_checkpoint(
            self.state_name,
            {
                "server_round": server_round,
                "arrays": state_dict,
                "strategy_state": strategy_state.learned(strategy, configured),
                "rng": strategy_state.rng(),
                "history": {field: _plain(getattr(history, field)) for field in HISTORY_FIELDS},
            },
        )
        self._wait_for_commit()  # commits stay in round order
        clients = outcome.clients_trained if self.clients_dir is not None else None
        self._commit = threading.Thread(
            target=self._commit_round, args=(state, server_round, clients), name="fedckpt-round-commit"
        )
        self._commit.start()

    def _commit_round(self, state: StateSnapshot, server_round: int, clients: int | None) -> None:
        """Save the server state once everything issued before it is durable."""
        try:
            lifecycle.flush()
            assert self.module.state_checkpointer is not None
            self.module.state_checkpointer.save_snapshot(state, server_round, round_clients=clients)
        except BaseException as error:  # raised in the server's thread by _wait_for_commit
            self._commit_error = error

    def _wait_for_commit(self) -> None:
        if self._commit is not None:
            self._commit.join()
            self._commit = None
        if self._commit_error is not None:
            error, self._commit_error = self._commit_error, None
            raise error

    def _saved_state(self) -> dict[str, Any] | None:
        """The server state to continue from: the round chosen by :meth:`resume`, else the newest."""
        if self._resume_round is None:
            return self.module.maybe_load_state(self.state_name)
        dropped = drop_rounds_after(self._state_dir, self._resume_round, self.module.state_checkpointer.storage_options)
        if self.clients_dir is not None and self.clients_dir != self._state_dir:
            dropped += drop_rounds_after(
                self.clients_dir, self._resume_round, self.module.state_checkpointer.storage_options
            )
        if dropped:
            progress(
                INFO, "Resuming from round %s: %d versions of later rounds deleted", self._resume_round, len(dropped)
            )
        return self.module.state_checkpointer.load_checkpoint(self.state_name, server_round=self._resume_round)

    def _restore(self, saved: dict[str, Any], strategy: Strategy, history: Result) -> ArrayRecord:
        self.resumed_from_round = int(saved["server_round"])
        strategy_state.restore(strategy, saved.get("strategy_state", {"": saved.get("strategy", {})}))
        if "rng" in saved:
            strategy_state.restore_rng(saved["rng"])
        for field, rounds in saved.get("history", {}).items():
            getattr(history, field).update({int(r): MetricRecord(values) for r, values in rounds.items()})
        progress(INFO, "Resuming after round %s from %s", self.resumed_from_round, self.state_name)
        return ArrayRecord(saved["arrays"])


def _scalars(record: MetricRecord | None) -> dict[str, float]:
    if record is None:
        return {}
    return {name: float(value) for name, value in record.items() if isinstance(value, (int, float))}


def _plain(history: Mapping[int, MetricRecord]) -> dict[int, dict[str, Any]]:
    return {server_round: dict(record) for server_round, record in history.items()}
