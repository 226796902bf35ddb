"""fedckpt's own background threads in a caller process (the watcher aside): each one stops when
asked, and they are all stopped and joined before Ray disconnects at exit, never left inside a Ray
call while the interpreter shuts down (Ray documents crashes for that)."""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable

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
