"""Helpers for Flower apps (Message API, Flower 1.24 and later): checkpoints, per-round state and resume.

- :class:`ClientCheckpoints`, built in a ``ClientApp``'s ``@app.train()`` / ``@app.evaluate()``
  handlers: pre-aggregation checkpoints after local training, post-aggregation checkpoints of the
  global model received, and the client's own state (optimizer, counters) saved each round and
  restored at the start of the next, in whichever Ray worker the client runs then.
- :class:`ServerCheckpoints`, used in a ``ServerApp``'s ``main()`` in place of ``strategy.start``:
  runs Flower's own ``Strategy.start`` rounds, checkpoints the global model and the server state
  after each, resumes a run from its last durable round, and flushes every save before ``main()``
  returns (Flower shuts Ray down right after).
- :func:`run_checkpoint_dir`: the run config's ``checkpoint-dir``, checked to be absolute (or a URL),
  and :func:`client_checkpoint_dir`: a client's directory below it.

fedckpt joins the Ray instance Flower starts; its writer actors are created at the first save.
Flower is an optional dependency: ``pip install 'fedckpt[flower]'``.
"""

from fedckpt._extras import require

require("flwr", extra="flower", part="fedckpt.flower")

from fedckpt.flower.client import ClientCheckpoints, client_checkpoint_dir, run_checkpoint_dir  # noqa: E402
from fedckpt.flower.server import ServerCheckpoints  # noqa: E402

__all__ = ["ClientCheckpoints", "ServerCheckpoints", "client_checkpoint_dir", "run_checkpoint_dir"]
