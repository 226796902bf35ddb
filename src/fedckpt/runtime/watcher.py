"""The watcher: a thread of each saving process that sends a dead writer's saves again at once.

A server's round flush, in another process, waits for this process's saves, and this process may
stay idle for a long time, so it must not wait for its next call to notice. The thread sleeps in
``poll`` until a channel hangs up (its writer died: never for notices, which wait for the next
call) or it is woken (a save came back to STAGED: a Ray save's writer said it lost it). Nothing
polls on a timer. Every Ray call it makes has a timeout, and it stops (joined) before Ray
disconnects at exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import sys
import threading
import time
from collections.abc import Callable

import ray

from fedckpt.errors import CheckpointError
from fedckpt.runtime.channel import ChannelClient

log = logging.getLogger("fedckpt")

# The longest a Ray call of the watcher waits before it looks whether it should stop.
RAY_CALL_SECONDS = 5.0


class Watcher:
    """Args:
    channels: the open channels, by writer index.
    writer_died: called with a writer's index and its channel that hung up (and a deadline).
    resend_lost: called (with a deadline) to send again the saves that came back to STAGED.
    """

    def __init__(
        self,
        channels: Callable[[], dict[int, ChannelClient]],
        writer_died: Callable[[int, ChannelClient, float], None],
        resend_lost: Callable[[float], None],
    ) -> None:
        self._channels = channels
        self._writer_died = writer_died
        self._resend_lost = resend_lost
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake_pipe = os.pipe()
        os.set_blocking(self._wake_pipe[1], False)

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive() and not self._stop.is_set():
            return
        self._stop = threading.Event()  # a thread still stopping keeps its own, set, event
        self._thread = threading.Thread(target=self._watch, args=(self._stop,), name="fedckpt-watcher", daemon=True)
        self._thread.start()

    def stop(self, wait: float = RAY_CALL_SECONDS + 1.0) -> None:
        """Stop the thread and wait for it (before Ray disconnects); ``start`` starts a new one."""
        self._stop.set()
        self.wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(wait)
            if thread.is_alive():
                log.warning("fedckpt: the watcher thread did not stop within %.0f s", wait)

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # a full pipe is awake already
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
                    by_fd[client.fileno()] = (index, client)
            events = poller.poll()
            if stop.is_set() or sys.is_finalizing() or not ray.is_initialized():
                return  # a new pool starts a new watcher
            try:
                for fd, _ in events:
                    if fd == self._wake_pipe[0]:
                        os.read(fd, 4096)
                    elif fd in by_fd:
                        self._writer_died(*by_fd[fd], time.monotonic() + RAY_CALL_SECONDS)
                self._resend_lost(time.monotonic() + RAY_CALL_SECONDS)
            except CheckpointError as error:  # a writer gone for good: its saves FAILED, nothing to send
                log.error("fedckpt: %s", error)
            except Exception as error:  # a writer restarting slowly, Ray going down: the next call tries again
                log.warning("fedckpt: could not send a dead writer's saves again yet: %s", error)
                if not stop.wait(RAY_CALL_SECONDS):
                    self.wake()  # try again: their saves are still STAGED
