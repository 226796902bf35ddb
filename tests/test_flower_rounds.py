"""``ServerCheckpoints`` on Flower's own round loop, in this process: the strategy sees the run's true
round numbers, each round is checkpointed when it ends, a resume continues after the last durable
round, and the result holds the whole run. (The Flower simulations in test_flower_simulation.py run
the same with clients.)"""

import logging

import pytest
import torch
from flower_loop import CentralEvaluation, NoClientsGrid, RecordingStrategy, arrays_of, value_of
from flwr.app import MetricRecord
from flwr.serverapp.strategy import Result
from torch import nn

from fedckpt import (
    BestLossTorchModuleCheckpointer,
    LatestTorchModuleCheckpointer,
    PerRoundStateCheckpointer,
    ServerCheckpointAndStateModule,
)
from fedckpt import _compat as compat
from fedckpt.errors import ScoreError
from fedckpt.flower import ServerCheckpoints
from fedckpt.storage.reading import read_state_dict


class Weights(nn.Module):
    """The model of ``flower_loop``'s arrays: one parameter ``w`` of two values."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))


def server_checkpoints(directory) -> ServerCheckpoints:
    module = ServerCheckpointAndStateModule(
        model=Weights(),
        model_checkpointers=[
            LatestTorchModuleCheckpointer(str(directory), "latest.safetensors"),
            BestLossTorchModuleCheckpointer(str(directory), "best.safetensors"),
        ],
        state_checkpointer=PerRoundStateCheckpointer(str(directory)),
    )
    return ServerCheckpoints(module)


def saved_state(directory) -> dict:
    return torch.load(directory / "server_state.pt", weights_only=False)


def checkpointed_value(directory, name: str) -> float:
    return float(read_state_dict(str(directory / name))["w"][0])


def test_a_run_and_its_resume_call_the_strategy_with_the_runs_round_numbers(runtime, tmp_path):
    strategy = RecordingStrategy()
    central = CentralEvaluation(strategy.calls)
    first = server_checkpoints(tmp_path)
    result = first.start(strategy, NoClientsGrid(), arrays_of(0), num_rounds=2, evaluate_fn=central)
    assert first.resumed_from_round == 0
    assert strategy.rounds("configure_train") == [1, 2] and strategy.rounds("evaluate_fn") == [0, 1, 2]
    assert saved_state(tmp_path)["server_round"] == 2
    assert value_of(result.arrays) == 20

    strategy = RecordingStrategy()
    central = CentralEvaluation(strategy.calls)
    resumed = server_checkpoints(tmp_path)
    result = resumed.start(strategy, NoClientsGrid(), arrays_of(-1), num_rounds=4, evaluate_fn=central)
    assert resumed.resumed_from_round == 2
    # Flower's loop ran two rounds; the strategy saw them as rounds 3 and 4, from the arrays round 2 left.
    assert strategy.calls[1:5] == [
        ("configure_train", 3, 20.0), ("aggregate_train", 3), ("configure_evaluate", 3, 30.0), ("aggregate_evaluate", 3)
    ]  # fmt: skip
    assert strategy.rounds("configure_train") == [3, 4]
    assert strategy.rounds("evaluate_fn") == [3, 4]  # the initial arrays were evaluated by the first run
    # The result is the whole run's, by its round numbers; so is the history each round committed.
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3, 4]
    assert {r: m["round"] for r, m in result.train_metrics_clientapp.items()} == {1: 1, 2: 2, 3: 3, 4: 4}
    assert sorted(result.evaluate_metrics_clientapp) == [1, 2, 3, 4]
    assert sorted(result.evaluate_metrics_serverapp) == [0, 1, 2, 3, 4]
    assert value_of(result.arrays) == 40
    state = saved_state(tmp_path)
    assert state["server_round"] == 4
    assert sorted(state["history"]["evaluate_metrics_serverapp"]) == [0, 1, 2, 3, 4]
    assert checkpointed_value(tmp_path, "latest.safetensors") == 40
    # The centralized loss (= the round) wins over the federated one (1 / round): round 1 is the best.
    assert checkpointed_value(tmp_path, "best.safetensors") == 10

    strategy = RecordingStrategy()
    done = server_checkpoints(tmp_path)
    result = done.start(strategy, NoClientsGrid(), arrays_of(-1), num_rounds=4, evaluate_fn=CentralEvaluation())
    assert done.resumed_from_round == 4 and strategy.calls == [("summary",)]  # no round left to run
    assert value_of(result.arrays) == 40 and sorted(result.train_metrics_clientapp) == [1, 2, 3, 4]


def test_without_central_evaluation_a_round_is_checkpointed_after_its_federated_evaluation(runtime, tmp_path):
    strategy = RecordingStrategy(rounds_without_aggregate={3})
    checkpoints = server_checkpoints(tmp_path)
    grid = NoClientsGrid()
    result = checkpoints.start(strategy, grid, arrays_of(0), num_rounds=3)
    assert grid.sends == 6 and strategy.rounds("aggregate_evaluate") == [1, 2, 3]
    assert value_of(result.arrays) == 20  # round 3 aggregated nothing: the arrays stayed
    assert result.evaluate_metrics_serverapp == {}
    state = saved_state(tmp_path)
    assert state["server_round"] == 3 and value_of_state(state) == 20
    # The federated loss (1 / round) decides: the last round is the best (with round 2's arrays).
    assert checkpointed_value(tmp_path, "best.safetensors") == 20
    assert checkpoints.blocked_seconds > 0


def value_of_state(state: dict) -> float:
    return float(state["arrays"]["w"][0])


def test_a_flower_loop_that_ends_no_round_is_an_error_not_a_run_without_checkpoints(runtime, tmp_path, monkeypatch):
    """Should Flower's loop stop calling the hooks a round ends with, the run fails loudly."""
    monkeypatch.setattr(compat, "run_strategy_rounds", lambda *arguments: Result())
    with pytest.raises(RuntimeError, match=r"ended rounds \[\], not \[1, 2\].*round loop changed"):
        server_checkpoints(tmp_path).start(RecordingStrategy(), NoClientsGrid(), arrays_of(0), num_rounds=2)


def test_a_strategy_that_overrides_start_is_run_by_flowers_loop_with_a_warning(runtime, tmp_path, caplog):
    class OwnLoop(RecordingStrategy):
        def start(self, *arguments, **options):  # never called
            raise AssertionError("ServerCheckpoints ran the override")

    strategy = OwnLoop()
    with caplog.at_level(logging.WARNING, logger="fedckpt"):
        server_checkpoints(tmp_path).start(strategy, NoClientsGrid(), arrays_of(0), num_rounds=1)
    assert "OwnLoop overrides Strategy.start" in caplog.text
    assert strategy.rounds("configure_train") == [1]


class ReportsUnder(RecordingStrategy):
    """Reports its federated evaluation under ``names`` (round -> metric names; none: no evaluation)."""

    def __init__(self, names: dict[int, list[str]]) -> None:
        super().__init__()
        self.names = names

    def aggregate_evaluate(self, server_round, replies):
        super().aggregate_evaluate(server_round, replies)
        names = self.names.get(server_round, [])
        return MetricRecord({name: 1.0 / server_round for name in names}) if names else None


def test_a_loss_key_the_evaluation_never_reports_is_an_error_naming_what_it_reports(runtime, tmp_path):
    """Flower's templates report ``eval_loss``, the default; an app that names its loss otherwise is
    told so at its first evaluated round, before anything of that round is saved."""
    checkpoints = server_checkpoints(tmp_path)
    strategy = ReportsUnder({1: ["loss", "accuracy"]})
    with pytest.raises(ScoreError, match=r"loss_key='eval_loss'.*round 1's evaluation reported 'accuracy', 'loss'"):
        checkpoints.start(strategy, NoClientsGrid(), arrays_of(0), num_rounds=2)
    assert not (tmp_path / "server_state.pt").exists() and not (tmp_path / "latest.safetensors").exists()


def test_rounds_without_evaluation_have_no_loss_and_are_not_an_error(runtime, tmp_path, caplog):
    """Round 1 is not evaluated, round 2 reports the loss, round 3 reports something else only: the
    best model is round 2's, every round is checkpointed, and the two rounds without it are logged."""
    checkpoints = server_checkpoints(tmp_path)
    strategy = ReportsUnder({2: ["eval_loss"], 3: ["accuracy"]})
    with caplog.at_level(logging.WARNING, logger="fedckpt"):
        checkpoints.start(strategy, NoClientsGrid(), arrays_of(0), num_rounds=3)
    assert saved_state(tmp_path)["server_round"] == 3
    assert checkpointed_value(tmp_path, "best.safetensors") == 20
    assert checkpointed_value(tmp_path, "latest.safetensors") == 30
    assert [record.getMessage() for record in caplog.records if "reported no" in record.getMessage()] == [
        "Round 1 reported no 'eval_loss' metric: the global model's loss is NaN",
        "Round 3 reported no 'eval_loss' metric: the global model's loss is NaN",
    ]
