"""The writer pool: finding or creating the writer actors of a namespace, and where each one runs."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from typing import Any

import ray

from fedckpt.runtime import ray_session
from fedckpt.runtime.messages import WriterInfo, WriterStats
from fedckpt.runtime.settings import Settings
from fedckpt.runtime.writer import writer_actor_class
from fedckpt.runtime.writer.incarnation import CLOCK_OFFSET_FILE_ENV

log = logging.getLogger("fedckpt")


def writer_name(index: int) -> str:
    return f"fedckpt-writer-{index}"


def shard_of(key: str, pool_size: int) -> int:
    """The writer index that owns ``key``: stable across processes and runs."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") % pool_size


class WriterPool:
    """The writers of one namespace, as this process knows them: handles, and who and where each is.

    The pool's size, coalescing and I/O threads are whatever the process that created it chose.
    Writers are detached named actors, so a pool outlives whichever client process created it.
    """

    def __init__(self, namespace: str, handles: list[Any], infos: list[WriterInfo]) -> None:
        self.namespace = namespace
        self.handles = handles
        self.infos = infos
        self.session = ray_session.session_id()
        self.generation = ray_session.generation

    @property
    def size(self) -> int:
        return len(self.handles)

    def owner_of(self, key: str) -> int:
        return shard_of(key, self.size)

    @classmethod
    def create(cls, settings: Settings) -> WriterPool:
        """Create the pool of ``settings.namespace``, or join it if it exists (its settings win)."""
        actor = writer_actor_class()
        first = actor.options(**_actor_options(settings.namespace, 0)).remote(
            0, settings.num_writers, settings.coalesce, settings.io_threads
        )
        info = ray.get(first.describe.remote())
        if info.pool_size != settings.num_writers:
            log.info("fedckpt: joining an existing pool of %d writers", info.pool_size)
        rest = [
            actor.options(**_actor_options(settings.namespace, index)).remote(
                index, info.pool_size, info.coalesce, info.io_threads
            )
            for index in range(1, info.pool_size)
        ]
        return cls(settings.namespace, [first, *rest], [info, *_describe(rest)])

    @classmethod
    def find(cls, settings: Settings) -> WriterPool | None:
        """The pool of ``settings.namespace`` if one runs, else None."""
        try:
            first = ray.get_actor(writer_name(0), namespace=settings.namespace)
        except ValueError:
            return None
        info = ray.get(first.describe.remote())
        rest = [ray.get_actor(writer_name(index), namespace=settings.namespace) for index in range(1, info.pool_size)]
        return cls(settings.namespace, [first, *rest], [info, *_describe(rest)])

    def refresh(self, index: int) -> WriterInfo:
        """Ask writer ``index`` who it is now: after it died, this waits until Ray restarted it."""
        self.infos[index] = ray.get(self.handles[index].describe.remote())
        return self.infos[index]

    def stats(self) -> list[WriterStats]:
        return ray.get([handle.stats.remote() for handle in self.handles])

    def stop(self) -> None:
        """Stop every writer once its queued saves are written."""
        for handle in self.handles:
            with contextlib.suppress(ray.exceptions.RayActorError):  # exiting is how stop() answers
                ray.get(handle.stop.options(max_task_retries=0).remote())


def _actor_options(namespace: str, index: int) -> dict[str, Any]:
    return {
        "name": writer_name(index),
        "namespace": namespace,
        "lifetime": "detached",  # not owned by whichever client process happened to create it
        "get_if_exists": True,
        # A runtime env of its own gives the writer a process of its own: without it the writer takes
        # one of the idle workers Ray starts ahead for the first tasks and actors (Flower's ClientApp
        # actors), and one of those then waits for a process to start.
        "runtime_env": {"env_vars": _writer_env()},
    }


def _writer_env() -> dict[str, str]:
    env = {"FEDCKPT_WRITER_PROCESS": "1"}
    if CLOCK_OFFSET_FILE_ENV in os.environ:  # fault injection (tests): a node whose clock is off
        env[CLOCK_OFFSET_FILE_ENV] = os.environ[CLOCK_OFFSET_FILE_ENV]
    return env


def _describe(handles: list[Any]) -> list[WriterInfo]:
    """Every writer's info (this also waits until each has started)."""
    return ray.get([handle.describe.remote() for handle in handles])
