"""The model, each client's data, training and evaluation (synthetic data: the app needs no download)."""

from __future__ import annotations

import torch
from torch import nn

FEATURES = 32
CLASSES = 10
SAMPLES = 320


def make_model(width: int) -> nn.Module:
    """A two-layer MLP: about 4 * width**2 bytes of weights (305 KB at width 256)."""
    return nn.Sequential(
        nn.Linear(FEATURES, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, CLASSES)
    )


def load_data(partition_id: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Partition ``partition_id``'s (train, validation) samples: classes shared by all partitions, each
    with its own skewed label mix, so that the clients' data differ."""
    classes = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(0)) * 2.0
    own = torch.Generator().manual_seed(1 + partition_id)
    mix = torch.softmax(torch.randn(CLASSES, generator=own) * 2.0, 0)
    labels = torch.multinomial(mix, SAMPLES, replacement=True, generator=own)
    features = classes[labels] + torch.randn(SAMPLES, FEATURES, generator=own)
    cut = SAMPLES * 4 // 5
    return (features[:cut], labels[:cut]), (features[cut:], labels[cut:])


def train(model: nn.Module, optimizer: torch.optim.Optimizer, data: tuple, steps: int, batch_size: int) -> float:
    """``steps`` SGD steps on random batches; the mean training loss."""
    features, labels = data
    model.train()
    total = 0.0
    for _ in range(steps):
        batch = torch.randint(0, len(labels), (batch_size,), device=labels.device)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(features[batch]), labels[batch])
        loss.backward()
        optimizer.step()
        total += loss.item()
    return total / max(steps, 1)


@torch.no_grad()
def evaluate(model: nn.Module, data: tuple) -> tuple[float, float]:
    """(loss, accuracy) of ``model`` on ``data``."""
    features, labels = data
    model.eval()
    logits = model(features)
    return float(nn.functional.cross_entropy(logits, labels)), float((logits.argmax(1) == labels).float().mean())
