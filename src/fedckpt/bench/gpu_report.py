"""The GPU benchmark's targets (evaluated from a run's own figures) and its rich tables."""

from __future__ import annotations

from typing import Any

from rich.table import Table

MIB = 1 << 20
DASH = "—"


def _entry(case: dict[str, Any] | None, method: str) -> dict[str, Any] | None:
    if case is None:
        return None
    return next((e for e in case["methods"] if e["method"] == method and e["error"] is None), None)


def _target(name: str, measured: float | None, limit: float | None, unit: str) -> dict[str, Any]:
    passed = None if measured is None or limit is None else measured <= limit
    return {"target": name, "measured": measured, "limit": limit, "unit": unit, "passed": passed}


def evaluate_targets(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The GPU issue's targets, each from this run's figures (None where a figure is missing)."""
    by_name = {case["case"]: case for case in cases}
    targets = []
    big = by_name.get("fp32-2gb")
    for mode in ("default", "overlap"):
        entry = _entry(big, f"fedckpt ({mode} mode)")
        call = None if entry is None else entry["call_p50_s"]
        targets.append(_target(f"fp32-2gb: fedckpt {mode} call", None if call is None else call * 1e3, 1.0, "ms"))
    for case in cases:
        if case["kind"] != "save":
            continue
        entry = _entry(case, "fedckpt (default mode)")
        ratio = None if entry is None else entry["exposed_vs_floor"]
        targets.append(_target(f"{case['case']}: fedckpt default GPU time exposed / floor", ratio, 1.2, "x"))
    loop = next((case for case in cases if case["kind"] == "loop"), None)
    overlap, default, floor = (_entry(loop, name) for name in ("fedckpt (overlap mode)", "fedckpt (default mode)",
                                                                "pinned copy (caller's stream): floor"))  # fmt: skip
    if loop is not None:
        targets.append(_target(f"{loop['case']}: fedckpt overlap overhead", _get(overlap, "overhead_pct"), 2.0, "%"))
        floor_overhead = _get(floor, "overhead_pct")
        limit = None if floor_overhead is None else max(floor_overhead, 0.0) + 1.0
        targets.append(_target(f"{loop['case']}: fedckpt default overhead (floor's + 1)", _get(default, "overhead_pct"),
                               limit, "%"))  # fmt: skip
    for case in cases:  # ahead of DCP on every row: fedckpt's figure below the best DCP variant's
        key = "overhead_pct" if case["kind"] == "loop" else "call_p50_s"
        scale = 1.0 if case["kind"] == "loop" else 1e3
        dcp = [_get(e, key) for e in case["methods"] if e["method"].startswith("dcp") and e["error"] is None]
        best_dcp = min((value for value in dcp if value is not None), default=None)
        for mode in ("default", "overlap"):
            value = _get(_entry(case, f"fedckpt ({mode} mode)"), key)
            targets.append(
                _target(f"{case['case']}: fedckpt {mode} {key.split('_')[0]} below DCP's best",
                        None if value is None else value * scale, None if best_dcp is None else best_dcp * scale,
                        "%" if case["kind"] == "loop" else "ms")
            )  # fmt: skip
    return targets


def _get(entry: dict[str, Any] | None, key: str) -> float | None:
    return None if entry is None else entry.get(key)


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def _note(entry: dict[str, Any]) -> str:
    if entry.get("error"):
        return f"[red]FAILED: {entry['error']}[/red]"
    check = entry.get("check")
    if check is None:
        return ""
    return "checked: equal" if check == "ok" else f"[red]{check}[/red]"


def save_table(case: dict[str, Any]) -> Table:
    rate = f"; floor {case['floor_gb_s']:.1f} GB/s" if case.get("floor_gb_s") else ""
    table = Table(
        title=f"{case['case']}: {case['description']}, {case['bytes'] / MIB:.0f} MiB in {case['tensors']} tensors, "
        f"{case['repeats']} saves per method{rate}",
        caption="call: the caller's thread; GPU exposed: CUDA events on the caller's stream around the call; "
        "staged: until the copy is complete; durable: until on storage (p50s).",
    )
    for column in ("method", "call ms", "GPU exposed ms", "×floor", "staged ms", "durable ms", "note"):
        table.add_column(column, justify="left" if column in ("method", "note") else "right")
    for entry in case["methods"]:
        ratio = entry.get("exposed_vs_floor")
        table.add_row(
            entry["method"], _ms(entry.get("call_p50_s")), _ms(entry.get("exposed_p50_s")),
            DASH if ratio is None else f"{ratio:.2f}×", _ms(entry.get("staged_p50_s")),
            _ms(entry.get("durable_p50_s")), _note(entry),
        )  # fmt: skip
    return table


def loop_table(case: dict[str, Any]) -> Table:
    table = Table(
        title=f"{case['case']}: {case['description']}, {case['bytes'] / MIB:.0f} MiB, {case['steps']} steps, "
        f"{case['repeats']} loops per method",
        caption="step: training time / steps (p50 over loops); overhead: against no checkpoint; durable: from the "
        "first step until the last save is on storage.",
    )
    for column in ("method", "step ms", "overhead", "save call ms", "durable s", "note"):
        table.add_column(column, justify="left" if column in ("method", "note") else "right")
    for entry in case["methods"]:
        overhead, step = entry.get("overhead_pct"), entry.get("step_ms")
        durable = entry.get("durable_p50_s")
        table.add_row(
            entry["method"], DASH if step is None else f"{step:.2f}",
            DASH if overhead is None else f"{overhead:+.2f}%", _ms(entry.get("call_p50_s")),
            DASH if durable is None else f"{durable:.2f}", _note(entry),
        )  # fmt: skip
    return table


def targets_table(targets: list[dict[str, Any]]) -> Table:
    table = Table(title="targets (from this run's figures)")
    for column in ("target", "measured", "limit", "result"):
        table.add_column(column, justify="left" if column in ("target", "result") else "right")
    for target in targets:
        measured, limit, unit = target["measured"], target["limit"], target["unit"]
        result = {True: "[green]met[/green]", False: "[red]missed[/red]", None: "no figure"}[target["passed"]]
        table.add_row(
            target["target"], DASH if measured is None else f"{measured:.3g} {unit}",
            DASH if limit is None else f"{limit:.3g} {unit}", result,
        )  # fmt: skip
    return table
