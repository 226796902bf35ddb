"""``fedckpt bench`` end to end on tiny cases, in-process, on the session's Ray instance."""

import json
import os

import pytest
import ray
import torch

import fedckpt
from fedckpt.bench import cases, runner
from fedckpt.bench.measure import burst_size, percentile, process_cpu_seconds, raw_write_fsync
from fedckpt.bench.methods import SAVE_METHODS, Fedckpt
from fedckpt.cli import main

SAVE_METHOD_NAMES = [method.name for method in SAVE_METHODS]


@pytest.fixture(autouse=True)
def tiny_cases(monkeypatch):
    """Cases small enough for a test, known to the bench only while it runs."""
    tiny = cases.Case(
        "tiny", "fp32 and bf16, ~1 MiB", lambda: cases.linear_stack(1, 4, (torch.float32, torch.bfloat16))
    )
    tiny_loop = cases.Case("tiny-loop", "small CNN, 4 steps", cases.small_cnn, kind="loop", steps=4)
    for case in (tiny, tiny_loop):
        monkeypatch.setitem(cases.CASES, case.name, case)


def test_bench_save_case_reports_every_method(ray_instance, tmp_path, capsys):
    out = tmp_path / "b.json"
    argv = ["bench", "--cases", "tiny", "--repeats", "2", "--dir", str(tmp_path / "work"), "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "tiny:" in printed and "blocking p50 ms" in printed and "raw write+fsync MiB/s" in printed
    assert "CPU s/GiB" in printed

    report = json.loads(out.read_text())
    (case,) = report["cases"]
    assert case["case"] == "tiny" and case["kind"] == "save" and case["bytes"] > 0
    assert [entry["method"] for entry in case["methods"]] == SAVE_METHOD_NAMES
    for entry in case["methods"]:
        assert entry["error"] is None, entry
        assert len(entry["blocking_s"]) == 2
        assert entry["blocking_p50_s"] > 0
        durable = entry["method"] not in ("floor", "torch.save")
        assert (entry["persist_mib_s"] is not None) == durable
        assert (entry["persist_cpu_s_per_gib"] is not None) == durable
        if durable:
            assert entry["burst_cpu_s"] > 0
        assert (entry["durable_p50_s"] is not None) == durable
    by_name = {entry["method"]: entry for entry in case["methods"]}
    assert by_name["floor"]["vs_floor"] == pytest.approx(1.0)
    assert by_name["torch.save"]["vs_torch_save"] == pytest.approx(1.0)
    # The session's Ray and fedckpt runtime are still usable: the bench did not shut them down.
    assert ray.is_initialized()
    fedckpt.flush()
    # Everything the run wrote was removed.
    assert list((tmp_path / "work").iterdir()) == []


def test_bench_loop_case(ray_instance, tmp_path, capsys):
    result = runner.run_bench(cases=["tiny-loop"], repeats=1, directory=str(tmp_path))
    (case,) = result["cases"]
    assert [entry["method"] for entry in case["methods"]] == ["no checkpoint", "torch.save", "hand-rolled async",
                                                              "fedckpt"]  # fmt: skip
    for entry in case["methods"]:
        assert entry["error"] is None and entry["wall_p50_s"] > 0
    assert case["methods"][0]["slowdown_pct"] is None
    assert all(entry["slowdown_pct"] is not None for entry in case["methods"][1:])
    assert "slowdown" in capsys.readouterr().out


def test_a_failing_method_is_a_row_note(ray_instance, tmp_path, monkeypatch, capsys):
    def broken(self, model, slot):
        raise OSError("disk on fire")

    monkeypatch.setattr(Fedckpt, "save", broken)
    result = runner.run_bench(cases=["tiny"], repeats=1, directory=str(tmp_path))
    entries = {entry["method"]: entry for entry in result["cases"][0]["methods"]}
    assert entries["fedckpt"]["error"] == "OSError: disk on fire"
    assert entries["fedckpt"]["blocking_p50_s"] is None
    assert entries["torch.save"]["error"] is None and entries["torch.save"]["blocking_p50_s"] > 0
    assert "FAILED: OSError: disk on fire" in capsys.readouterr().out


def test_unknown_case_and_bad_repeats_exit_2(capsys):
    assert main(["bench", "--cases", "nope"]) == 2
    assert main(["bench", "--cases", "tiny", "--repeats", "0"]) == 2
    assert "unknown case(s) nope" in capsys.readouterr().err


def test_helpers(tmp_path):
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([1.0, 2.0, 3.0], 0.99) == 3.0
    assert burst_size(1) == 8 and burst_size(1 << 30) == 2
    path = tmp_path / "raw.bin"
    assert raw_write_fsync(str(path), b"x" * 1000, 3) > 0
    assert not path.exists()


def test_bench_against_s3_leaves_nothing_in_the_working_directory(s3_server, tmp_path):
    """``fedckpt bench --storage s3://...`` run from an empty directory leaves it empty: no ``s3:``
    directory of lock files from a URL joined as a local path (issue 23). Its warm-up saves one model
    to S3 and to a local file: the local save's content index names the S3 checkpoint, which is where
    one was made before (a hard link tried to an S3 candidate, under its publishing lock)."""
    import os
    import subprocess
    import sys

    work = tmp_path / "cwd"
    work.mkdir()
    source = os.path.dirname(os.path.dirname(fedckpt.__file__))  # this checkout's fedckpt, from any cwd
    env = {**os.environ, **s3_server.env(), "RAY_ADDRESS": "local",
           "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))}  # fmt: skip
    url = f"s3://{s3_server.new_bucket()}/run"
    command = [sys.executable, "-m", "fedckpt.cli", "bench", "--storage", url, "--cases", "mlp-305kb", "--repeats", "1"]
    completed = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "fedckpt MiB/s" in completed.stdout
    assert list(work.iterdir()) == []
    assert [path for path in tmp_path.rglob("*") if "s3:" in str(path)] == []


def test_fedckpts_cpu_includes_its_writers_on_this_node(ray_instance, tmp_path):
    method = Fedckpt(str(tmp_path))
    method.wait(method.save(torch.nn.Linear(64, 64), 1))
    pids = method.helper_pids()
    assert pids and os.getpid() not in pids
    for pid in pids:  # live processes, each a writer actor
        with open(f"/proc/{pid}/cmdline") as cmdline:
            assert "CheckpointWriter" in cmdline.read()
    assert all(process_cpu_seconds(pid) > 0 for pid in pids)
    method.close()
