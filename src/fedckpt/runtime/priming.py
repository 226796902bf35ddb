"""The one-time costs of a process's first save and load, paid ahead on a background thread.

A fresh process's first checkpoint calls run code nothing has run yet: torch's serialization
modules and their config (built from source), pickle's lookup of each torch class's slots, torch's
loader, and fedckpt's own snapshot paths. Together that is tens of milliseconds, which a Flower
client's first round would otherwise block for. The warm-up thread
(:func:`fedckpt.runtime.lifecycle.warm_up_in_background`) runs them on a tiny model and a state
like an optimizer's, while the round trains, without touching torch's random number generator (a
seeded program gets the same models with or without it). Only per-architecture work is left to the
first save of a real model.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable

import torch
from torch import nn

from fedckpt.snapshot import snapshot_module, snapshot_state, snapshot_torch_module
from fedckpt.storage.base import storage_for


def prime_serialization() -> None:
    """Save and load a tiny model and optimizer state the ways fedckpt and its users do, in memory,
    and import the local storage backend (imported on first use)."""
    storage_for(os.getcwd()).exists(os.getcwd())
    model = nn.Sequential(_zero_linear(2, 2), nn.ReLU())
    parameters = list(model.parameters())
    # An optimizer's state dict, built by hand: constructing a torch optimizer imports torch._dynamo
    # (about a second of CPU), which a process that never trains (a ServerApp) would pay for nothing.
    state = {
        "server_round": 1,
        "optimizer": {
            "state": {index: {"momentum_buffer": torch.zeros_like(p)} for index, p in enumerate(parameters)},
            "param_groups": [{"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "params": list(range(len(parameters)))}],
        },
    }
    prime_models([model])
    snapshot_state(state)
    for saved, weights_only in ((model, False), (state, True)):
        buffer = io.BytesIO()
        torch.save(saved, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=weights_only)


def _zero_linear(in_features: int, out_features: int) -> nn.Linear:
    """A ``Linear`` with zero weights, made without torch's random number generator (shared by every
    thread: a default-initialized layer here would change the models a seeded program builds
    meanwhile) and without ``skip_init``, whose meta-device path costs a few hundred milliseconds
    of CPU on first use."""
    layer = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = in_features, out_features
    layer.weight = nn.Parameter(torch.zeros(out_features, in_features))
    layer.bias = nn.Parameter(torch.zeros(out_features))
    return layer


def prime_models(models: Iterable[nn.Module]) -> None:
    """The per-architecture work of ``models``' first saves, under ``.pt`` and ``.safetensors`` names:
    the pickle of each one's structure and its tensors' plan. Views only: no tensor is copied."""
    for model in models:
        snapshot_torch_module(model)
        snapshot_module(model)
