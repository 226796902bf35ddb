"""The writer actor: its Ray and channel surface (``actor``), each key's queue (``queue``), the
bookkeeping of a restart (``recovery``) and its access to staged bytes (``staged``)."""

from fedckpt.runtime.writer.actor import CheckpointWriter, writer_actor_class

__all__ = ["CheckpointWriter", "writer_actor_class"]
