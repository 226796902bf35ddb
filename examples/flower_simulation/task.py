"""The learning task of the example: an MLP (or a small CNN) on synthetic, non-identically distributed
client data."""

from __future__ import annotations

import time

import torch
from torch import nn

NUM_FEATURES = 32
NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)  # the CNN's inputs: CIFAR-10's shape, flattened in the data
MODELS = ("mlp", "cnn")


class Net(nn.Module):
    """An MLP: ``depth`` hidden layers of ``width`` units (4 * width**2 * depth bytes of fp32 weights)."""

    def __init__(self, width: int, depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(NUM_FEATURES, width), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.ReLU()]
        layers.append(nn.Linear(width, NUM_CLASSES))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class CNN(nn.Module):
    """A small CNN for 3x32x32 images (CIFAR-10's shape): two convolutions with batch norm, then two
    linear layers; about 4.3 MB of fp32 weights, and batch-norm buffers beside them."""

    def __init__(self) -> None:
        super().__init__()
        channels, height, width = IMAGE_SHAPE
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * (height // 4) * (width // 4), 256), nn.ReLU(), nn.Linear(256, NUM_CLASSES)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x.view(-1, *IMAGE_SHAPE)))


def build(model: str, width: int, depth: int) -> nn.Module:
    """The run's model: ``"mlp"`` (``Net(width, depth)``) or ``"cnn"`` (:class:`CNN`; width and depth unused)."""
    if model == "cnn":
        return CNN()
    if model == "mlp":
        return Net(width, depth)
    raise ValueError(f"unknown model {model!r}: expected one of {MODELS}")


def num_features(model: str) -> int:
    """The length of a sample's feature vector for ``model`` (an image, flattened, for the CNN)."""
    channels, height, width = IMAGE_SHAPE
    return channels * height * width if model == "cnn" else NUM_FEATURES


def width_for(megabytes: float, depth: int = 2) -> int:
    """The width at which ``Net(width, depth)`` holds about ``megabytes`` MB (10**6 bytes) of fp32 tensors."""
    parameters = megabytes * 1e6 / 4
    # (depth - 1) * w**2 + (NUM_FEATURES + depth + NUM_CLASSES) * w + NUM_CLASSES = parameters
    a, b, c = depth - 1, NUM_FEATURES + depth + NUM_CLASSES, NUM_CLASSES - parameters
    width = -c / b if a == 0 else (-b + (b * b - 4 * a * c) ** 0.5) / (2 * a)
    return max(1, round(width))


def model_bytes(model: nn.Module) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())


def client_data(
    partition: int, seed: int, features: int = NUM_FEATURES, samples: int = 320
) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's samples of ``features`` values: shared class means, a skewed label mix and an input
    shift per client."""
    shared = torch.Generator().manual_seed(seed)
    class_means = torch.randn(NUM_CLASSES, features, generator=shared) * 2.0
    own = torch.Generator().manual_seed(seed * 100_003 + partition + 1)
    label_mix = torch.softmax(torch.randn(NUM_CLASSES, generator=own) * 2.0, 0)  # skewed: a few classes dominate
    labels = torch.multinomial(label_mix, samples, replacement=True, generator=own)
    shift = torch.randn(features, generator=own) * 0.5
    return class_means[labels] + torch.randn(samples, features, generator=own) + shift, labels


def split(data: tuple[torch.Tensor, torch.Tensor], validation: float = 0.2) -> tuple[tuple, tuple]:
    features, labels = data
    cut = int(len(labels) * (1 - validation))
    return (features[:cut], labels[:cut]), (features[cut:], labels[cut:])


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: tuple,
    steps: int,
    batch_size: int,
    simulated_accelerator_s: float = 0.0,
) -> float:
    """``steps`` SGD steps on random batches; returns the mean training loss.

    ``simulated_accelerator_s`` > 0 stands in for a GPU client (there is none here): each step
    computes on one thread, then holds the host idle that long, as a step waiting on the device
    (a CUDA synchronize) would. Runs with it are SIMULATED, and reported as such.
    """
    features, labels = data
    model.train()
    total = 0.0
    threads = torch.get_num_threads()
    if simulated_accelerator_s:
        torch.set_num_threads(1)
    try:
        for _ in range(steps):
            batch = torch.randint(0, len(labels), (batch_size,), device=labels.device)
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(features[batch]), labels[batch])
            loss.backward()
            optimizer.step()
            total += loss.item()
            if simulated_accelerator_s:
                time.sleep(simulated_accelerator_s)  # the host waits on the (simulated) device
    finally:
        torch.set_num_threads(threads)
    return total / max(steps, 1)


@torch.no_grad()
def evaluate(model: nn.Module, data: tuple) -> tuple[float, float]:
    """(loss, accuracy) on ``data``."""
    features, labels = data
    model.eval()
    logits = model(features)
    return float(nn.functional.cross_entropy(logits, labels)), float((logits.argmax(1) == labels).float().mean())
