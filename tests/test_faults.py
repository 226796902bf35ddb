"""Processes killed at random points: a writer mid-stream, and the caller mid-stream.

Nothing acknowledged is lost, no reader ever sees a partial file or an older checkpoint after a
newer one, and what a dead caller left behind does not trouble the next run.
"""

import itertools
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import ray
import torch
from conftest import shared_pool_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

import fedckpt
from fedckpt import LatestTorchModuleCheckpointer, PerRoundStateCheckpointer
from fedckpt.cli import main as fedckpt_cli
from fedckpt.runtime import lifecycle
from fedckpt.runtime.pool import writer_name
from fedckpt.runtime.staging import PREFIX, SHM_DIR, remove_orphans
from fedckpt.snapshot import snapshot_state

KIB = 1 << 10
STATE_KEYS = ("state_a.pt", "state_b.pt")
MODEL_KEYS = ("model_a.safetensors", "model_b.safetensors")
CHAOS_NAMESPACE = "fedckpt-chaos"


def leftover_temp_files(directory) -> list[str]:
    """Temp files anywhere below ``directory``, the manifest's hidden folder included."""
    return [name for _, _, names in os.walk(directory) for name in names if name.endswith(".tmp")]


def counter_on_disk(path: str) -> int | None:
    """The counter a checkpoint file holds, read straight from the disk; checks it is whole."""
    if not os.path.exists(path):
        return None
    if path.endswith(".pt"):
        state = torch.load(path, weights_only=False)
        assert torch.all(state["x"] == state["counter"]), f"{path} mixes two saves"
        return state["counter"]
    tensors = load_file(path)
    values = {float(tensor.reshape(-1)[0]) for tensor in tensors.values()}
    assert len(values) == 1 and all(torch.all(t == t.reshape(-1)[0]) for t in tensors.values()), f"{path} mixed"
    return int(values.pop())


class DiskWatcher(threading.Thread):
    """Reads every checkpoint file over and over while saves and kills go on."""

    def __init__(self, paths: list[str]) -> None:
        super().__init__(daemon=True)
        self.paths = paths
        self.stop = threading.Event()
        self.seen: dict[str, list[int]] = {path: [] for path in paths}
        self.problems: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            for path in self.paths:
                try:
                    counter = counter_on_disk(path)
                except Exception as error:  # a partial or corrupt file
                    self.problems.append(f"{path}: {type(error).__name__}: {error}")
                    continue
                if counter is not None:
                    self.seen[path].append(counter)
            time.sleep(0.002)  # leave the saving thread most of the GIL

    def regressions(self) -> list[str]:
        return [
            f"{path}: {before} then {after}"
            for path, counters in self.seen.items()
            for before, after in itertools.pairwise(counters)
            if after < before
        ]


class Wide(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.layer = nn.Linear(width, width)


@pytest.fixture(scope="module")
def chaos_pool(ray_instance):
    """A pool of its own, so that killing its writers disturbs no other test."""
    fedckpt.init(namespace=CHAOS_NAMESPACE, num_writers=2, io_threads=2)
    yield [ray.get_actor(writer_name(index), namespace=CHAOS_NAMESPACE) for index in range(2)]
    lifecycle.coordinator().stop_writers()
    fedckpt.init()


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kills=st.lists(st.tuples(st.integers(0, 23), st.floats(0.0, 0.05), st.integers(0, 1)), min_size=1, max_size=2),
    state_kib=st.integers(64, 4096),
    width=st.integers(64, 768),
)
def test_a_writer_killed_at_random_points_loses_nothing_acknowledged(chaos_pool, tmp_path_factory, kills, state_kib,
                                                                      width):  # fmt: skip
    """SIGKILL writers at random moments of a stream of saves (mid-write, mid-rename, idle, ...).

    After the flush, every key holds the last save issued for it; while it ran, no file was ever
    partial and no key ever went back to an older save; the writers restarted; no temp file is left.
    """
    directory = tmp_path_factory.mktemp("chaos")
    states = PerRoundStateCheckpointer(directory)
    models = {name: LatestTorchModuleCheckpointer(str(directory), name) for name in MODEL_KEYS}
    model = Wide(width)
    watcher = DiskWatcher([str(directory / name) for name in (*STATE_KEYS, *MODEL_KEYS)])
    watcher.start()
    issued = 0
    kill_at = {after: (delay, writer) for after, delay, writer in kills}
    killed_pids = []

    def kill(delay: float, writer: int) -> None:
        time.sleep(delay)  # lands anywhere in the write path of the saves in flight
        pid = ray.get(chaos_pool[writer].stats.remote()).pid
        os.kill(pid, signal.SIGKILL)
        killed_pids.append(pid)

    killers = []
    for counter in range(24):
        if counter in kill_at:
            killers.append(threading.Thread(target=kill, args=kill_at[counter]))
            killers[-1].start()
        for name in STATE_KEYS:
            states.save_checkpoint(name, {"counter": counter, "x": torch.full((state_kib * KIB // 8,), counter)})
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.fill_(counter)
        for checkpointer in models.values():
            checkpointer.maybe_checkpoint(model, 0.0, {})
        issued = counter
    for killer in killers:
        killer.join()
    fedckpt.flush()
    watcher.stop.set()
    watcher.join()

    assert watcher.problems == [] and watcher.regressions() == []
    for name in (*STATE_KEYS, *MODEL_KEYS):
        assert counter_on_disk(str(directory / name)) == issued, name
    assert states.load_checkpoint(STATE_KEYS[0])["counter"] == issued
    assert models[MODEL_KEYS[0]].load_checkpoint().layer.weight[0, 0] == issued
    live = {ray.get(writer.stats.remote()).pid for writer in chaos_pool}
    assert not live & set(killed_pids)  # every killed writer came back as a new process
    assert fedckpt_cli(["verify", str(directory)]) == 0
    assert leftover_temp_files(directory) == []


CALLER = """
import os, signal, sys, time, torch, fedckpt, ray
from fedckpt.snapshot import Snapshot
ray.init(address={address!r}, include_dashboard=False, log_to_driver=False)
copies = 0
copy_into = Snapshot.copy_into

def copy_and_maybe_die(snapshot, destination):  # dies halfway through its copy, or right after it
    global copies
    copies += 1
    if copies == {die_mid_copy}:
        destination[: snapshot.nbytes // 2] = 0xAB
        os.kill(os.getpid(), signal.SIGKILL)
    copy_into(snapshot, destination)
    if copies == {die_after_copy}:  # before the writer hears of the save
        os.kill(os.getpid(), signal.SIGKILL)

Snapshot.copy_into = copy_and_maybe_die
states = fedckpt.PerRoundStateCheckpointer({directory!r})
model = torch.nn.Linear(512, 512)
x = torch.empty({numel}, dtype=torch.int64)
latest = fedckpt.LatestTorchModuleCheckpointer({directory!r}, "model.safetensors")
for counter in range({rounds}):
    for name in {keys!r}:
        states.save_checkpoint(name, {{"counter": counter, "x": x.fill_(counter)}})
        print("acked", name, counter, flush=True)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(counter)
    latest.maybe_checkpoint(model, 0.0, {{}})
    print("acked model.safetensors", counter, flush=True)
fedckpt.flush()
print("done", flush=True)
"""


def start_caller(directory, rounds: int, die_mid_copy: int = 0, die_after_copy: int = 0) -> subprocess.Popen:
    """A separate driver on the test's Ray cluster, saving into the default writer pool; it kills
    itself in the middle of its ``die_mid_copy``-th snapshot copy, or right after its
    ``die_after_copy``-th (before it sends the save to the writer), if told to."""
    address = ray.get_runtime_context().gcs_address
    script = CALLER.format(address=address, directory=str(directory), rounds=rounds, keys=STATE_KEYS,
                           numel=4096 * KIB, die_mid_copy=die_mid_copy, die_after_copy=die_after_copy)  # fmt: skip
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=shared_pool_env())  # fmt: skip


def acknowledged(caller: subprocess.Popen, acked: dict[str, int]) -> int:
    """Read the caller's acks until it dies; returns how many were read."""
    count = 0
    for line in caller.stdout:
        _, name, counter = line.split()
        acked[name] = int(counter)
        count += 1
    return count


def abandoned_saves() -> int:
    return sum(stats.abandoned for stats in lifecycle.coordinator().writer_stats())


@pytest.mark.parametrize("moment", ["mid-copy", "after-copy", "any"])
def test_a_caller_killed_mid_stream_leaves_loadable_checkpoints_and_a_clean_start(runtime, tmp_path, moment):
    """SIGKILL a saving process: halfway through a snapshot copy, between the copy and telling the
    writer, or at a random moment.

    Every save it saw acknowledged is written (or a newer one) and what is on disk verifies. A
    writer hears of a save only once its copy is complete, so a save cut short never reaches it:
    neither the flush nor the next run waits on it or sees a stale error, and the checkpoint keeps
    its previous version. The next run leaves nothing of the dead caller behind.
    """
    abandoned_before = abandoned_saves()
    acked: dict[str, int] = {}
    if moment == "any":
        caller = start_caller(tmp_path, rounds=1000)
        for _ in range(5 + int.from_bytes(os.urandom(1)) % 20):
            _, name, counter = caller.stdout.readline().split()
            acked[name] = int(counter)
        time.sleep(int.from_bytes(os.urandom(1)) / 255 * 0.05)
        caller.send_signal(signal.SIGKILL)
    else:  # the 5th save (of state_b.pt, counter 1) is the one it dies in
        die = {"mid-copy": {"die_mid_copy": 5}, "after-copy": {"die_after_copy": 5}}[moment]
        caller = start_caller(tmp_path, rounds=1000, **die)
    acknowledged(caller, acked)
    assert caller.wait() == -signal.SIGKILL, caller.stderr.read()[-3000:]

    fedckpt.flush(timeout=60)  # waits for the dead caller's saves too; none is an error for us
    for name, counter in acked.items():
        assert counter_on_disk(str(tmp_path / name)) >= counter, name
    if moment != "any":
        assert acked["state_b.pt"] == 0 and counter_on_disk(str(tmp_path / "state_b.pt")) == 0
        assert abandoned_saves() == abandoned_before  # nothing reached a writer to be dropped
    assert fedckpt_cli(["verify", str(tmp_path)]) == 0
    assert leftover_temp_files(tmp_path) == []

    next_run = start_caller(tmp_path, rounds=2)
    out, err = next_run.communicate(timeout=90)
    assert next_run.returncode == 0, err[-3000:]
    assert out.strip().endswith("done")
    for name in (*STATE_KEYS, "model.safetensors"):
        assert counter_on_disk(str(tmp_path / name)) == 1, name
    assert fedckpt_cli(["verify", str(tmp_path)]) == 0
    # Its segments go once no save of it can still be on its way to a writer (the sweep's grace period).
    remove_orphans(grace_seconds=0.0)
    assert not [name for name in os.listdir(SHM_DIR) if name.startswith(f"{PREFIX}{caller.pid}-")]


SAVE_AND_DIE = """
import os, ray, torch, fedckpt
ray.init(address={address!r}, include_dashboard=False, log_to_driver=False)
checkpointer = fedckpt.PerRoundStateCheckpointer({directory!r})
checkpointer.save_checkpoint("warm.pt", {{"v": 0}})
checkpointer.flush()  # the pool and the channel are up
checkpointer.save_checkpoint("orphan.pt", {{"v": "from the dead caller", "x": torch.arange(1000)}})
os._exit(0)  # killed right after the call returned: nothing cleaned up, no flush
"""


def test_a_save_sent_just_before_its_caller_died_is_written(runtime, tmp_path):
    """A caller returns from a save (its message sent) and dies at once; another process sweeps
    dead processes' segments right then. The writer maps a segment when the save arrives, and the
    sweep keeps a dead process's segment for a grace period after its last use: the save is
    written, and the key takes new saves afterwards."""
    address = ray.get_runtime_context().gcs_address
    script = SAVE_AND_DIE.format(address=address, directory=str(tmp_path))
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                           env=shared_pool_env())  # fmt: skip
    assert child.returncode == 0, child.stderr[-3000:]
    remove_orphans()  # as a new process on the node does when it starts
    fedckpt.flush()
    state = torch.load(tmp_path / "orphan.pt", weights_only=False)
    assert state["v"] == "from the dead caller" and torch.equal(state["x"], torch.arange(1000))
    checkpointer = PerRoundStateCheckpointer(tmp_path)
    checkpointer.save_checkpoint("orphan.pt", {"v": "next"})  # no stale error for the next caller
    assert checkpointer.load_checkpoint("orphan.pt")["v"] == "next"


def publish_every_other_version(path: str, parity: int, versions: int) -> None:
    """One incarnation of a writer: publishes the versions of one parity, as fast as it can."""
    import numpy as np

    from fedckpt.storage.posix import persist_checkpoint

    for number in range(parity, versions, 2):
        snapshot = snapshot_state({"n": number, "x": torch.full((1000 + 997 * (number % 13),), number)})
        data = np.empty(snapshot.nbytes, dtype=np.uint8)
        snapshot.copy_into(data)
        persist_checkpoint(path, "state", snapshot.layout, memoryview(data), (1, number), None, None, f"w{parity}")


def test_two_incarnations_of_a_writer_publishing_at_once_keep_file_and_manifest_a_pair(tmp_path):
    """A writer on a node being lost still runs while Ray's restarted copy writes the same checkpoint:
    the newest version wins, the entry always describes the file beside it (``verify`` runs all along),
    and the version on disk never goes back."""
    import multiprocessing

    from fedckpt.storage.manifest import read_entry

    path = str(tmp_path / "contested.pt")
    versions = 300
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=publish_every_other_version, args=(path, p, versions)) for p in (0, 1)]
    for writer in writers:
        writer.start()
    seen, problems = [], 0
    while any(writer.is_alive() for writer in writers):
        entry = read_entry(path)
        if entry is not None:
            seen.append(entry.sequence[1])
        problems += fedckpt_cli(["verify", str(tmp_path)])
    for writer in writers:
        writer.join()
        assert writer.exitcode == 0
    assert problems == 0 and len(seen) > 10
    assert all(after >= before for before, after in itertools.pairwise(seen))
    assert torch.load(path, weights_only=False)["n"] == versions - 1 == read_entry(path).sequence[1]
    assert fedckpt_cli(["verify", str(tmp_path)]) == 0


TRAINING_LOOP = """
import signal, sys, torch, fedckpt
if {user_handler!r}:
    def on_sigterm(signum, frame):
        print("user handler ran", flush=True)
        sys.exit(143)
    signal.signal(signal.SIGTERM, on_sigterm)
states = fedckpt.PerRoundStateCheckpointer({directory!r})
step = 0
while True:
    step += 1
    states.save_checkpoint("state.pt", {{"counter": step, "x": torch.full((8 << 20,), step)}})  # 64 MiB
    print("acked state.pt", step, flush=True)
"""


SIGTERM_AROUND_BACKGROUND_START = """
import os, signal, sys, threading, torch, fedckpt
from fedckpt.runtime import failpoints
def on_sigterm(signum, frame):
    print("user handler ran", flush=True)
    sys.exit(143)
signal.signal(signal.SIGTERM, on_sigterm)
if {during_ray_init!r}:  # to the thread in ray.init, once its core worker is up: delivered before pthread_kill returns
    failpoints.set_hook("ray_session.connected", lambda: signal.pthread_kill(threading.get_ident(), signal.SIGTERM))
states = fedckpt.PerRoundStateCheckpointer({directory!r})
states.save_checkpoint("state.pt", {{"counter": 1, "x": torch.ones(4)}})  # held: Ray joins in the background
fedckpt.flush()  # that thread has connected, and the pool is up
os.kill(os.getpid(), signal.SIGTERM)
"""


@pytest.mark.parametrize("during_ray_init", [True, False], ids=["during-ray-init", "after-ray-init"])
def test_sigterm_around_the_background_join_of_ray_runs_the_programs_handler(runtime, tmp_path, during_ray_init):
    """Ray's core worker, created off the main thread by the background start, would install a C++
    handler for SIGTERM that aborts the process (status -6): the program's handler (behind fedckpt's
    flush) must run whether the signal comes while Ray connects or later, and the held save is kept."""
    script = SIGTERM_AROUND_BACKGROUND_START.format(directory=str(tmp_path), during_ray_init=during_ray_init)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 143 and "user handler ran" in done.stdout, (done.returncode, done.stderr[-3000:])
    # Ray's handler dumps a stack ("*** SIGTERM received ...") before handing on, and aborts the process
    # if that takes more than its alarm allows (a busy machine): it must not be the one that runs.
    assert "SIGTERM received" not in done.stderr, done.stderr[-3000:]
    assert counter_on_disk(str(tmp_path / "state.pt")) == 1


@pytest.mark.parametrize("user_handler", [False, True], ids=["default-handler", "user-handler"])
def test_sigterm_mid_save_flushes_every_acknowledged_save_then_exits_as_it_would_have(runtime, tmp_path, user_handler):
    """Preemption (Slurm, Kubernetes): SIGTERM to a training loop that saves as fast as it can. Every
    save it saw acknowledged is on disk when it has ended, and it ends as it would have without
    fedckpt: killed by SIGTERM (143 in a shell), or through the user's own handler."""
    script = TRAINING_LOOP.format(directory=str(tmp_path), user_handler=user_handler)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    loop = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)  # fmt: skip
    acked: dict[str, int] = {}
    for _ in range(4):
        _, name, counter = loop.stdout.readline().split()
        acked[name] = int(counter)
    loop.send_signal(signal.SIGTERM)  # while it saves the next one
    rest = loop.stdout.read().split("\n")
    for line in rest:
        if line.startswith("acked"):
            acked["state.pt"] = int(line.split()[2])
    code = loop.wait(timeout=120)
    stderr = loop.stderr.read()
    if user_handler:
        assert code == 143 and "user handler ran" in rest, (code, stderr[-3000:])
    else:
        assert code == -signal.SIGTERM, (code, stderr[-3000:])
    assert counter_on_disk(str(tmp_path / "state.pt")) >= acked["state.pt"]
    assert fedckpt_cli(["verify", str(tmp_path)]) == 0
