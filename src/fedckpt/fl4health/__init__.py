"""FL4Health 0.4's checkpointing API on fedckpt's asynchronous saves, under FL4Health's module paths.

Replace ``fl4health.`` with ``fedckpt.fl4health.`` in the imports of
``fl4health.checkpointing.{checkpointer,client_module,server_module,state_checkpointer}``,
``fl4health.utils.snapshotter`` and ``fl4health.parameter_exchange.{full_exchanger,packing_exchanger,
parameter_packer}``. Nothing here imports FL4Health: the state checkpointers work on any object that
has the attributes they name, and nothing imports Flower until a function needs it.
"""
