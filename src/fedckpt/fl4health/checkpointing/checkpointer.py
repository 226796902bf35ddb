"""Mirror of ``fl4health.checkpointing.checkpointer``: fedckpt's model checkpointers, saving in the background.

These are the same classes as ``fedckpt``'s, so the 0.3 and 0.4 module paths give one checkpointer.
Beyond FL4Health: a ``.safetensors`` name writes safetensors, a best score of 0.0 counts as a best
score, a NaN score never saves, and ``load_checkpoint`` waits for the checkpoint's pending saves.
"""

from fedckpt.checkpointers import (
    BestLossTorchModuleCheckpointer,
    BestMetricTorchModuleCheckpointer,
    FunctionTorchModuleCheckpointer,
    LatestTorchModuleCheckpointer,
    TorchModuleCheckpointer,
)
from fedckpt.policies import CheckpointScoreFunctionType

__all__ = [
    "BestLossTorchModuleCheckpointer",
    "BestMetricTorchModuleCheckpointer",
    "CheckpointScoreFunctionType",
    "FunctionTorchModuleCheckpointer",
    "LatestTorchModuleCheckpointer",
    "TorchModuleCheckpointer",
]
