"""Exceptions raised by fedckpt."""


class CheckpointError(RuntimeError):
    """A background save (or the load that waited for it) failed.

    The original exception is chained as ``__cause__``. Raised at the next call on the
    checkpointer whose save failed, at ``flush()``, or at load time.
    """
