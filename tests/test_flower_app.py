"""examples/flower_app through Flower's own entry point: ``flwr run .`` on the local SuperLink that
Flower 1.42 starts by itself (on 127.0.0.1), in a temporary ``FLWR_HOME``, stopped at the end."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_flower_simulation import durable_round

from fedckpt.cli import main as fedckpt_cli

APP = Path(__file__).resolve().parent.parent / "examples" / "flower_app"
sys.path.insert(0, str(APP))
from compare import (  # noqa: E402  (the app's comparison script finds and stops the local SuperLink)
    SUPERLINK_PORTS,
    command_line,
    descendants,
    flwr_environment,
    listening,
    local_superlink,
    signal_and_wait,
    stop_local_superlink,
)

SIMULATION = "--federation-config", "num-supernodes=3 client-resources-num-cpus=1"
# Without coverage's subprocess measurement: when Flower adds the app's directory to sys.path,
# coverage re-scans it and drops every module imported meanwhile, by any thread, from sys.modules;
# the SuperLink's server thread then fails to import the ServerApp (KeyError).
UNMEASURED = {"COVERAGE_PROCESS_CONFIG", "COVERAGE_PROCESS_START"}


def unmeasured(env: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in env.items() if name not in UNMEASURED}


class Flwr:
    """The ``flwr`` command of this environment, with its own ``FLWR_HOME``."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = unmeasured(flwr_environment(home))

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        completed = subprocess.run(
            ["flwr", *args], cwd=APP, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
        return completed

    def run(self, run_config: str, *, stream: bool = True) -> subprocess.CompletedProcess:
        return self(
            "run", ".", *(["--stream"] if stream else ["--format", "json"]), "--run-config", run_config, *SIMULATION
        )

    def status(self, run_id: str) -> str:
        listed = json.loads(self("ls", "--run-id", run_id, "--format", "json").stdout)
        return listed["runs"][0]["status"]

    def superlink(self) -> int | None:
        return local_superlink(self.home)

    def stop_superlink(self) -> None:
        assert not stop_local_superlink(self.home), "the local SuperLink's processes survived"


@pytest.fixture
def flwr(tmp_path):
    for port in SUPERLINK_PORTS:  # flwr run would hand the runs to that SuperLink, not start its own
        if listening(port):
            pytest.fail(f"a Flower SuperLink (or another server) listens on 127.0.0.1:{port}: stop it first")
    cli = Flwr(tmp_path / "flwr-home")
    yield cli
    cli.stop_superlink()


def newest_run(flwr: Flwr) -> dict:
    runs = json.loads(flwr("ls", "--format", "json").stdout)["runs"]
    return max(runs, key=lambda run: run["pending-at"])


def client_state_rounds(directory: Path) -> dict[str, set[int]]:
    """Each client's state slots, by the rounds they hold."""
    return {
        client.name: {torch.load(path, weights_only=False)["server_round"] for path in client.glob("client_state.*.pt")}
        for client in sorted((directory / "clients").iterdir())
    }


def test_flwr_run_trains_checkpoints_and_runs_more_rounds_on_the_same_directory(flwr, tmp_path):
    directory = tmp_path / "checkpoints"
    assert flwr.superlink() is None
    first = flwr.run(f"num-server-rounds=2 checkpoint-dir='{directory}'")
    assert newest_run(flwr)["status"] == "finished:completed", first.stdout[-3000:]
    assert durable_round(directory) == 2
    assert client_state_rounds(directory) == {f"client_{i}": {1, 2} for i in range(3)}
    for client in (directory / "clients").iterdir():
        for name in ("pre_aggregation_best.pt", "post_aggregation_latest.pt"):  # torch.save's format
            assert set(torch.load(client / name, weights_only=False).state_dict()) >= {"0.weight", "4.bias"}

    more = flwr.run(f"num-server-rounds=4 checkpoint-dir='{directory}'")  # the same command, more rounds
    assert "Resuming after round 2" in more.stdout + more.stderr
    assert newest_run(flwr)["status"] == "finished:completed"
    assert durable_round(directory) == 4
    assert client_state_rounds(directory) == {f"client_{i}": {3, 4} for i in range(3)}
    assert fedckpt_cli(["verify", str(directory)]) == 0


def test_a_relative_checkpoint_dir_fails_the_run_with_a_message_naming_it(flwr, tmp_path):
    flwr.run("num-server-rounds=1 checkpoint-dir='relative/checkpoints'")
    assert newest_run(flwr)["status"] == "finished:failed"
    log = flwr("log", newest_run(flwr)["run-id"], timeout=60).stdout
    assert "relative path" in log and "relative/checkpoints" in log
    assert not (APP / "relative").exists()


def test_flwr_run_killed_mid_run_resumes_from_its_last_durable_round(flwr, tmp_path):
    directory = tmp_path / "checkpoints"
    config = f"num-server-rounds=8 checkpoint-dir='{directory}'"
    run_id = json.loads(flwr.run(config, stream=False).stdout)["run-id"]
    deadline = time.monotonic() + 240
    while durable_round(directory) < 2:
        assert flwr.status(run_id) in ("pending", "starting", "running"), flwr.status(run_id)
        assert time.monotonic() < deadline, "no round became durable in time"
        time.sleep(0.05)  # polling a condition, bounded by the deadline
    # The run's process and everything it started (its Ray, the writers) die at once, as in a crash.
    superlink = flwr.superlink()
    assert superlink is not None
    simulation = [pid for pid in descendants(superlink) if "flwr-simulation" in command_line(pid)]
    assert len(simulation) == 1, [command_line(pid) for pid in descendants(superlink)]
    assert not signal_and_wait([*simulation, *descendants(simulation[0])], signal.SIGKILL, 30)
    killed_at = durable_round(directory)
    assert killed_at < 8, "the run finished before it was killed"

    resumed = flwr.run(config)  # the same command again
    assert f"Resuming after round {killed_at}" in resumed.stdout + resumed.stderr
    assert newest_run(flwr)["status"] == "finished:completed"
    assert durable_round(directory) == 8
    assert client_state_rounds(directory) == {f"client_{i}": {7, 8} for i in range(3)}
    assert fedckpt_cli(["verify", str(directory)]) == 0


def test_run_checkpoint_dir_expands_home_passes_urls_and_names_what_is_wrong():
    from flwr.app import Context, RecordDict

    from fedckpt.flower import run_checkpoint_dir

    def context(run_config):
        return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config)

    assert run_checkpoint_dir(context({"checkpoint-dir": "~/ckpt"})) == os.path.expanduser("~/ckpt")
    assert run_checkpoint_dir(context({"checkpoint-dir": "/data/run-7"})) == "/data/run-7"
    assert run_checkpoint_dir(context({"checkpoint-dir": "s3://bucket/run-7"})) == "s3://bucket/run-7"
    assert run_checkpoint_dir(context({"out": "/data/x"}), key="out") == "/data/x"
    with pytest.raises(ValueError, match=r"checkpoint-dir='ckpt' is a relative path"):
        run_checkpoint_dir(context({"checkpoint-dir": "ckpt"}))
    with pytest.raises(ValueError, match=r"no 'checkpoint-dir'.*\[tool.flwr.app.config\]"):
        run_checkpoint_dir(context({}))


def test_compare_measures_the_app_with_sync_saves_and_with_fedckpt_then_stops_its_superlink():
    """The README's main job, small: ``compare.py`` runs the app through ``flwr run`` in both modes."""
    assert not any(listening(port) for port in SUPERLINK_PORTS)
    completed = subprocess.run(
        [sys.executable, str(APP / "compare.py"), "--repeats", "1", "--num-supernodes", "2",
         "--num-server-rounds", "2"],
        env=unmeasured(dict(os.environ)), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    lines = completed.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert (summary["num_clients"], summary["num_rounds"], summary["repeats"]) == (2, 2, 1)
    for mode in ("sync", "fedckpt"):
        figures = summary[mode]
        # Round 2 restores the state saved in round 1; every round saves the clients' and the server's.
        assert {"client restore", "client save_state", "client post_aggregation", "server end_of_round"} <= set(
            figures["blocked_by_activity"]
        ), figures
        parts = figures["blocked_by_activity"].values()  # each rounded to 0.1 ms, as the total is
        assert figures["blocked_seconds"] == pytest.approx(sum(parts), abs=1e-4 * len(parts)) and sum(parts) > 0
        assert figures["wall_seconds"] > figures["blocked_seconds"]
    # Per client and round: its state and the global model, and its first trained model; per round, the
    # server's latest model and state. (fedckpt's server also keeps its best model.)
    assert summary["sync"]["checkpoints_written"] >= 2 * 2 * 2 + 2 + 2 * 2
    assert summary["fedckpt"]["checkpoints_written"] > 0
    fedckpt, sync = summary["fedckpt"]["blocked_seconds"], summary["sync"]["blocked_seconds"]
    assert summary["blocked_ratio"] == round(fedckpt / sync, 3)
    assert any(line.startswith("blocked (restores included)") for line in lines)
    assert not any(listening(port) for port in SUPERLINK_PORTS), "compare.py left the local SuperLink running"


def test_a_checkpointing_other_than_fedckpt_or_sync_is_an_error_naming_it():
    from flwr.app import Context, RecordDict

    from fedckpt_app.client_app import checkpointing

    def context(run_config):
        return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config)

    assert checkpointing(context({"checkpointing": "sync"})) == "sync"
    assert checkpointing(context({})) == "fedckpt"
    with pytest.raises(ValueError, match=r"checkpointing='torch' in the run config: expected one of \('fedckpt'"):
        checkpointing(context({"checkpointing": "torch"}))
