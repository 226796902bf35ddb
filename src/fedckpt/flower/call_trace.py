"""Where a checkpoint call's time goes: each timed call (:class:`fedckpt.flower.timing.BlockedTime`)
split into the fedckpt steps it ran, with wall and CPU time and the thread's context switches, one
JSON line per call.

On when ``FEDCKPT_CALL_TRACE`` names a directory, in every process that inherits it (a Flower
simulation's ClientApp workers and ServerApp included): each process appends to
``<dir>/calls-<pid>.jsonl``. ``benchmarks/call_breakdown.py`` runs the main job's Flower App that
way and prints the table. A step's time includes the steps it calls; the difference between a
call's wall and CPU time is time the thread was not running: ``waits`` counts the times it slept
(a lock, an answer), ``preempted`` the times the scheduler gave its CPU to another thread.

Tracing wraps the functions in :data:`STEPS` once per process, at the first timed call; a wrapped
function outside a timed call costs one thread-local lookup.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import resource
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

TRACE_ENV = "FEDCKPT_CALL_TRACE"

# (module, qualified name) of the steps a call is split into: the save path, the load path, and the
# calls the Flower helpers make around them.
STEPS: tuple[tuple[str, str], ...] = (
    ("fedckpt.client_module", "ClientCheckpointAndStateModule.maybe_checkpoint"),
    ("fedckpt.flower.client", "ClientCheckpoints._resume_best_scores"),
    ("fedckpt.flower.client", "ClientCheckpoints._previous_round_state"),
    ("fedckpt.checkpointers", "snapshot_model"),
    ("fedckpt.checkpointers", "wait_until_readable"),
    ("fedckpt.state", "wait_until_readable"),
    ("fedckpt.state", "PerRoundStateCheckpointer.snapshot_checkpoint"),
    ("fedckpt.state", "PerRoundStateCheckpointer.save_snapshot"),
    ("fedckpt.storage.reading", "read_checkpoint"),
    ("fedckpt.storage.reading", "read_state_checkpoint"),
    ("fedckpt.runtime.coordinator", "Coordinator.save"),
    ("fedckpt.runtime.coordinator", "Coordinator.flush"),
    ("fedckpt.runtime.coordinator", "Coordinator._take_in"),
    ("fedckpt.runtime.transport", "Transport.stage"),
    ("fedckpt.runtime.transport", "Transport.numbers"),
    ("fedckpt.runtime.transport", "Transport.write_ticket"),
    ("fedckpt.runtime.delivery", "Delivery.send"),
    ("fedckpt.runtime.inflight", "InflightSaves.add"),
    ("fedckpt.runtime.channel", "ChannelClient.post"),
    ("fedckpt.runtime.channel", "ChannelClient.call"),
    ("torch.optim", "Optimizer.load_state_dict"),
)


@dataclass
class StepTime:
    """The time one step took within one call (summed over its runs there)."""

    wall: float = 0.0
    cpu: float = 0.0
    runs: int = 0
    waits: int = 0  # voluntary context switches: the thread slept (a lock, an answer, I/O)
    preempted: int = 0  # involuntary ones: the scheduler gave its CPU to another thread


def _switches() -> tuple[int, int]:
    """This thread's voluntary and involuntary context switches so far."""
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_nvcsw, usage.ru_nivcsw


_current = threading.local()
_install_lock = threading.Lock()
_installed = False


def trace_directory() -> str | None:
    """The directory calls are traced to (``FEDCKPT_CALL_TRACE``), or None if tracing is off."""
    return os.environ.get(TRACE_ENV) or None


def _timed_step(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def step(*args: Any, **kwargs: Any) -> Any:
        steps: defaultdict[str, StepTime] | None = getattr(_current, "steps", None)
        if steps is None:
            return function(*args, **kwargs)
        wall, cpu, (waits, preempted) = time.perf_counter(), time.thread_time(), _switches()
        try:
            return function(*args, **kwargs)
        finally:
            taken = steps[name]
            taken.wall += time.perf_counter() - wall
            taken.cpu += time.thread_time() - cpu
            taken.runs += 1
            waits_after, preempted_after = _switches()
            taken.waits += waits_after - waits
            taken.preempted += preempted_after - preempted

    return step


def install() -> None:
    """Wrap the functions of :data:`STEPS` (once per process)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        for module_name, qualified in STEPS:
            owner: Any = importlib.import_module(module_name)
            *path, name = qualified.split(".")
            for part in path:
                owner = getattr(owner, part)
            setattr(owner, name, _timed_step(qualified, getattr(owner, name)))
        _installed = True


class CallTrace:
    """One timed call being traced: :meth:`end` appends its line to this process's file."""

    def __init__(self, directory: str, activity: str) -> None:
        install()
        self.directory = directory
        self.activity = activity
        self.steps: defaultdict[str, StepTime] = defaultdict(StepTime)
        _current.steps = self.steps
        self.wall, self.cpu, self.switches = time.perf_counter(), time.thread_time(), _switches()

    def end(self) -> None:
        wall, cpu = time.perf_counter() - self.wall, time.thread_time() - self.cpu
        (waits, preempted), (waits_before, preempted_before) = _switches(), self.switches
        _current.steps = None
        line = {
            "activity": self.activity,
            "wall": wall,
            "cpu": cpu,
            "waits": waits - waits_before,
            "preempted": preempted - preempted_before,
            "at": time.time(),
            "steps": {name: dataclasses.astuple(step) for name, step in self.steps.items()},
        }
        with open(os.path.join(self.directory, f"calls-{os.getpid()}.jsonl"), "a") as file:
            file.write(json.dumps(line) + "\n")


def read_calls(directory: str) -> list[dict[str, Any]]:
    """Every call traced to ``directory``, from every process."""
    calls = []
    for name in sorted(os.listdir(directory)):
        if name.startswith("calls-") and name.endswith(".jsonl"):
            with open(os.path.join(directory, name)) as file:
                calls.extend(json.loads(line) for line in file if line.strip())
    return calls
