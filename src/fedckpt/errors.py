"""Exceptions raised by fedckpt."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A background save (or the load that waited for it) failed.

    The original exception is chained as ``__cause__``; ``errors`` maps each checkpoint that
    failed to its exception. Raised at the next call on the checkpointer whose save failed, at
    ``flush()``, or at load time.
    """

    errors: dict[str, BaseException]

    @classmethod
    def naming(cls, what: str, errors: dict[str, BaseException]) -> CheckpointError:
        """``what``, then each failed checkpoint with its error."""
        details = "; ".join(f"{key}: {type(error).__name__}: {error}" for key, error in sorted(errors.items()))
        error = cls(f"{what}. {details}")
        error.__cause__ = next(iter(errors.values()))
        error.errors = errors
        return error


class CorruptCheckpointError(RuntimeError):
    """A checkpoint whose manifest entry names a version that is missing from storage: never read as
    "no checkpoint", which would restart a run from scratch. ``fedckpt verify`` lists such entries."""


class ScoreError(TypeError, ValueError):
    """A loss or metric that is not a number (raised in the caller, before anything is saved).

    Both a ``TypeError`` and a ``ValueError``: what ``float()`` raises depends on the value.
    """


class SaveLostError(RuntimeError):
    """An acknowledged save that never reached storage: its writer is gone for good, or died with it
    while its caller died too (the checkpoint keeps its last written version)."""


class MissingExtraError(ImportError):
    """A part of fedckpt whose optional dependencies are not installed (``fedckpt.flower`` without
    Flower, ``fedckpt bench`` without rich); the message names the extra that installs them."""
