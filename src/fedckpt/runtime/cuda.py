"""GPU saves: a snapshot's CUDA tensors copied straight into the staging memory, without blocking.

```
save (caller's thread)
  host-memory sources: copied into the segment now (numpy), as for any save
  per device: side stream waits for the caller's current stream (the state at the call)
              copy_(non_blocking) of each tensor's bytes -> its offset in the segment
              record D (a blocking-sync event: whoever waits on it sleeps)
              default mode: the caller's current stream waits on D (the GPU orders it, the CPU does not wait)
  return
completion thread (runtime/completion.py): D.synchronize(), then the save is sent to its writer
```

A staging segment is registered with CUDA (``cudaHostRegister``, page-locked) the first time a GPU
save uses it, and stays registered while it lives: a copy into registered memory runs at the
page-locked speed and is truly asynchronous, where one into plain memory runs at a third of that and
blocks the caller. :class:`RegisteredPool` keeps the registrations of every segment of the process
(every client it runs), least recently used first, within ``max_registered_bytes``, and undoes each
before its segment is unmapped (never while a copy into it is in flight). The GPU path prefers free
segments already registered.

Fallbacks, each logged once: a segment that cannot be registered (refused, or over the cap) is
filled through a pinned bounce buffer (the device copy is still asynchronous; the completion thread
moves the bytes into the segment); without ``/dev/shm`` the bytes go through a pinned buffer into
Ray's object store; a pinned allocation refused copies with ``.to("cpu")``, blocking.

The source tensors are kept alive until their copies completed, so that the caching allocator never
hands their memory to other work while a copy still reads it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from fedckpt import _compat
from fedckpt.runtime import stats
from fedckpt.runtime.staging import Segment
from fedckpt.snapshot import DevicePart, Snapshot

log = logging.getLogger("fedckpt")

_logged: set[str] = set()


def log_once(key: str, message: str, *args: object) -> None:
    """Log a fallback the first time this process takes it."""
    if key not in _logged:
        _logged.add(key)
        log.warning(message, *args)


# ---- registered memory ------------------------------------------------------------------------------

# Dest views cached per registration, at most (a model's tensors land at the same offsets every save).
SLICE_CACHE_ENTRIES = 4096


@dataclass(eq=False)
class Registration:
    """A staging segment registered with CUDA, with a uint8 tensor over its whole mapping."""

    segment: Segment
    host: torch.Tensor
    device: int | None  # the device current when it was registered (undone there too)
    copies: int = 0  # copies into it in flight: it is never unregistered meanwhile
    slices: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    def slice(self, offset: int, nbytes: int) -> torch.Tensor:
        """The destination of ``nbytes`` at ``offset`` (cached: slicing costs a microsecond or two a tensor)."""
        view = self.slices.get((offset, nbytes))
        if view is None:
            if len(self.slices) >= SLICE_CACHE_ENTRIES:
                self.slices.clear()
            view = self.slices[(offset, nbytes)] = self.host[offset : offset + nbytes]
        return view


def _on_own_thread(call: Callable[[], int], device: int | None = None) -> int:
    """Run a CUDA runtime call on a short-lived thread of its own, with ``device`` current there (a
    fresh thread's is device 0, whose context a process using another GPU never made), and return
    its error code.

    A failed call stays that thread's "last CUDA error", which torch's next kernel launch check on
    the same thread would raise: the caller's thread (training) must never be left with one.
    """
    result: list[int] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            if device is not None:
                torch.cuda.set_device(device)
            result.append(call())
        except BaseException as error:  # handed to the caller below
            failure.append(error)

    thread = threading.Thread(target=run, name="fedckpt-cuda-register", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


class RegisteredPool:
    """The staging segments of this process registered with CUDA, least recently used first, at
    most ``max_bytes`` together. Shared by every save of the process (every client it runs)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._registrations: OrderedDict[Segment, Registration] = OrderedDict()
        self._closing: dict[Segment, Callable[[], None]] = {}  # each segment's before_close callback
        self._lock = threading.Lock()
        self.registered_bytes = 0

    def registered(self, segment: Segment) -> bool:
        """Whether ``segment`` is registered (for the arena's choice among free segments)."""
        return segment in self._registrations

    def acquire(self, segment: Segment, device: int | None = None) -> Registration | None:
        """``segment``'s registration, made now (with ``device`` current) if it has none, evicting the
        least recently used idle ones past the cap; held for one copy until :meth:`release`. None if it
        cannot be registered."""
        with self._lock:
            registration = self._registrations.get(segment)
            if registration is None:
                registration = self._register(segment, device)
                if registration is None:
                    return None
            self._registrations.move_to_end(segment)
            registration.copies += 1
            return registration

    def release(self, registration: Registration) -> None:
        """A copy into ``registration``'s segment completed."""
        with self._lock:
            registration.copies -= 1

    def _register(self, segment: Segment, device: int | None) -> Registration | None:
        if segment.size > self.max_bytes:
            log_once(
                "over-cap",
                "fedckpt: a %.0f MiB staging segment is more than max_registered_bytes (%.0f MiB) allows to register "
                "with CUDA: GPU saves of that size go through a pinned bounce buffer (one host copy more, in the "
                "background). Raise fedckpt.init(max_registered_bytes=...) to avoid it.",
                segment.size / (1 << 20), self.max_bytes / (1 << 20),
            )  # fmt: skip
            return None
        for other, idle in list(self._registrations.items()):  # least recently used first
            if self.registered_bytes + segment.size <= self.max_bytes:
                break
            if idle.copies == 0:
                self._unregister(other)
                other.before_close.remove(self._closing.pop(other))
        if self.registered_bytes + segment.size > self.max_bytes:
            log_once(
                "cap-busy",
                "fedckpt: max_registered_bytes (%.0f MiB) is taken by segments with copies in flight: this GPU save "
                "goes through a pinned bounce buffer",
                self.max_bytes / (1 << 20),
            )  # fmt: skip
            return None
        start = time.perf_counter()
        code = _on_own_thread(partial(_compat.cuda_host_register, segment.array.ctypes.data, segment.size), device)
        stats.recorder.add(registration_seconds=time.perf_counter() - start)
        if code != 0:
            log_once(
                "refused",
                "fedckpt: CUDA refused to register a staging segment (cudaHostRegister error %d): GPU saves go "
                "through a pinned bounce buffer (one host copy more, in the background)",
                code,
            )  # fmt: skip
            return None
        registration = Registration(segment, torch.from_numpy(segment.array), device)
        self._registrations[segment] = registration
        self.registered_bytes += segment.size
        callback = partial(self._segment_closing, segment)
        self._closing[segment] = callback
        segment.before_close.append(callback)
        return registration

    def _segment_closing(self, segment: Segment) -> None:
        """The arena unmaps ``segment``: its registration goes first (its copies completed: a segment is
        released only then)."""
        with self._lock:
            if segment in self._registrations:
                self._unregister(segment)
                self._closing.pop(segment, None)

    def _unregister(self, segment: Segment) -> None:
        registration = self._registrations.pop(segment)
        registration.slices.clear()
        registration.host = torch.empty(0, dtype=torch.uint8)  # no tensor keeps the mapping exported
        self.registered_bytes -= segment.size
        try:
            code = _on_own_thread(partial(_compat.cuda_host_unregister, segment.array.ctypes.data), registration.device)
        except Exception as error:  # CUDA torn down first (at exit): the mapping goes all the same
            log.warning("fedckpt: cudaHostUnregister of a staging segment failed: %s: %s", type(error).__name__, error)
            return
        if code != 0:
            log.warning("fedckpt: cudaHostUnregister of a staging segment failed (error %d)", code)


# ---- copies -------------------------------------------------------------------------------------------


@dataclass(eq=False)
class DeviceCopy:
    """The copies queued on one device's side stream for a snapshot, and the event recorded after them."""

    device: torch.device
    done: torch.cuda.Event


@dataclass(eq=False)
class PendingCopy:
    """A snapshot's device-to-host copies, queued. :meth:`complete` waits for them and then runs
    ``finish`` (host-side work: a bounce buffer into the segment, the bytes into Ray's object store)."""

    copies: list[DeviceCopy]
    sources: list[torch.Tensor]  # kept alive until the copies completed: their memory is not reused meanwhile
    finish: Callable[[], None] | None = None
    registration: Registration | None = None
    pool: RegisteredPool | None = None
    completed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def complete(self, finish: bool = True) -> None:
        """Wait until the copies completed (sleeping: the events are blocking-sync), run ``finish`` (unless
        ``finish=False``: the bytes are not wanted any more), and let go of the sources. Once; a second
        caller waits for the first."""
        with self._lock:
            if self.completed:
                return
            try:
                for copy in self.copies:
                    with _on_device(copy.device):  # this thread's CUDA calls go to that device's context
                        copy.done.synchronize()
                if finish and self.finish is not None:
                    self.finish()
            finally:
                self.completed = True
                self.finish = None
                self.sources = []
                _forget(self)
                if self.registration is not None and self.pool is not None:
                    self.pool.release(self.registration)
                    self.registration = None


def _on_device(device: torch.device) -> contextlib.AbstractContextManager[object]:
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# Copies queued and not yet known complete: what the overlap mode's hooks make the GPU wait for.
_unconfirmed: list[PendingCopy] = []
_unconfirmed_lock = threading.Lock()


def _forget(copy: PendingCopy) -> None:
    with _unconfirmed_lock:
        if copy in _unconfirmed:
            _unconfirmed.remove(copy)


def order_after_pending_copies() -> None:
    """Make this thread's current stream, on each device with copies in flight, wait for them: work
    queued on it from now on (an optimizer step, a ``load_state_dict``) runs after the copies. The
    CPU does not wait. Nothing to do (no CUDA call) when no copy is in flight."""
    if not _unconfirmed:
        return
    with _unconfirmed_lock:
        pending = list(_unconfirmed)
    for copy in pending:
        for device_copy in copy.copies:
            torch.cuda.current_stream(device_copy.device).wait_event(device_copy.done)


_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """This process's copy stream for ``device`` (one per device, made once)."""
    stream = _side_streams.get(device)
    if stream is None:
        stream = _side_streams[device] = torch.cuda.Stream(device=device)
    return stream


class DeviceStaging:
    """Queues the copies of snapshots' CUDA sources into host memory: registered staging segments,
    or pinned buffers where those cannot be had."""

    def __init__(self, max_registered_bytes: int) -> None:
        self.pool = RegisteredPool(max_registered_bytes)
        stats.recorder.registered = lambda: self.pool.registered_bytes

    def into_segment(self, snapshot: Snapshot, segment: Segment, overlap: bool) -> PendingCopy | None:
        """Fill ``segment`` with ``snapshot``: its host-memory bytes now, its device bytes queued (None:
        copied already, blocking, as a last resort)."""
        snapshot.copy_into(segment.array)
        parts = snapshot.device_parts
        first = parts[0].view.device
        registration = self.pool.acquire(segment, first.index if first.type == "cuda" else None)
        if registration is not None:
            try:
                return self._queue(parts, registration.slice, overlap, registration)
            except BaseException:
                self.pool.release(registration)
                raise
        bounce = _pinned(snapshot.nbytes)
        if bounce is None:
            _copy_blocking(parts, segment.array)
            return None
        pending = self._queue(parts, partial(_slice, bounce), overlap)
        pending.finish = partial(_unbounce, bounce.numpy(), segment.array, parts)
        return pending

    def into_pinned(self, snapshot: Snapshot, overlap: bool) -> tuple[np.ndarray, PendingCopy | None]:
        """``snapshot`` into a pinned buffer (no ``/dev/shm``: for Ray's object store), its device bytes
        queued; returns the buffer's bytes as a numpy array."""
        buffer = _pinned(snapshot.nbytes)
        if buffer is None:
            array = np.empty(snapshot.nbytes, dtype=np.uint8)
            snapshot.copy_into(array)
            _copy_blocking(snapshot.device_parts, array)
            return array, None
        array = buffer.numpy()
        snapshot.copy_into(array)
        pending = self._queue(snapshot.device_parts, partial(_slice, buffer), overlap)
        pending.sources.append(buffer)  # kept until the copies completed, with the sources
        return array, pending

    def _queue(
        self,
        parts: list[DevicePart],
        destination: Callable[[int, int], torch.Tensor],
        overlap: bool,
        registration: Registration | None = None,
    ) -> PendingCopy:
        """Queue a copy of each part to ``destination(offset, nbytes)``, on each device's side stream
        after what the caller's current stream holds now."""
        by_device: dict[torch.device, list[DevicePart]] = {}
        for part in parts:
            by_device.setdefault(part.view.device, []).append(part)
        copies: list[DeviceCopy] = []
        try:
            for device, group in by_device.items():
                current = torch.cuda.current_stream(device)
                side = side_stream(device)
                side.wait_stream(current)  # the state at the call: after everything the caller queued so far
                with torch.cuda.stream(side):
                    for part in group:
                        if part.nbytes:
                            destination(part.offset, part.nbytes).copy_(part.view, non_blocking=True)
                done = torch.cuda.Event(blocking=True)  # the completion thread sleeps on it instead of spinning
                done.record(side)
                if not overlap:
                    current.wait_event(done)  # the caller's later work (its mutations) runs after the copy
                copies.append(DeviceCopy(device, done))
        except BaseException:
            for device in by_device:  # nothing may still write into memory that goes back to its pool
                side_stream(device).synchronize()
            raise
        pending = PendingCopy(copies, [part.view for part in parts], registration=registration, pool=self.pool)
        with _unconfirmed_lock:
            _unconfirmed.append(pending)
        return pending


def _slice(buffer: torch.Tensor, offset: int, nbytes: int) -> torch.Tensor:
    return buffer[offset : offset + nbytes]


def _pinned(nbytes: int) -> torch.Tensor | None:
    """A page-locked host buffer (torch's caching host allocator reuses them), or None if refused."""
    try:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    except RuntimeError as error:
        log_once(
            "no-pinned",
            "fedckpt: no page-locked memory could be had (%s): GPU saves copy with .to('cpu'), blocking",
            error,
        )
        return None


def _unbounce(bounce: np.ndarray, segment: np.ndarray, parts: list[DevicePart]) -> None:
    """The device parts' bytes, from the bounce buffer into the segment (numpy: no OpenMP threads)."""
    for part in parts:
        segment[part.offset : part.offset + part.nbytes] = bounce[part.offset : part.offset + part.nbytes]


def _copy_blocking(parts: list[DevicePart], array: np.ndarray) -> None:
    for part in parts:
        array[part.offset : part.offset + part.nbytes] = part.view.cpu().numpy()
