"""The baselines of the Flower benchmarks: the example's run with FL4Health-style saves, or none.

    .venv/bin/python benchmarks/flower_baselines.py --checkpointing sync [options of the example's run.py]
    .venv/bin/python benchmarks/flower_baselines.py --checkpointing none --num-rounds 3

The clients, the training, the server and the JSON summary are those of
``examples/flower_simulation/run.py``; only the checkpoints differ. ``sync`` saves what the example
saves, each with a ``torch.save`` that training waits for (what FL4Health does); ``none`` saves
nothing (the wall-time floor). ``flower_walltime.py`` and ``main_job.py`` run them beside the example.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "flower_simulation"))
import run as example  # noqa: E402  (first: it keeps Ray on loopback, which must come before Ray's import)

# isort: split
import torch  # noqa: E402
from flwr.app import ArrayRecord, Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from torch import nn  # noqa: E402

import client_app  # noqa: E402
import server_app  # noqa: E402
import task  # noqa: E402
from server_app import Options, Outcome  # noqa: E402

MODES = ("sync", "none")


class NoCheckpoints:
    """Stands in for the example's ``ClientCheckpoints`` (the same calls) and saves nothing."""

    blocked_seconds = 0.0

    def restore_state(self, server_round: int, optimizer: Any = None) -> dict | None:
        return None

    def save_state(self, server_round: int, optimizer: Any = None, **extra: Any) -> None:
        pass

    def after_local_training(self, model: nn.Module, loss: float, metrics: dict) -> None:
        pass

    def after_receiving_global_model(self, model: nn.Module, loss: float, metrics: dict) -> None:
        pass


class SyncCheckpoints(NoCheckpoints):
    """FL4Health-style: every checkpoint is a ``torch.save`` that training waits for."""

    def __init__(self, checkpoint_dir: str) -> None:
        os.makedirs(checkpoint_dir, exist_ok=True)
        self.directory = checkpoint_dir
        self.blocked_seconds = 0.0

    def _timed_save(self, obj: object, name: str) -> None:
        start = time.perf_counter()
        torch.save(obj, os.path.join(self.directory, name))
        self.blocked_seconds += time.perf_counter() - start

    def restore_state(self, server_round: int, optimizer: Any = None) -> dict | None:
        path = os.path.join(self.directory, "client_state.pt")
        if not os.path.exists(path):
            return None
        start = time.perf_counter()
        state = torch.load(path, weights_only=False)
        self.blocked_seconds += time.perf_counter() - start
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        return state

    def save_state(self, server_round: int, optimizer: Any = None, **extra: Any) -> None:
        state = {"server_round": server_round, "optimizer": optimizer.state_dict(), **extra}
        self._timed_save(state, "client_state.pt")

    def after_local_training(self, model: nn.Module, loss: float, metrics: dict) -> None:
        self._timed_save(model, "pre_latest.pt")

    def after_receiving_global_model(self, model: nn.Module, loss: float, metrics: dict) -> None:
        self._timed_save(model, "post_latest.pt")


def make_client_app(mode: str) -> ClientApp:
    """The example's client rounds with the checkpoints of ``mode``."""
    app = ClientApp()

    def checkpoints(context: Context) -> NoCheckpoints:
        return SyncCheckpoints(client_app.client_dir(context)) if mode == "sync" else NoCheckpoints()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return client_app.train_round(msg, context, checkpoints(context))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return client_app.evaluate_round(msg, context, checkpoints(context))

    return app


def make_server_app(mode: str, options: Options, outcome: Outcome) -> ServerApp:
    """The example's FedAvg rounds; for ``sync``, the server's saves with ``torch.save`` after each."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        initial = server_app.initial_arrays(options)
        server_dir = os.path.join(str(context.run_config["checkpoint-dir"]), "server")
        evaluate_fn = sync_server_saves(options, server_dir, outcome) if mode == "sync" else None
        config = server_app.round_config(options)
        outcome.result = server_app.fedavg(options).start(
            grid, initial, options.num_rounds, train_config=config, evaluate_config=config, evaluate_fn=evaluate_fn
        )

    return app


def sync_server_saves(options: Options, server_dir: str, outcome: Outcome) -> Callable[[int, ArrayRecord], None]:
    """FL4Health-style server saves: the global model and the server state, with ``torch.save``."""
    os.makedirs(server_dir, exist_ok=True)
    model = task.Net(options.width, options.depth)

    def save(server_round: int, arrays: ArrayRecord) -> None:
        if server_round == 0:
            return None
        start = time.perf_counter()
        state_dict = arrays.to_torch_state_dict()
        model.load_state_dict(state_dict)
        torch.save(model, os.path.join(server_dir, "global_latest.pt"))
        torch.save({"server_round": server_round, "arrays": state_dict}, os.path.join(server_dir, "server_state.pt"))
        outcome.server_blocked_seconds += time.perf_counter() - start
        outcome.checkpoints_written += 2
        return None

    return save


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpointing", choices=MODES, required=True)
    args, run_options = parser.parse_known_args(argv)
    mode = args.checkpointing
    options, checkpoint_dir = example.parse_options(run_options)
    seconds_per_byte = example.sync_seconds_per_byte(options, checkpoint_dir)
    outcome = Outcome()
    start = time.perf_counter()
    example.simulate(
        make_server_app(mode, options, outcome), make_client_app(mode), options.num_clients,
        {"checkpoint-dir": checkpoint_dir},
    )  # fmt: skip
    summary = example.summarize(options, checkpoint_dir, outcome, time.perf_counter() - start, seconds_per_byte)
    if mode == "sync":
        summary["checkpoints_written"] += int(example.client_total(outcome, "checkpoint-saves"))
    else:  # the clients report what the example saves; none saved nothing
        summary.update(checkpoint_bytes=0, sync_seconds_estimate=0.0)
    summary["checkpointing"] = mode
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
