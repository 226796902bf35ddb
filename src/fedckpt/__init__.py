"""fedckpt: FL4Health-compatible checkpointing whose saves never block training on disk I/O.

Checkpointers snapshot the state in the caller (about one memory copy) and return; Ray actors
write it in the background, atomically and in order per checkpoint.
"""

from fedckpt.checkpointers import (
    BestLossTorchModuleCheckpointer,
    BestMetricTorchModuleCheckpointer,
    FunctionTorchModuleCheckpointer,
    LatestTorchModuleCheckpointer,
    TorchModuleCheckpointer,
)
from fedckpt.client_module import ClientCheckpointAndStateModule
from fedckpt.errors import CheckpointError, ScoreError
from fedckpt.modes import CheckpointMode
from fedckpt.runtime.lifecycle import flush, init, shutdown
from fedckpt.server_module import ServerCheckpointAndStateModule
from fedckpt.state import PerRoundStateCheckpointer

__version__ = "0.1.0"

__all__ = [
    "BestLossTorchModuleCheckpointer",
    "BestMetricTorchModuleCheckpointer",
    "CheckpointError",
    "CheckpointMode",
    "ClientCheckpointAndStateModule",
    "FunctionTorchModuleCheckpointer",
    "LatestTorchModuleCheckpointer",
    "PerRoundStateCheckpointer",
    "ScoreError",
    "ServerCheckpointAndStateModule",
    "TorchModuleCheckpointer",
    "flush",
    "init",
    "shutdown",
]
