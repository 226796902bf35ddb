"""Plain classes holding the attributes of FL4Health's ``BasicClient`` and ``FlServer`` (FL4Health is not
installed): what ``fedckpt.fl4health``'s state checkpointers save and load. A module of its own, so that
Ray workers (Flower's ClientApps) can unpickle them."""

from __future__ import annotations

import torch
from flwr.server.history import History
from torch import nn


class Reports:
    """Stands in for FL4Health's ``ReportsManager``: what was reported, in order."""

    def __init__(self) -> None:
        self.reports: list[dict] = []

    def report(self, data: dict) -> None:
        self.reports.append(dict(data))


class LossMeter:
    """Stands in for FL4Health's ``LossMeter``."""

    def __init__(self) -> None:
        self.losses_list: list[float] = []

    def update(self, loss: float) -> None:
        self.losses_list.append(loss)


class MetricManager:
    """Stands in for FL4Health's ``MetricManager``: a running count of correct signs."""

    def __init__(self) -> None:
        self.correct, self.seen = 0, 0

    def update(self, predictions: torch.Tensor, targets: torch.Tensor) -> None:
        self.correct += int(((predictions > 0) == (targets > 0)).sum())
        self.seen += targets.numel()

    def compute(self) -> dict[str, float]:
        return {"accuracy": self.correct / max(self.seen, 1)}


class Client:
    """The attributes FL4Health's ``ClientStateCheckpointer`` saves by default, and a training step."""

    def __init__(self, client_name: str, seed: int = 0, width: int = 16) -> None:
        torch.manual_seed(seed)
        self.client_name = client_name
        self.model = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 1))
        self.optimizers = {"global": torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)}
        self.lr_schedulers = {"global": torch.optim.lr_scheduler.StepLR(self.optimizers["global"], step_size=2)}
        self.total_steps = 0
        self.total_epochs = 0
        self.reports_manager = Reports()
        self.train_loss_meter = LossMeter()
        self.train_metric_manager = MetricManager()

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        optimizer = self.optimizers["global"]
        optimizer.zero_grad()
        predictions = self.model(inputs)
        loss = torch.nn.functional.mse_loss(predictions, targets)
        loss.backward()
        optimizer.step()
        self.lr_schedulers["global"].step()
        self.total_steps += 1
        self.train_loss_meter.update(loss.item())
        self.train_metric_manager.update(predictions.detach(), targets)
        self.reports_manager.report({"step": self.total_steps, "loss": loss.item()})
        return loss.item()


def batch(seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 8, generator=generator), torch.randn(size, 1, generator=generator)


class Server:
    """The attributes FL4Health's ``ServerStateCheckpointer`` saves by default (its model is passed apart)."""

    def __init__(self, server_name: str) -> None:
        self.server_name = server_name
        self.current_round = 0
        self.reports_manager = Reports()
        self.history = History()
