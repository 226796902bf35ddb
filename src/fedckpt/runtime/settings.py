"""Runtime settings, from ``fedckpt.init`` arguments or ``FEDCKPT_*`` environment variables."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

T = TypeVar("T")

_ENV_VARIABLES = {
    "num_writers": "FEDCKPT_NUM_WRITERS",
    "writers_per_node": "FEDCKPT_WRITERS_PER_NODE",
    "namespace": "FEDCKPT_NAMESPACE",
    "max_inflight_bytes": "FEDCKPT_MAX_INFLIGHT_BYTES",
    "io_threads": "FEDCKPT_IO_THREADS",
    "shared_memory_staging": "FEDCKPT_SHARED_MEMORY",
    "preemption_grace_seconds": "FEDCKPT_PREEMPTION_GRACE_SECONDS",
    "overlap": "FEDCKPT_OVERLAP",
    "max_registered_bytes": "FEDCKPT_MAX_REGISTERED_BYTES",
}


def _env_number(name: str, default: T, kind: Callable[[str], T]) -> T:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return kind(value)
    except ValueError as error:
        raise ValueError(f"Environment variable {name}={value!r} is not a valid {kind.__name__}") from error


def _env_int(name: str, default: int) -> int:
    return _env_number(name, default, int)


# The settings that belong to the pool: fixed by the process that creates it.
POOL_SETTINGS = ("num_writers", "writers_per_node", "coalesce", "io_threads")


@dataclass(frozen=True)
class Settings:
    """How the runtime runs. ``num_writers``, ``coalesce`` and ``io_threads`` are fixed by whichever
    process creates the writer pool first; ``max_inflight_bytes`` is per process.

    ``namespace`` None (the default) gives each Ray job a pool of its own, which ends with the job;
    a name shares one pool among every job that names it. ``explicit`` holds the settings the
    program chose (``fedckpt.init`` arguments, ``FEDCKPT_*`` variables): a pool whose settings
    differ from those is an error, never joined silently.
    """

    num_writers: int = 1  # one process per pool: a writer process costs ~1 s of CPU to start
    # Per node whose callers save keys homed on another node (docs/design.md: clusters).
    writers_per_node: int = 1
    namespace: str | None = None
    max_inflight_bytes: int = 2 << 30
    coalesce: bool = True
    io_threads: int = 2
    shared_memory_staging: bool = True  # False: stage snapshots in Ray's object store instead
    # On SIGTERM (Slurm, Kubernetes: SIGKILL follows after their grace period, 30 s by default), this
    # long is given to the saves already acknowledged; 0 leaves SIGTERM alone.
    preemption_grace_seconds: float = 25.0
    # GPU saves (docs/design.md, "GPU saves"): False, the caller's CUDA stream waits for the copy of a
    # save (the GPU orders it, the CPU does not wait); True, only in-place mutations wait (optimizer steps,
    # load_state_dict into a saved module, fedckpt.wait_staged()), so the copy overlaps the next steps.
    overlap: bool = False
    # Staging memory registered with CUDA (page-locked) for this process's GPU saves, at most.
    max_registered_bytes: int = 4 << 30
    explicit: frozenset[str] = frozenset()

    @classmethod
    def from_env(cls) -> Settings:
        base = cls()
        named = {field: variable for field, variable in _ENV_VARIABLES.items() if os.environ.get(variable)}
        return replace(
            base,
            explicit=frozenset(named),
            num_writers=_env_int("FEDCKPT_NUM_WRITERS", base.num_writers),
            writers_per_node=_env_int("FEDCKPT_WRITERS_PER_NODE", base.writers_per_node),
            namespace=os.environ.get("FEDCKPT_NAMESPACE") or None,
            max_inflight_bytes=_env_int("FEDCKPT_MAX_INFLIGHT_BYTES", base.max_inflight_bytes),
            io_threads=_env_int("FEDCKPT_IO_THREADS", base.io_threads),
            shared_memory_staging=bool(_env_int("FEDCKPT_SHARED_MEMORY", int(base.shared_memory_staging))),
            preemption_grace_seconds=_env_number(
                "FEDCKPT_PREEMPTION_GRACE_SECONDS", base.preemption_grace_seconds, float
            ),
            overlap=bool(_env_int("FEDCKPT_OVERLAP", int(base.overlap))),
            max_registered_bytes=_env_int("FEDCKPT_MAX_REGISTERED_BYTES", base.max_registered_bytes),
        )

    def validated(self) -> Settings:
        if self.num_writers < 1:
            raise ValueError(f"num_writers must be at least 1, got {self.num_writers}")
        if self.writers_per_node < 1:
            raise ValueError(f"writers_per_node must be at least 1, got {self.writers_per_node}")
        if self.io_threads < 1:
            raise ValueError(f"io_threads must be at least 1, got {self.io_threads}")
        if self.max_inflight_bytes < 1:
            raise ValueError(f"max_inflight_bytes must be positive, got {self.max_inflight_bytes}")
        if self.max_registered_bytes < 0:
            raise ValueError(f"max_registered_bytes must be at least 0, got {self.max_registered_bytes}")
        if not self.preemption_grace_seconds >= 0:
            raise ValueError(f"preemption_grace_seconds must be at least 0, got {self.preemption_grace_seconds}")
        if self.namespace is not None and not self.namespace:
            raise ValueError("namespace must not be empty (None: a pool for this Ray job)")
        return self
