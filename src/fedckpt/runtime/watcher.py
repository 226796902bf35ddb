"""The watcher: a thread of each saving process that notices at once when a writer died, so that
what it lost is sent again without waiting for this process's next call (a server's round commit,
in another process, waits for those saves, and this process may stay idle for a long time)."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable
from typing import Any

import ray

from fedckpt.runtime.channel import ChannelClient

log = logging.getLogger("fedckpt")

# How often the watcher looks at saves sent with Ray calls (a writer on another node).
RAY_POLL_SECONDS = 0.2


class Watcher:
    """Wakes when a channel's writer hangs up (never for its notices: they wait for the next call),
    and every ``RAY_POLL_SECONDS`` while saves sent with Ray calls are pending.

    Args:
        channels: the open channels, by writer index.
        ray_saves: the saves in flight on the Ray route.
        writer_died: called with the index of a writer whose channel hung up.
        check_ray_saves: called with the Ray-route saves, to take in those that finished.
    """

    def __init__(
        self,
        channels: Callable[[], dict[int, ChannelClient]],
        ray_saves: Callable[[], list[Any]],
        writer_died: Callable[[int], None],
        check_ray_saves: Callable[[list[Any]], None],
    ) -> None:
        self._channels = channels
        self._ray_saves = ray_saves
        self._writer_died = writer_died
        self._check_ray_saves = check_ray_saves
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake_pipe = os.pipe()

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive() and not self._stop.is_set():
            return
        self._stop = threading.Event()  # a thread still stopping keeps its own, set, event
        self._thread = threading.Thread(target=self._watch, args=(self._stop,), name="fedckpt-watcher", daemon=True)
        self._thread.start()

    def stop(self, wait: float = 2.0) -> None:
        """Stop the thread (before Ray disconnects); ``start`` starts a new one."""
        self._stop.set()
        self.wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(wait)

    def wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_pipe[1], b"x")

    def _watch(self, stop: threading.Event) -> None:
        while not stop.is_set():
            channels = self._channels()
            poller = select.poll()
            poller.register(self._wake_pipe[0], select.POLLIN)
            by_fd = {}
            for index, client in channels.items():
                with contextlib.suppress(OSError, ValueError):
                    poller.register(client.fileno(), select.POLLRDHUP)
                    by_fd[client.fileno()] = index
            on_ray = self._ray_saves()
            events = poller.poll(RAY_POLL_SECONDS * 1000 if on_ray or not channels else None)
            if stop.is_set():
                return
            if not ray.is_initialized():
                return  # Ray went down under this process; the next pool starts a new watcher
            try:
                for fd, _ in events:
                    if fd == self._wake_pipe[0]:
                        os.read(fd, 4096)
                    elif fd in by_fd:
                        self._writer_died(by_fd[fd])
                if on_ray and ray.is_initialized():
                    self._check_ray_saves(on_ray)
            except Exception as error:  # Ray going down, a writer gone for good: the next flush raises it
                log.warning("fedckpt: could not send the saves of a writer that died again: %s", error)
                stop.wait(RAY_POLL_SECONDS)
