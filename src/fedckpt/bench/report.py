"""Derived figures (percentiles, ratios, throughput), the rich tables, and the JSON file."""

from __future__ import annotations

import json
import statistics
from typing import Any

from rich.console import Console
from rich.table import Table

from fedckpt.bench.measure import MIB, percentile

DASH = "—"


def summarize_save_case(case: dict[str, Any]) -> None:
    """Add p50/p99, ratios and throughput to every method entry of a save case (in place)."""
    for entry in case["methods"]:
        blocking, durable = entry["blocking_s"], entry["durable_s"]
        entry["blocking_p50_s"] = statistics.median(blocking) if blocking else None
        entry["blocking_p99_s"] = percentile(blocking, 0.99) if blocking else None
        entry["durable_p50_s"] = statistics.median(durable) if durable else None
        burst_bytes = case["bytes"] * case["burst_saves"]
        entry["persist_mib_s"] = burst_bytes / MIB / entry["burst_s"] if entry.get("burst_s") else None
        entry["raw_write_mib_s"] = burst_bytes / MIB / entry["raw_write_s"] if entry.get("raw_write_s") else None
        cpu = entry.get("burst_cpu_s")
        entry["persist_cpu_s_per_gib"] = cpu / (burst_bytes / (1 << 30)) if cpu is not None else None
    floor = _p50_of(case, "floor")
    torch_save = _p50_of(case, "torch.save")
    for entry in case["methods"]:
        p50 = entry["blocking_p50_s"]
        entry["vs_floor"] = p50 / floor if p50 is not None and floor else None
        entry["vs_torch_save"] = p50 / torch_save if p50 is not None and torch_save else None


def summarize_loop_case(case: dict[str, Any]) -> None:
    """Add wall-time p50, the slowdown against the loop without checkpoints, and save-call percentiles."""
    for entry in case["methods"]:
        walls, calls = entry["wall_s"], entry["step_blocking_s"]
        entry["wall_p50_s"] = statistics.median(walls) if walls else None
        saves = calls if entry["method"] != "no checkpoint" else []
        entry["step_blocking_p50_s"] = statistics.median(saves) if saves else None
        entry["step_blocking_p99_s"] = percentile(saves, 0.99) if saves else None
    baseline = next((e["wall_p50_s"] for e in case["methods"] if e["method"] == "no checkpoint"), None)
    for entry in case["methods"]:
        wall = entry["wall_p50_s"]
        meaningful = baseline and wall is not None and entry["method"] != "no checkpoint"
        entry["slowdown_pct"] = (wall / baseline - 1) * 100 if meaningful else None


def _p50_of(case: dict[str, Any], method: str) -> float | None:
    return next((e["blocking_p50_s"] for e in case["methods"] if e["method"] == method), None)


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    ms = seconds * 1e3
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def _ratio(value: float | None) -> str:
    if value is None:
        return DASH
    return f"{value:.2f}×" if value < 10 else f"{value:.1f}×" if value < 100 else f"{value:.0f}×"


def _rate(value: float | None) -> str:
    return DASH if value is None else f"{value:.0f}"


def _seconds(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}"


NOTES = {
    "floor": "memory copy only",
    "torch.save": "page cache, not durable",
    "torch.save + fsync": "durable on return",
    "no checkpoint": "baseline",
}


def _note(entry: dict[str, Any]) -> str:
    return f"[red]FAILED: {entry['error']}[/red]" if entry.get("error") else NOTES.get(entry["method"], "")


def save_table(case: dict[str, Any]) -> Table:
    """One row per method: blocking time, ratios, time until durable, persist throughput beside a raw write."""
    table = Table(
        title=f"{case['case']}: {case['description']} — {case['bytes'] / MIB:.1f} MiB in {case['tensors']} tensors, "
        f"{case['repeats']} saves per method",
        caption=f"blocking/durable: one save at a time, the model mutated in between. ×floor, ×torch.save: "
        f"blocking p50 over theirs. persist: {case['burst_saves']} back-to-back saves to distinct files until all "
        f"durable, and the CPU it took (this process and fedckpt's writers; not the kernel's writeback threads); "
        f"raw write: os.write of the same bytes + fsync, right after.",
    )
    columns = ("method", "blocking p50 ms", "blocking p99 ms", "×floor", "×torch.save", "durable p50 ms",
               "persist MiB/s", "CPU s/GiB", "raw write+fsync MiB/s", "note")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in ("method", "note") else "right")
    for entry in case["methods"]:
        table.add_row(
            entry["method"], _ms(entry["blocking_p50_s"]), _ms(entry["blocking_p99_s"]), _ratio(entry["vs_floor"]),
            _ratio(entry["vs_torch_save"]), _ms(entry["durable_p50_s"]), _rate(entry["persist_mib_s"]),
            _seconds(entry["persist_cpu_s_per_gib"]), _rate(entry["raw_write_mib_s"]), _note(entry),
        )  # fmt: skip
    return table


def loop_table(case: dict[str, Any]) -> Table:
    """One row per method: the loop's wall time, its slowdown against no checkpoints, the save call's time."""
    table = Table(
        title=f"{case['case']}: {case['description']} — {case['steps']} steps, {case['bytes'] / MIB:.1f} MiB "
        f"in {case['tensors']} tensors, {case['repeats']} loops per method",
        caption="wall: from the first step until the last checkpoint is durable (p50 over the loops).",
    )
    for column in ("method", "loop wall p50 s", "slowdown", "save call p50 ms", "save call p99 ms", "note"):
        table.add_column(column, justify="left" if column in ("method", "note") else "right")
    for entry in case["methods"]:
        wall, slowdown = entry["wall_p50_s"], entry["slowdown_pct"]
        table.add_row(
            entry["method"], DASH if wall is None else f"{wall:.3f}",
            DASH if slowdown is None else f"{slowdown:+.1f}%", _ms(entry["step_blocking_p50_s"]),
            _ms(entry["step_blocking_p99_s"]), _note(entry),
        )  # fmt: skip
    return table


def print_report(report: dict[str, Any], console: Console) -> None:
    """Print one table per case."""
    for case in report["cases"]:
        console.print(save_table(case) if case["kind"] == "save" else loop_table(case))
        console.print()


def write_json(report: dict[str, Any], path: str) -> None:
    """Write the whole report, raw samples included."""
    with open(path, "w") as file:
        json.dump(report, file, indent=2)
        file.write("\n")
