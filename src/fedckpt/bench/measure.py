"""Timing: single saves (blocking and until durable), bursts (persist throughput), a raw write, a training loop."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional

from fedckpt.bench.methods import SaveMethod

MIB = 1 << 20
# A burst of back-to-back saves holds about this many bytes (2 to 8 saves): enough to measure a sustained
# rate, few enough that every method's copies of a 1 GiB model stay within the memory budget.
BURST_TARGET_BYTES = 400 * MIB


def percentile(samples: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (``q`` in [0, 1]) of ``samples``."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def tensors_of(saved: nn.Module | dict) -> list[torch.Tensor]:
    """The tensors of a model's state dict, or every tensor inside a (nested) state dict."""
    if isinstance(saved, nn.Module):
        return list(saved.state_dict().values())
    found: list[torch.Tensor] = []

    def walk(value: object) -> None:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(saved)
    return found


def mutate(saved: nn.Module | dict) -> None:
    """Change every floating-point tensor in place, as a training step would (outside the timed region)."""
    with torch.no_grad():
        for tensor in tensors_of(saved):
            if tensor.is_floating_point():
                tensor.add_(1)


def burst_size(nbytes: int) -> int:
    """How many saves a burst issues for a model of ``nbytes``."""
    return max(2, min(8, round(BURST_TARGET_BYTES / max(nbytes, 1))))


@dataclass
class SaveSamples:
    blocking_s: list[float] = field(default_factory=list)
    durable_s: list[float] = field(default_factory=list)


def time_one_save(method: SaveMethod, saved: nn.Module | dict, samples: SaveSamples) -> None:
    """One save started from an idle method (the previous one durable), as between rounds; the
    model is mutated first, outside the timed region."""
    mutate(saved)
    start = time.perf_counter()
    handle = method.save(saved, 0)
    returned = time.perf_counter()
    method.wait(handle)
    durable = time.perf_counter()
    samples.blocking_s.append(returned - start)
    if method.reaches_storage:
        samples.durable_s.append(durable - start)


def warm_up(method: SaveMethod, saved: nn.Module | dict) -> None:
    """One-time costs: Ray and writer start, threads, imports, first allocation."""
    for _ in range(method.warmups):
        method.wait(method.save(saved, 0))


@dataclass(frozen=True)
class BurstTime:
    """A burst of saves: seconds until all were durable, and the CPU seconds spent meanwhile by this
    process (every thread) and the method's helper processes (fedckpt's writers on this node)."""

    seconds: float
    cpu_seconds: float


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds a process (all its threads) has used (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_burst(method: SaveMethod, model: nn.Module | dict, saves: int) -> BurstTime:
    """``saves`` back-to-back saves to distinct targets, from the first until all of them are durable."""
    helpers = method.helper_pids()
    cpu = time.process_time() + sum(process_cpu_seconds(pid) for pid in helpers)
    start = time.perf_counter()
    handles = [method.save(model, slot) for slot in range(1, saves + 1)]
    for handle in handles:
        method.wait(handle)
    seconds = time.perf_counter() - start
    return BurstTime(seconds, time.process_time() + sum(process_cpu_seconds(pid) for pid in helpers) - cpu)


def raw_write_fsync(path: str, buffer: memoryview | bytes, times: int) -> float:
    """Seconds to ``os.write`` ``buffer`` ``times`` times to a new file at ``path`` and fsync it; removes the file."""
    start = time.perf_counter()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(times):
            view = memoryview(buffer).cast("B")
            while view:  # os.write may write less than asked (Linux caps one call near 2 GiB)
                view = view[os.write(descriptor, view) :]
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    seconds = time.perf_counter() - start
    os.remove(path)
    return seconds


def synthetic_batches(count: int = 8, batch_size: int = 32, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """CIFAR-sized random images (3x32x32) with labels in 0..9, fixed by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch_size, 3, 32, 32, generator=generator),
            torch.randint(0, 10, (batch_size,), generator=generator),
        )
        for _ in range(count)
    ]


@dataclass
class LoopSample:
    wall_s: float
    step_blocking_s: list[float]


def time_loop(
    method: SaveMethod, build: Callable[[], nn.Module], steps: int, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> LoopSample:
    """Train a fresh model for ``steps`` SGD steps, saving with ``method`` after each.

    The wall time runs until the last checkpoint is durable: an async method that defers all its I/O past
    the end of the loop does not get it for free.
    """
    model = build()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    handles, step_blocking = [], []
    start = time.perf_counter()
    for step in range(steps):
        images, labels = batches[step % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        before = time.perf_counter()
        handles.append(method.save(model, 0))
        step_blocking.append(time.perf_counter() - before)
    for handle in {id(handle): handle for handle in handles}.values():  # each distinct handle once, in order
        method.wait(handle)
    return LoopSample(time.perf_counter() - start, step_blocking)
