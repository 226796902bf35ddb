"""Runs the cases: one model per case, every method on it in the same process, then the tables and the JSON."""

from __future__ import annotations

import os

# Keep Ray on loopback. It only counts if set before Ray is imported (benchmarks/bench.py does that);
# fedckpt pins a Ray instance it starts to 127.0.0.1 either way.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import gc  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn  # noqa: E402

import fedckpt  # noqa: E402
from fedckpt.bench import report as reporting  # noqa: E402
from fedckpt.bench.cases import CASES, DEFAULT_CASES, QUICK_CASES, Case, case_names  # noqa: E402
from fedckpt.bench.measure import (  # noqa: E402
    SaveSamples,
    burst_size,
    raw_write_fsync,
    synthetic_batches,
    time_burst,
    time_loop,
    time_one_save,
    warm_up,
)
from fedckpt.bench.methods import LOOP_METHODS, SAVE_METHODS, HostBytes, NoCheckpoint, SaveMethod  # noqa: E402

DEFAULT_REPEATS = 10
QUICK_REPEATS = 5


def run_bench(
    cases: Sequence[str] | None = None,
    repeats: int | None = None,
    directory: str | None = None,
    json_path: str | None = None,
    quick: bool = False,
    console: Console | None = None,
    shutdown: bool | None = None,
) -> dict[str, Any]:
    """Run the benchmark, print one table per case, and return the report (also written to ``json_path``).

    Args:
        cases: case names (see ``fedckpt.bench.cases.CASES``); default: every case but
            ``fp32-400mb``, or the 100 MiB ones with ``quick``.
        repeats: saves per method and case (loops per method for loop cases); default 10, or 5 with ``quick``.
        directory: where to make the run's temp directory (default: the system's temp dir). Removed at the end.
        json_path: also write the report, raw samples included, to this file.
        quick: small cases and fewer repeats.
        console: where to print (default: stdout).
        shutdown: call ``fedckpt.shutdown()`` at the end. Default: only if Ray was not running at the start,
            so a benchmark run inside a program (or a test session) that owns Ray leaves it alone.
    """
    names = list(cases) if cases else list(QUICK_CASES if quick else DEFAULT_CASES)
    unknown = [name for name in names if name not in CASES]
    if unknown:
        raise ValueError(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(case_names())}")
    repeats = repeats if repeats is not None else QUICK_REPEATS if quick else DEFAULT_REPEATS
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    console = console if console is not None else default_console()
    if shutdown is None:
        shutdown = not ray.is_initialized()
    if directory is not None:
        os.makedirs(directory, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="fedckpt-bench-", dir=directory)
    result: dict[str, Any] = {"meta": _meta(names, repeats, quick, workdir), "cases": []}
    try:
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, transient=True,
        ) as progress:  # fmt: skip
            overall = progress.add_task("cases", total=len(names))
            for name in names:
                case = CASES[name]
                progress.update(overall, description=f"case {name}")
                run = _run_loop_case if case.kind == "loop" else _run_save_case
                result["cases"].append(run(case, repeats, os.path.join(workdir, name), progress))
                gc.collect()  # the case's model and copies go before the next one is built
                progress.advance(overall)
    finally:
        if shutdown:
            try:
                fedckpt.shutdown()
            except Exception as error:  # a failed save is already a row note; still remove the files
                console.print(f"[yellow]fedckpt.shutdown() raised {type(error).__name__}: {error}[/yellow]")
        shutil.rmtree(workdir, ignore_errors=True)
    reporting.print_report(result, console)
    if json_path:
        reporting.write_json(result, json_path)
        console.print(f"raw samples written to {json_path}")
    return result


def _run_save_case(case: Case, repeats: int, directory: str, progress: Progress) -> dict[str, Any]:
    """Single saves interleaved across the methods (the order reverses every repeat, so a slow spell of
    the machine falls on all of them alike), then each method's burst beside a raw write."""
    saved = case.build()
    host = HostBytes.of(saved)
    saves = burst_size(host.nbytes)
    result = {
        "case": case.name, "kind": "save", "description": case.description, "bytes": host.nbytes,
        "tensors": host.tensors, "repeats": repeats, "burst_saves": saves, "methods": [],
    }  # fmt: skip
    is_state = isinstance(saved, dict)
    methods: list[tuple[SaveMethod | None, dict[str, Any], SaveSamples]] = []
    for method_type in SAVE_METHODS:
        if is_state and not method_type.saves_states:
            continue
        entry: dict[str, Any] = {"method": method_type.name, "blocking_s": [], "durable_s": [], "burst_s": None,
                                 "burst_cpu_s": None, "raw_write_s": None, "error": None}  # fmt: skip
        method: SaveMethod | None = None
        try:
            method_dir = os.path.join(directory, _slug(method_type.name))
            os.makedirs(method_dir)
            method = method_type(method_dir)
            method.prepare(saved, host)
            warm_up(method, saved)
        except Exception as error:  # one failing method is a row note, not the end of the run
            entry["error"] = _describe(error)
        methods.append((method, entry, SaveSamples()))
        result["methods"].append(entry)
    task = progress.add_task(f"  {case.name}: {len(methods)} methods", total=repeats * len(methods) + len(methods))
    try:
        for repeat in range(repeats):
            for method, entry, samples in methods if repeat % 2 == 0 else reversed(methods):
                if method is not None and entry["error"] is None:
                    try:
                        time_one_save(method, saved, samples)
                    except Exception as error:
                        entry["error"] = _describe(error)
                progress.advance(task)
        for method, entry, samples in methods:
            entry["blocking_s"], entry["durable_s"] = samples.blocking_s, samples.durable_s
            if method is not None and entry["error"] is None and method.reaches_storage:
                try:
                    burst = time_burst(method, saved, saves)
                    entry["burst_s"], entry["burst_cpu_s"] = burst.seconds, burst.cpu_seconds
                    # The disk's own rate for the same bytes, measured right after, so both see the same disk state.
                    raw_path = os.path.join(method.directory, "raw-write.bin")
                    entry["raw_write_s"] = raw_write_fsync(raw_path, host.buffer, saves)
                except Exception as error:
                    entry["error"] = _describe(error)
            progress.advance(task)
    finally:
        for method, entry, _ in methods:
            entry["error"] = _close(method, entry["error"])
        shutil.rmtree(directory, ignore_errors=True)
        progress.remove_task(task)
    reporting.summarize_save_case(result)
    return result


def _run_loop_case(case: Case, repeats: int, directory: str, progress: Progress) -> dict[str, Any]:
    batches = synthetic_batches()
    probe = case.build()
    host_bytes = sum(t.numel() * t.element_size() for t in probe.state_dict().values())
    result = {
        "case": case.name, "kind": "loop", "description": case.description, "bytes": host_bytes,
        "tensors": len(probe.state_dict()), "steps": case.steps, "repeats": repeats, "methods": [],
    }  # fmt: skip
    methods: list[tuple[SaveMethod | None, dict[str, Any]]] = []
    for method_type in LOOP_METHODS:
        entry = {"method": method_type.name, "wall_s": [], "step_blocking_s": [], "error": None}
        method_dir = os.path.join(directory, _slug(method_type.name))
        os.makedirs(method_dir)
        method: SaveMethod | None = None
        try:
            method = method_type(method_dir)
            for _ in range(method.warmups):  # start Ray, threads, files before the first timed loop
                method.wait(method.save(probe, 0))
        except Exception as error:
            entry["error"] = _describe(error)
        methods.append((method, entry))
        result["methods"].append(entry)
    task = progress.add_task(f"  {case.name}: {len(methods)} methods x {repeats} loops", total=repeats * len(methods))
    try:
        time_loop(NoCheckpoint(directory), case.build, case.steps, batches)  # warms torch's kernels; untimed
        # Rounds interleave the methods, so a slow spell of the machine hits all of them alike.
        for _ in range(repeats):
            for method, entry in methods:
                if entry["error"] is None and method is not None:
                    try:
                        sample = time_loop(method, case.build, case.steps, batches)
                        entry["wall_s"].append(sample.wall_s)
                        entry["step_blocking_s"].extend(sample.step_blocking_s)
                    except Exception as error:
                        entry["error"] = _describe(error)
                progress.advance(task)
    finally:
        for method, entry in methods:
            entry["error"] = _close(method, entry["error"])
        shutil.rmtree(directory, ignore_errors=True)
        progress.remove_task(task)
    reporting.summarize_loop_case(result)
    return result


def _close(method: SaveMethod | None, error: str | None) -> str | None:
    """Close ``method``; returns the first error seen (the earlier one, or the close's own)."""
    if method is None:
        return error
    try:
        method.close()
    except Exception as close_error:
        return error or _describe(close_error)
    return error


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:160]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def default_console() -> Console:
    console = Console()
    # A redirected stdout would get rich's default 80 columns, which folds the tables.
    return console if console.is_terminal else Console(width=200)


def _meta(names: list[str], repeats: int, quick: bool, workdir: str) -> dict[str, Any]:
    return {
        "cases": names, "repeats": repeats, "quick": quick, "directory": workdir,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": platform.python_version(),
        "platform": platform.platform(), "cpus": os.cpu_count(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "torch": torch.__version__, "ray": ray.__version__, "numpy": np.__version__, "fedckpt": fedckpt.__version__,
    }  # fmt: skip
