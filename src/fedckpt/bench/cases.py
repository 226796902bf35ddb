"""The benchmark's cases: models to save (``kind="save"``) and a training loop to checkpoint (``kind="loop"``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

MIB = 1 << 20


@dataclass(frozen=True)
class Case:
    """One benchmark case.

    Args:
        name: what ``--cases`` calls it.
        description: one line for the table title.
        build: returns what to save: a model (fp32 on CPU unless the case says otherwise), or a state
            dict (saved with ``PerRoundStateCheckpointer`` by fedckpt).
        kind: ``"save"`` times single saves and bursts; ``"loop"`` times a training loop that saves every step.
        steps: the number of training steps of a loop case.
    """

    name: str
    description: str
    build: Callable[[], nn.Module | dict]
    kind: str = "save"
    steps: int = 0


def linear_stack(megabytes: float, layers: int = 8, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> nn.Module:
    """``layers`` square bias-free Linear layers adding up to about ``megabytes`` MiB.

    Every layer has the same number of parameters; layer ``i`` has dtype ``dtypes[i % len(dtypes)]``,
    so ``(float32, bfloat16)`` gives half the parameters in each.
    """
    per_layer_dtypes = [dtypes[index % len(dtypes)] for index in range(layers)]
    bytes_per_parameter = sum(torch.empty((), dtype=dtype).element_size() for dtype in per_layer_dtypes)
    side = max(1, int(math.sqrt(megabytes * MIB / bytes_per_parameter)))
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(side, side, bias=False, dtype=dtype) for dtype in per_layer_dtypes))


def many_small(count: int = 1000, width: int = 16) -> nn.Module:
    """``count`` ``Linear(width, width)`` layers: ``2 * count`` small tensors, for per-save fixed overhead."""
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(width, width) for _ in range(count)))


class SmallCNN(nn.Module):
    """A CIFAR-sized CNN in the spirit of FedAvg's: three conv blocks with batch norm, two Linear layers,
    about 2.2 MiB of state."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()

        def block(inputs: int, outputs: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(inputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs), nn.ReLU(), nn.MaxPool2d(2)
            )

        self.features = nn.Sequential(block(3, 32), block(32, 64), block(64, 64))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 512), nn.ReLU(), nn.Linear(512, classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class FederatedMLP(nn.Module):
    """The MLP of the README's Flower example at its default size: 32-256-256-10, 305 KB in 6 tensors."""

    def __init__(self, width: int = 256, features: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(features, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes)
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.layers(inputs)


def federated_mlp() -> nn.Module:
    torch.manual_seed(0)
    return FederatedMLP()


def sgd_state() -> dict:
    """What a Flower client of the example saves as its per-round state: its SGD optimizer's state
    dict (momentum buffers of the 305 KB MLP) and a step counter."""
    model = federated_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model(torch.randn(8, 32)).sum().backward()
    optimizer.step()  # creates the momentum buffers
    return {"optimizer": optimizer.state_dict(), "local_steps": 5, "server_round": 1}


def small_cnn() -> nn.Module:
    """A freshly initialized ``SmallCNN`` (same seed every time, so every loop starts alike)."""
    torch.manual_seed(0)
    return SmallCNN()


CASES: dict[str, Case] = {
    case.name: case
    for case in (
        Case("fp32-100mb", "fp32, 8 Linear layers, ~100 MiB", lambda: linear_stack(100)),
        Case("fp32-400mb", "fp32, 8 Linear layers, ~400 MiB", lambda: linear_stack(400)),
        Case("fp32-1gb", "fp32, 8 Linear layers, ~1 GiB", lambda: linear_stack(1024)),
        Case(
            "mixed-100mb",
            "half the parameters fp32, half bf16, ~100 MiB",
            lambda: linear_stack(100, dtypes=(torch.float32, torch.bfloat16)),
        ),
        Case("mlp-305kb", "the Flower example's MLP, 305 KB (per-save fixed cost)", federated_mlp),
        Case("sgd-state-305kb", "its SGD state dict, saved as per-round state", sgd_state),
        Case("small-2000", "1,000 Linear(16, 16): 2,000 small tensors", many_small),
        Case(
            "cnn-loop",
            "small CNN, SGD, batches of 32 CIFAR-sized images, a save after every step",
            small_cnn,
            kind="loop",
            steps=60,
        ),  # fmt: skip
    )
}
# fp32-400mb is the old blocking_time.py default; it is opt-in so the default run stays in ~10 GB.
DEFAULT_CASES = ("mlp-305kb", "sgd-state-305kb", "small-2000", "fp32-100mb", "fp32-1gb", "mixed-100mb", "cnn-loop")
QUICK_CASES = ("mlp-305kb", "sgd-state-305kb", "small-2000", "fp32-100mb", "mixed-100mb", "cnn-loop")


def case_names() -> list[str]:
    """The case names ``--cases`` offers."""
    return list(CASES)
