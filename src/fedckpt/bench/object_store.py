"""``fedckpt bench --storage URL``: persisting to an object store beside a plain put of the same bytes.

For each case, interleaved (the order reverses every repeat): a plain fsspec ``pipe_file`` of the
model's bytes (what any program would do: concurrent multipart), a fedckpt save of the model to
``URL`` followed by ``flush()``, and the same save to a local temp directory. fedckpt's persist
throughput (bytes / time until durable) is reported as a ratio of the plain put's, and its
blocking time (the caller's part) beside that of the save to a local file.
"""

from __future__ import annotations

import gc
import shutil
import statistics
import tempfile
import time
import uuid
from typing import Any

import fsspec
import torch
from rich.console import Console
from rich.table import Table

import fedckpt
from fedckpt.bench.cases import CASES
from fedckpt.bench.measure import percentile, tensors_of
from fedckpt.checkpointers import LatestTorchModuleCheckpointer

MIB = 1 << 20


def run_object_store_bench(url: str, cases: list[str], repeats: int, console: Console) -> dict[str, Any]:
    """Measure every case against ``url``; print a table; return the samples."""
    fs, root = fsspec.core.url_to_fs(url, use_listings_cache=False)
    run = f"{url.rstrip('/')}/fedckpt-bench-{uuid.uuid4().hex[:8]}"
    result: dict[str, Any] = {"url": url, "repeats": repeats, "cases": []}
    try:
        for name in cases:
            case = CASES[name]
            if case.kind != "save":
                raise ValueError(f"case {name} is a training loop; --storage takes model cases")
            result["cases"].append(_run_case(fs, run, name, case.build(), repeats, console))
            gc.collect()
    finally:
        fedckpt.flush()
        fs.rm(fsspec.core.url_to_fs(run)[1], recursive=True)
    console.print(_table(result))
    return result


def _run_case(fs: Any, run: str, name: str, model: torch.nn.Module, repeats: int, console: Console) -> dict:
    payload = b"".join(tensor.detach().reshape(-1).view(torch.uint8).numpy().tobytes() for tensor in tensors_of(model))
    checkpointer = LatestTorchModuleCheckpointer(f"{run}/{name}", "model.safetensors")
    local_dir = tempfile.mkdtemp(prefix="fedckpt-bench-local-")
    local = LatestTorchModuleCheckpointer(local_dir, "model.safetensors")
    for warm_up in (checkpointer, local):  # the writer pool starts, connections open
        warm_up.maybe_checkpoint(model, 0.0, {})
        warm_up.flush()
    fs.pipe_file(fsspec.core.url_to_fs(f"{run}/{name}/warm-up")[1], payload[:MIB])
    plain_s, blocking_s, durable_s, local_blocking_s = [], [], [], []
    for repeat in range(repeats):
        order = ("plain", "fedckpt", "local") if repeat % 2 == 0 else ("local", "fedckpt", "plain")
        console.print(f"{name}: repeat {repeat + 1}/{repeats}")
        for method in order:
            with torch.no_grad():
                next(model.parameters()).add_(1.0)  # new content every save: nothing is deduplicated
            if method == "plain":
                target = fsspec.core.url_to_fs(f"{run}/{name}/plain-{repeat}")[1]
                start = time.perf_counter()
                fs.pipe_file(target, payload)
                plain_s.append(time.perf_counter() - start)
                fs.rm_file(target)
            elif method == "local":
                start = time.perf_counter()
                local.maybe_checkpoint(model, 0.0, {})
                local_blocking_s.append(time.perf_counter() - start)
                local.flush()
            else:
                start = time.perf_counter()
                checkpointer.maybe_checkpoint(model, 0.0, {})
                blocking_s.append(time.perf_counter() - start)
                checkpointer.flush()
                durable_s.append(time.perf_counter() - start)
    shutil.rmtree(local_dir, ignore_errors=True)
    plain = len(payload) / statistics.median(plain_s) / MIB
    persist = len(payload) / statistics.median(durable_s) / MIB
    return {
        "case": name, "bytes": len(payload), "plain_put_s": plain_s, "blocking_s": blocking_s, "durable_s": durable_s,
        "plain_mib_s": plain, "fedckpt_mib_s": persist, "ratio": persist / plain,
        "blocking_p50_ms": percentile(blocking_s, 0.5) * 1e3, "local_blocking_s": local_blocking_s,
        "local_blocking_p50_ms": percentile(local_blocking_s, 0.5) * 1e3,
    }  # fmt: skip


def _table(result: dict[str, Any]) -> Table:
    table = Table(title=f"persisting to {result['url']}, medians of {result['repeats']}", title_justify="left")
    columns = ("case", "MiB", "plain put MiB/s", "fedckpt MiB/s", "fedckpt / plain", "blocking p50 ms",
               "local file: blocking p50 ms")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "case" else "right")
    for case in result["cases"]:
        table.add_row(
            case["case"], f"{case['bytes'] / MIB:.0f}", f"{case['plain_mib_s']:.0f}", f"{case['fedckpt_mib_s']:.0f}",
            f"{case['ratio']:.2f}x", f"{case['blocking_p50_ms']:.1f}", f"{case['local_blocking_p50_ms']:.1f}",
        )  # fmt: skip
    return table
