"""DESIGN.md's invariants, each on a real local Ray with real files."""

import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import ray
import torch
from conftest import assert_same_tensors, make_model
from torch import nn

import fedckpt
from fedckpt import CheckpointError, LatestTorchModuleCheckpointer, PerRoundStateCheckpointer
from fedckpt.runtime import lifecycle
from fedckpt.storage import manifest
from fedckpt.storage.paths import CONTROL_DIR, TEMP_DIR
from fedckpt.storage.posix import persist_checkpoint

MB = 1 << 20


def big_model(megabytes: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    side = int((megabytes * MB / 4) ** 0.5)
    return nn.Linear(side, side, bias=False)


def temp_files(directory) -> list[str]:
    temp_dir = os.path.join(directory, CONTROL_DIR, TEMP_DIR)
    return os.listdir(temp_dir) if os.path.isdir(temp_dir) else []


# 1. Snapshot isolation -------------------------------------------------------------------------


def test_snapshot_isolation_model_mutated_in_place_right_after_the_call(runtime, tmp_path):
    model = big_model(16)
    checkpointer = LatestTorchModuleCheckpointer(str(tmp_path), "iso.pt")
    expected = []
    for step in range(5):
        with torch.no_grad():
            model.weight.fill_(float(step))
        checkpointer.maybe_checkpoint(model, 0.0, {})
        expected.append(model.weight.detach().clone())
        with torch.no_grad():
            model.weight.fill_(-1.0)  # the writer has not written yet: this must not leak in
    saved = checkpointer.load_state_dict()["weight"]
    assert torch.equal(saved, expected[-1])


def test_snapshot_isolation_state_mutated_in_place(runtime, tmp_path):
    checkpointer = PerRoundStateCheckpointer(tmp_path)
    tensor = torch.zeros(1_000_000)
    state = {"values": tensor, "meta": {"round": 1}}
    checkpointer.save_checkpoint("state.pt", state)
    tensor.add_(5.0)
    state["meta"]["round"] = 99
    loaded = checkpointer.load_checkpoint("state.pt")
    assert torch.count_nonzero(loaded["values"]) == 0
    assert loaded["meta"]["round"] == 1


# 2. Read your writes, across processes ------------------------------------------------------------


@ray.remote(num_cpus=0)
def read_counter(directory: str, name: str) -> int | None:
    checkpointer = PerRoundStateCheckpointer(directory)
    if not checkpointer.checkpoint_exists(name):
        return None
    return int(checkpointer.load_checkpoint(name)["counter"])


@ray.remote(num_cpus=0)
def save_counter(directory: str, name: str, counter: int, megabytes: int) -> None:
    payload = torch.full((megabytes * MB // 4,), float(counter))
    PerRoundStateCheckpointer(directory).save_checkpoint(name, {"counter": counter, "payload": payload})


def test_read_your_writes_from_another_ray_worker(runtime, tmp_path):
    directory = str(tmp_path)
    checkpointer = PerRoundStateCheckpointer(directory)
    # 24 MB per save: the write takes far longer than the read request needs to arrive.
    for counter in range(1, 6):
        payload = torch.full((6 * MB,), float(counter))
        checkpointer.save_checkpoint("rw.pt", {"counter": counter, "payload": payload})
        assert ray.get(read_counter.remote(directory, "rw.pt")) == counter


def test_read_your_writes_when_saver_and_reader_are_different_workers(runtime, tmp_path):
    """A Flower client saves in one worker process in round r and loads in another in round r+1."""
    directory = str(tmp_path)
    for counter in range(1, 4):
        ray.get(save_counter.remote(directory, "client.pt", counter, 24))
        assert ray.get(read_counter.remote(directory, "client.pt")) == counter


# 3. Per-key order, latest wins, no stale overwrite -------------------------------------------------


def test_per_key_order_latest_wins_and_coalesces(runtime, tmp_path):
    checkpointer = PerRoundStateCheckpointer(tmp_path)
    filler = torch.zeros(2 * MB)  # 8 MB: writes are slower than the calls, so saves queue up
    for counter in range(40):
        checkpointer.save_checkpoint("order.pt", {"counter": counter, "filler": filler})
    checkpointer.flush()
    entry = manifest.read_entry(str(tmp_path / "order.pt"))
    assert checkpointer.load_checkpoint("order.pt")["counter"] == 39
    epoch, number = entry.sequence
    assert number >= 40  # the 40th save of this writer epoch is the one on disk
    assert temp_files(tmp_path) == []


def test_no_stale_overwrite_by_an_older_sequence(tmp_path):
    from fedckpt.snapshot import snapshot_state

    def staged(state):
        snapshot = snapshot_state(state)
        buffer = np.empty(snapshot.nbytes, dtype=np.uint8)
        snapshot.copy_into(buffer)
        return snapshot.layout, memoryview(buffer)

    path = str(tmp_path / "seq.pt")
    newer = persist_checkpoint(path, "state", *staged({"v": "new"}), (2, 1), None, None, "test")
    assert newer is not None
    older = persist_checkpoint(path, "state", *staged({"v": "old"}), (1, 99), None, None, "test")
    assert older is None
    assert torch.load(path, weights_only=False)["v"] == "new"
    assert manifest.read_entry(path).sequence == (2, 1)


def test_concurrent_savers_on_one_key_end_with_an_issued_version(runtime, tmp_path):
    directory = str(tmp_path)
    ray.get([save_counter.remote(directory, "shared.pt", counter, 4) for counter in range(8)])
    fedckpt.flush()
    final = PerRoundStateCheckpointer(directory).load_checkpoint("shared.pt")
    assert final["counter"] in range(8)
    assert torch.all(final["payload"] == float(final["counter"]))


# 4. Atomic and durable ------------------------------------------------------------------------------


def test_readers_never_see_a_partial_file(runtime, tmp_path):
    checkpointer = LatestTorchModuleCheckpointer(str(tmp_path), "atomic.safetensors")
    model = big_model(8)
    with torch.no_grad():
        model.weight.fill_(-5.0)
    checkpointer.maybe_checkpoint(model, 0.0, {})
    checkpointer.flush()
    stop = threading.Event()
    seen, failures = [], []

    def read_loop():
        while not stop.is_set():
            try:
                # Read the file directly, not through fedckpt, so nothing waits for the writer.
                from safetensors.torch import load_file

                weight = load_file(checkpointer.checkpoint_path)["weight"]
                value = float(weight[0, 0])
                assert torch.all(weight == value), "a torn file mixes two versions"
                seen.append(value)
            except Exception as error:
                failures.append(repr(error))

    reader = threading.Thread(target=read_loop)
    reader.start()
    try:
        for step in range(30):
            with torch.no_grad():
                model.weight.fill_(float(step))
            checkpointer.maybe_checkpoint(model, 0.0, {})
        checkpointer.flush()
    finally:
        stop.set()
        reader.join()
    assert failures == []
    assert len(set(seen)) > 1  # the reader did overlap the writes
    assert temp_files(tmp_path) == []
    assert float(checkpointer.load_state_dict()["weight"][0, 0]) == 29.0


def test_a_script_that_exits_without_flush_loses_nothing(tmp_path):
    script = textwrap.dedent(
        f"""
        import os
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        os.environ["RAY_ADDRESS"] = "local"
        import torch
        from fedckpt import LatestTorchModuleCheckpointer, PerRoundStateCheckpointer
        model = torch.nn.Linear(4096, 4096)  # 64 MB: these saves take seconds to write and fsync
        checkpointers = [LatestTorchModuleCheckpointer({str(tmp_path)!r}, f"model{{i}}.safetensors") for i in range(4)]
        for version in (1.0, 2.0):  # version 2 of each key waits in the writer's queue behind version 1
            with torch.no_grad():
                model.weight.fill_(version)
            for checkpointer in checkpointers:
                checkpointer.maybe_checkpoint(model, 0.0, {{}})
        PerRoundStateCheckpointer({str(tmp_path)!r}).save_checkpoint("state.pt", {{"round": 3, "w": model.weight}})
        print("pid", os.getpid(), flush=True)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    child_pid = int(result.stdout.split("pid", 1)[1].split()[0])
    assert not [name for name in os.listdir("/dev/shm") if name.startswith(f"fedckpt-{child_pid}-")]
    from safetensors.torch import load_file

    for index in range(4):
        assert torch.all(load_file(tmp_path / f"model{index}.safetensors")["weight"] == 2.0)
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    assert state["round"] == 3 and torch.all(state["w"] == 2.0)
    assert temp_files(tmp_path) == []
    verify = subprocess.run([sys.executable, "-m", "fedckpt.cli", "verify", str(tmp_path)], capture_output=True)
    assert verify.returncode == 0


# 5. No silent loss: errors surface, and saving recovers -------------------------------------------


def save_and_wait_until_it_failed(save: Callable[[], None]) -> None:
    """Make a save that will fail (its directory is a file), and poll the writers' counters (another
    process's view: no call of this process's) until a writer counted it failed."""
    coordinator = lifecycle.coordinator()
    failed_before = sum(stats.failed for stats in coordinator.writer_stats())
    save()
    deadline = time.monotonic() + 60
    while sum(stats.failed for stats in coordinator.writer_stats()) == failed_before:
        assert time.monotonic() < deadline, "the save into a file-for-a-directory never failed"
        time.sleep(0.01)


def test_failed_save_raises_at_next_call_flush_and_load_then_recovers(runtime, tmp_path):
    directory = tmp_path / "checkpoints"
    checkpointer = LatestTorchModuleCheckpointer(str(directory), "model.pt")
    good = make_model(1)
    checkpointer.maybe_checkpoint(good, 0.0, {})
    checkpointer.flush()
    before = checkpointer.load_state_dict()

    shutil.rmtree(directory)
    directory.write_text("a file where the checkpoint directory was")

    # Next call: the background failure of the first save surfaces there (once it has happened).
    save_and_wait_until_it_failed(lambda: checkpointer.maybe_checkpoint(make_model(2), 0.0, {}))
    with pytest.raises(CheckpointError, match="model.pt") as raised:
        checkpointer.maybe_checkpoint(make_model(3), 0.0, {})
    assert isinstance(raised.value.__cause__, OSError)

    # flush()
    checkpointer.maybe_checkpoint(make_model(4), 0.0, {})
    with pytest.raises(CheckpointError) as raised:
        checkpointer.flush()
    assert isinstance(raised.value.__cause__, OSError)

    # load
    checkpointer.maybe_checkpoint(make_model(5), 0.0, {})
    with pytest.raises(CheckpointError):
        checkpointer.load_state_dict()

    # The cause goes away: saving works again, and the old version had never been torn.
    directory.unlink()
    directory.mkdir()
    recovered = make_model(6)
    checkpointer.maybe_checkpoint(recovered, 0.0, {})
    checkpointer.flush()
    assert_same_tensors(checkpointer.load_state_dict(), recovered.state_dict())
    assert before.keys() == recovered.state_dict().keys()


def writer_waits_answered() -> int:
    return sum(stats.waits_answered for stats in lifecycle.coordinator().writer_stats())


def test_a_load_of_a_written_state_asks_no_writer_and_still_sees_a_newer_save(runtime, tmp_path):
    """A restore a round after its save: the counters show every save of its key written, so the
    load reads at once; a save issued after that is still waited for."""
    checkpointer = PerRoundStateCheckpointer(tmp_path)
    checkpointer.save_checkpoint("state.pt", {"round": 1, "w": torch.ones(4)})
    checkpointer.flush()
    waits, waited = writer_waits_answered(), fedckpt.stats().waited_seconds
    for _ in range(3):
        assert checkpointer.load_checkpoint("state.pt")["round"] == 1
    assert writer_waits_answered() == waits
    assert fedckpt.stats().waited_seconds == waited

    checkpointer.save_checkpoint("state.pt", {"round": 2, "w": torch.full((4,), 2.0)})
    state = checkpointer.load_checkpoint("state.pt")  # read-your-writes: the pending save first
    assert state["round"] == 2 and torch.all(state["w"] == 2.0)


def test_a_load_after_a_save_failed_in_the_background_raises_its_error(runtime, tmp_path):
    directory = tmp_path / "checkpoints"
    checkpointer = PerRoundStateCheckpointer(str(directory))
    checkpointer.save_checkpoint("state.pt", {"round": 1})
    checkpointer.flush()
    shutil.rmtree(directory)
    directory.write_text("a file where the checkpoint directory was")
    save_and_wait_until_it_failed(lambda: checkpointer.save_checkpoint("state.pt", {"round": 2}))
    with pytest.raises(CheckpointError, match="state.pt") as raised:
        checkpointer.load_checkpoint("state.pt")
    assert isinstance(raised.value.__cause__, OSError)


def test_failure_does_not_touch_the_last_good_version(runtime, tmp_path):
    checkpointer = PerRoundStateCheckpointer(tmp_path)
    checkpointer.save_checkpoint("state.pt", {"round": 1})
    checkpointer.flush()
    control = tmp_path / CONTROL_DIR / TEMP_DIR
    shutil.rmtree(control)
    control.write_text("blocks the temp directory")  # every new write now fails
    checkpointer.save_checkpoint("state.pt", {"round": 2})
    with pytest.raises(CheckpointError):
        checkpointer.flush()
    assert torch.load(tmp_path / "state.pt", weights_only=False)["round"] == 1
    control.unlink()
    checkpointer.save_checkpoint("state.pt", {"round": 3})
    assert checkpointer.load_checkpoint("state.pt")["round"] == 3


# 6. Bounded memory ----------------------------------------------------------------------------------


def test_backpressure_keeps_inflight_bytes_under_the_budget(ray_instance, tmp_path):
    budget = 64 * MB
    fedckpt.init(namespace="fedckpt-backpressure", max_inflight_bytes=budget, num_writers=1, io_threads=1)
    try:
        coordinator = lifecycle.coordinator()
        checkpointer = PerRoundStateCheckpointer(tmp_path)
        observed = []
        x = torch.zeros(5 * MB)  # reused, so that the saves (a fill and a copy) outrun the writes
        for index in range(24):  # 24 x 20 MB to distinct keys: nothing coalesces
            checkpointer.save_checkpoint(f"s{index}.pt", {"x": x.fill_(float(index))})
            observed.append(coordinator.inflight_bytes())
        assert max(observed) <= budget
        assert max(observed) > budget // 2  # the budget was actually reached and enforced
        fedckpt.flush()
        assert coordinator.inflight_bytes() == 0
        for index in (0, 23):
            assert float(checkpointer.load_checkpoint(f"s{index}.pt")["x"][0]) == float(index)
    finally:
        fedckpt.init()  # back to the default pool for the other tests


# 7. Clear errors for bad input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, message",
    [
        ("", "empty"),
        ("../outside.pt", "escapes"),
        ("/etc/passwd", "not inside the checkpoint directory"),
        ("a\x00b", "NUL"),
        (".fedckpt/x.pt", "keeps for itself"),
        ("x" * 300, "longer than"),
        ("sub/", "directory"),
    ],
)
def test_bad_checkpoint_names(tmp_path, name, message):
    with pytest.raises(ValueError, match=message):
        LatestTorchModuleCheckpointer(str(tmp_path), name).maybe_checkpoint(nn.Linear(2, 2), 0.0, {})
    with pytest.raises(ValueError, match=message):
        PerRoundStateCheckpointer(tmp_path).save_checkpoint(name, {"a": 1})


def test_bad_states_and_models_are_rejected_before_anything_is_written(runtime, tmp_path):
    checkpointer = PerRoundStateCheckpointer(tmp_path)
    with pytest.raises(TypeError, match="cannot be saved"):
        checkpointer.save_checkpoint("lock.pt", {"lock": threading.Lock()})
    with pytest.raises(TypeError, match="must be a dict"):
        checkpointer.save_checkpoint("list.pt", [1, 2, 3])
    with pytest.raises(TypeError, match="nn.Module"):
        LatestTorchModuleCheckpointer(str(tmp_path), "m.pt").maybe_checkpoint({"not": "a model"}, 0.0, {})
    sparse = nn.Linear(2, 2)
    sparse.register_buffer("s", torch.eye(3).to_sparse())
    with pytest.raises(TypeError, match="layout"):  # safetensors holds dense tensors only
        LatestTorchModuleCheckpointer(str(tmp_path), "sparse.safetensors").maybe_checkpoint(sparse, 0.0, {})
    with pytest.raises(TypeError, match="cannot be saved"):
        unpicklable = nn.Linear(2, 2)
        unpicklable.lock = threading.Lock()
        LatestTorchModuleCheckpointer(str(tmp_path), "lock.pt").maybe_checkpoint(unpicklable, 0.0, {})
    with pytest.raises(TypeError, match="score must be a number"):
        fedckpt.BestLossTorchModuleCheckpointer(str(tmp_path), "b.pt").maybe_checkpoint(sparse, "low", {})
    fedckpt.flush()
    assert sorted(os.listdir(tmp_path)) == []


def test_subdirectories_inside_the_checkpoint_dir_are_allowed(runtime, tmp_path):
    checkpointer = PerRoundStateCheckpointer(tmp_path)
    checkpointer.save_checkpoint("client_3/round_2.pt", {"x": np.arange(3)})
    assert list(checkpointer.load_checkpoint("client_3/round_2.pt")["x"]) == [0, 1, 2]


def test_a_saved_model_is_not_kept_alive(runtime, tmp_path):
    """A Flower ClientApp builds a new model every round: fedckpt must let each one go."""
    import gc
    import weakref

    checkpointer = LatestTorchModuleCheckpointer(str(tmp_path), "m.safetensors")
    alive = []
    for seed in range(3):
        model = make_model(seed)
        checkpointer.maybe_checkpoint(model, 0.0, {})
        checkpointer.maybe_checkpoint(model, 0.0, {})  # the second save reuses the cached plan
        alive.append(weakref.ref(model))
        del model
    checkpointer.flush()
    gc.collect()
    assert [ref() for ref in alive] == [None, None, None]
