"""Flower's round loop in the test process, without clients: a strategy that records every call the
loop makes and aggregates without replies, and a grid that sends nothing.

The loop itself is Flower's (``Strategy.start``); these stand in for the clients only, so that a test
can see exactly which calls the loop made, with which round numbers and arrays.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy


def arrays_of(value: float) -> ArrayRecord:
    return ArrayRecord({"w": torch.full((2,), float(value))})


def value_of(arrays: ArrayRecord) -> float:
    return float(arrays.to_torch_state_dict()["w"][0])


class RecordingStrategy(Strategy):
    """Records each call as ``(hook, round, value of the arrays it was given)``. Round ``r`` aggregates
    to arrays of value ``10 * r`` (none in ``rounds_without_aggregate``), with the train metric
    ``round``; its federated evaluation reports ``loss = 1 / r`` (so the best loss is the last round's)."""

    def __init__(self, rounds_without_aggregate: Iterable[int] = ()) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.rounds_without_aggregate = frozenset(rounds_without_aggregate)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.calls.append(("configure_train", server_round, value_of(arrays)))
        return []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.calls.append(("aggregate_train", server_round))
        aggregated = None if server_round in self.rounds_without_aggregate else arrays_of(10 * server_round)
        return aggregated, MetricRecord({"round": server_round})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.calls.append(("configure_evaluate", server_round, value_of(arrays)))
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        self.calls.append(("aggregate_evaluate", server_round))
        return MetricRecord({"eval_loss": 1.0 / server_round})

    def summary(self) -> None:
        self.calls.append(("summary",))

    def rounds(self, hook: str) -> list[int]:
        """The round numbers ``hook`` was called with, in order."""
        return [call[1] for call in self.calls if call[0] == hook]


class CentralEvaluation:
    """An ``evaluate_fn`` that records ``(round, value of the arrays)`` and reports ``loss = round``
    (so the best loss is the first round's)."""

    def __init__(self, calls: list[tuple[Any, ...]] | None = None) -> None:
        self.calls = calls if calls is not None else []

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        self.calls.append(("evaluate_fn", server_round, value_of(arrays)))
        return MetricRecord({"eval_loss": float(server_round), "accuracy": 0.5})


class NoClientsGrid(Grid):
    """Sends nothing and gets no replies; counts the sends (Flower's loop makes two a round)."""

    def __init__(self) -> None:
        self.sends = 0

    def set_run(self, run: Any) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        assert list(messages) == []
        self.sends += 1
        return []
