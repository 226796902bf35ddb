"""fedckpt's own background threads in a caller process (the watcher aside): each one stops when
asked, and they are all stopped and joined before Ray disconnects at exit, never left inside a Ray
call while the interpreter shuts down (Ray documents crashes for that)."""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger("fedckpt")

stopping = threading.Event()  # set at exit: every background thread returns as soon as it can
_threads: list[threading.Thread] = []
# Called at stop: threads asleep on their own condition wake up. Weak: an object replaced (a coordinator
# of an earlier fedckpt.init) is not kept alive by its waker.
_wakers: list[weakref.WeakMethod] = []
_lock = threading.Lock()


def start(name: str, target: Callable[[], None]) -> threading.Thread:
    """Run ``target`` on a daemon thread that :func:`stop_all` joins."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    with _lock:
        _threads[:] = [alive for alive in _threads if alive.is_alive()]
        _threads.append(thread)
    thread.start()
    return thread


def wake_on_stop(wake: Callable[[], None]) -> None:
    """Have :func:`stop_all` call the bound method ``wake`` after setting :data:`stopping` (for a thread
    that sleeps on a condition of its own rather than on :data:`stopping`), while its object lives."""
    with _lock:
        _wakers[:] = [waker for waker in _wakers if waker() is not None]
        _wakers.append(weakref.WeakMethod(wake))  # type: ignore[arg-type]


def stop_all(timeout: float) -> None:
    """Ask every background thread to stop and wait up to ``timeout`` seconds for each."""
    stopping.set()
    with _lock:
        threads = list(_threads)
        wakers = [waker() for waker in _wakers]
    for wake in wakers:
        if wake is not None:
            wake()
    for thread in threads:
        if thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("fedckpt: background thread %s did not stop within %.0f s", thread.name, timeout)


class BackgroundCalls:
    """One thread that runs short calls off the caller's path, in turn (a Flower client's reads that
    its training can hide). Submitting is a queue put: the caller never waits for a thread to start
    or to run. Calls still queued at exit fail with ``RuntimeError``."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the thread now (a process's warm-up does, so that its first call finds it running)."""
        with self._lock:
            if self._thread is None:
                wake_on_stop(self._wake)
                self._thread = start("fedckpt-background-calls", self._run)

    def submit(self, call: Callable[[], T]) -> Future[T]:
        """Run ``call`` on the thread; its future holds what it returned or raised."""
        self.start()
        future: Future[T] = Future()
        self._calls.put((call, future))
        return future

    def _wake(self) -> None:
        self._calls.put(None)

    def _run(self) -> None:
        while True:
            item = self._calls.get()
            if item is None or stopping.is_set():
                break
            call, future = item
            try:
                future.set_result(call())
            except BaseException as error:  # the caller that waits for it raises it
                future.set_exception(error)
        while item is not None or not self._calls.empty():  # at exit: what was not run never will be
            if item is not None:
                item[1].set_exception(RuntimeError("fedckpt stopped at exit before this background call ran"))
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                return


background_calls = BackgroundCalls()
