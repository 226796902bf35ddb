"""The writer's process: how it is scheduled, whether its job still runs, and the counter file it
shares with the callers on its node."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

from fedckpt import _compat
from fedckpt._version import __version__
from fedckpt.runtime.sequence import SequenceCounter
from fedckpt.runtime.staging import StagingFull
from fedckpt.runtime.writer.incarnation import CLOCK_OFFSET_FILE_ENV

log = logging.getLogger("fedckpt.writer")


def run_as_background_work() -> None:
    """Every thread of this process, and those it starts later (Linux): ``SCHED_IDLE``, so that the
    writer runs on CPU time training leaves over, and never preempts a caller in a save.

    Ray starts its workers at nice 15, training's included, so a writer niced further still shared
    the CPU with training at about 1:2.4 (nice 19's weight against nice 15's), and its wake-ups cut
    into callers' saves. Where ``SCHED_IDLE`` is refused, ``SCHED_BATCH``: no wake-up preemption."""
    for policy in (os.SCHED_IDLE, os.SCHED_BATCH):
        try:
            for thread_id in os.listdir("/proc/self/task"):
                with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                    os.sched_setscheduler(int(thread_id), policy, os.sched_param(0))
        except (OSError, AttributeError):
            continue
        return


def lower_priority() -> None:
    """Run background I/O at a lower CPU priority (Linux: per thread), for where the policy of
    :func:`run_as_background_work` is ``SCHED_BATCH``."""
    with contextlib.suppress(OSError):
        os.nice(10)


# How often a job's own pool asks whether its job still runs.
JOB_CHECK_SECONDS = 2.0


async def wait_for_job_end(job_id: str) -> None:
    """Return once Ray's job table says job ``job_id`` ended (checked every JOB_CHECK_SECONDS)."""
    loop = asyncio.get_running_loop()
    while not await loop.run_in_executor(None, job_ended, job_id):
        await asyncio.sleep(JOB_CHECK_SECONDS)


def job_ended(job_id: str | None) -> bool:
    """Whether Ray's job table says job ``job_id`` ended (False where it cannot be told)."""
    try:
        return job_id is not None and _compat.ray_job_is_dead(job_id)
    except Exception:
        return False


def fedckpt_version() -> str:
    return __version__


def actor_options(namespace: str, name: str) -> dict[str, Any]:
    """How every writer actor (home or node writer) of a pool is created."""
    return {
        "name": name,
        "namespace": namespace,
        "lifetime": "detached",  # not owned by whichever client process happened to create it
        "get_if_exists": True,
        # A runtime env of its own gives the writer a process of its own: without it the writer takes
        # one of the idle workers Ray starts ahead for the first tasks and actors (Flower's ClientApp
        # actors), and one of those then waits for a process to start.
        "runtime_env": {"env_vars": _writer_env()},
    }


def _writer_env() -> dict[str, str]:
    # Ray's workers start at nice 15 (RayConfig's worker_niceness), training's included: the writer's
    # own start (imports, connecting) runs below them, until it switches to run_as_background_work.
    env = {"FEDCKPT_WRITER_PROCESS": "1", "RAY_worker_niceness": "19"}
    if CLOCK_OFFSET_FILE_ENV in os.environ:  # fault injection (tests): a node whose clock is off
        env[CLOCK_OFFSET_FILE_ENV] = os.environ[CLOCK_OFFSET_FILE_ENV]
    return env


def shared_counter() -> SequenceCounter | None:
    try:
        return SequenceCounter.create()
    except StagingFull:
        log.warning("fedckpt: /dev/shm is full; callers on this node reach writer %s through Ray calls", os.getpid())
        return None
