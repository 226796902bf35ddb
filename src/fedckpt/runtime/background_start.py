"""Saves made while the writer pool starts: a program's first save does not wait for Ray.

Starting a local Ray instance and the writer pool takes seconds, and a plain PyTorch program's
first save would block for all of it. Instead a save made while there is no pool yet is copied into
private memory (the one blocking copy, as any save) and held, and a background thread starts Ray
and the pool and then makes the held saves, in the order they were made, as if they were made then.
Saves made meanwhile are held behind them. A held save that cannot be made (the pool does not
start) is an error at the next save of its key and at ``flush()``, as for any save that fails.

The bytes held are capped (``max_inflight_bytes``): past the cap a save waits for the start.

The thread that started Ray stays parked until the process exits: Ray's local processes are made to
die with the thread that started them (``PR_SET_PDEATHSIG`` is per thread on Linux).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import ray

from fedckpt.errors import CheckpointError
from fedckpt.runtime import failpoints
from fedckpt.runtime.messages import SaveRequest
from fedckpt.snapshot import Snapshot

log = logging.getLogger("fedckpt")


@dataclass(frozen=True)
class HeldSave:
    """A save made before the pool was up: its requests and a private copy of its snapshot."""

    requests: list[SaveRequest]
    snapshot: Snapshot


def private_copy(snapshot: Snapshot) -> Snapshot:
    """The snapshot's bytes copied into memory of its own, with the same layout (the caller may
    change its tensors as soon as the save returns)."""
    buffer = np.empty(snapshot.nbytes, dtype=np.uint8)
    snapshot.copy_into(buffer)
    for part in snapshot.device_parts:  # a GPU save made this early is copied before it returns
        buffer[part.offset : part.offset + part.nbytes] = part.view.cpu().numpy()
    copied = Snapshot(snapshot.kind, snapshot.nbytes, [buffer], snapshot.layout)
    copied.__dict__["packed_layout"] = snapshot.packed_layout  # made once (a cached property)
    return copied


class BackgroundStart:
    """Holds saves while a background thread starts the pool, then makes them in order.

    ``start_pool`` starts (or joins) Ray and the pool; ``save_now`` makes one save on the pool there
    is then; ``max_held_bytes`` caps the bytes held.
    """

    def __init__(
        self,
        start_pool: Callable[[], None],
        save_now: Callable[[list[SaveRequest], Snapshot], None],
        max_held_bytes: int,
    ) -> None:
        self._start_pool = start_pool
        self._save_now = save_now
        self._max_held_bytes = max_held_bytes
        self._lock = threading.Lock()
        self._held: deque[HeldSave] = deque()
        self._held_bytes = 0
        self._running = False
        self._idle = threading.Event()
        self._idle.set()
        self._failures: dict[str, BaseException] = {}
        self.ray_started_here = False  # whether its thread started Ray (see flush_at_exit)

    @property
    def busy(self) -> bool:
        """Saves are held, or held saves failed and no one has been told yet."""
        with self._lock:
            return self._running or bool(self._failures)

    def hold(self, requests: list[SaveRequest], snapshot: Snapshot, save_now: Callable[[], bool]) -> bool:
        """Hold this save if saves are held already, or if ``save_now()`` says no (then start the pool
        in the background); False when the caller is to save now: ``save_now()``, or the cap is
        reached (the caller then waits for the start, :meth:`wait`)."""
        with self._lock:
            if not self._running and save_now():
                return False
            if self._held_bytes + snapshot.nbytes > self._max_held_bytes:
                return False
            self._held.append(HeldSave(requests, private_copy(snapshot)))
            self._held_bytes += snapshot.nbytes
            if not self._running:
                self._running = True
                self._idle.clear()
                threading.Thread(target=self._run, name="fedckpt-start-pool", daemon=True).start()
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no save is held (the start is over, its saves made or failed); False on timeout."""
        return self._idle.wait(timeout)

    def take_failures(self, keys: Iterable[str] | None = None) -> dict[str, BaseException]:
        """The held saves that could not be made, of ``keys`` (all: None), each reported once."""
        with self._lock:
            taken = {key: error for key, error in self._failures.items() if keys is None or key in keys}
            for key in taken:
                del self._failures[key]
        return taken

    def _run(self) -> None:
        ray_was_up = ray.is_initialized()
        start_failure = None
        try:
            failpoints.reach("background_start.starting")
            self._start_pool()
        except BaseException as error:  # every held save fails; the next save tries to start again
            log.error("fedckpt: the writer pool could not be started: %s: %s", type(error).__name__, error)
            start_failure = error
        started_ray = not ray_was_up and ray.is_initialized()
        self.ray_started_here = self.ray_started_here or started_ray
        self._make_held_saves(start_failure)
        if started_ray:
            threading.Event().wait()  # parked: Ray's local processes live as long as this thread

    def _make_held_saves(self, start_failure: BaseException | None) -> None:
        """Make the held saves in order, and those held meanwhile, until none is left (all fail if
        the pool did not start)."""
        while True:
            with self._lock:
                if not self._held:
                    self._running = False
                    self._idle.set()
                    return
                held = self._held[0]
            if start_failure is not None:
                self._record_failure(held, start_failure)
            else:
                try:
                    self._save_now(held.requests, held.snapshot)
                except BaseException as error:  # this save fails; those behind it go on
                    self._record_failure(held, error)
            with self._lock:
                self._held.popleft()
                self._held_bytes -= held.snapshot.nbytes

    def _record_failure(self, held: HeldSave, error: BaseException) -> None:
        failure = CheckpointError(
            f"a save made while the writer pool was starting could not be made ({type(error).__name__}: {error})"
        )
        failure.__cause__ = error
        with self._lock:
            for request in held.requests:
                self._failures[request.key] = failure
