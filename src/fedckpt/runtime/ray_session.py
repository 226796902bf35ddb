"""Joining the Ray instance a program already runs, or starting a local one on loopback."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import ray

from fedckpt import _compat
from fedckpt.runtime import failpoints

log = logging.getLogger("fedckpt")

# Counts ``ray.shutdown()`` calls in this process (fedckpt wraps it): a cheap test, on every save,
# of whether the writer pool this process knows can still be the one it talks to.
generation = 0

# What ``ray.shutdown()`` runs first, while Ray is up (set by fedckpt.runtime.shutdown_hook: flush
# every save, stop fedckpt's threads); it returns the failure to raise once Ray is down.
before_shutdown: Callable[[], BaseException | None] | None = None


def ensure_ray() -> bool:
    """Make sure this process is connected to Ray. Returns True if fedckpt connected it.

    Inside Flower (or after the user's own ``ray.init``) Ray is initialized and fedckpt joins it.
    With ``RAY_ADDRESS`` naming a cluster, fedckpt connects to it. Otherwise it starts a local
    instance bound to 127.0.0.1, never to the machine's network interface.
    """
    if ray.is_initialized():
        return False
    from fedckpt.runtime.preemption import keeping_sigterm_handler

    address = os.environ.get("RAY_ADDRESS")
    with keeping_sigterm_handler(), _quiet_about_sigterm():
        if address and address != "local":
            ray.init(address=address, include_dashboard=False)
        else:
            _start_local_on_loopback()
        failpoints.reach("ray_session.connected")
    return True


class _NoSigtermNotice(logging.Filter):
    """Ray warns that it set no SIGTERM handler when started off the main thread (the background
    start): fedckpt keeps the program's own handler anyway (see ``keeping_sigterm_handler``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


@contextlib.contextmanager
def _quiet_about_sigterm() -> Iterator[None]:
    ray_worker_log = logging.getLogger("ray._private.worker")
    notice = _NoSigtermNotice()
    ray_worker_log.addFilter(notice)
    try:
        yield
    finally:
        ray_worker_log.removeFilter(notice)


def _start_local_on_loopback() -> None:
    with _compat.ray_binds_loopback():
        ray.init(address="local", include_dashboard=False)
    log.info("fedckpt started a local Ray instance on 127.0.0.1")


def session_id() -> str:
    """Identifies the Ray instance this process is connected to (changes after a restart)."""
    context = ray.get_runtime_context()
    return f"{context.gcs_address}/{context.get_job_id()}"


def _flush_first(shutdown: Callable[..., Any]) -> Callable[..., Any]:
    """``ray.shutdown`` that first waits for every save pending in the cluster.

    Flower calls ``ray.shutdown()`` as soon as a simulation's ServerApp returns, and that kills the
    writers with whatever the clients saved last. Ray has no shutdown hook, so fedckpt wraps the
    function in every process that imports fedckpt (see :mod:`fedckpt.runtime.shutdown_hook`).
    Failed saves are raised after Ray is down; when ``ray.shutdown()`` runs while an exception
    propagates (in an ``except`` or ``finally`` block), that exception goes on, with the failed saves
    added to it as a note, and logged.
    """

    @functools.wraps(shutdown)
    def shutdown_after_flush(*args: Any, **kwargs: Any) -> Any:
        global generation
        failure = None
        if ray.is_initialized() and before_shutdown is not None:
            failure = before_shutdown()
        generation += 1
        result = shutdown(*args, **kwargs)
        if failure is not None:
            propagating = sys.exc_info()[1]
            if propagating is None:
                raise failure
            propagating.add_note(f"fedckpt, at ray.shutdown(): {failure}")
            log.error("fedckpt: saves failed before ray.shutdown(): %s", failure)
        return result

    return shutdown_after_flush


unwrapped_shutdown = _compat.wrap_ray_shutdown(_flush_first)
