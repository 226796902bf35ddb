"""This process's counters: what ``fedckpt.stats()`` returns."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class ProcessStats:
    """What this process saved since it started (or since ``fedckpt.shutdown()``).

    Bytes are counted where they were staged: in this node's shared memory (written from there by a
    writer on the same node, whichever node its key's home is on), or in Ray's object store (no
    usable ``/dev/shm``, or a full staging budget). One snapshot saved under several keys is staged once.
    """

    saves: int  # checkpoint saves acknowledged (one per checkpoint file)
    snapshots: int  # save calls: one copy each
    bytes_shared_memory: int
    bytes_object_store: int
    resends: int  # saves sent again because their writer died before writing them
    blocked_seconds: float  # inside save calls: the snapshot, the copy, sending (backpressure included)
    waited_seconds: float  # inside flushes and waits for pending saves (loads of pending checkpoints)
    pending_saves: int = 0  # saves of this process not yet durable or failed (0 after a flush)
    pending_bytes: int = 0  # staged bytes they hold (0 after a flush)
    unknown_notices: int = 0  # writers' answers about saves this process never made (should stay 0)
    registration_seconds: float = 0.0  # registering staging memory with CUDA (GPU saves; once per segment)
    registered_bytes: int = 0  # staging memory registered with CUDA now (at most max_registered_bytes)


# Read from the coordinator and the GPU staging, not counted here.
_GAUGES = ("pending_saves", "pending_bytes", "unknown_notices", "registered_bytes")


class StatsRecorder:
    """Thread-safe accumulators behind :class:`ProcessStats`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = {field.name: 0 for field in fields(ProcessStats) if field.name not in _GAUGES}
        self._depth = threading.local()
        # The current coordinator's (pending saves, pending bytes, unknown notices).
        self.pending: Callable[[], tuple[int, int, int]] = lambda: (0, 0, 0)
        # The bytes of staging memory registered with CUDA now (runtime/cuda.py).
        self.registered: Callable[[], int] = lambda: 0

    def add(self, **amounts: float) -> None:
        with self._lock:
            for name, amount in amounts.items():
                self._values[name] += amount

    def timed(self, name: str) -> _Timed:
        """Add the time spent in the block to ``name`` (``blocked_seconds`` or ``waited_seconds``);
        a block inside another timed block of the same thread counts once (a module's save calls a
        checkpointer's, which calls the coordinator's)."""
        return _Timed(self, name)

    def snapshot(self) -> ProcessStats:
        pending_saves, pending_bytes, unknown = self.pending()
        with self._lock:
            values = dict(self._values)
        return ProcessStats(  # type: ignore[arg-type]
            **values, pending_saves=pending_saves, pending_bytes=pending_bytes, unknown_notices=unknown,
            registered_bytes=self.registered(),
        )  # fmt: skip


# Process-wide: the counters outlive a coordinator replaced by fedckpt.init() or fedckpt.shutdown().
recorder = StatsRecorder()


def stats() -> ProcessStats:
    """This process's save counters since it started: saves, bytes by transport, time blocked and waited."""
    return recorder.snapshot()


class _Timed:
    """:meth:`StatsRecorder.timed`'s block: a plain context manager (every save enters a few)."""

    def __init__(self, recorder: StatsRecorder, name: str) -> None:
        self._recorder = recorder
        self._name = name
        self._depth = 0
        self._start = 0.0

    def __enter__(self) -> None:
        depths = self._recorder._depth
        self._depth = getattr(depths, self._name, 0)
        setattr(depths, self._name, self._depth + 1)
        self._start = time.perf_counter()

    def __exit__(self, *exc_info: object) -> None:
        setattr(self._recorder._depth, self._name, self._depth)
        if self._depth == 0:
            self._recorder.add(**{self._name: time.perf_counter() - self._start})
