"""The GPU benchmark's runner and report, run on CPU models with stand-ins for CUDA's timing events.

The figures of such a run mean nothing (no GPU is measured): this checks that the runner goes through
every step, checks what each method saved, turns a failing method into a row note, evaluates the
targets and writes its files, so that the run on the GPU host does not fail on plumbing.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

from fedckpt.bench import gpu, gpu_methods, gpu_report


class TimingEvent:
    """Stands in for torch.cuda.Event(enable_timing=True): the host's clock when recorded."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False) -> None:
        self.at = 0.0

    def record(self, stream=None) -> None:
        self.at = time.perf_counter()

    def synchronize(self) -> None:
        return None

    def elapsed_time(self, other: TimingEvent) -> float:
        return (other.at - self.at) * 1e3


class CpuFloor(gpu_methods.PinnedCopyCaller):
    """The floor's copies, on the CPU: no pinned memory, no stream."""

    def prepare(self, model: nn.Module) -> None:
        self.buffers = {name: torch.empty_like(tensor) for name, tensor in gpu_methods.state_of(model).items()}

    def save(self, model: nn.Module) -> TimingEvent:
        for name, tensor in gpu_methods.state_of(model).items():
            self.buffers[name].copy_(tensor)
        event = TimingEvent()
        event.record()
        return event

    def before_step(self, handle: TimingEvent) -> None:
        return None


def tiny(side: int = 64, layers: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(side, side, bias=False) for _ in range(layers)))


@pytest.fixture
def cpu_as_cuda(runtime, monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.cuda, "Event", TimingEvent)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(gpu, "require_cuda", lambda: None)
    monkeypatch.setattr(gpu, "_meta", lambda names, directory: {"cases": names, "directory": directory})
    monkeypatch.setitem(gpu.GPU_CASES, "tiny", gpu.GpuCase("tiny", "4 Linear(64, 64) on the CPU", tiny, repeats=2))
    monkeypatch.setitem(
        gpu.GPU_CASES,
        "tiny-loop",
        gpu.GpuCase("tiny-loop", "the same, trained", tiny, kind="loop", steps=6, save_every=2, repeats=2),
    )
    save_methods = (CpuFloor, *gpu_methods.SAVE_METHODS[1:])
    monkeypatch.setattr(gpu, "SAVE_METHODS", save_methods)
    monkeypatch.setattr(gpu, "LOOP_METHODS", save_methods)


def test_the_gpu_bench_runs_checks_and_reports(cpu_as_cuda, tmp_path):
    result = gpu.run_gpu_bench(out=str(tmp_path / "out"), cases=["tiny", "tiny-loop"], directory=str(tmp_path))
    written = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert [case["case"] for case in written["cases"]] == ["tiny", "tiny-loop"]
    assert "targets (from this run's figures)" in (tmp_path / "out" / "gpu.txt").read_text()
    save_case, loop_case = result["cases"]
    by_method = {entry["method"]: entry for entry in save_case["methods"]}
    # DefaultStager's pinned options need CUDA: on the CPU that method fails, as a row note.
    assert by_method.pop("dcp.async_save (DefaultStager, pinned)")["error"]
    for name, entry in by_method.items():
        assert entry["error"] is None and entry["check"] == "ok", (name, entry)
        assert len(entry["call_s"]) == 2 and entry["exposed_p50_s"] >= 0
    assert by_method["pinned copy (caller's stream): floor"]["exposed_vs_floor"] == pytest.approx(1.0)
    loop_methods = {entry["method"]: entry for entry in loop_case["methods"]}
    assert loop_methods["no checkpoint"]["overhead_pct"] is None
    for name in ("fedckpt (default mode)", "fedckpt (overlap mode)", "torch.save", "dcp.async_save (default)"):
        assert loop_methods[name]["check"] == "ok" and loop_methods[name]["overhead_pct"] is not None, name
    names = [target["target"] for target in result["targets"]]
    assert "tiny: fedckpt default GPU time exposed / floor" in names
    assert "tiny-loop: fedckpt overlap overhead" in names
    assert any(name.startswith("tiny: fedckpt overlap call below DCP") for name in names)


def test_targets_are_met_missed_or_without_a_figure():
    """Made-up inputs (not measurements) for the rule of each target."""
    floor = "pinned copy (caller's stream): floor"
    save = {
        "case": "fp32-2gb", "kind": "save",
        "methods": [
            {"method": floor, "error": None, "call_p50_s": 0.04, "exposed_vs_floor": 1.0},
            {"method": "fedckpt (default mode)", "error": None, "call_p50_s": 0.0005, "exposed_vs_floor": 1.1},
            {"method": "fedckpt (overlap mode)", "error": None, "call_p50_s": 0.002, "exposed_vs_floor": 0.01},
            {"method": "dcp.async_save (default)", "error": None, "call_p50_s": 1.0},
            {"method": "dcp.async_save (DefaultStager, pinned)", "error": "ImportError: no", "call_p50_s": None},
        ],
    }  # fmt: skip
    loop = {
        "case": "loop", "kind": "loop",
        "methods": [
            {"method": floor, "error": None, "overhead_pct": 1.5},
            {"method": "fedckpt (default mode)", "error": None, "overhead_pct": 3.0},
            {"method": "fedckpt (overlap mode)", "error": None, "overhead_pct": 1.0},
        ],
    }  # fmt: skip
    targets = {target["target"]: target["passed"] for target in gpu_report.evaluate_targets([save, loop])}
    assert targets["fp32-2gb: fedckpt default call"] is True
    assert targets["fp32-2gb: fedckpt overlap call"] is False
    assert targets["fp32-2gb: fedckpt default GPU time exposed / floor"] is True
    assert targets["loop: fedckpt overlap overhead"] is True
    assert targets["loop: fedckpt default overhead (floor's + 1)"] is False  # 3.0 > 1.5 + 1
    assert targets["fp32-2gb: fedckpt default call below DCP's best"] is True
    assert targets["loop: fedckpt overlap overhead below DCP's best"] is None  # no DCP figure
