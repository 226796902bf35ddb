"""The save protocol's races, each driven deterministically: threads are stopped at the racing
points (fedckpt.runtime.failpoints) with events, never with sleeps. And no success is reported for
a save that failed or was lost.
"""

import contextlib
import os
import pickle
import signal
import threading
import time

import numpy as np
import pytest
import ray
import torch

import fedckpt
from fedckpt import (
    CheckpointMode,
    ClientCheckpointAndStateModule,
    LatestTorchModuleCheckpointer,
    PerRoundStateCheckpointer,
)
from fedckpt.errors import CheckpointError, SaveLostError
from fedckpt.runtime import failpoints, lifecycle
from fedckpt.runtime.channel import ChannelClosed
from fedckpt.runtime.inflight import SaveState
from fedckpt.runtime.messages import ObjectStorePayload, Outcome, SaveRequest
from fedckpt.runtime.pool import writer_name
from fedckpt.snapshot import snapshot_state

MB = 1 << 20
WAIT = 60.0  # the longest any event here is waited for: a hang fails, it never passes


@contextlib.contextmanager
def own_pool(namespace: str, **settings):
    """A pool of one writer of this test's own, stopped afterwards."""
    fedckpt.init(namespace=namespace, num_writers=1, io_threads=1, **settings)
    try:
        yield ray.get_actor(writer_name(0), namespace=namespace)
    finally:
        lifecycle.coordinator().stop_writers()
        fedckpt.init()


def kill_and_see_its_channel_close(writer) -> None:
    """SIGKILL the writer, and return once this process's channel to it says it is gone."""
    channel = lifecycle.coordinator()._transport.current_channel(0)
    os.kill(ray.get(writer.stats.remote()).pid, signal.SIGKILL)
    with pytest.raises(ChannelClosed):
        channel.read_until(lambda: False, time.monotonic() + WAIT)


def saved_value(path) -> object:
    return torch.load(path, weights_only=False)["v"]


def in_thread(target, start: bool = True) -> tuple[threading.Thread, list]:
    """A thread running ``target`` (started unless told not to); the list gets its exception, if any."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=run)
    if start:
        thread.start()
    return thread, errors


def test_two_recoveries_of_one_dead_writer_never_drop_the_channel_its_saves_went_again_on(ray_instance, tmp_path):
    """The watcher and a calling thread both recover a writer that died. The first sends its saves
    again on a new channel; the second, which looked at the dead channel before that, goes on while
    the first is between posting a re-sent save and recording it acknowledged. The second must drop
    only the dead channel: dropping the new one sends the re-sent saves' notices nowhere, and their
    staging memory would stay taken for good."""
    with own_pool("fedckpt-race-recoveries") as writer:
        coordinator = lifecycle.coordinator()
        coordinator.stop_watcher()  # the two recoveries are this test's threads
        delivery = coordinator._delivery
        states = PerRoundStateCheckpointer(tmp_path)
        for key in range(6):  # 32 MB each behind one I/O thread: still queued at the kill
            states.save_checkpoint(f"k{key}.pt", {"v": 1, "x": torch.full((8 * MB,), 1)})
        dead = coordinator._transport.current_channel(0)
        kill_and_see_its_channel_close(writer)
        resends_before = fedckpt.stats().resends

        first_resending, second_at_drop, first_posted, second_done = (threading.Event() for _ in range(4))
        threads: dict[str, threading.Thread] = {}
        posted_on = []

        def at_resending(**_) -> None:
            if threading.current_thread() is threads["first"]:
                first_resending.set()
                assert second_at_drop.wait(WAIT)

        def at_drop(**_) -> None:
            if threading.current_thread() is threads["second"]:
                second_at_drop.set()
                assert first_posted.wait(WAIT)

        def at_posted(client, **_) -> None:
            if threading.current_thread() is threads["first"]:
                posted_on.append(client)
                first_posted.set()
                assert second_done.wait(WAIT)

        def second() -> None:
            try:
                delivery.writer_died(0, dead)
            finally:
                second_done.set()

        with (
            failpoints.hooked("delivery.resending", at_resending),
            failpoints.hooked("writer_died.before_drop", at_drop),
            failpoints.hooked("delivery.posted", at_posted),
        ):
            threads["first"], first_errors = in_thread(lambda: delivery.writer_died(0, dead), start=False)
            threads["second"], second_errors = in_thread(second, start=False)
            threads["first"].start()
            assert first_resending.wait(WAIT)
            threads["second"].start()
            for thread in threads.values():
                thread.join(WAIT)
        assert first_errors == second_errors == []
        # The second dropped the dead channel only: the one the first sent the saves again on is open.
        assert coordinator._transport.current_channel(0) is posted_on[0] and not posted_on[0].closed

        fedckpt.flush(timeout=WAIT)
        assert {key: saved_value(tmp_path / f"k{key}.pt") for key in range(6)} == dict.fromkeys(range(6), 1)
        after = fedckpt.stats()
        assert after.pending_saves == 0 and after.pending_bytes == 0 and after.unknown_notices == 0
        assert after.resends - resends_before <= 6  # each lost save sent again once: not lost a second time


def test_a_notice_read_before_its_save_is_recorded_acknowledged_still_finishes_it(runtime, tmp_path):
    """A writer can write a small save and answer before the thread that posted it records the post:
    another thread reading the channel then takes in a notice of a save that is only SENT. The save
    was recorded before it was posted, so the notice finishes it; nothing waits for it afterwards."""
    states = PerRoundStateCheckpointer(tmp_path)
    states.save_checkpoint("warm.pt", {"v": 0})
    states.flush()
    unknown_before = fedckpt.stats().unknown_notices

    def read_its_notice_first(client, records, **_) -> None:
        assert all(record.state is SaveState.SENT for record in records)
        client.read_until(lambda: all(record.finished for record in records), time.monotonic() + WAIT)

    with failpoints.hooked("delivery.posted", read_its_notice_first):
        states.save_checkpoint("early.pt", {"v": 1})
    after = fedckpt.stats()
    assert after.pending_saves == 0 and after.pending_bytes == 0 and after.unknown_notices == unknown_before
    states.flush(timeout=WAIT)
    assert saved_value(tmp_path / "early.pt") == 1


@ray.remote(num_cpus=0)
class IdleSaver:
    """A client process that saves and then stays idle; its re-sends can be held back."""

    def __init__(self, namespace: str, directory: str) -> None:
        fedckpt.init(namespace=namespace)  # joins the pool the test created
        self.states = PerRoundStateCheckpointer(directory)
        self.resend = threading.Event()

    def hold_resends(self) -> None:
        failpoints.set_hook("delivery.resending", lambda **_: self.resend.wait())

    def release_resends(self) -> None:
        self.resend.set()

    def save(self, names: list[str], value: int, numel: int) -> None:
        for name in names:
            self.states.save_checkpoint(name, {"v": value, "x": torch.full((numel,), value)})

    def flush(self) -> tuple[int, int]:
        fedckpt.flush(timeout=WAIT)
        stats = fedckpt.stats()
        return stats.pending_saves, stats.pending_bytes


def test_a_restarted_writer_finds_an_idle_clients_saves_itself_so_another_process_flush_covers_them(
    ray_instance, tmp_path
):
    """A client saves and goes idle; the writer holding its saves is SIGKILLed; the client's own
    re-sends are held back (it could be busy, or slow to notice). A flush in another process (the
    server's round commit) must still return only once the client's saves are on storage: the
    restarted writer finds them itself, in the tickets of the client's staging segments, before it
    answers any flush. Then the client's re-sends arrive and are taken once."""
    namespace = "fedckpt-race-idle-client"
    with own_pool(namespace) as writer:
        saver = IdleSaver.remote(namespace, str(tmp_path))
        try:
            names = [f"idle_{index}.pt" for index in range(6)]
            ray.get(saver.save.remote(names, 0, MB))
            ray.get(saver.hold_resends.remote())
            ray.get(saver.save.remote(names, 1, 8 * MB))  # 32 MB each, queued behind one I/O thread
            pid = ray.get(writer.stats.remote()).pid
            os.kill(pid, signal.SIGKILL)
            fedckpt.flush(timeout=WAIT)  # the saver makes no call, and its re-sends are held
            assert {name: saved_value(tmp_path / name) for name in names} == dict.fromkeys(names, 1)
            assert ray.get(writer.stats.remote()).pid != pid
            ray.get(saver.release_resends.remote())
            assert ray.get(saver.flush.remote()) == (0, 0)
            assert {name: saved_value(tmp_path / name) for name in names} == dict.fromkeys(names, 1)
        finally:
            ray.kill(saver)


def test_a_process_whose_pool_another_process_stopped_saves_into_the_pool_there_is_now(ray_instance, tmp_path):
    """One process stops the pool (``fedckpt.shutdown()``, ``stop_writers()``) while another keeps its
    handles on it: that process's next saves go to the pool there is now, never to the ended writers
    (a Ray worker reused by a later run, or a client of a notebook's second simulation). Nothing of
    it was pending at the stop, so nothing failed."""
    namespace = "fedckpt-race-stopped-by-another"
    with own_pool(namespace):
        saver = IdleSaver.remote(namespace, str(tmp_path))
        try:
            ray.get(saver.save.remote(["a.pt", "b.pt"], 0, 1024))
            assert ray.get(saver.flush.remote()) == (0, 0)
            lifecycle.coordinator().stop_writers()  # every writer of the pool ends
            fedckpt.init(namespace=namespace, num_writers=1, io_threads=1)  # a new pool of the same names
            assert ray.get(saver.flush.remote()) == (0, 0)  # a flush (a load's wait) finds the current pool too
            for value in (1, 2):
                ray.get(saver.save.remote(["a.pt", "b.pt"], value, 1024))
            assert ray.get(saver.flush.remote()) == (0, 0)
            assert [saved_value(tmp_path / name) for name in ("a.pt", "b.pt")] == [2, 2]
        finally:
            ray.kill(saver)


def test_a_flush_returns_only_once_this_process_saves_are_durable_not_on_the_writers_word(ray_instance, tmp_path):
    """Saves a dead writer held are sent again with the sequences of its old incarnation. The new
    incarnation's quiet mark (nothing numbered, nothing pending) must not let a flush return before
    they are written: a flush waits for this process's own records to be durable. Here the restarted
    writer was flushed by another caller (so it was quiet) before this process's flush."""
    with own_pool("fedckpt-race-quiet") as writer:
        coordinator = lifecycle.coordinator()
        states = PerRoundStateCheckpointer(tmp_path)
        for key in range(4):
            states.save_checkpoint(f"k{key}.pt", {"v": 1, "x": torch.full((8 * MB,), 1)})
        coordinator.stop_watcher()  # this process recovers only when it calls
        kill_and_see_its_channel_close(writer)
        assert ray.get(writer.flush.remote(None), timeout=WAIT) == {}  # another caller's flush: quiet now
        fedckpt.flush(timeout=WAIT)
        assert {key: saved_value(tmp_path / f"k{key}.pt") for key in range(4)} == dict.fromkeys(range(4), 1)
        stats = fedckpt.stats()
        assert stats.pending_saves == 0 and stats.pending_bytes == 0


def _object_store_payload(state) -> ObjectStorePayload:
    """A snapshot staged in Ray's object store, as a caller without shared memory stages it."""
    snapshot = snapshot_state(state)
    array = np.empty(snapshot.nbytes, dtype=np.uint8)
    snapshot.copy_into(array)
    return ObjectStorePayload([ray.put(array)], snapshot.nbytes, pickle.dumps(snapshot.layout))


def test_a_save_whose_bytes_are_gone_before_its_writer_fetched_them_fails_every_flush_that_covers_it(runtime, tmp_path):
    """A writer that fetches a save's snapshot from Ray's object store and finds it gone (its caller
    died, or it was freed) has nothing to write (ABANDONED): an acknowledged save that is not on
    storage, so an error for every flush that covers it, never silence."""
    payload = _object_store_payload({"v": "lost", "x": torch.arange(MB)})  # 8 MB: in the object store
    ray.internal.free(payload.refs)  # gone before the writer fetches it
    key = str(tmp_path / "orphan.pt")
    pool = lifecycle.coordinator().pool()
    writer = pool.handles[pool.owner_of(key)]
    ack = ray.get(writer.enqueue.remote(SaveRequest(key, "state", save_id="abandoned-1"), payload))
    done = ray.get(writer.wait_saved.remote("abandoned-1", key, ack.sequence, ack.writer_epoch), timeout=WAIT)
    assert done.outcome is Outcome.ABANDONED and isinstance(done.error, SaveLostError), done
    with pytest.raises(CheckpointError) as raised:
        fedckpt.flush(timeout=WAIT)
    assert key in str(raised.value) and not os.path.exists(key)


def test_wait_saved_for_a_save_that_failed_earlier_gives_its_error(runtime, tmp_path):
    """A ``wait_saved`` that reaches the writer after the save failed (and its key's error was taken
    by a flush) answers FAILED with the error, never SAVED."""
    (tmp_path / "blocked").write_text("a file where a directory should be")
    key = str(tmp_path / "blocked" / "s.pt")
    pool = lifecycle.coordinator().pool()
    writer = pool.handles[pool.owner_of(key)]
    payload = _object_store_payload({"v": 1})
    ack = ray.get(writer.enqueue.remote(SaveRequest(key, "state", save_id="failing-1"), payload))
    errors = ray.get(writer.flush.remote([key]), timeout=WAIT)
    assert list(errors) == [key]
    done = ray.get(writer.wait_saved.remote("failing-1", key, ack.sequence, ack.writer_epoch), timeout=WAIT)
    assert done.outcome is Outcome.FAILED and isinstance(done.error, OSError), done


@pytest.mark.parametrize("shared_memory", [True, False], ids=["channel", "ray-calls"])
def test_a_flush_out_of_time_raises_timeout_error_on_every_route(ray_instance, tmp_path, shared_memory):
    with own_pool(f"fedckpt-timeout-{shared_memory}", shared_memory_staging=shared_memory):
        states = PerRoundStateCheckpointer(tmp_path)
        for index in range(4):
            states.save_checkpoint(f"t{index}.pt", {"x": torch.zeros(16 * MB)})  # 64 MB each
        with pytest.raises(TimeoutError) as raised:
            fedckpt.flush(timeout=0.01)
        assert not isinstance(raised.value, CheckpointError)
        fedckpt.flush(timeout=WAIT)
        stats = fedckpt.stats()
        assert stats.pending_saves == 0 and stats.pending_bytes == 0


def test_blocked_seconds_count_the_saves_made_through_the_modules(runtime, tmp_path):
    module = ClientCheckpointAndStateModule(
        pre_aggregation=LatestTorchModuleCheckpointer(str(tmp_path), "pre.safetensors"),
    )
    model = torch.nn.Linear(1024, 1024)
    before = fedckpt.stats()
    module.maybe_checkpoint(model, 0.5, {}, CheckpointMode.PRE_AGGREGATION)
    after = fedckpt.stats()
    assert after.saves == before.saves + 1
    assert after.blocked_seconds > before.blocked_seconds
    module.flush(timeout=WAIT)
    assert fedckpt.stats().pending_saves == 0
