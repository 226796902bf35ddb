"""This process's side of a writer restart: outcomes taken in, lost saves found and sent again.

A writer that dies takes the saves it held with it. This process still holds their staged bytes
(see :mod:`~fedckpt.runtime.inflight`), so once Ray restarted the writer it sends them again, with
the sequences they were acknowledged with. Failures of saves sent again in the background are held
for the next call on their key, or the next flush.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import defaultdict
from collections.abc import Callable

import ray

from fedckpt.runtime import stats
from fedckpt.runtime.channel import ChannelClosed
from fedckpt.runtime.inflight import InflightSave, InflightSaves, SaveState
from fedckpt.runtime.messages import Outcome, SaveDone
from fedckpt.runtime.pool import WriterPool
from fedckpt.runtime.transport import Route, Transport

log = logging.getLogger("fedckpt")


class Resender:
    """Takes in the writers' outcomes and sends again what a dead writer lost."""

    def __init__(self, pool: Callable[[], WriterPool | None], transport: Transport, inflight: InflightSaves) -> None:
        self._pool = pool  # the current pool (None once it went away)
        self._transport = transport
        self._inflight = inflight
        self._recovering: dict[int, threading.Lock] = defaultdict(threading.Lock)
        self._resending = threading.Lock()
        # Errors of saves sent again in the background, for the next call on their key or flush.
        self.held_errors: dict[str, BaseException] = {}

    # ---- outcomes --------------------------------------------------------------------------------

    def on_done(self, writer: int, notices: list[SaveDone]) -> None:
        for notice in notices:
            self.finished(writer, notice)

    def finished(self, writer: int, notice: SaveDone) -> None:
        """A save left its writer; a failure is held for this process's next call on its key."""
        save, released = self._inflight.done(writer, notice.sequence)
        for staged in released:
            self._transport.release(staged)
        if save is not None and notice.error is not None:
            self.held_errors[save.request.key] = notice.error

    def take_in_notices(self) -> None:
        """Done notices that arrived (channels), and Ray saves that finished (without waiting)."""
        self._transport.take_in_notices()
        on_ray = self._inflight.on_ray()
        if on_ray:
            self.check_ray_saves(on_ray, timeout=0.0)

    def check_ray_saves(self, saves: list[InflightSave], timeout: float) -> None:
        """Take in the outcomes of Ray-route saves that resolved; lost ones are sent again."""
        refs = [save.done_ref for save in saves]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        if not ready and timeout > 0:
            ready, _ = ray.wait(refs, num_returns=1, timeout=0)
        resolved = set(ready)
        for save in saves:
            if save.done_ref not in resolved:
                continue
            try:
                notice = ray.get(save.done_ref)
            except ray.exceptions.RayError as error:  # the writer is gone for good, or Ray is going down
                log.debug("fedckpt: waiting for a save of %s failed: %s", save.request.key, error)
                self._inflight.lost_one(save)
                continue
            if notice.outcome in (Outcome.UNKNOWN, Outcome.ABANDONED):
                self._inflight.lost_one(save)
            else:
                self.finished(save.writer, notice)
        if any(save.state is SaveState.LOST for save in saves):
            self.resend_and_recover()

    def take_held_errors(self, keys: set[str] | None) -> dict[str, BaseException]:
        """Errors of background re-sends for ``keys`` (or all), cleared: each is reported once."""
        chosen = [key for key in list(self.held_errors) if keys is None or key in keys]
        return {key: self.held_errors.pop(key) for key in chosen if key in self.held_errors}

    # ---- a writer that died ----------------------------------------------------------------------

    def recover(self, writer: int) -> None:
        """Writer ``writer``'s channel closed: it died. Wait until Ray restarted it, then send it
        what it held of this process's saves again."""
        with self._recovering[writer]:
            pool = self._pool()
            if pool is None or not ray.is_initialized():
                # Ray went down under this process (any Ray call would start a new instance): the
                # next call reports what was lost.
                return
            client = self._transport.open_channels().get(writer)
            if client is not None:
                with contextlib.suppress(ChannelClosed, TimeoutError):
                    client.pump(0.0)  # notices it sent before it died
                if not client.closed:
                    return  # recovered by another thread meanwhile
            self._transport.drop_channel(writer)
            self._inflight.writer_lost(writer, Route.CHANNEL)
            info = pool.refresh(writer)
        if self._inflight.lost(writer):
            log.warning("fedckpt: writer %d restarted (pid %d); sending its lost saves again", writer, info.pid)
        self.resend_and_recover(writer)

    def resend_and_recover(self, writer: int | None = None) -> None:
        """Send the lost saves (of ``writer``, or all) again; recover writers found dead meanwhile."""
        for closed in self._resend_lost(writer):
            self.recover(closed)

    def _resend_lost(self, writer: int | None = None) -> set[int]:
        """Send the lost saves again, with their sequences. Returns the writers whose channel closed
        meanwhile (to recover, outside this lock)."""
        pool = self._pool()
        closed: set[int] = set()
        if pool is None:
            return closed
        with self._resending:
            for batch, save in self._inflight.lost(writer):
                if save.writer in closed:
                    continue
                answer = self._transport.enqueue(pool, batch.staged, {save.writer: [save.request]})[save.writer]
                if isinstance(answer, ChannelClosed):
                    closed.add(save.writer)
                else:
                    self._inflight.resent(save, save.writer, answer[0])
                    stats.recorder.add(resends=1)
        return closed
