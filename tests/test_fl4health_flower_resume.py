"""A Flower simulation checkpointing through FL4Health 0.4's API (``fedckpt.fl4health``), SIGKILLed mid-run
and run again: it resumes after the last durable server state, and no client step is lost or repeated."""

import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import assert_same_tensors
from test_flower_simulation import ENV, kill_session

from fedckpt.cli import main as fedckpt_cli
from fedckpt.storage.reading import read_state_dict

APP = Path(__file__).resolve().parent / "flower_app_fl4health.py"
CLIENTS, STEPS = 2, 2  # as in the app


def server_state(directory: Path) -> dict | None:
    path = directory / "server" / "server_fl4h_state.pt"
    return torch.load(path, weights_only=False) if path.exists() else None  # renamed into place: never torn


def durable_round(directory: Path) -> int:
    state = server_state(directory)
    return 0 if state is None else state["current_round"]["None"]


def test_a_run_on_the_0_4_api_killed_with_sigkill_resumes_from_its_last_server_state(tmp_path):
    rounds = 20  # rounds take a fraction of a second once the clients run: room to kill it mid-run
    command = [sys.executable, str(APP), str(tmp_path), str(rounds)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                               start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while durable_round(tmp_path) < 2:
            assert process.poll() is None, "the run ended before it was killed"
            assert time.monotonic() < deadline, "no round became durable in time"
            time.sleep(0.05)  # polling a condition, bounded by the deadline
    finally:
        kill_session(process.pid)  # the app and the Ray it started: no flush, no exit handlers
        process.wait()
    killed_at = durable_round(tmp_path)
    assert 2 <= killed_at < rounds
    assert fedckpt_cli(["verify", str(tmp_path)]) == 0  # nothing torn on disk

    completed = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=420)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert f"resumed from round {killed_at}\n" in completed.stdout
    assert f"finished round {rounds}\n" in completed.stdout

    state = server_state(tmp_path)
    every_round = list(range(1, rounds + 1))
    assert state["current_round"]["None"] == rounds and state["server_name"]["None"] == "fl4h"
    assert [server_round for server_round, _ in state["history"]["None"].losses_distributed] == every_round
    assert [report["round"] for report in state["reports_manager"]["None"].reports] == every_round
    global_model = read_state_dict(str(tmp_path / "server" / "global.safetensors"))
    assert_same_tensors(state["model"]["None"], global_model)
    for partition in range(CLIENTS):
        client = torch.load(tmp_path / "clients" / f"client_{partition}_state.{rounds % 2}.pt", weights_only=False)
        # Each round started from the state its client had after the previous round, across the kill.
        assert client["total_steps"]["None"] == rounds * STEPS
        assert client["total_epochs"]["None"] == rounds
        assert client["lr_schedulers"]["global"]["last_epoch"] == rounds * STEPS
        reported = [report["round"] for report in client["reports_manager"]["None"].reports if "round" in report]
        assert reported == every_round
        assert len(client["train_loss_meter"]["None"].losses_list) == rounds * STEPS
    assert fedckpt_cli(["verify", str(tmp_path)]) == 0
