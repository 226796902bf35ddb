"""fedckpt: FL4Health-compatible checkpointing whose saves never block training on disk I/O.

Checkpointers snapshot the state in the caller (about one memory copy) and return; Ray actors
write it in the background, atomically and in order per checkpoint.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedckpt._version import __version__
from fedckpt.runtime import shutdown_hook

if TYPE_CHECKING:
    from fedckpt.checkpointers import (
        BestLossTorchModuleCheckpointer,
        BestMetricTorchModuleCheckpointer,
        FunctionTorchModuleCheckpointer,
        LatestTorchModuleCheckpointer,
        TorchModuleCheckpointer,
    )
    from fedckpt.client_module import ClientCheckpointAndStateModule
    from fedckpt.errors import CheckpointError, CorruptCheckpointError, ScoreError
    from fedckpt.modes import CheckpointMode
    from fedckpt.runtime.lifecycle import flush, init, shutdown, wait_staged
    from fedckpt.runtime.stats import ProcessStats, stats
    from fedckpt.server_module import ServerCheckpointAndStateModule
    from fedckpt.state import PerRoundStateCheckpointer

# Names are imported on first use: a writer process (which never touches torch) and the CLI's
# ls/verify load only the modules they use.
_EXPORTS = {
    "BestLossTorchModuleCheckpointer": "fedckpt.checkpointers",
    "BestMetricTorchModuleCheckpointer": "fedckpt.checkpointers",
    "FunctionTorchModuleCheckpointer": "fedckpt.checkpointers",
    "LatestTorchModuleCheckpointer": "fedckpt.checkpointers",
    "TorchModuleCheckpointer": "fedckpt.checkpointers",
    "ClientCheckpointAndStateModule": "fedckpt.client_module",
    "CheckpointError": "fedckpt.errors",
    "CorruptCheckpointError": "fedckpt.errors",
    "ScoreError": "fedckpt.errors",
    "CheckpointMode": "fedckpt.modes",
    "flush": "fedckpt.runtime.lifecycle",
    "init": "fedckpt.runtime.lifecycle",
    "shutdown": "fedckpt.runtime.lifecycle",
    "wait_staged": "fedckpt.runtime.lifecycle",
    "stats": "fedckpt.runtime.stats",
    "ProcessStats": "fedckpt.runtime.stats",
    "ServerCheckpointAndStateModule": "fedckpt.server_module",
    "PerRoundStateCheckpointer": "fedckpt.state",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


shutdown_hook.install()  # ray.shutdown flushes first, once Ray is imported

__all__ = [
    "__version__",
    "BestLossTorchModuleCheckpointer",
    "BestMetricTorchModuleCheckpointer",
    "CheckpointError",
    "CorruptCheckpointError",
    "CheckpointMode",
    "ClientCheckpointAndStateModule",
    "FunctionTorchModuleCheckpointer",
    "LatestTorchModuleCheckpointer",
    "PerRoundStateCheckpointer",
    "ProcessStats",
    "ScoreError",
    "ServerCheckpointAndStateModule",
    "TorchModuleCheckpointer",
    "flush",
    "init",
    "shutdown",
    "stats",
    "wait_staged",
]
