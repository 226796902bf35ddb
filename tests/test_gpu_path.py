"""The GPU save path, the parts of it that run without a GPU (tests/test_cuda.py needs one).

Without CUDA a save takes today's path (nothing of the GPU path runs); the overlap mode's hooks are
installed, called and removed as documented; the completion thread sends saves in order behind a copy
in flight, and reports a failed copy; the registered-memory pool registers, reuses, evicts and
unregisters (CUDA's calls replaced by fakes); the records of a state with device storages come from
torch's pickling under ``skip_data`` (checked on CPU storages, which take that path only here).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same_tensors, make_model
from hypothesis import given, settings
from test_state_records import states

import fedckpt
from fedckpt import _compat
from fedckpt.runtime import cuda, lifecycle, overlap_hooks
from fedckpt.runtime.settings import Settings
from fedckpt.runtime.staging import StagingArena
from fedckpt.runtime.transport import Transport
from fedckpt.storage.formats import torch_records
from fedckpt.storage.formats.torch_records import _RecordCollector

ROOT = Path(__file__).resolve().parent.parent


# ---- settings and stats -------------------------------------------------------------------------------


def test_overlap_and_the_registration_cap_from_the_environment(monkeypatch):
    monkeypatch.setenv("FEDCKPT_OVERLAP", "1")
    monkeypatch.setenv("FEDCKPT_MAX_REGISTERED_BYTES", str(1 << 20))
    settings = Settings.from_env()
    assert settings.overlap is True and settings.max_registered_bytes == 1 << 20
    assert {"overlap", "max_registered_bytes"} <= settings.explicit
    monkeypatch.delenv("FEDCKPT_OVERLAP")
    monkeypatch.delenv("FEDCKPT_MAX_REGISTERED_BYTES")
    assert Settings.from_env().overlap is False and Settings.from_env().max_registered_bytes == 4 << 30
    with pytest.raises(ValueError, match="max_registered_bytes"):
        Settings(max_registered_bytes=-1).validated()


def test_stats_report_registration_time_and_bytes():
    counters = fedckpt.stats()
    assert counters.registration_seconds >= 0.0
    assert counters.registered_bytes == 0  # nothing registered without a GPU


# ---- without CUDA: today's path ------------------------------------------------------------------------


def test_without_cuda_a_save_takes_todays_path(runtime, tmp_path, monkeypatch):
    """A model and a state on the CPU: no device part, no GPU staging made, no completion thread used;
    the files hold what was saved. ``overlap=True`` and ``wait_staged()`` change nothing."""
    submitted = []
    coordinator = lifecycle.coordinator()
    monkeypatch.setattr(coordinator._completions, "submit", lambda *args: submitted.append(args))
    model = make_model(1)
    state = {"optimizer": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).state_dict(), "round": 3}
    for overlap in (False, True):
        checkpointer = fedckpt.LatestTorchModuleCheckpointer(str(tmp_path), f"m{overlap}.safetensors", overlap=overlap)
        checkpointer.maybe_checkpoint(model, 0.0, {})
        states_ = fedckpt.PerRoundStateCheckpointer(str(tmp_path), overlap=overlap)
        states_.save_checkpoint(f"s{overlap}.pt", state)
        fedckpt.wait_staged()  # nothing is being copied: returns at once
        assert_same_tensors(checkpointer.load_state_dict(), model.state_dict())
        assert states_.load_checkpoint(f"s{overlap}.pt")["round"] == 3
    assert submitted == []
    assert coordinator._transport._device is None
    assert fedckpt.stats().registered_bytes == 0


def test_wait_staged_returns_at_once_and_loads_take_a_cpu_device(runtime, tmp_path):
    fedckpt.wait_staged(timeout=0.0)
    model = make_model(2)
    checkpointer = fedckpt.LatestTorchModuleCheckpointer(str(tmp_path), "m.safetensors")
    checkpointer.maybe_checkpoint(model, 0.0, {})
    assert_same_tensors(checkpointer.load_state_dict(device="cpu"), model.state_dict())
    assert_same_tensors(checkpointer.load_checkpoint(device="cpu").state_dict(), model.state_dict())
    states_ = fedckpt.PerRoundStateCheckpointer(str(tmp_path))
    states_.save_checkpoint("s.pt", {"w": model.body[0].weight.detach()})
    assert torch.equal(states_.load_checkpoint("s.pt", map_location="cpu")["w"], model.body[0].weight)


# ---- overlap mode's hooks ----------------------------------------------------------------------------


@pytest.fixture
def waits(monkeypatch):
    """Counts the calls the hooks make to order the GPU after the copies in flight."""
    calls: list[str] = []
    monkeypatch.setattr(cuda, "order_after_pending_copies", lambda: calls.append("wait"))
    yield calls
    overlap_hooks.remove_all()


def test_overlap_mode_installs_the_hooks_once_and_they_wait(runtime, tmp_path, waits):
    fedckpt.init(overlap=True)
    model = make_model(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpointer = fedckpt.LatestTorchModuleCheckpointer(str(tmp_path), "m.safetensors")
    assert not overlap_hooks.installed()
    for _ in range(3):  # saved again and again: one hook of each kind
        checkpointer.maybe_checkpoint(model, 0.0, {})
    assert overlap_hooks.installed(model)
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    assert waits == ["wait"]
    model.load_state_dict(make_model(4).state_dict())
    assert waits == ["wait", "wait"]
    other = make_model(5)
    other.load_state_dict(model.state_dict())  # a module never saved in overlap mode has no hook
    assert waits == ["wait", "wait"]


def test_no_checkpoint_holds_the_hook(runtime, tmp_path, waits):
    """The module's hook is off while it is snapshot: neither file format pickles fedckpt's hook."""
    fedckpt.init(overlap=True)
    model = make_model(6)
    for name in ("m.safetensors", "m.pt"):
        checkpointer = fedckpt.LatestTorchModuleCheckpointer(str(tmp_path), name)
        for _ in range(2):  # the second save finds the hook of the first in place
            checkpointer.maybe_checkpoint(model, 0.0, {})
        checkpointer.flush()
        assert b"overlap_hooks" not in (tmp_path / name).read_bytes()
        loaded = checkpointer.load_checkpoint()
        loaded.load_state_dict(model.state_dict())
        assert waits == []  # the loaded module carries no hook of fedckpt
    assert overlap_hooks.installed(model)


def test_the_checkpointers_option_overrides_the_process_default(runtime, tmp_path, waits):
    fedckpt.init(overlap=False)
    model = make_model(7)
    fedckpt.LatestTorchModuleCheckpointer(str(tmp_path), "plain.safetensors").maybe_checkpoint(model, 0.0, {})
    assert not overlap_hooks.installed()
    fedckpt.LatestTorchModuleCheckpointer(str(tmp_path), "o.safetensors", overlap=True).maybe_checkpoint(model, 0.0, {})
    assert overlap_hooks.installed(model)
    fedckpt.PerRoundStateCheckpointer(str(tmp_path), overlap=False).save_checkpoint("s.pt", {"r": 1})
    assert overlap_hooks.installed(model)


@pytest.mark.parametrize("how", ["shutdown", "init"])
def test_shutdown_and_init_remove_the_hooks(runtime, tmp_path, waits, how):
    fedckpt.init(overlap=True)
    model = make_model(8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fedckpt.LatestTorchModuleCheckpointer(str(tmp_path), "m.safetensors").maybe_checkpoint(model, 0.0, {})
    assert overlap_hooks.installed(model)
    if how == "shutdown":
        fedckpt.flush()
        lifecycle.shutdown()  # the session's Ray stays up: fedckpt did not start it
    else:
        fedckpt.init(overlap=False)
    assert not overlap_hooks.installed()
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    model.load_state_dict(make_model(9).state_dict())
    assert waits == []


# ---- the completion thread: order and failures ---------------------------------------------------


@dataclass(eq=False)
class HeldCopy:
    """Stands in for a GPU copy in flight: completes once ``release`` is set (or raises ``error``)."""

    release: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    completed: int = 0

    def complete(self, finish: bool = True) -> None:
        """Like PendingCopy's: once (the release of its segment calls it again)."""
        assert self.release.wait(60)
        if self.completed:
            return
        self.completed += 1
        if self.error is not None:
            raise self.error


@pytest.fixture
def held_copy(runtime, monkeypatch):
    """The next save staged looks like a GPU save whose copy is in flight until the test releases it."""
    held = HeldCopy()
    original = Transport.stage
    taken = []

    def stage(self, snapshot, ticket_room, overlap=False):
        staged = original(self, snapshot, ticket_room, overlap)
        if not taken:
            taken.append(staged)
            staged.copy = held
        return staged

    monkeypatch.setattr(Transport, "stage", stage)
    yield held
    held.release.set()


def test_a_save_behind_a_copy_in_flight_is_sent_after_it(tmp_path, held_copy):
    """Per-key order: the second save (host memory) waits behind the first (its copy in flight), so it
    gets the later sequence and is the version on storage; wait_staged waits for both; a flush too."""
    checkpointer = fedckpt.LatestTorchModuleCheckpointer(str(tmp_path), "m.safetensors")
    first, second = make_model(10), make_model(11)
    checkpointer.maybe_checkpoint(first, 0.0, {})
    checkpointer.maybe_checkpoint(second, 0.0, {})
    assert fedckpt.stats().pending_saves >= 2
    with pytest.raises(TimeoutError):
        fedckpt.wait_staged(timeout=0.2)
    held_copy.release.set()
    fedckpt.wait_staged(timeout=60)
    checkpointer.flush(timeout=60)
    assert_same_tensors(checkpointer.load_state_dict(), second.state_dict())
    assert held_copy.completed == 1


def test_a_flush_waits_for_the_copy_in_flight(tmp_path, held_copy):
    checkpointer = fedckpt.LatestTorchModuleCheckpointer(str(tmp_path), "m.safetensors")
    model = make_model(12)
    checkpointer.maybe_checkpoint(model, 0.0, {})
    with pytest.raises(TimeoutError):
        checkpointer.flush(timeout=0.3)
    threading.Timer(0.2, held_copy.release.set).start()
    checkpointer.flush(timeout=60)
    assert_same_tensors(checkpointer.load_state_dict(), model.state_dict())


def test_a_failed_copy_is_an_error_at_the_next_flush(tmp_path, held_copy):
    held_copy.error = RuntimeError("CUDA error: an illegal memory access was encountered")
    held_copy.release.set()
    checkpointer = fedckpt.LatestTorchModuleCheckpointer(str(tmp_path), "broken.safetensors")
    checkpointer.maybe_checkpoint(make_model(13), 0.0, {})
    with pytest.raises(fedckpt.CheckpointError, match="illegal memory access"):
        checkpointer.flush(timeout=60)
    assert not (tmp_path / "broken.safetensors").exists()
    checkpointer.maybe_checkpoint(make_model(14), 0.0, {})  # the error was reported once; saving goes on
    checkpointer.flush(timeout=60)
    assert (tmp_path / "broken.safetensors").exists()


# ---- the registered-memory pool (CUDA's calls replaced) --------------------------------------------


@pytest.fixture
def fake_cuda(monkeypatch):
    """cudaHostRegister / cudaHostUnregister replaced by fakes that record what they were asked."""
    calls: dict[str, list] = {"register": [], "unregister": [], "threads": []}
    refuse: list[int] = []

    def register(address, nbytes):
        calls["register"].append((address, nbytes))
        calls["threads"].append(threading.current_thread().name)
        return refuse.pop(0) if refuse else 0

    def unregister(address):
        calls["unregister"].append(address)
        return 0

    monkeypatch.setattr(_compat, "cuda_host_register", register)
    monkeypatch.setattr(_compat, "cuda_host_unregister", unregister)
    calls["refuse"] = refuse
    return calls


@pytest.fixture
def arena(tmp_path):
    staging = StagingArena(64 << 20, directory=str(tmp_path))
    yield staging
    staging.close()


def test_the_pool_registers_a_segment_once_and_reuses_it(fake_cuda, arena):
    pool = cuda.RegisteredPool(16 << 20)
    segment = arena.acquire(1 << 20)
    first = pool.acquire(segment)
    assert first is not None and first.host.numel() == segment.size
    pool.release(first)
    assert pool.acquire(segment) is first  # no second registration
    assert fake_cuda["register"] == [(segment.array.ctypes.data, segment.size)]
    assert fake_cuda["threads"] == ["fedckpt-cuda-register"]  # never on the caller's thread
    assert pool.registered_bytes == segment.size
    arena.release(segment)
    assert arena.acquire(1 << 20, prefer=pool.registered) is segment


def test_the_pool_evicts_the_least_recently_used_idle_registration(fake_cuda, arena):
    one, two, three = (arena.acquire(4 << 20) for _ in range(3))
    pool = cuda.RegisteredPool(one.size + two.size)
    registrations = [pool.acquire(segment) for segment in (one, two)]
    for registration in registrations:
        pool.release(registration)
    held = pool.acquire(one)  # one is busy (a copy in flight) and the most recently used
    assert pool.acquire(three) is not None  # evicts two, the least recently used idle one
    assert fake_cuda["unregister"] == [two.array.ctypes.data]
    assert pool.registered(one) and not pool.registered(two) and pool.registered(three)
    assert pool.acquire(two) is None  # one and three busy: over the cap, not registered
    pool.release(held)
    assert pool.registered_bytes == one.size + three.size


def test_a_refused_registration_is_none_and_closing_unregisters(fake_cuda, arena, caplog):
    pool = cuda.RegisteredPool(64 << 20)
    fake_cuda["refuse"].append(3)  # cudaErrorInitializationError, say
    segment = arena.acquire(1 << 20)
    address = segment.array.ctypes.data
    with caplog.at_level("WARNING", logger="fedckpt"):
        assert pool.acquire(segment) is None
    assert "bounce buffer" in caplog.text
    registration = pool.acquire(segment)  # refused once; tried again at its next use
    assert registration is not None
    pool.release(registration)
    big = arena.acquire(80 << 20)  # over the cap: never registered
    assert pool.acquire(big) is None
    arena.release(segment)
    arena.release(big)
    arena.close()  # the registration is undone before the segment is unmapped
    assert fake_cuda["unregister"] == [address]
    assert pool.registered_bytes == 0 and not pool.registered(segment)


# ---- state records under skip_data (the path of GPU storages) -------------------------------------


def records(collected) -> list[tuple[str, bytes]]:
    return [(name, view.tobytes()) for name, view in collected]


@settings(max_examples=100, deadline=None)
@given(state=states())
def test_records_named_under_skip_data_and_filled_are_torch_saves(state):
    """The path a state with GPU storages takes, on CPU storages: torch's pickling names the storages
    without their bytes, and the storages :func:`describe` found fill them in, in its order."""
    described = torch_records.describe(state)
    assert described is not None
    named = _RecordCollector()
    _compat.torch_save_records(state, named, skip_data=True)
    assert named.fill(described.storages)
    full = _RecordCollector()
    _compat.torch_save_records(state, full)
    assert records(named.records) == records(full.records)


def test_fill_refuses_storages_that_do_not_match():
    state = {"a": torch.zeros(3), "b": torch.ones(5)}
    named = _RecordCollector()
    _compat.torch_save_records(state, named, skip_data=True)
    assert not named.fill([torch.zeros(5).untyped_storage(), torch.zeros(3).untyped_storage()])
    assert not named.fill([torch.zeros(3).untyped_storage()])
    assert any(view is None for _, view in named.records)  # left as it was


# ---- the benchmark and the device run, without a GPU ---------------------------------------------


def test_bench_on_cuda_without_a_gpu_is_a_clear_message(capsys):
    from fedckpt.cli import main

    assert main(["bench", "--device", "cuda", "--out", "unused"]) == 2
    assert "CUDA" in capsys.readouterr().err


def test_what_the_gpu_host_runs_never_imports_flower(tmp_path):
    """The GPU host has no Flower: conftest, tests/test_cuda.py, benchmarks/gpu.py and what they import
    of fedckpt must not import flwr."""
    script = f"""
import importlib.util, sys
sys.modules["flwr"] = None  # any import of flwr raises ImportError
sys.path[:0] = [{str(ROOT / "tests")!r}, {str(ROOT / "src")!r}]
import conftest, test_cuda
spec = importlib.util.spec_from_file_location("gpu_bench", {str(ROOT / "benchmarks" / "gpu.py")!r})
spec.loader.exec_module(importlib.util.module_from_spec(spec))
import fedckpt.bench.gpu
print("no flwr")
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no flwr" in done.stdout


def test_the_cuda_tests_are_skipped_here_with_a_reason():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: tests/test_cuda.py runs")
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "cuda", "-p", "no:cacheprovider"]
    done = subprocess.run(
        [*command, str(ROOT / "tests" / "test_cuda.py")],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "no CUDA device" in done.stdout and " passed" not in done.stdout


def test_numpy_views_stay_views():
    """The host-memory sources of a snapshot are still numpy views (the copy of today's path)."""
    from fedckpt.snapshot import snapshot_module

    snapshot = snapshot_module(make_model(15))
    assert snapshot.device_parts == []
    assert all(isinstance(view, np.ndarray) for view in snapshot.sources)


# ---- the GPU path's Python, run on CPU tensors with stand-ins for CUDA's streams and events --------
#
# No GPU here: these run every line of runtime/cuda.py's staging (registered segment, bounce buffer,
# pinned buffer for the object store, blocking copy), the completion thread and the overlap hooks on
# CPU tensors posing as device memory. What they cannot show (that the copies are asynchronous, that
# the events order the streams) is tests/test_cuda.py's.


class FakeStream:
    def __init__(self, device=None) -> None:
        self.device = device
        self.waited: list = []

    def wait_stream(self, other) -> None:
        self.waited.append(other)

    def wait_event(self, event) -> None:
        self.waited.append(event)

    def synchronize(self) -> None:
        return None


class FakeEvent:
    """Its ``synchronize`` blocks until the test lets the copies complete (``FakeEvent.gate``)."""

    gate = threading.Event()

    def __init__(self, enable_timing: bool = False, blocking: bool = False) -> None:
        self.blocking = blocking
        self.stream = None

    def record(self, stream=None) -> None:
        self.stream = stream

    def synchronize(self) -> None:
        assert FakeEvent.gate.wait(60)


@pytest.fixture
def fake_device(runtime, monkeypatch, fake_cuda):
    """Every tensor's bytes are a "device part", copied by runtime/cuda.py with fake streams and events."""
    from fedckpt import snapshot

    streams: dict = {}
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: streams.setdefault(device, FakeStream()))
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(cuda, "_side_streams", {})
    monkeypatch.setattr(cuda, "_logged", set())
    monkeypatch.setattr(cuda, "_pinned", lambda nbytes: torch.empty(nbytes, dtype=torch.uint8))
    monkeypatch.setattr(snapshot, "byte_view", lambda tensor: tensor.reshape(-1).view(torch.uint8))
    monkeypatch.setattr(torch_records, "storage_view", lambda storage: torch.empty(0, dtype=torch.uint8).set_(
        storage, 0, (storage.nbytes(),), (1,)))  # fmt: skip
    FakeEvent.gate.set()
    yield streams
    FakeEvent.gate.set()
    fedckpt.init()  # the segments registered with the fakes are unregistered with them too


def test_fake_device_default_mode_registers_once_and_orders_the_callers_stream(fake_device, fake_cuda, tmp_path):
    fedckpt.init()  # a new pool, with the stand-ins
    checkpointer = fedckpt.LatestTorchModuleCheckpointer(str(tmp_path), "m.safetensors")
    states_ = fedckpt.PerRoundStateCheckpointer(str(tmp_path))
    for seed in (20, 21, 22):  # a model rebuilt every round: its segment is registered once
        model = make_model(seed)
        expected = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        checkpointer.maybe_checkpoint(model, 0.0, {})
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model(torch.randn(2, 8)).sum().backward()
        optimizer.step()
        states_.save_checkpoint("s.pt", {"optimizer": optimizer.state_dict(), "round": seed})
        fedckpt.wait_staged(timeout=60)
        assert_same_tensors(checkpointer.load_state_dict(), expected)
        saved = states_.load_checkpoint("s.pt")
        assert saved["round"] == seed
        assert_same_tensors(saved["optimizer"]["state"][0], optimizer.state_dict()["state"][0])
    assert len(fake_cuda["register"]) == 2  # the model's segment and the state's, each once
    assert fedckpt.stats().registered_bytes > 0
    current = fake_device[torch.device("cpu")]
    assert any(isinstance(waited, FakeEvent) and waited.blocking for waited in current.waited)  # default mode


def test_fake_device_overlap_mode_the_step_waits_for_the_copy_in_flight(fake_device, tmp_path):
    fedckpt.init(overlap=True)
    model = make_model(23)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpointer = fedckpt.LatestTorchModuleCheckpointer(str(tmp_path), "m.safetensors")
    current = fake_device.setdefault(torch.device("cpu"), FakeStream())
    FakeEvent.gate.clear()  # the copy stays in flight
    checkpointer.maybe_checkpoint(model, 0.0, {})
    assert not any(isinstance(waited, FakeEvent) for waited in current.waited)  # the save did not order the stream
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()  # the hook: the stream waits for the copy's event
    assert sum(isinstance(waited, FakeEvent) for waited in current.waited) == 1
    with pytest.raises(TimeoutError):
        fedckpt.wait_staged(timeout=0.2)
    FakeEvent.gate.set()
    fedckpt.wait_staged(timeout=60)
    optimizer.step()  # nothing in flight any more: no wait
    assert sum(isinstance(waited, FakeEvent) for waited in current.waited) == 1
    checkpointer.flush()


@pytest.mark.parametrize("fallback", ["bounce buffer", "object store", "blocking copy"])
def test_fake_device_fallbacks_save_the_same_bytes(fake_device, fake_cuda, tmp_path, monkeypatch, fallback, caplog):
    if fallback == "object store":
        fedckpt.init(shared_memory_staging=False)
    else:
        fake_cuda["refuse"].extend([999] * 10)
        fedckpt.init()
    if fallback == "blocking copy":
        monkeypatch.setattr(cuda, "_pinned", lambda nbytes: None)
    model = make_model(24)
    checkpointer = fedckpt.LatestTorchModuleCheckpointer(str(tmp_path), "m.safetensors")
    before = fedckpt.stats()
    with caplog.at_level("WARNING", logger="fedckpt"):
        for _ in range(2):
            checkpointer.maybe_checkpoint(model, 0.0, {})
            checkpointer.flush()
            assert_same_tensors(checkpointer.load_state_dict(), model.state_dict())
    after = fedckpt.stats()
    if fallback == "object store":
        assert after.bytes_object_store > before.bytes_object_store
    else:
        assert "bounce buffer" in caplog.text and after.registered_bytes == 0


def test_the_completion_thread_stops_at_exit_when_idle():
    """threads.stop_all (the exit path) wakes the idle completion thread, which returns at once."""
    script = """
import time
from fedckpt.runtime import threads
from fedckpt.runtime.completion import Completions
delivered = []
completions = Completions(delivered.append, lambda records, error: None)
completions.submit(None, ["a save"])
assert completions.wait_delivered(10) and delivered == [["a save"]]
start = time.monotonic()
threads.stop_all(5.0)
assert not completions._thread.is_alive(), "still running"
print(f"stopped in {time.monotonic() - start:.3f} s")
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.split()[2]) < 1.0


@pytest.fixture
def cpu_as_a_load_device(monkeypatch):
    """Loads take the GPU path (page-locked buffer, non-blocking copies) with the CPU as the device."""
    from fedckpt.storage import reading

    monkeypatch.setattr(reading, "cuda_device", lambda device: None if device is None else torch.device("cpu"))
    monkeypatch.setattr(reading, "page_locked", lambda nbytes: torch.empty(nbytes, dtype=torch.uint8))


def test_loads_through_the_gpu_path_read_the_same_tensors(runtime, tmp_path, cpu_as_a_load_device):
    import io

    from fedckpt.storage import reading

    model = make_model(30)
    model.body[0].weight.data = model.body[0].weight.data.to(torch.bfloat16)  # mixed dtypes in one file
    checkpointer = fedckpt.LatestTorchModuleCheckpointer(str(tmp_path), "m.safetensors")
    checkpointer.maybe_checkpoint(model, 0.0, {})
    assert_same_tensors(checkpointer.load_state_dict(device="cuda"), model.state_dict())
    assert_same_tensors(checkpointer.load_checkpoint(device="cuda").state_dict(), model.state_dict())
    data = (tmp_path / "m.safetensors").read_bytes()
    assert_same_tensors(reading.read_state_dict(io.BytesIO(data), "cuda"), model.state_dict())  # an object's file
    base = torch.arange(300_000, dtype=torch.float32)  # over 1 MiB: the mapped read
    state = {"views": [base, base[5:]], "ids": torch.arange(7), "round": 4}
    states_ = fedckpt.PerRoundStateCheckpointer(str(tmp_path))
    states_.save_checkpoint("s.pt", state)
    for loaded in (states_.load_checkpoint("s.pt", map_location="cuda"),
                   reading.read_state(io.BytesIO((tmp_path / "s.pt").read_bytes()), map_location="cuda")):  # fmt: skip
        assert torch.equal(loaded["views"][1], base[5:]) and torch.equal(loaded["ids"], state["ids"])
        assert loaded["views"][1].untyped_storage().data_ptr() == loaded["views"][0].untyped_storage().data_ptr()
        assert loaded["round"] == 4
