"""Process-wide runtime lifecycle: ``init``, ``flush``, ``shutdown`` and the flush at exit."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import ray

from fedckpt.runtime import overlap_hooks, preemption, priming, ray_session, threads
from fedckpt.runtime.coordinator import Coordinator
from fedckpt.runtime.settings import Settings
from fedckpt.storage.base import close_file_systems, set_default_storage_options

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger("fedckpt")

_coordinator: Coordinator | None = None
_lock = threading.Lock()

# How long ``ray.shutdown()`` waits for the saves still pending in the cluster before it goes on.
SHUTDOWN_FLUSH_TIMEOUT_SECONDS = 600.0


def init(
    num_writers: int | None = None,
    writers_per_node: int | None = None,
    namespace: str | None = None,
    max_inflight_bytes: int | None = None,
    coalesce: bool | None = None,
    io_threads: int | None = None,
    shared_memory_staging: bool | None = None,
    preemption_grace_seconds: float | None = None,
    storage_options: Mapping[str, Any] | None = None,
    overlap: bool | None = None,
    max_registered_bytes: int | None = None,
) -> None:
    """Configure the runtime and start (or join) Ray and the writer pool now.

    Optional: without it, the first save does the same with defaults (``FEDCKPT_*`` environment
    variables override them). ``num_writers`` (the writers that order saves, each the home of a
    share of the keys), ``writers_per_node`` (the writers that write the saves staged on a node whose
    keys' home runs elsewhere), ``coalesce`` and ``io_threads`` belong to the pool and are set by the
    first process that creates it; ``max_inflight_bytes`` caps the snapshot
    bytes this process has in flight before a save waits (backpressure). With
    ``shared_memory_staging`` (the default where ``/dev/shm`` is writable) a save is copied into
    reused shared memory that writers on the same node read directly; without it, or for a writer
    on another node, the copy goes into Ray's object store. On SIGTERM (preemption by Slurm or
    Kubernetes) the saves already acknowledged get ``preemption_grace_seconds`` (default 25; 0: leave
    SIGTERM alone) to reach storage, then the handler that was in place runs (see
    :mod:`fedckpt.runtime.preemption`; installed from the main thread only). ``storage_options`` are
    fsspec's options for checkpoint URLs (``s3://...``: ``endpoint_url``, ``key``, ``secret``, ...),
    for this process's saves and loads; without them credentials come from the environment.

    GPU saves (models and states with CUDA tensors): a save returns once its copies into the staging
    memory are queued. With ``overlap`` False (the default) the caller's CUDA stream waits for them (the
    GPU orders it, the CPU does not wait); with True only in-place mutations do (optimizer steps,
    ``load_state_dict`` into a saved module, :func:`wait_staged`), and the copy overlaps the next
    forward and backward passes: see docs/design.md, "GPU saves", for the contract. Each checkpointer's
    ``overlap=`` overrides it. ``max_registered_bytes`` caps the staging memory this process registers
    with CUDA (page-locked; default 4 GiB).
    """
    global _coordinator
    if storage_options is not None:
        set_default_storage_options(storage_options)
    defaults = Settings.from_env()
    chosen = {
        "num_writers": num_writers, "writers_per_node": writers_per_node, "namespace": namespace,
        "max_inflight_bytes": max_inflight_bytes,
        "coalesce": coalesce, "io_threads": io_threads, "shared_memory_staging": shared_memory_staging,
        "preemption_grace_seconds": preemption_grace_seconds, "overlap": overlap,
        "max_registered_bytes": max_registered_bytes,
    }  # fmt: skip
    settings = Settings(
        num_writers=defaults.num_writers if num_writers is None else num_writers,
        writers_per_node=defaults.writers_per_node if writers_per_node is None else writers_per_node,
        namespace=defaults.namespace if namespace is None else namespace,
        max_inflight_bytes=defaults.max_inflight_bytes if max_inflight_bytes is None else max_inflight_bytes,
        coalesce=defaults.coalesce if coalesce is None else coalesce,
        io_threads=defaults.io_threads if io_threads is None else io_threads,
        shared_memory_staging=(
            defaults.shared_memory_staging if shared_memory_staging is None else shared_memory_staging
        ),
        preemption_grace_seconds=(
            defaults.preemption_grace_seconds if preemption_grace_seconds is None else preemption_grace_seconds
        ),
        overlap=defaults.overlap if overlap is None else overlap,
        max_registered_bytes=defaults.max_registered_bytes if max_registered_bytes is None else max_registered_bytes,
        explicit=defaults.explicit | {name for name, value in chosen.items() if value is not None},
    ).validated()
    with _lock:
        if _coordinator is not None:
            try:
                if _coordinator.has_pool:  # saves in flight belong to the pool it holds; none without one
                    _coordinator.flush()
            finally:
                _coordinator.forget()
                _coordinator = None
        overlap_hooks.remove_all()  # the next save in overlap mode installs them again
        configured = Coordinator(settings)
    try:
        configured.writers()
    except BaseException:  # a pool this process may not join: the next call starts afresh
        configured.forget()
        raise
    with _lock:
        _coordinator = configured


def coordinator() -> Coordinator:
    """This process's coordinator, created with default settings on first use."""
    global _coordinator
    with _lock:
        if _coordinator is None:
            _coordinator = Coordinator(Settings.from_env())
    return _coordinator


# How often a ServerApp's background start looks whether the simulation connected it to Ray yet
# (Ray has no hook for it).
RAY_UP_CHECK_SECONDS = 0.02


def start_writers_when_ray_is_up(within: float = 300.0, models: Sequence[nn.Module] = ()) -> threading.Thread:
    """Create the writer pool in the background as soon as this process is connected to Ray, warm
    this process up as :func:`warm_up_in_background` does (channels open, staging memory mapped),
    then pay the first save's one-time costs (:mod:`fedckpt.runtime.priming`), ``models``' own included.

    For a Flower ServerApp: its ``main()`` starts before the simulation starts Ray, and without
    this the first client to save would wait for the writers to start, and the server's first round
    for its channel, its staging memory and its first save's pickling. Gives up after ``within``
    seconds, or at exit; a save creates the pool itself anyway.
    """

    def start() -> None:
        deadline = time.monotonic() + within
        while not ray.is_initialized():
            if time.monotonic() > deadline or threads.stopping.wait(RAY_UP_CHECK_SECONDS):
                return
        try:
            coordinator().warm_up()  # creates the pool if no process has yet
        except Exception as error:  # the first save will try again and raise
            log.warning("fedckpt: starting the writer pool in the background failed: %s", error)
        try:
            priming.prime_serialization()
            priming.prime_models(models)
        except Exception as error:  # the first save pays these costs itself, and raises if it fails
            log.debug("fedckpt: priming the first save failed: %s", error)

    return threads.start("fedckpt-start-writers", start)


_warming_up: threading.Thread | None = None


def warm_up_in_background() -> None:
    """In a process already connected to Ray (a Flower ClientApp worker), join the writer pool, open
    the channels to this node's writers and pay the first save's and load's one-time costs
    (:mod:`fedckpt.runtime.priming`) on a background thread, once: the process's first save, after a
    round of training, then need not wait for them. Does nothing without Ray (it never starts Ray)."""
    global _warming_up
    if not ray.is_initialized():
        return
    with _lock:
        if _warming_up is not None:
            return
        _warming_up = threads.start("fedckpt-warm-up", _warm_up)


def _warm_up() -> None:
    threads.background_calls.start()  # a handler's first background read then waits for no thread to start
    try:
        coordinator().warm_up()
        priming.prime_serialization()
    except Exception as error:  # the first save tries again, and raises
        log.debug("fedckpt: warming up in the background failed: %s", error)


def flush(timeout: float | None = None) -> None:
    """Wait until every save issued before this call, by any process, is durable on storage.

    Raises ``CheckpointError`` for saves that failed, and ``TimeoutError`` if ``timeout`` seconds
    pass first (saves still pending then go on in the background).
    """
    coordinator().flush(timeout=timeout)


def wait_staged(timeout: float | None = None) -> None:
    """Block until every save this process made so far has left the GPU and was sent to its writer.

    A save of CUDA tensors returns once its copies are queued; until they complete, other processes'
    loads and flushes do not see it (a flush or load in this process waits for it anyway). In overlap
    mode, call it before changing saved tensors in place other than by an optimizer step or
    ``load_state_dict`` (see docs/design.md, "GPU saves"). Returns at once when nothing is being
    copied (always, without a GPU); ``TimeoutError`` after ``timeout`` seconds.
    """
    coordinator().wait_staged(timeout)


def flush_before_ray_shutdown() -> BaseException | None:
    """What ``ray.shutdown()`` does first (see :mod:`fedckpt.runtime.ray_session`): wait for every save
    pending in the cluster; returns the failure to raise once Ray is down."""
    failure = None
    try:
        if not preemption.sigterm_handled.is_set():  # else the SIGTERM handler flushed already
            coordinator().flush(timeout=SHUTDOWN_FLUSH_TIMEOUT_SECONDS)
    except Exception as error:  # Ray still goes down; the caller hears of it afterwards
        log.error("fedckpt: saves pending at ray.shutdown() failed or timed out: %s", error)
        failure = error
    coordinator().stop_watcher()  # not in a Ray call while Ray disconnects; a new pool restarts it
    return failure


def _flush_within(timeout: float) -> None:
    coordinator().flush(timeout=timeout)


preemption.flush = _flush_within


def shutdown() -> None:
    """Flush, stop the writer pool, and stop Ray if fedckpt started it.

    Call it from the program that owns the run (a script, a ServerApp), not from a client that
    shares the pool with others: a later save anywhere starts a new pool. The object-store sessions
    this process opened are closed too (a later save or load opens new ones).
    """
    global _coordinator
    with _lock:
        instance, _coordinator = _coordinator, None
    overlap_hooks.remove_all()
    if instance is None:
        close_file_systems()
        return
    try:
        if ray.is_initialized() or instance.pool_starting:
            instance.flush()  # waits for a pool starting in the background first
            instance.stop_writers()
    finally:
        instance.forget()  # unregisters the exit handler, which would have closed the sessions
        close_file_systems()  # now, while fsspec's event loop runs: not from s3fs's finalizers at exit
        if instance.started_ray and ray.is_initialized():
            ray_session.unwrapped_shutdown()  # everything is flushed already
