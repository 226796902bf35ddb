"""The GPU save path, the parts of it that run without a GPU (tests/test_cuda.py needs one).

Without CUDA a save takes today's path (nothing of the GPU path runs); the overlap mode's hooks are
installed, called and removed as documented; the records of a state with device storages come from
torch's pickling under ``skip_data`` (checked on CPU storages, which take that path only here).
Everything that needs a GPU (the copies, their order, the registered pool, the completion thread, the
fallbacks) is tested on one, in tests/test_cuda.py: none of it is faked here.
"""

from __future__ import annotations

import os
import subprocess
import sys
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


def test_the_cuda_tests_are_outside_the_default_run_and_fail_without_a_gpu():
    """Opt-in by marker, as the slow tests: deselected by default; selected with ``-m cuda`` on a machine
    without a GPU, each fails saying so (no test skipped in silence)."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_cuda.py")]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    default = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert default.returncode == pytest.ExitCode.NO_TESTS_COLLECTED, default.stdout[-3000:]
    assert "deselected" in default.stdout and " passed" not in default.stdout
    selected = subprocess.run([*command, "-m", "cuda"], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    if torch.cuda.is_available():
        assert selected.returncode == 0, selected.stdout[-3000:]
    else:
        assert selected.returncode == pytest.ExitCode.TESTS_FAILED, selected.stdout[-3000:]
        assert "this test needs a CUDA GPU" in selected.stdout and " passed" not in selected.stdout


def test_numpy_views_stay_views():
    """The host-memory sources of a snapshot are still numpy views (the copy of today's path)."""
    from fedckpt.snapshot import snapshot_module

    snapshot = snapshot_module(make_model(15))
    assert snapshot.device_parts == []
    assert all(isinstance(view, np.ndarray) for view in snapshot.sources)
