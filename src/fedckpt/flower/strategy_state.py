"""What of a Flower strategy a round commits, and a resume restores: the attributes the rounds
reassigned in the strategy and in every strategy it wraps (FedAdam's moments, also inside a
differential-privacy wrapper), and the server process's random generators (a DP wrapper's noise)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from flwr.serverapp.strategy import Strategy


def _strategies(strategy: Strategy) -> dict[str, Strategy]:
    """The strategy and those it wraps (a differential-privacy wrapper's ``strategy``, and so on),
    by attribute path from the outermost ("" is the strategy itself)."""
    found = {"": strategy}
    pending = [("", strategy)]
    while pending:
        path, current = pending.pop()
        for name, value in vars(current).items():
            if isinstance(value, Strategy) and all(value is not known for known in found.values()):
                inner = f"{path}.{name}" if path else name
                found[inner] = value
                pending.append((inner, value))
    return found


def configuration(strategy: Strategy) -> dict[str, dict[str, Any]]:
    """Each strategy's attributes before the first round: its configuration."""
    return {path: dict(vars(each)) for path, each in _strategies(strategy).items()}


def learned(strategy: Strategy, configured: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each strategy's attributes the rounds set or replaced (FedAdam's moments, a wrapper's last
    arrays): its learned state, not its configuration, nor the strategies it wraps."""
    missing = object()
    return {
        path: {
            name: value
            for name, value in vars(each).items()
            if configured.get(path, {}).get(name, missing) is not value
            and not callable(value)
            and not isinstance(value, Strategy)
        }
        for path, each in _strategies(strategy).items()
    }


def restore(strategy: Strategy, state: dict[str, dict[str, Any]]) -> None:
    strategies = _strategies(strategy)
    unknown = sorted(set(state) - set(strategies))
    if unknown:
        raise ValueError(
            f"The saved server state holds the state of wrapped strategies {unknown} that "
            f"{type(strategy).__name__} does not have: resume with the strategy the run was started with"
        )
    for path, attributes in state.items():
        vars(strategies[path]).update(attributes)


def rng() -> dict[str, Any]:
    """The server process's random generators (a DP wrapper's noise comes from numpy's): a resumed
    run draws what the uninterrupted one would have."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def prime_rng() -> None:
    """Pay :func:`rng`'s one-time cost ahead of the first round: numpy 2 imports ``numpy.random`` at
    its first use (about 5 ms). No generator's state changes."""
    import numpy.random  # noqa: F401


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
