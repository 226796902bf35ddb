"""The writer actor: its Ray and channel surface (``actor``), each key's queue (``queue``), the
bookkeeping of a restart (``recovery``) and its access to staged bytes (``staged``); the writers
of a node's staged saves whose keys' homes run elsewhere (``node_writer``)."""

from fedckpt.runtime.writer.actor import CheckpointWriter, writer_actor_class
from fedckpt.runtime.writer.node_writer import NodeWriter, node_writer_actor_class

__all__ = ["CheckpointWriter", "NodeWriter", "node_writer_actor_class", "writer_actor_class"]
