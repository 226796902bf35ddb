"""Mirror of ``fl4health.checkpointing.client_module``.

``ClientCheckpointAndStateModule`` is fedckpt's own: with a ``ClientStateCheckpointer`` its
``save_state(client)`` and ``maybe_load_state(client) -> bool`` are FL4Health 0.4's, with a
``PerRoundStateCheckpointer`` the same methods take 0.3's checkpoint name.
"""

from fedckpt.checkpoint_module import ModelCheckpointers
from fedckpt.client_module import ClientCheckpointAndStateModule
from fedckpt.modes import CheckpointMode

__all__ = ["CheckpointMode", "ClientCheckpointAndStateModule", "ModelCheckpointers"]
