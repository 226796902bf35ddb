"""Storage faults (a full or read-only file system, a directory replaced by a file): a clear error in the caller,
the writer keeps running, older checkpoints intact, saving resumes once the cause is gone."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import assert_same_tensors, make_model

import fedckpt
from fedckpt import LatestTorchModuleCheckpointer, PerRoundStateCheckpointer
from fedckpt.cli import main as fedckpt_cli
from fedckpt.runtime import lifecycle

MB = 1 << 20


@pytest.fixture
def small_filesystem(tmp_path):
    """A 3 MiB tmpfs mounted for the test (needs the right to mount, as root in CI has)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs here (these tests need root): {mounted.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill_up(directory):
    """A file that takes every free byte of the file system."""
    path = directory / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (MB, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return path


def writer_pids():
    return sorted(stats.pid for stats in lifecycle.coordinator().writer_stats())


@pytest.mark.parametrize("kind", ["state", "model"])
def test_a_full_file_system_is_reported_and_saving_resumes_once_there_is_room(runtime, small_filesystem, kind):
    if kind == "state":
        checkpointer = PerRoundStateCheckpointer(small_filesystem)

        def save(megabytes, value):
            checkpointer.save_checkpoint("state.pt", {"x": torch.full((megabytes * MB // 4,), value)})

        def load():
            return checkpointer.load_checkpoint("state.pt")["x"]
    else:
        checkpointer = LatestTorchModuleCheckpointer(str(small_filesystem), "model.safetensors")

        def save(megabytes, value):
            model = torch.nn.Linear(megabytes * MB // 4 // 64, 64, bias=False)
            torch.nn.init.constant_(model.weight, value)
            checkpointer.maybe_checkpoint(model, 0.0, {})

        def load():
            return checkpointer.load_state_dict()["weight"]

    save(1, 1.0)
    checkpointer.flush()
    pids = writer_pids()
    save(4, 4.0)  # does not fit next to the first
    with pytest.raises(fedckpt.CheckpointError) as raised:
        checkpointer.flush()
    message = str(raised.value)
    assert "No space left on device" in message and str(small_filesystem) in message
    filler = fill_up(small_filesystem)  # now not even the small parts of a file fit
    save(1, 3.0)
    with pytest.raises(fedckpt.CheckpointError, match="No space left on device"):
        checkpointer.flush()
    assert writer_pids() == pids, "the writer crashed instead of reporting the error"
    assert torch.all(load() == 1.0)  # the earlier checkpoint is intact
    assert os.listdir(small_filesystem / ".fedckpt" / "tmp") == []  # the failed temp files were removed
    os.remove(filler)
    save(1, 2.0)  # fits again: the failed saves left nothing behind
    checkpointer.flush()
    assert torch.all(load() == 2.0)


def test_a_state_write_error_keeps_the_model_checkpoint_of_the_same_directory(runtime, small_filesystem):
    model = make_model(1, width=16)
    model_checkpointer = LatestTorchModuleCheckpointer(str(small_filesystem), "model.safetensors")
    model_checkpointer.maybe_checkpoint(model, 0.0, {})
    model_checkpointer.flush()
    state = PerRoundStateCheckpointer(small_filesystem)
    state.save_checkpoint("huge.pt", {"x": torch.zeros(8 * MB // 4)})
    with pytest.raises(fedckpt.CheckpointError):
        state.flush()
    assert_same_tensors(model_checkpointer.load_state_dict(), model.state_dict())


def test_a_read_only_file_system_is_reported_and_saving_resumes_when_writable(runtime, small_filesystem):
    """EROFS (a file system remounted read-only, as after disk errors): a CheckpointError naming the
    checkpoint and the cause, the last good version intact, and saving resumes once it is writable."""
    checkpointer = PerRoundStateCheckpointer(small_filesystem)
    checkpointer.save_checkpoint("state.pt", {"round": 1})
    checkpointer.flush()
    subprocess.run(["mount", "-o", "remount,ro", str(small_filesystem)], check=True)
    try:
        checkpointer.save_checkpoint("state.pt", {"round": 2})
        with pytest.raises(fedckpt.CheckpointError) as raised:
            checkpointer.flush()
        assert "Read-only file system" in str(raised.value) and str(small_filesystem / "state.pt") in str(raised.value)
        assert checkpointer.load_checkpoint("state.pt")["round"] == 1
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_filesystem)], check=True)
    checkpointer.save_checkpoint("state.pt", {"round": 3})
    assert checkpointer.load_checkpoint("state.pt")["round"] == 3
    assert fedckpt_cli(["verify", str(small_filesystem)]) == 0


def test_a_directory_replaced_by_a_file_is_reported_and_saving_resumes_when_it_is_back(runtime, tmp_path):
    """The checkpoint directory deleted and a file put in its place: a clear error for the save, the
    other checkpoints untouched, and saving resumes once the directory is back."""
    other = LatestTorchModuleCheckpointer(str(tmp_path / "other"), "model.safetensors")
    model = make_model(2, width=16)
    other.maybe_checkpoint(model, 0.0, {})
    client = PerRoundStateCheckpointer(tmp_path / "client")
    client.save_checkpoint("state.pt", {"round": 1})
    client.flush()
    shutil.rmtree(tmp_path / "client")
    (tmp_path / "client").write_text("not a directory")
    client.save_checkpoint("state.pt", {"round": 2})
    with pytest.raises(fedckpt.CheckpointError) as raised:
        client.flush()
    assert str(tmp_path / "client" / "state.pt") in str(raised.value)
    assert "Not a directory" in str(raised.value) or "File exists" in str(raised.value)
    assert_same_tensors(other.load_state_dict(), model.state_dict())
    (tmp_path / "client").unlink()
    client.save_checkpoint("state.pt", {"round": 3})
    assert client.load_checkpoint("state.pt")["round"] == 3


def test_a_small_dev_shm_stages_through_the_object_store_and_the_trainer_lives(tmp_path):
    """Docker's 64 MB /dev/shm, or less: in a private mount namespace with an 8 MB tmpfs over /dev/shm, a
    64 MB model is saved. Staging memory is reserved when a segment is made, so the shortage is an
    error fedckpt sees (one warning, saying what to do), not a SIGBUS in the middle of the copy."""
    script = f"""
import os, warnings
import ray, torch, fedckpt
ray.init(address="local", include_dashboard=False, num_cpus=1, object_store_memory=300 << 20)
model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048, bias=False) for _ in range(4)])  # 64 MiB
checkpointer = fedckpt.LatestTorchModuleCheckpointer({str(tmp_path)!r}, "model.safetensors")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for step in range(2):
        with torch.no_grad():
            model[0].weight.fill_(step)
        checkpointer.maybe_checkpoint(model, 0.0, {{}})
checkpointer.flush()
loaded = checkpointer.load_state_dict()
print("loaded:", all(torch.equal(loaded[name], value) for name, value in model.state_dict().items()))
print("warnings:", [str(w.message) for w in caught if "shm" in str(w.message)])
ray.shutdown()
"""
    command = f'mount -t tmpfs -o size=8m tmpfs /dev/shm && exec {sys.executable} -c "$0"'
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_ADDRESS": "local"}
    result = subprocess.run(["unshare", "-m", "sh", "-c", command, script], capture_output=True, text=True,
                            timeout=300, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert "loaded: True" in lines, result.stdout
    (warned,) = [line for line in lines if line.startswith("warnings:")]
    assert warned.count("--shm-size") == 1, warned  # once per process, with what to do
    assert fedckpt_cli(["verify", str(tmp_path)]) == 0


def test_staging_memory_never_stays_above_its_budget_once_released(tmp_path):
    """Segments are reused while they fit the budget; released ones beyond it are unmapped and removed."""
    from fedckpt.runtime.staging import StagingArena

    directory = tmp_path / "shm"
    directory.mkdir()
    arena = StagingArena(max_bytes=8 * MB, directory=str(directory))
    try:
        busy = [arena.acquire(5 * MB) for _ in range(3)]  # in flight at once: more than the budget
        assert arena.total_bytes() > 8 * MB
        for segment in busy:
            arena.release(segment)
        assert arena.total_bytes() <= 8 * MB
        assert sum(os.path.getsize(directory / name) for name in os.listdir(directory)) == arena.total_bytes()
        again = arena.acquire(5 * MB)  # a kept segment is reused
        assert len(os.listdir(directory)) == 1
        arena.release(again)
    finally:
        arena.close()
    assert os.listdir(directory) == []


IN_ANOTHER_PID_NAMESPACE = """
import os, sys
from fedckpt.runtime.staging import StagingArena
from fedckpt.storage.atomic import claim_temp
from fedckpt.storage.paths import temp_path

target = int(sys.argv[1])
while True:  # pids in a new namespace count up from 1: fork until a child gets the pid we want
    child = os.fork()
    if child == 0:
        if os.getpid() != target:
            os._exit(0)
        arena = StagingArena(max_bytes=1 << 20, directory=sys.argv[2])
        arena.acquire(4096)  # a segment, locked while this process lives
        os.makedirs(os.path.join(sys.argv[3], ".fedckpt", "tmp"), exist_ok=True)
        claim_temp(temp_path(os.path.join(sys.argv[3], "model.pt")))  # a temp file being written
        print("holding", os.getpid(), flush=True)
        sys.stdin.read()  # until the test closes our stdin
        os._exit(0)
    os.waitpid(child, 0)
    if child >= target:
        break
"""


def test_files_whose_owner_lives_in_another_pid_namespace_are_never_removed(tmp_path):
    """A container with --ipc=host, or a shared hostname: the owner's PID, written in the file's name,
    names no process (or another one) here. Its lock says it is alive; once it dies, its files go."""
    from fedckpt.runtime.staging import remove_orphans
    from fedckpt.storage import atomic

    live = {int(name) for name in os.listdir("/proc") if name.isdigit()}
    target = next(pid for pid in range(40, 400) if pid not in live)  # dead here, alive over there
    shm, checkpoints = tmp_path / "shm", tmp_path / "checkpoints"
    shm.mkdir()
    checkpoints.mkdir()
    owner = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount", "--mount-proc", sys.executable, "-c", IN_ANOTHER_PID_NAMESPACE,
         str(target), str(shm), str(checkpoints)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    temps = checkpoints / ".fedckpt" / "tmp"
    try:
        assert owner.stdout.readline().split() == ["holding", str(target)], owner.stderr.read()[-2000:]
        assert remove_orphans(str(shm), grace_seconds=0.0) == 0
        assert atomic.remove_stale_temps(str(temps)) == []
        assert len(os.listdir(shm)) == 1 and len(os.listdir(temps)) == 1
    finally:
        owner.stdin.close()
        owner.wait(timeout=60)
    assert remove_orphans(str(shm), grace_seconds=0.0) == 1  # the owner is gone: now they are removed
    assert len(atomic.remove_stale_temps(str(temps))) == 1
    assert os.listdir(shm) == [] and os.listdir(temps) == []
