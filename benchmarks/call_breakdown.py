"""Where the main job's blocked time goes: each checkpoint call split into fedckpt's steps.

    .venv/bin/python benchmarks/call_breakdown.py                 # 2 runs of each mode (~1.5 min)
    .venv/bin/python benchmarks/call_breakdown.py --repeats 4 --json breakdown.json

Runs the Flower App of the README's main job (``examples/flower_app``, through ``flwr run``) with
``FEDCKPT_CALL_TRACE`` set (:mod:`fedckpt.flower.call_trace`), fedckpt and the synchronous baseline
interleaved, and prints per call (restore, pre-/post-aggregation save, state save, the server's end
of round): its mean and median wall time, its mean CPU time, and the mean wall and CPU time of each
step it ran (a step includes the steps it calls). Wall minus CPU is time the caller was not running:
``waits`` is how often per call it slept (a lock, an answer), ``preempted`` how often the scheduler
gave its CPU to another thread (on 2 busy cores, mostly to the nice-0 processes of Flower and Ray:
Ray runs its workers, the clients included, at nice 15).

A last table gives each call's total wall time in both modes, and what fedckpt's would be if its
runtime cost nothing beyond the copy into staging: each save's ``Coordinator.save`` less its
``Transport.stage``, and a restore's ``wait_until_readable``, taken out. What is left is the
snapshot (the pickled structure and the byte views), the copy, the restore's read and
``load_state_dict``, the server's round commit, and the preemptions that come with them: the least
this design can block for, however lean its bookkeeping.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import astuple
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "flower_app"))
import compare  # noqa: E402

from fedckpt.flower.call_trace import TRACE_ENV, StepTime, read_calls  # noqa: E402


def breakdown(calls: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per activity: calls, mean and median wall, mean CPU, and each step's mean wall and CPU per call."""
    by_activity: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
    for call in calls:
        by_activity[call["activity"]].append(call)
    summary = {}
    for activity, group in sorted(by_activity.items()):
        steps: defaultdict[str, StepTime] = defaultdict(StepTime)
        for call in group:
            for name, figures in call["steps"].items():
                steps[name] = StepTime(
                    *(mine + theirs for mine, theirs in zip(astuple(steps[name]), figures, strict=True))
                )
        count = len(group)
        summary[activity] = {
            "calls": count,
            "wall_mean_ms": 1e3 * statistics.mean(call["wall"] for call in group),
            "wall_median_ms": 1e3 * statistics.median(call["wall"] for call in group),
            "cpu_mean_ms": 1e3 * statistics.mean(call["cpu"] for call in group),
            "waits": statistics.mean(call["waits"] for call in group),
            "preempted": statistics.mean(call["preempted"] for call in group),
            "steps": {
                name: {
                    "wall_ms": 1e3 * step.wall / count,
                    "cpu_ms": 1e3 * step.cpu / count,
                    "waits": step.waits / count,
                    "preempted": step.preempted / count,
                }
                for name, step in sorted(steps.items(), key=lambda item: -item[1].wall)
            },
        }
    return summary


def table(mode: str, summary: dict[str, dict[str, Any]]) -> Table:
    result = Table(title=f"{mode}: per call (ms)", title_justify="left")
    for column in ("call / step", "calls", "wall mean", "wall median", "CPU mean", "waits", "preempted"):
        result.add_column(column, justify="left" if column == "call / step" else "right")
    for activity, figures in summary.items():
        result.add_row(
            f"[bold]{activity}", str(figures["calls"]), f"{figures['wall_mean_ms']:.3f}",
            f"{figures['wall_median_ms']:.3f}", f"{figures['cpu_mean_ms']:.3f}", f"{figures['waits']:.2f}",
            f"{figures['preempted']:.2f}",
        )  # fmt: skip
        for name, step in figures["steps"].items():
            result.add_row(
                f"  {name}",
                "",
                f"{step['wall_ms']:.3f}",
                "",
                f"{step['cpu_ms']:.3f}",
                f"{step['waits']:.2f}",
                f"{step['preempted']:.2f}",
            )
    return result


# What each call would cost if fedckpt's runtime cost only the copy: steps taken out of a call's wall
# time (less the step kept inside them).
RUNTIME_STEPS = {"Coordinator.save": "Transport.stage", "wait_until_readable": None}


def runtime_free(figures: dict[str, Any]) -> float:
    """A call's mean wall time (ms) less its runtime steps but the copy (see RUNTIME_STEPS)."""
    steps = figures["steps"]
    wall = figures["wall_mean_ms"]
    for step, kept in RUNTIME_STEPS.items():
        if step in steps:
            wall -= steps[step]["wall_ms"] - (steps[kept]["wall_ms"] if kept in steps else 0.0)
    return wall


def floor_table(fedckpt: dict[str, dict[str, Any]], sync: dict[str, dict[str, Any]]) -> Table:
    """Each call's total wall time (ms, over every call of the runs) in both modes, and fedckpt's with
    a runtime that cost only its copy."""
    result = Table(title="total wall time per call (ms): fedckpt with a runtime that costs only the copy",
                   title_justify="left")  # fmt: skip
    for column in ("call", "sync", "fedckpt", "fedckpt / sync", "runtime free", "runtime free / sync"):
        result.add_column(column, justify="left" if column == "call" else "right")
    totals = [0.0, 0.0, 0.0]
    for activity in sorted(fedckpt.keys() | sync.keys()):
        mine, theirs = fedckpt.get(activity), sync.get(activity)
        row = [
            theirs["wall_mean_ms"] * theirs["calls"] if theirs else 0.0,
            mine["wall_mean_ms"] * mine["calls"] if mine else 0.0,
            runtime_free(mine) * mine["calls"] if mine else 0.0,
        ]
        totals = [total + value for total, value in zip(totals, row, strict=True)]
        result.add_row(activity, *(f"{value:.1f}" for value in row[:2]), ratio(row[1], row[0]), f"{row[2]:.1f}",
                       ratio(row[2], row[0]))  # fmt: skip
    result.add_row("[bold]all", *(f"{value:.1f}" for value in totals[:2]), ratio(totals[1], totals[0]),
                   f"{totals[2]:.1f}", ratio(totals[2], totals[0]))  # fmt: skip
    return result


def ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.2f}x" if baseline else "-"


def main(argv: list[str] | None = None) -> int:
    parser = compare.argument_parser()
    parser.description = __doc__
    parser.set_defaults(repeats=2)
    parser.add_argument("--json", default=None, help="write the breakdown of each mode here")
    args = parser.parse_args(argv)
    console = Console()
    runs: list[tuple[str, float, float]] = []  # mode, start, end: a call belongs to the run it came in
    with tempfile.TemporaryDirectory(prefix="fedckpt-calls-") as traces:
        os.environ[TRACE_ENV] = traces  # before the SuperLink starts: its simulations inherit it
        try:
            started = time.time()
            for mode, _ in compare.interleaved_runs(args):
                runs.append((mode, started, time.time()))
                started = time.time()
        finally:
            os.environ.pop(TRACE_ENV, None)
        calls = read_calls(traces)
    result = {}
    for mode in compare.MODES:
        spans = [(start, end) for run_mode, start, end in runs if run_mode == mode]
        result[mode] = breakdown([call for call in calls if any(start <= call["at"] <= end for start, end in spans)])
        console.print(table(mode, result[mode]))
    console.print(floor_table(result["fedckpt"], result["sync"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
