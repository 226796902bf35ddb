"""Helpers for Flower 1.42 apps (Message API): checkpoints, per-round state and resume.

- :class:`ClientCheckpoints`, built in a ``ClientApp``'s ``@app.train()`` / ``@app.evaluate()``
  handlers: pre-aggregation checkpoints after local training, post-aggregation checkpoints of the
  global model received, and the client's own state (optimizer, counters) saved each round and
  restored at the start of the next, in whichever Ray worker the client runs then.
- :class:`ServerCheckpoints`, used in a ``ServerApp``'s ``main()`` in place of ``strategy.start``:
  runs the same rounds, checkpoints the global model and the server state after each, resumes a
  run from its last durable round, and flushes every save before ``main()`` returns (Flower shuts
  Ray down right after).

fedckpt joins the Ray instance Flower starts; its writer actors are created at the first save.
"""

from fedckpt.flower.client import ClientCheckpoints, client_checkpoint_dir
from fedckpt.flower.server import ServerCheckpoints

__all__ = ["ClientCheckpoints", "ServerCheckpoints", "client_checkpoint_dir"]
