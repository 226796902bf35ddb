"""Preemption: on SIGTERM, the saves already acknowledged are flushed, within a grace period, and
the process then ends as it would have without fedckpt.

Slurm and Kubernetes stop a job with SIGTERM, then SIGKILL after a grace period (30 s by default
in both). Python's default for SIGTERM is to die at once, exit handlers unrun, so without this the
saves a training loop was told were taken would be lost with the writers. After the flush the
handler that was there before runs: the user's own, or the default one, which ends the process by
the signal (status 143 in a shell).

Installed only in the process that drives the run (a script, Flower's ServerApp), from its main
thread: in Ray's worker processes SIGTERM belongs to Ray, and the driver's flush covers their saves.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import ray

from fedckpt import _compat
from fedckpt.runtime import threads

log = logging.getLogger("fedckpt")

# Past the grace period, how long the handler still waits for the flush's thread to return.
JOIN_MARGIN_SECONDS = 2.0

# Set once SIGTERM was handled: the flushes at ray.shutdown() and at exit that follow (the handler
# handed on may exit through them) do not wait again past the grace period.
sigterm_handled = threading.Event()

# The flush a SIGTERM runs (set by fedckpt.runtime.lifecycle): every acknowledged save, within a timeout.
flush: Callable[[float], None] | None = None


@contextlib.contextmanager
def keeping_sigterm_handler() -> Iterator[None]:
    """Around a ``ray.init`` that fedckpt makes: Ray would replace the handler the program has
    (the user's own, fedckpt's, or the default).

    Ray's core worker installs a C++ failure-signal handler that also takes SIGTERM, and aborts the
    process (status -6) instead of running the program's handler; off the main thread (the
    background start) it stays in place. Where Ray has the switch (2.55), it is not installed at all,
    so that a SIGTERM at any moment, ``ray.init`` included, runs the program's handler: Ray's native
    crash stacks are what this costs in a driver that fedckpt connects (a program that wants them
    calls ``ray.init`` itself first). Where it has not (2.51), the process's action for SIGTERM is put
    back through ``sigaction`` after ``ray.init`` (Python's handler table never changed), and a
    SIGTERM during ``ray.init`` off the main thread still aborts. On the main thread, Ray also sets a
    Python handler: the one before is set again.
    """
    on_main_thread = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if on_main_thread else None
    action = None if on_main_thread else _sigterm_action()
    try:
        with _compat.ray_failure_signal_handler_off():
            yield
    finally:
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)
        if action is not None:
            _set_sigterm_action(action)


# glibc's struct sigaction is 152 bytes on x86_64 and aarch64: kept as opaque bytes, read and set back.
_SIGACTION_BYTES = 512


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _sigterm_action() -> ctypes.Array[ctypes.c_char]:
    """The process's current action for SIGTERM (its C-level handler, mask and flags)."""
    action = ctypes.create_string_buffer(_SIGACTION_BYTES)
    if _libc().sigaction(signal.SIGTERM, None, action) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"sigaction(SIGTERM) could not be read: {os.strerror(error)}")
    return action


def _set_sigterm_action(action: ctypes.Array[ctypes.c_char]) -> None:
    if _libc().sigaction(signal.SIGTERM, action, None) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"sigaction(SIGTERM) could not be set back: {os.strerror(error)}")


def install(grace_seconds: float) -> None:
    """Flush for up to ``grace_seconds`` on SIGTERM, before the handler already in place (0: leave it)."""
    if grace_seconds <= 0 or threading.current_thread() is not threading.main_thread():
        return
    if ray.is_initialized() and _compat.in_ray_worker_process():
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous in (signal.SIG_IGN, None) or isinstance(previous, _FlushThenHandOn):
        return
    signal.signal(signal.SIGTERM, _FlushThenHandOn(previous, grace_seconds))


class _FlushThenHandOn:
    def __init__(self, previous: Any, grace_seconds: float) -> None:
        self.previous = previous
        self.grace_seconds = grace_seconds

    def __call__(self, signum: int, frame: FrameType | None) -> Any:
        signal.signal(signal.SIGTERM, self.previous)  # a second SIGTERM is not held up by this one
        self._flush()
        sigterm_handled.set()
        if callable(self.previous):
            return self.previous(signum, frame)
        os.kill(os.getpid(), signum)  # the default action: end by the signal
        return None

    def _flush(self) -> None:
        """In a thread of its own, bounded: the signal may have come while this thread held a lock
        the flush needs. The flush itself ends by the grace period (every wait in it has that
        deadline), so the thread is gone before the process goes on to exit."""
        outcome: list[BaseException | None] = []

        def flush_within_grace() -> None:
            try:
                if flush is not None:
                    flush(self.grace_seconds)
                outcome.append(None)
            except BaseException as error:
                outcome.append(error)

        worker = threads.start("fedckpt-preemption-flush", flush_within_grace)
        worker.join(self.grace_seconds + JOIN_MARGIN_SECONDS)
        if not outcome:
            log.error("fedckpt: SIGTERM: saves not flushed within %.0f s; ending anyway", self.grace_seconds)
        elif outcome[0] is not None:
            log.error("fedckpt: SIGTERM: saves failed while flushing: %s", outcome[0])
        else:
            log.info("fedckpt: SIGTERM: every acknowledged save is on storage")
