"""Exceptions raised by fedckpt."""


class CheckpointError(RuntimeError):
    """A background save (or the load that waited for it) failed.

    The original exception is chained as ``__cause__``. Raised at the next call on the
    checkpointer whose save failed, at ``flush()``, or at load time.
    """


class ScoreError(TypeError, ValueError):
    """A loss or metric that is not a number (raised in the caller, before anything is saved).

    Both a ``TypeError`` and a ``ValueError``: what ``float()`` raises depends on the value.
    """
