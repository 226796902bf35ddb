"""The writer pool: finding or creating the writer actors of a namespace, and where each one runs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import ray

from fedckpt.errors import CheckpointError
from fedckpt.runtime import ray_session
from fedckpt.runtime.messages import PoolShape, WriterInfo, WriterStats
from fedckpt.runtime.settings import POOL_SETTINGS, Settings
from fedckpt.runtime.shards import shard_of
from fedckpt.runtime.writer.actor import writer_actor_class
from fedckpt.runtime.writer.node_writer import NODE_WRITER_PREFIX, start_node_writers
from fedckpt.runtime.writer.process import actor_options, fedckpt_version

# How long finding a running pool waits for its writers to answer (a writer Ray is restarting after a
# crash answers within seconds): a name left by a writer that is not coming back must not hang a caller.
FIND_SECONDS = 60.0
# How long creating a pool waits for its first writer to start and answer (a process of its own).
START_SECONDS = 120.0


def writer_name(index: int) -> str:
    return f"fedckpt-writer-{index}"


class WriterPool:
    """The writers of one pool, as this process knows them: handles, and who and where each is.

    The pool's size, coalescing and I/O threads are whatever the process that created it chose.
    Writers are detached named actors, so a pool outlives whichever client process created it.
    """

    def __init__(self, namespace: str, handles: list[Any], infos: list[WriterInfo]) -> None:
        self.namespace = namespace
        self.handles = handles
        self.infos = infos
        self.session = ray_session.session_id()
        self.generation = ray_session.generation
        # Set once a writer is found ended for good: the pool was stopped (fedckpt.shutdown() or
        # stop_writers() by some process, or its job ended); the next call leaves it for a new one.
        self.stopped: BaseException | None = None
        self._nodes_with_writers: set[str] = set()

    @property
    def shape(self) -> PoolShape:
        return _shape_of(self.infos[0], self.namespace)

    def ensure_node_writers(self, node_id: str) -> None:
        """Start the writers of ``node_id`` (this process's node) unless they run: pinned to it, they
        write the saves staged there whose keys' homes run on other nodes."""
        if node_id in self._nodes_with_writers:
            return
        start_node_writers(self.shape, node_id)
        self._nodes_with_writers.add(node_id)

    @property
    def size(self) -> int:
        return len(self.handles)

    def owner_of(self, key: str) -> int:
        return shard_of(key, self.size)

    def keys_by_home(self, keys: Iterable[str]) -> dict[int, list[str]]:
        """``keys`` grouped by the index of their home, each group sorted."""
        homes: dict[int, list[str]] = {}
        for key in sorted(keys):
            homes.setdefault(self.owner_of(key), []).append(key)
        return homes

    @classmethod
    def create(cls, settings: Settings) -> WriterPool:
        """Create the pool of ``settings``' namespace, or join it if it exists (its settings win,
        unless this process chose others: then :class:`CheckpointError`)."""
        namespace, job_id = pool_namespace(settings)
        actor = writer_actor_class()
        shape = PoolShape(
            settings.num_writers, settings.writers_per_node, settings.coalesce, settings.io_threads, job_id, namespace
        )
        first, info = _first_writer(actor, shape, namespace)
        _check_joinable(info, settings, namespace)
        shape = _shape_of(info, namespace)  # the pool's, where it existed already
        rest = [
            actor.options(**actor_options(namespace, writer_name(index))).remote(index, shape)
            for index in range(1, info.pool_size)
        ]
        return cls(namespace, [first, *rest], [info, *_describe(rest)])

    @classmethod
    def find(cls, settings: Settings) -> WriterPool | None:
        """The pool of ``settings``' namespace if one runs, else None."""
        namespace, _ = pool_namespace(settings)
        try:
            first = ray.get_actor(writer_name(0), namespace=namespace)
            info = _describe([first], FIND_SECONDS)[0]
            _check_joinable(info, settings, namespace)
            rest = [ray.get_actor(writer_name(index), namespace=namespace) for index in range(1, info.pool_size)]
            return cls(namespace, [first, *rest], [info, *_describe(rest, FIND_SECONDS)])
        except (ValueError, ray.exceptions.RayActorError):  # none, or stopped: a stopped writer's name outlives it
            return None
        except ray.exceptions.GetTimeoutError:
            raise CheckpointError(
                f"The writer pool in Ray namespace {namespace!r} did not answer within {FIND_SECONDS:.0f} s "
                "(its writers are named, but not running: see `fedckpt status`)"
            ) from None

    def refresh(self, index: int, timeout: float | None = None) -> WriterInfo:
        """Ask writer ``index`` who it is now: after it died, this waits until Ray restarted it."""
        self.infos[index] = ray.get(self.handles[index].describe.remote(), timeout=timeout)
        return self.infos[index]

    def stats(self) -> list[WriterStats]:
        return ray.get([handle.stats.remote() for handle in self.handles])

    def node_writers(self) -> list[Any]:
        """The handles of every node writer of this pool (on any node)."""
        named = ray.util.list_named_actors(all_namespaces=True)
        handles = []
        for actor in named:
            if actor["namespace"] == self.namespace and actor["name"].startswith(NODE_WRITER_PREFIX):
                with contextlib.suppress(ValueError):  # gone meanwhile
                    handles.append(ray.get_actor(actor["name"], namespace=self.namespace))
        return handles

    def stop(self) -> None:
        """Stop every writer once its queued saves are written (homes first: they wait for the node
        writers' writes they ordered)."""
        for handle in [*self.handles, *self.node_writers()]:
            with contextlib.suppress(ray.exceptions.RayActorError):  # exiting is how stop() answers
                ray.get(handle.stop.options(max_task_retries=0).remote())


def pool_namespace(settings: Settings) -> tuple[str, str | None]:
    """The Ray namespace of the pool, and the job whose end ends it: by default each Ray job has a
    pool of its own (two jobs on one cluster never wait on each other's saves); a namespace the
    program names is shared by every job that names it, and lives until ``fedckpt.shutdown()``."""
    if settings.namespace is not None:
        return settings.namespace, None
    job_id = ray.get_runtime_context().get_job_id()
    return f"fedckpt-job-{job_id}", job_id


def _check_joinable(info: WriterInfo, settings: Settings, namespace: str) -> None:
    """A pool of another fedckpt version, or with settings other than those this process chose, is an error."""
    version = fedckpt_version()
    if info.version != version:
        raise CheckpointError(
            f"The writer pool in Ray namespace {namespace!r} runs fedckpt {info.version}, this process "
            f"fedckpt {version}: their messages and files may differ. Use the same version everywhere, "
            "or another namespace (fedckpt.init(namespace=...))"
        )
    pool = {
        "num_writers": info.pool_size, "writers_per_node": info.writers_per_node, "coalesce": info.coalesce,
        "io_threads": info.io_threads,
    }  # fmt: skip
    differ = {name: (getattr(settings, name), pool[name]) for name in POOL_SETTINGS if name in settings.explicit}
    differ = {name: values for name, values in differ.items() if values[0] != values[1]}
    if differ:
        described = ", ".join(f"{name}={mine!r} (the pool's: {theirs!r})" for name, (mine, theirs) in differ.items())
        raise CheckpointError(
            f"The writer pool in Ray namespace {namespace!r} was created with other settings than this "
            f"process chose: {described}. A pool's settings are fixed by the process that creates it; "
            "choose the same, or another namespace"
        )


def _shape_of(info: WriterInfo, namespace: str) -> PoolShape:
    """The shape a pool's writers were created with, as one of them describes it."""
    return PoolShape(info.pool_size, info.writers_per_node, info.coalesce, info.io_threads, info.job_id, namespace)


def _first_writer(actor: Any, shape: PoolShape, namespace: str) -> tuple[Any, WriterInfo]:
    """Writer 0 of the pool, started here or running already, and its info."""
    for _ in range(3):
        first = actor.options(**actor_options(namespace, writer_name(0))).remote(0, shape)
        try:
            return first, _describe([first], START_SECONDS)[0]
        except ray.exceptions.RayActorError:  # a stopped writer whose name Ray had not released yet
            continue
        except ray.exceptions.GetTimeoutError:
            break
    raise CheckpointError(
        f"Writer 0 of the pool in Ray namespace {namespace!r} did not start, or did not answer, within "
        f"{START_SECONDS:.0f} s (see `fedckpt status`, and Ray's logs of the actor {writer_name(0)!r})"
    )


def _describe(handles: list[Any], timeout: float | None = None) -> list[WriterInfo]:
    """Every writer's info (this also waits until each has started)."""
    return ray.get([handle.describe.remote() for handle in handles], timeout=timeout)
