"""The GPU benchmark's target rules (the runs themselves need a GPU: benchmarks/gpu_device_run.sh)."""

from __future__ import annotations

from fedckpt.bench import gpu_report


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
