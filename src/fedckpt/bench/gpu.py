"""``fedckpt bench --device cuda`` (also ``benchmarks/gpu.py``): saves of a model on a GPU, fedckpt in
both modes beside the pinned-copy floor, ``torch.save`` and DCP's ``async_save``.

Cases (models built on the GPU):

- ``fp32-256mb``, ``fp32-2gb``: 64 square bias-free fp32 Linear layers. Single saves, each from an idle
  GPU with the model changed in place before it; the methods take turns, the order reversed every
  repeat. Per save: the **call** (the caller's thread, wall clock), the GPU time **exposed** (CUDA
  events on the caller's stream around the call: how long after the call began the stream could run
  new work), until the copy is **staged** (the model may change freely) and until **durable**.
- ``bf16-512mb-loop``: 16 Linear(4096, 4096) bf16 layers trained with SGD (momentum) on one batch of
  8192 x 4096, a save every 10 steps; the training time of ``steps`` steps against the same loop with no
  save (its **overhead**), then until the last save is durable.

Every method's first timed save of a case is read back and compared with the state at its call (the model
changed right after the call, or after ``staged`` where the method's contract says so): a save that
does not hold the state at its call is a FAILED check. The targets of the GPU issue are evaluated from
the figures of the run itself (:mod:`fedckpt.bench.gpu_report`). Output: rich tables, and ``gpu.json``
and ``gpu.txt`` under ``out``.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported: loopback

import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import ray  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from torch import nn  # noqa: E402

import fedckpt  # noqa: E402
from fedckpt.bench.gpu_methods import LOOP_METHODS, SAVE_METHODS, GpuMethod, state_of  # noqa: E402
from fedckpt.bench.gpu_report import evaluate_targets, loop_table, save_table, targets_table  # noqa: E402

MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class GpuCase:
    """A model on the GPU: saved alone (``kind="save"``), or trained with a save every ``save_every``
    steps (``kind="loop"``)."""

    name: str
    description: str
    build: Callable[[], nn.Module]
    kind: str = "save"
    steps: int = 0
    save_every: int = 0
    repeats: int = 5  # saves per method (loops per method for a loop case), unless --repeats says


def linear_layers(total_bytes: int, layers: int, dtype: torch.dtype) -> nn.Module:
    """``layers`` square bias-free Linear layers of ``dtype`` adding up to about ``total_bytes``, made on
    the GPU."""
    side = int((total_bytes / layers / torch.empty((), dtype=dtype).element_size()) ** 0.5)
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(side, side, bias=False, dtype=dtype, device="cuda") for _ in range(layers)))


GPU_CASES: dict[str, GpuCase] = {
    case.name: case
    for case in (
        GpuCase("fp32-256mb", "fp32, 64 Linear layers, 256 MiB", lambda: linear_layers(256 * MIB, 64, torch.float32)),
        GpuCase(
            "fp32-2gb", "fp32, 64 Linear layers, 2 GiB", lambda: linear_layers(2048 * MIB, 64, torch.float32), repeats=2
        ),
        GpuCase(
            "bf16-512mb-loop",
            "bf16, 16 Linear(4096, 4096), SGD, a batch of 8192 x 4096, a save every 10 steps",
            lambda: linear_layers(512 * MIB, 16, torch.bfloat16),
            kind="loop",
            steps=50,
            save_every=10,
            repeats=2,
        ),  # fmt: skip
    )
}
DEFAULT_GPU_CASES = tuple(GPU_CASES)


class CudaUnavailable(RuntimeError):
    """torch sees no CUDA device here."""


def require_cuda() -> None:
    if not torch.cuda.is_available():
        build = "built without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no device visible"
        raise CudaUnavailable(f"torch sees no CUDA device here (torch {torch.__version__}, {build})")


# ---- measuring -----------------------------------------------------------------------------------


def on_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.to("cpu", copy=True) for name, tensor in state_of(model).items()}


def mutate(model: nn.Module) -> None:
    """Change every weight in place, on the caller's stream, as a training step would."""
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.add_(1)


def same(saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> bool:
    return saved.keys() == expected.keys() and all(
        saved[name].dtype == expected[name].dtype and torch.equal(saved[name].cpu(), expected[name])
        for name in expected
    )


@dataclasses.dataclass
class SaveSamples:
    call_s: list[float] = dataclasses.field(default_factory=list)
    exposed_s: list[float] = dataclasses.field(default_factory=list)
    staged_s: list[float] = dataclasses.field(default_factory=list)
    durable_s: list[float] = dataclasses.field(default_factory=list)


def one_save(method: GpuMethod, model: nn.Module, samples: SaveSamples | None, check: bool) -> bool | None:
    """One save from an idle GPU (the model changed first); with ``check``, the model changed again
    as the method's contract allows and the save read back. Returns the check's result (None: none)."""
    mutate(model)
    expected = on_cpu(model) if check else None
    torch.cuda.synchronize()
    before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    before.record()
    start = time.perf_counter()
    handle = method.save(model)
    returned = time.perf_counter()
    after.record()
    if check and method.mutates_after_call:
        mutate(model)
    method.staged(handle)
    staged = time.perf_counter()
    if check and not method.mutates_after_call:
        mutate(model)
    method.durable(handle)
    durable = time.perf_counter()
    after.synchronize()
    if samples is not None:
        samples.call_s.append(returned - start)
        samples.exposed_s.append(before.elapsed_time(after) / 1e3)
        samples.staged_s.append(staged - start)
        samples.durable_s.append(durable - start)
    if expected is None:
        return None
    return same(method.saved(model), expected)


@dataclasses.dataclass
class LoopSample:
    train_s: float
    durable_s: float
    call_s: list[float]


def one_loop(
    method: GpuMethod | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: torch.Tensor,
    steps: int,
    save_every: int,
    check: bool = False,
) -> tuple[LoopSample, bool | None]:
    """``steps`` training steps with a save after every ``save_every`` (none without a method); with
    ``check``, the last save read back and compared with the state at its call."""
    calls, handle, expected = [], None, None
    torch.cuda.synchronize()
    start = time.perf_counter()
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        model(batch).float().pow(2).mean().backward()
        if handle is not None and method is not None:
            method.before_step(handle)
        optimizer.step()
        if method is not None and (step + 1) % save_every == 0:
            if check:
                expected = on_cpu(model)
            called = time.perf_counter()
            handle = method.save(model)
            calls.append(time.perf_counter() - called)
    torch.cuda.synchronize()
    trained = time.perf_counter()
    if method is not None and handle is not None:
        method.durable(handle)
    durable = time.perf_counter()
    sample = LoopSample(trained - start, durable - start, calls)
    if expected is None or method is None:
        return sample, None
    return sample, same(method.saved(model), expected)


# ---- running -------------------------------------------------------------------------------------


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]


def _p50(samples: Sequence[float]) -> float | None:
    return statistics.median(samples) if samples else None


def _make(method_type: type[GpuMethod], directory: str, model: nn.Module, entry: dict[str, Any]) -> GpuMethod | None:
    try:
        path = os.path.join(directory, "".join(c if c.isalnum() else "-" for c in method_type.name).strip("-"))
        os.makedirs(path, exist_ok=True)
        method = method_type(path)
        method.prepare(model)
        return method
    except Exception as error:  # a method that cannot run here is a row note, the run goes on
        entry["error"] = _describe(error)
        return None


def _close(method: GpuMethod | None, entry: dict[str, Any]) -> None:
    if method is not None:
        try:
            method.close()
        except Exception as error:
            entry["error"] = entry["error"] or _describe(error)


def run_save_case(case: GpuCase, repeats: int, directory: str, deadline: float) -> dict[str, Any]:
    model = case.build()
    nbytes = sum(tensor.numel() * tensor.element_size() for tensor in state_of(model).values())
    result: dict[str, Any] = {"case": case.name, "kind": "save", "description": case.description, "bytes": nbytes,
                              "tensors": len(state_of(model)), "repeats": 0, "methods": []}  # fmt: skip
    runs: list[tuple[GpuMethod | None, dict[str, Any], SaveSamples]] = []
    for method_type in SAVE_METHODS:
        entry: dict[str, Any] = {"method": method_type.name, "error": None, "check": None}
        method = _make(method_type, directory, model, entry)
        if method is not None:
            try:
                one_save(method, model, None, check=False)  # warm-up: registration, threads, Ray, first files
            except Exception as error:
                entry["error"] = _describe(error)
        runs.append((method, entry, SaveSamples()))
        result["methods"].append(entry)
    for repeat in range(repeats):
        if repeat and time.monotonic() > deadline:
            result["cut_short"] = True
            break
        for method, entry, samples in runs if repeat % 2 == 0 else reversed(runs):
            if method is not None and entry["error"] is None:
                try:  # the first repeat, which always runs, also checks (outside the timed parts)
                    checked = one_save(method, model, samples, check=repeat == 0)
                    if checked is not None:
                        entry["check"] = "ok" if checked else "FAILED: the save does not hold the state at its call"
                except Exception as error:
                    entry["error"] = _describe(error)
        result["repeats"] = repeat + 1
    for method, entry, samples in runs:
        _close(method, entry)
        entry.update({"call_s": samples.call_s, "exposed_s": samples.exposed_s, "staged_s": samples.staged_s,
                      "durable_s": samples.durable_s, "call_p50_s": _p50(samples.call_s),
                      "exposed_p50_s": _p50(samples.exposed_s), "staged_p50_s": _p50(samples.staged_s),
                      "durable_p50_s": _p50(samples.durable_s)})  # fmt: skip
    floor = next((e["exposed_p50_s"] for e in result["methods"] if e["method"].endswith("floor")), None)
    for entry in result["methods"]:
        exposed = entry["exposed_p50_s"]
        entry["exposed_vs_floor"] = exposed / floor if exposed is not None and floor else None
    result["floor_gb_s"] = nbytes / floor / 1e9 if floor else None
    del model
    return result


def run_loop_case(case: GpuCase, repeats: int, directory: str, deadline: float) -> dict[str, Any]:
    model = case.build()
    side = model[0].in_features
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    batch = torch.randn(8192, side, device=model[0].weight.device, dtype=model[0].weight.dtype)
    nbytes = sum(tensor.numel() * tensor.element_size() for tensor in state_of(model).values())
    result: dict[str, Any] = {
        "case": case.name, "kind": "loop", "description": case.description, "bytes": nbytes, "steps": case.steps,
        "save_every": case.save_every, "repeats": 0, "methods": [],
    }  # fmt: skip
    baseline: dict[str, Any] = {"method": "no checkpoint", "error": None, "check": None, "samples": []}
    runs: list[tuple[GpuMethod | None, dict[str, Any]]] = [(None, baseline)]
    one_loop(None, model, optimizer, batch, case.save_every, case.save_every)  # warms the kernels up
    for method_type in LOOP_METHODS:
        entry: dict[str, Any] = {"method": method_type.name, "error": None, "check": None, "samples": []}
        method = _make(method_type, directory, model, entry)
        if method is not None:
            try:  # warm-up and check: two saves, a step after the last, the last read back
                _, checked = one_loop(method, model, optimizer, batch, 2 * case.save_every + 1, case.save_every, True)
                entry["check"] = "ok" if checked else "FAILED: the save does not hold the state at its call"
            except Exception as error:
                entry["error"] = _describe(error)
        runs.append((method, entry))
    for repeat in range(repeats):
        if repeat and time.monotonic() > deadline:
            result["cut_short"] = True
            break
        for method, entry in runs if repeat % 2 == 0 else reversed(runs):
            if entry["error"] is None and (method is not None or entry is baseline):
                try:
                    sample, _ = one_loop(method, model, optimizer, batch, case.steps, case.save_every)
                    entry["samples"].append(dataclasses.asdict(sample))
                except Exception as error:
                    entry["error"] = _describe(error)
        result["repeats"] = repeat + 1
    for method, entry in runs:
        _close(method, entry)
    base = _p50([sample["train_s"] for sample in baseline["samples"]])
    for _, entry in runs:
        train = _p50([sample["train_s"] for sample in entry["samples"]])
        entry["train_p50_s"] = train
        entry["step_ms"] = None if train is None else train / case.steps * 1e3
        entry["durable_p50_s"] = _p50([sample["durable_s"] for sample in entry["samples"]])
        entry["call_p50_s"] = _p50([call for sample in entry["samples"] for call in sample["call_s"]])
        meaningful = base and train is not None and entry is not baseline
        entry["overhead_pct"] = (train / base - 1) * 100 if meaningful else None
    result["methods"] = [entry for _, entry in runs]
    del model, optimizer, batch
    return result


def _meta(names: list[str], directory: str) -> dict[str, Any]:
    properties = torch.cuda.get_device_properties(0)
    return {
        "cases": names, "directory": directory, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "ray": ray.__version__, "fedckpt": fedckpt.__version__,
        "gpu": properties.name, "gpu_memory_bytes": properties.total_memory, "gpus": torch.cuda.device_count(),
    }  # fmt: skip


def run_gpu_bench(
    out: str | None = None,
    cases: Sequence[str] | None = None,
    repeats: int | None = None,
    directory: str | None = None,
    budget_seconds: float = 240.0,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the GPU cases, print their tables and the targets, and write ``gpu.json`` and ``gpu.txt``
    under ``out``. ``CudaUnavailable`` without a GPU. Past ``budget_seconds`` a case stops repeating
    (each method keeps at least one sample, and the case says ``cut_short``)."""
    require_cuda()
    names = list(cases) if cases else list(DEFAULT_GPU_CASES)
    unknown = [name for name in names if name not in GPU_CASES]
    if unknown:
        raise ValueError(f"unknown GPU case(s) {', '.join(unknown)}; known: {', '.join(GPU_CASES)}")
    if repeats is not None and repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    console = console or Console(width=180, record=True)
    started_ray = not ray.is_initialized()
    # Room for two 2 GiB snapshots in flight, and their segments registered.
    fedckpt.init(max_inflight_bytes=8 << 30, max_registered_bytes=8 << 30)
    workdir = tempfile.mkdtemp(prefix="fedckpt-gpu-bench-", dir=directory)
    deadline = time.monotonic() + budget_seconds
    result: dict[str, Any] = {"meta": _meta(names, workdir), "cases": []}
    try:
        for name in names:
            case = GPU_CASES[name]
            console.print(f"[bold]{name}[/bold] ...")
            run = run_loop_case if case.kind == "loop" else run_save_case
            case_dir = os.path.join(workdir, name)
            result["cases"].append(run(case, repeats or case.repeats, case_dir, deadline))
            shutil.rmtree(case_dir, ignore_errors=True)
            gc.collect()
            torch.cuda.empty_cache()
    finally:
        try:
            fedckpt.flush()
            if started_ray:
                fedckpt.shutdown()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    result["targets"] = evaluate_targets(result["cases"])
    result["stats"] = dataclasses.asdict(fedckpt.stats())
    for case in result["cases"]:
        console.print(save_table(case) if case["kind"] == "save" else loop_table(case))
        console.print()
    console.print(targets_table(result["targets"]))
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "gpu.json"), "w", encoding="utf-8") as file:
            json.dump(result, file, indent=2)
            file.write("\n")
        if console.record:
            with open(os.path.join(out, "gpu.txt"), "w", encoding="utf-8") as file:
                file.write(console.export_text())
        console.print(f"written: {os.path.join(out, 'gpu.json')}")
    return result
