"""Runtime settings, coalescing on and off, and a writer that dies under a stream of saves."""

import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import pytest
import ray
import torch

import fedckpt
from fedckpt import PerRoundStateCheckpointer
from fedckpt.errors import SaveLostError
from fedckpt.runtime import failpoints, lifecycle
from fedckpt.runtime.messages import ObjectStorePayload, Outcome, SaveRequest
from fedckpt.runtime.pool import shard_of, writer_name
from fedckpt.runtime.settings import Settings
from fedckpt.runtime.writer.incarnation import CLOCK_OFFSET_FILE_ENV
from fedckpt.storage import manifest

MB = 1 << 20


def totals(stats: list[dict]) -> dict[str, int]:
    return {name: sum(getattr(item, name) for item in stats) for name in ("saved", "superseded", "failed")}


@pytest.mark.parametrize("coalesce", [True, False])
def test_coalescing_switch(ray_instance, tmp_path, coalesce):
    fedckpt.init(namespace=f"fedckpt-coalesce-{coalesce}", coalesce=coalesce, num_writers=1, io_threads=1)
    try:
        checkpointer = PerRoundStateCheckpointer(tmp_path)
        filler = torch.zeros(4 * MB)  # 16 MB per save: the calls outrun the writes
        for counter in range(20):
            checkpointer.save_checkpoint("c.pt", {"counter": counter, "filler": filler})
        checkpointer.flush()
        assert checkpointer.load_checkpoint("c.pt")["counter"] == 19
        counts = totals(lifecycle.coordinator().writer_stats())
        assert counts["saved"] + counts["superseded"] == 20 and counts["failed"] == 0
        if coalesce:
            assert counts["superseded"] > 0
        else:
            assert counts == {"saved": 20, "superseded": 0, "failed": 0}
    finally:
        lifecycle.coordinator().stop_writers()
        fedckpt.init()


def test_settings_validation_and_environment(monkeypatch):
    with pytest.raises(ValueError, match="num_writers"):
        Settings(num_writers=0).validated()
    with pytest.raises(ValueError, match="io_threads"):
        Settings(io_threads=0).validated()
    with pytest.raises(ValueError, match="max_inflight_bytes"):
        Settings(max_inflight_bytes=0).validated()
    with pytest.raises(ValueError, match="namespace"):
        Settings(namespace="").validated()
    monkeypatch.setenv("FEDCKPT_NUM_WRITERS", "5")
    monkeypatch.setenv("FEDCKPT_MAX_INFLIGHT_BYTES", "1024")
    settings = Settings.from_env()
    assert settings.num_writers == 5 and settings.max_inflight_bytes == 1024
    monkeypatch.setenv("FEDCKPT_NUM_WRITERS", "many")
    with pytest.raises(ValueError, match="FEDCKPT_NUM_WRITERS"):
        Settings.from_env()
    monkeypatch.delenv("FEDCKPT_NUM_WRITERS")
    with pytest.raises(ValueError, match="num_writers"):
        fedckpt.init(num_writers=-1)


def test_keys_spread_over_a_fixed_pool():
    shards = {shard_of(f"/ckpt/client_{i}/state.pt", 4) for i in range(200)}
    assert shards == {0, 1, 2, 3}
    assert shard_of("/a/b.pt", 4) == shard_of("/a/b.pt", 4)


def test_a_killed_writer_restarts_and_acknowledged_saves_survive(ray_instance, tmp_path):
    """SIGKILL the writer while saves are queued: after flush, the last save of every key is on disk."""
    fedckpt.init(namespace="fedckpt-kill", num_writers=1, io_threads=1)
    try:
        coordinator = lifecycle.coordinator()
        writer = ray.get_actor(writer_name(0), namespace="fedckpt-kill")
        pid = ray.get(writer.stats.remote()).pid
        checkpointer = PerRoundStateCheckpointer(tmp_path)
        resends_before = fedckpt.stats().resends
        for counter in range(6):
            for key in range(3):
                checkpointer.save_checkpoint(f"k{key}.pt", {"counter": counter, "x": torch.full((2 * MB,), counter)})
        os.kill(pid, signal.SIGKILL)  # with saves still queued in the writer
        for key in range(3):  # keep saving while it restarts
            checkpointer.save_checkpoint(f"k{key}.pt", {"counter": 6, "x": torch.full((2 * MB,), 6)})
        fedckpt.flush()
        restarted = ray.get(writer.stats.remote())
        assert restarted.pid != pid
        # What this process sent again is what the new incarnation received from an earlier one.
        assert fedckpt.stats().resends - resends_before == restarted.resends
        for key in range(3):
            state = checkpointer.load_checkpoint(f"k{key}.pt")
            assert state["counter"] == 6 and torch.all(state["x"] == 6)
        assert coordinator.inflight_bytes() == 0
    finally:
        fedckpt.init()


def test_a_flush_right_after_a_writer_restart_waits_for_the_saves_sent_again(ray_instance, tmp_path):
    """Saves acknowledged by a writer that then died are sent again with their old sequences, which
    the new incarnation's counter never numbered: its quiet mark (nothing numbered, nothing pending)
    must not let this process's flush return before they are written. No save follows the kill."""
    fedckpt.init(namespace="fedckpt-quiet-restart", num_writers=1, io_threads=1)
    try:
        writer = ray.get_actor(writer_name(0), namespace="fedckpt-quiet-restart")
        pid = ray.get(writer.stats.remote()).pid
        checkpointer = PerRoundStateCheckpointer(tmp_path)
        for key in range(4):
            checkpointer.save_checkpoint(f"k{key}.pt", {"counter": 1, "x": torch.full((4 * MB,), 1)})
        os.kill(pid, signal.SIGKILL)  # with saves still queued in the writer
        fedckpt.flush()
        assert ray.get(writer.stats.remote()).pid != pid
        on_disk = {key: torch.load(tmp_path / f"k{key}.pt", weights_only=False)["counter"] for key in range(4)}
        assert on_disk == dict.fromkeys(range(4), 1)
    finally:
        fedckpt.init()


def test_a_writer_restarted_on_a_node_whose_clock_is_behind_still_publishes_newer_versions(
    ray_instance, tmp_path, monkeypatch
):
    """Epochs come from the record of the incarnation before, not from the wall clock alone: a
    restart on a node an hour behind would otherwise have every later save dropped as stale. The
    restart itself is told by that record too."""
    offset = tmp_path / "clock-offset-seconds"
    offset.write_text("0")
    monkeypatch.setenv(CLOCK_OFFSET_FILE_ENV, str(offset))
    fedckpt.init(namespace="fedckpt-clock", num_writers=1, io_threads=1)
    try:
        checkpointer = PerRoundStateCheckpointer(tmp_path / "ckpt")
        checkpointer.save_checkpoint("s.pt", {"version": 1})
        checkpointer.flush()
        first = manifest.read_entry(str(tmp_path / "ckpt" / "s.pt")).sequence
        writer = ray.get_actor(writer_name(0), namespace="fedckpt-clock")
        before = ray.get(writer.describe.remote())
        assert not before.restarted and before.epoch == first[0]
        offset.write_text("-3600")  # the restart lands on a node whose clock is an hour behind
        os.kill(before.pid, signal.SIGKILL)
        checkpointer.save_checkpoint("s.pt", {"version": 2})
        checkpointer.flush()
        after = ray.get(writer.describe.remote())
        assert after.pid != before.pid and after.restarted and after.epoch > before.epoch
        assert checkpointer.load_checkpoint("s.pt")["version"] == 2
        assert tuple(manifest.read_entry(str(tmp_path / "ckpt" / "s.pt")).sequence) > tuple(first)
    finally:
        fedckpt.init()


def test_a_flush_in_another_process_covers_saves_a_killed_writer_held(ray_instance, tmp_path):
    """README: ``fedckpt.flush()`` waits for every save issued before it, by any process. A saver
    process acknowledges saves, then stays idle; the writer holding them is SIGKILLed; a flush in this
    process (not the saver) returns only once the latest save of every key is on disk again."""
    namespace = "fedckpt-kill-idle"
    fedckpt.init(namespace=namespace, num_writers=1, io_threads=1)

    @ray.remote(num_cpus=0)
    class Saver:
        def __init__(self, directory: str) -> None:
            fedckpt.init(namespace=namespace)  # joins the pool this process created
            self.states = PerRoundStateCheckpointer(directory)

        def save(self, names: list[str], counter: int, numel: int) -> None:
            for name in names:
                self.states.save_checkpoint(name, {"counter": counter, "x": torch.full((numel,), counter)})

    def counter_on_disk(name: str) -> int | None:
        path = tmp_path / name
        return torch.load(path, weights_only=True)["counter"] if path.exists() else None

    saver = Saver.remote(str(tmp_path))
    try:
        writer = ray.get_actor(writer_name(0), namespace=namespace)
        pid = ray.get(writer.stats.remote()).pid
        names = [f"idle_{index}.pt" for index in range(8)]
        ray.get(saver.save.remote(names, 0, MB))
        ray.get(writer.__ray_call__.remote(failpoints.hold_in_actor, "writer.writing"))
        ray.get(saver.save.remote(names, 1, 8 * MB))  # 32 MB each, held by the writer until it dies
        os.kill(pid, signal.SIGKILL)
        lost = [name for name in names if counter_on_disk(name) != 1]
        assert lost == names
        fedckpt.flush()  # the saver makes no call meanwhile
        assert {name: counter_on_disk(name) for name in names} == dict.fromkeys(names, 1)
        info = ray.get(writer.describe.remote())
        assert info.pid != pid and info.restarted
        assert ray.get(writer.stats.remote()).awaiting_resend == 0
    finally:
        ray.kill(saver)
        fedckpt.init()


def test_flush_timeout(ray_instance, tmp_path):
    fedckpt.init(namespace="fedckpt-timeout", num_writers=1, io_threads=1)
    try:
        checkpointer = PerRoundStateCheckpointer(tmp_path)
        for index in range(6):
            checkpointer.save_checkpoint(f"t{index}.pt", {"x": torch.zeros(16 * MB)})  # 64 MB each
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            fedckpt.flush(timeout=0.01)
        assert time.monotonic() - start < 5
        fedckpt.flush()
    finally:
        fedckpt.init()


def _object_store_payload(state) -> ObjectStorePayload:
    """A snapshot staged in Ray's object store, as for a writer on another node."""
    import numpy as np

    from fedckpt.snapshot import snapshot_state

    snapshot = snapshot_state(state)
    array = np.empty(snapshot.nbytes, dtype=np.uint8)
    snapshot.copy_into(array)
    return ObjectStorePayload([ray.put(array)], snapshot.nbytes, pickle.dumps(snapshot.layout))


def _writer_of(key: str):
    pool = lifecycle.coordinator().pool()
    return pool.handles[pool.owner_of(key)]


def test_a_resent_older_save_never_replaces_a_newer_one(runtime, tmp_path):
    """A save re-sent after a writer restart carries its old sequence and loses to newer saves."""
    key = str(tmp_path / "r.pt")
    writer = _writer_of(key)
    newer = _object_store_payload({"v": "new", "x": torch.zeros(4 * MB)})
    older = _object_store_payload({"v": "old"})
    ack = ray.get(writer.enqueue.remote(SaveRequest(key, "state"), newer))
    stale = SaveRequest(key, "state", sequence=(ack.sequence[0] - 1, 10**6))
    ray.get(writer.enqueue.remote(stale, older))  # queued behind the newer, or after it was written
    assert ray.get(writer.flush.remote([key])) == {}
    assert torch.load(key, weights_only=False)["v"] == "new"


def test_a_restarted_writer_waits_for_the_saves_its_predecessor_lost(runtime, tmp_path):
    """A ``wait_saved`` naming an earlier incarnation tells the writer of a save it lost: flushes and
    reads of that key wait until it is sent again, or until its grace period runs out."""
    payload = _object_store_payload({"v": "re-sent"})
    key, ghost = str(tmp_path / "lost.pt"), str(tmp_path / "ghost.pt")
    writer = _writer_of(key)
    old_epoch = 1  # an incarnation long gone
    assert ray.get(writer.wait_saved.remote("lost-1", key, (old_epoch, 7), old_epoch)).outcome == Outcome.UNKNOWN
    flushed, read = writer.flush.remote([key]), writer.wait_key.remote(key)
    assert ray.wait([flushed, read], num_returns=2, timeout=1.0)[0] == []  # both wait for the re-send
    ray.get(writer.enqueue.remote(SaveRequest(key, "state", sequence=(old_epoch, 7), save_id="lost-1"), payload))
    assert ray.get(flushed, timeout=30) == {} and ray.get(read, timeout=30) is None
    assert torch.load(key, weights_only=False)["v"] == "re-sent"

    # Its caller never sends it again: after the grace period the flush stops waiting for it, and
    # reports it as lost (an acknowledged save that is not on storage is an error, not a log line).
    grace = ray.get(writer.__ray_call__.remote(lambda actor: actor.lost.grace_seconds))
    ray.get(writer.__ray_call__.remote(lambda actor: setattr(actor.lost, "grace_seconds", 3.0)))
    try:
        ray.get(writer.wait_saved.remote("ghost-1", ghost, (old_epoch, 8), old_epoch))
        assert ray.get(writer.stats.remote()).awaiting_resend == 1
        flushed = writer.flush.remote(None)
        assert ray.wait([flushed], timeout=1.0)[0] == []
        errors = ray.get(flushed, timeout=30)
        assert list(errors) == [ghost] and isinstance(errors[ghost], SaveLostError), errors
        assert "not sent again" in str(errors[ghost]) and not os.path.exists(ghost)
        assert ray.get(writer.stats.remote()).awaiting_resend == 0
        assert ray.get(writer.flush.remote(None)) == {}  # reported once
    finally:
        ray.get(writer.__ray_call__.remote(lambda actor: setattr(actor.lost, "grace_seconds", grace)))


def test_object_store_staging_round_trip(ray_instance, tmp_path):
    """The transport for writers on another node (or without /dev/shm): Ray's object store."""
    fedckpt.init(namespace="fedckpt-object-store", shared_memory_staging=False, num_writers=1)
    before = fedckpt.stats()
    try:
        from fedckpt import LatestTorchModuleCheckpointer

        model = torch.nn.Linear(512, 512)
        checkpointer = LatestTorchModuleCheckpointer(str(tmp_path), "m.safetensors")
        checkpointer.maybe_checkpoint(model, 0.0, {})
        expected = model.weight.detach().clone()
        with torch.no_grad():
            model.weight.zero_()  # mutated right after the call: the object store copy is isolated
        assert torch.equal(checkpointer.load_state_dict()["weight"], expected)
        PerRoundStateCheckpointer(tmp_path).save_checkpoint("s.pt", {"w": expected})
        assert torch.equal(PerRoundStateCheckpointer(tmp_path).load_checkpoint("s.pt")["w"], expected)
        assert not any(name.startswith(f"fedckpt-{os.getpid()}-") for name in os.listdir("/dev/shm"))
        after = fedckpt.stats()
        assert after.bytes_shared_memory == before.bytes_shared_memory
        assert after.bytes_object_store - before.bytes_object_store >= 2 * expected.nbytes
    finally:
        lifecycle.coordinator().stop_writers()
        fedckpt.init()


def test_segments_of_dead_processes_are_removed_once_no_save_can_be_on_its_way(tmp_path):
    """A dead process's segment is kept for a grace period after its last use (a save it sent just
    before dying may still be on its way to the writer), then removed; live processes' are kept."""
    from fedckpt.runtime.staging import PREFIX, remove_orphans

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a pid that no longer runs
    dead = tmp_path / f"{PREFIX}{child.pid}-abc"
    alive = tmp_path / f"{PREFIX}{os.getpid()}-abc"
    unrelated = tmp_path / "something-else"
    for path in (dead, alive, unrelated):
        path.write_bytes(b"x")
    assert remove_orphans(str(tmp_path)) == 0 and dead.exists()  # just used
    os.utime(dead, (time.time() - 60, time.time() - 60))
    assert remove_orphans(str(tmp_path)) == 1
    assert not dead.exists() and alive.exists() and unrelated.exists()


def test_saves_on_the_writers_node_travel_over_the_channel(runtime, tmp_path):
    """A caller beside its writer sends each save as one channel message (no Ray call on the save
    path), hears when it is done, and reuses its staging segment from then on."""
    from fedckpt.runtime.transport import Route

    coordinator = lifecycle.coordinator()
    checkpointer = PerRoundStateCheckpointer(tmp_path)
    checkpointer.save_checkpoint("c.pt", {"v": 0, "x": torch.zeros(MB)})
    checkpointer.flush()
    pool = coordinator.pool()
    key = str(tmp_path / "c.pt")
    assert coordinator._transport.route(pool, pool.owner_of(key)) is Route.CHANNEL
    submitted = []
    original = ray.actor.ActorMethod._remote
    ray.actor.ActorMethod._remote = lambda *args, **kwargs: submitted.append(args) or original(*args, **kwargs)
    try:
        for counter in range(1, 20):
            checkpointer.save_checkpoint("c.pt", {"v": counter, "x": torch.full((MB,), counter)})
    finally:
        ray.actor.ActorMethod._remote = original
    assert submitted == []
    checkpointer.flush()
    assert checkpointer.load_checkpoint("c.pt")["v"] == 19
    assert coordinator.inflight_bytes() == 0
    arena = coordinator._transport.arena
    free = {segment.path for segment in arena._free}
    assert free and not arena._busy  # every segment came back
    used = set()
    for counter in range(20, 25):  # a save per round: each reuses a segment, none is created
        checkpointer.save_checkpoint("c.pt", {"v": counter, "x": torch.full((MB,), counter)})
        used |= {segment.path for segment in arena._busy}
        checkpointer.flush()
    assert used and used <= free

    # A message larger than the socket's buffer (the layout of 2,000 tensors is ~230 KB) goes out
    # whole, on the same connection, after the socket was read without blocking.
    from fedckpt import LatestTorchModuleCheckpointer

    many = torch.nn.Sequential(*(torch.nn.Linear(16, 16) for _ in range(1000)))
    model_checkpointer = LatestTorchModuleCheckpointer(str(tmp_path), "many.safetensors")
    model_checkpointer.maybe_checkpoint(many, 0.0, {})
    model_checkpointer.flush()
    owner = pool.owner_of(str(tmp_path / "many.safetensors"))
    connection = coordinator._transport.open_channels()[owner]
    for _ in range(3):
        model_checkpointer.maybe_checkpoint(many, 0.0, {})
        coordinator.inflight_bytes()  # reads the socket without blocking
    model_checkpointer.flush()
    assert coordinator._transport.open_channels()[owner] is connection


def waits_answered() -> int:
    return sum(stats.waits_answered for stats in lifecycle.coordinator().writer_stats())


def test_a_read_of_a_quiet_writers_saves_asks_it_nothing(runtime, tmp_path):
    """Once every save on the node is written and no error is held, a read (or flush) of a key is
    answered from the writer's quiet mark without a call. A save issued before it, by this process
    or another, or an error held for a key makes the read ask the writer, which waits and reports."""
    checkpointer = PerRoundStateCheckpointer(tmp_path)
    checkpointer.save_checkpoint("s.pt", {"v": 1, "x": torch.zeros(32 * MB)})  # 128 MiB: still being written
    before = waits_answered()
    assert checkpointer.load_checkpoint("s.pt")["v"] == 1  # right after the save: the writer is asked
    assert waits_answered() == before + 1
    for _ in range(3):  # a round later: quiet
        assert checkpointer.load_checkpoint("s.pt")["v"] == 1
    fedckpt.flush()
    assert waits_answered() == before + 1

    other = subprocess.run(  # a save from another process of the cluster, not yet read by anyone
        [sys.executable, "-c", "import sys, fedckpt; fedckpt.PerRoundStateCheckpointer(sys.argv[1])"
         ".save_checkpoint('s.pt', {'v': 2})", str(tmp_path)],
        env={**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert other.returncode == 0, other.stderr[-2000:]
    assert checkpointer.load_checkpoint("s.pt")["v"] == 2

    (tmp_path / "blocked").write_text("a file where a directory should be")
    failing = PerRoundStateCheckpointer(tmp_path / "blocked")
    failing.save_checkpoint("s.pt", {"v": 3})
    with pytest.raises(fedckpt.CheckpointError, match="blocked"):
        failing.flush()
    asked = waits_answered()
    checkpointer.load_checkpoint("s.pt")  # the error was reported: quiet again
    assert waits_answered() == asked


def test_a_read_of_a_key_whose_bucket_is_quiet_asks_nothing_while_its_writer_is_busy(runtime, tmp_path):
    """The writer holds a save of another key (of another bucket): a read of a key whose saves are
    all written is answered from its bucket's quiet mark, without a call (a Flower client restoring
    its state while the writer writes other clients' saves). A save of the key makes the read ask."""
    from fedckpt.runtime.sequence import bucket_of
    from fedckpt.storage.paths import checkpoint_key

    pool = lifecycle.coordinator().pool()
    checkpointer = PerRoundStateCheckpointer(tmp_path)
    key = {name: checkpoint_key(str(tmp_path / name)) for name in (f"s{index}.pt" for index in range(64))}
    quiet = "s0.pt"
    busy = next(
        name for name in key
        if pool.owner_of(key[name]) == pool.owner_of(key[quiet]) and bucket_of(key[name]) != bucket_of(key[quiet])
    )  # fmt: skip
    checkpointer.save_checkpoint(quiet, {"v": 1})
    checkpointer.flush()
    writer = pool.handles[pool.owner_of(key[quiet])]
    ray.get(writer.__ray_call__.remote(failpoints.hold_key_in_actor, "writer.writing", key[busy]))
    try:
        checkpointer.save_checkpoint(busy, {"v": 1})  # held in the writer: it is not quiet
        before = waits_answered()
        assert checkpointer.load_checkpoint(quiet)["v"] == 1
        assert waits_answered() == before  # answered by the bucket's mark
        checkpointer.save_checkpoint(quiet, {"v": 2})
        assert checkpointer.load_checkpoint(quiet)["v"] == 2  # a save of it issued: the writer is asked
        assert waits_answered() == before + 1
    finally:
        ray.get(writer.__ray_call__.remote(failpoints.release_in_actor, "writer.writing"))
    fedckpt.flush()
    assert checkpointer.load_checkpoint(busy)["v"] == 1


def test_writers_run_on_idle_cpu_time(runtime, tmp_path):
    """Every thread of a writer, its I/O threads started by the save included, is SCHED_IDLE: a
    writer woken by a save does not preempt training, nor share the CPU with it."""
    PerRoundStateCheckpointer(tmp_path).save_checkpoint("s.pt", {"v": 1})
    fedckpt.flush()

    def policies(_):
        return {int(thread): os.sched_getscheduler(int(thread)) for thread in os.listdir("/proc/self/task")}

    for writer in lifecycle.coordinator().writers():
        threads = ray.get(writer.__ray_call__.remote(policies))
        assert len(threads) > 1 and set(threads.values()) == {os.SCHED_IDLE}, threads
        names = ray.get(writer.__ray_call__.remote(lambda _: [t.name for t in threading.enumerate()]))
        assert any(name.startswith("fedckpt-io") for name in names), names


def test_an_interrupt_during_the_staging_copy_leaves_nothing_behind(runtime, tmp_path):
    """Ctrl-C (a SIGALRM handler raising KeyboardInterrupt) while a save copies its snapshot: the
    save never reached the writer, so the segment is free again at once, the key's next save is not
    held up or failed by it, and the disk keeps the version before."""
    import traceback

    checkpointer = fedckpt.LatestTorchModuleCheckpointer(str(tmp_path), "model.safetensors")
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048, bias=False) for _ in range(16)])  # 256 MiB
    with torch.no_grad():
        model[0].weight.fill_(0)
    checkpointer.maybe_checkpoint(model, 0.0, {})  # maps the segment the interrupted saves reuse
    checkpointer.flush()
    segments = {name for name in os.listdir("/dev/shm") if name.startswith(f"fedckpt-{os.getpid()}-")}

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    in_copy, last_saved = 0, 0
    try:
        for attempt in range(5):
            with torch.no_grad():
                model[0].weight.fill_(attempt + 1)
            signal.setitimer(signal.ITIMER_REAL, 0.005)  # the copy of 256 MiB takes far longer
            try:
                checkpointer.maybe_checkpoint(model, 0.0, {})
                signal.setitimer(signal.ITIMER_REAL, 0)
                last_saved = attempt + 1
            except KeyboardInterrupt as interrupted:
                frames = [frame.name for frame in traceback.extract_tb(interrupted.__traceback__)]
                in_copy += "copy_into" in frames
            assert lifecycle.coordinator().inflight_bytes() == 0  # nothing staged is left busy
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert in_copy >= 1
    checkpointer.flush(timeout=30)  # no save of the key is waited for, none failed
    assert checkpointer.load_state_dict()["0.weight"][0, 0].item() == last_saved
    with torch.no_grad():
        model[0].weight.fill_(42)
    checkpointer.maybe_checkpoint(model, 0.0, {})  # the key's next save, unaffected
    checkpointer.flush(timeout=30)
    assert checkpointer.load_state_dict()["0.weight"][0, 0].item() == 42
    assert {name for name in os.listdir("/dev/shm") if name.startswith(f"fedckpt-{os.getpid()}-")} == segments


def test_saves_a_writer_took_with_it_for_good_make_flush_raise_naming_them(ray_instance, tmp_path):
    """A writer killed and not restarted (Ray gave up on it): the saves it had acknowledged cannot be
    sent again, and flush says which, as a CheckpointError, rather than a Ray error or a log line."""
    fedckpt.init(namespace="fedckpt-gone", num_writers=1, io_threads=1)
    try:
        checkpointer = PerRoundStateCheckpointer(tmp_path)
        writer = ray.get_actor(writer_name(0), namespace="fedckpt-gone")
        names = [f"s{index}.pt" for index in range(4)]
        for name in names:  # 256 MiB to write and fsync: the last ones are still queued at the kill
            checkpointer.save_checkpoint(name, {"x": torch.full((16 * MB,), 7.0)})
        ray.kill(writer, no_restart=True)
        with pytest.raises(fedckpt.CheckpointError) as raised:
            checkpointer.flush(timeout=60)
        message = str(raised.value)
        unwritten = [name for name in names if not os.path.exists(tmp_path / name)]
        assert unwritten and all(str(tmp_path / name) in message for name in unwritten), message
    finally:
        lifecycle.coordinator().forget()
        fedckpt.init()
