"""What fedckpt does when its process exits: flush, free the staging memory, and fail loudly."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Protocol

import ray

from fedckpt.runtime import preemption, ray_session, threads
from fedckpt.runtime.staging import remove_orphans
from fedckpt.storage.base import close_file_systems

log = logging.getLogger("fedckpt")

# How long exit waits for each background thread of fedckpt to return (each one's Ray calls have
# shorter timeouts than this).
THREAD_JOIN_SECONDS = 10.0


class ExitingRuntime(Protocol):
    """What the exit handler needs of the coordinator."""

    has_pool: bool
    pool_starting: bool
    ray_started_in_background: bool

    def flush(self) -> None: ...

    def stop_watcher(self) -> None: ...

    def release_staging_at_exit(self) -> None: ...


def flush_at_exit(coordinator: ExitingRuntime) -> None:
    """A process that exits normally loses nothing it saved, and leaves no staging memory behind.

    If saves failed, the process exits with status 1 once the error is printed: an exception in
    an exit handler would leave the status 0, as if everything had been saved.
    """
    failed = False
    ray_was_up = ray.is_initialized()
    try:
        # After SIGTERM the handler flushed for its grace period already: SIGKILL is near.
        to_flush = (coordinator.has_pool and ray.is_initialized()) or coordinator.pool_starting
        if to_flush and not preemption.sigterm_handled.is_set():
            try:
                coordinator.flush()
            except Exception as error:
                log.error("fedckpt: saves failed before exit: %s", error)
                failed = True
    finally:
        # Before Ray's own exit hook disconnects this process: no thread of fedckpt in a Ray call.
        coordinator.stop_watcher()
        threads.stop_all(THREAD_JOIN_SECONDS)
        close_file_systems()  # object-store sessions closed while their event loop still runs
        coordinator.release_staging_at_exit()
        if not ray_was_up and ray.is_initialized() and coordinator.ray_started_in_background:
            # Ray started while this handler waited for the pool: its own exit hook came too late to run.
            ray_session.unwrapped_shutdown()
        if not ray.is_initialized():
            # Ray was shut down under this process (Flower does, after a simulation): its workers
            # were killed without cleaning up, so remove their staging segments now.
            remove_orphans(settle_seconds=1.0, grace_seconds=0.0)
    if failed:
        _exit_with_failure()


def _exit_with_failure() -> None:
    """Exit now with status 1. The exit handlers registered before fedckpt's would not run after
    ``os._exit``; the ones that matter here run first: Ray's shutdown, then logging's and stdio's flush."""
    with contextlib.suppress(Exception):
        if ray.is_initialized():
            ray_session.unwrapped_shutdown()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(1)
