"""examples/flower_app through Flower's own entry point: ``flwr run .`` on the local SuperLink that
Flower 1.42 starts by itself (on 127.0.0.1), in a temporary ``FLWR_HOME``, stopped at the end."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_flower_simulation import durable_round

from fedckpt.cli import main as fedckpt_cli

APP = Path(__file__).resolve().parent.parent / "examples" / "flower_app"
SUPERLINK_PORTS = (39091, 39093)  # the local SuperLink's (1.42 serves every API on 39091), fixed by Flower
SIMULATION = "--federation-config", "num-supernodes=3 client-resources-num-cpus=1"


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command's name (state first, parent second); None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def running_processes() -> dict[int, int]:
    """Every running process (zombies left out), with its parent."""
    found = {}
    for entry in os.listdir("/proc"):
        fields = proc_stat(int(entry)) if entry.isdigit() else None
        if fields is not None and fields[0] != "Z":
            found[int(entry)] = int(fields[1])
    return found


def descendants(root: int) -> list[int]:
    parents = running_processes()
    tree, added = {root}, True
    while added:
        children = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= children
        added = bool(children)
    return sorted(tree - {root})


def kill_and_wait(pids: list[int], sig: int, timeout: float) -> list[int]:
    """Send ``sig`` to ``pids``; the ones still running after ``timeout`` seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the processes' exit, bounded by the deadline
        running = running_processes()
        alive = [pid for pid in alive if pid in running]
    return alive


class Flwr:
    """The ``flwr`` command of this environment, with its own ``FLWR_HOME``."""

    def __init__(self, home: Path) -> None:
        self.home = home
        # Without coverage's subprocess measurement: when Flower adds the app's directory to sys.path,
        # coverage re-scans it and drops every module imported meanwhile, by any thread, from
        # sys.modules; the SuperLink's server thread then fails to import the ServerApp (KeyError).
        measured = {"COVERAGE_PROCESS_CONFIG", "COVERAGE_PROCESS_START"}
        self.env = {
            **{name: value for name, value in os.environ.items() if name not in measured},
            "FLWR_HOME": str(home),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            # The app's dependencies are this environment's (else the SuperLink installs them per run).
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }

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
        """The local SuperLink of this ``FLWR_HOME`` (``flwr run`` starts it detached)."""
        database = f"--database {self.home / 'local-superlink' / 'state.db'}"
        return next((pid for pid in running_processes() if "flower-superlink" in command_line(pid)
                     and database in command_line(pid)), None)  # fmt: skip

    def stop_superlink(self) -> None:
        superlink = self.superlink()
        if superlink is None:
            return
        tree = [superlink, *descendants(superlink)]
        left = kill_and_wait(tree, signal.SIGTERM, 20)
        assert not kill_and_wait(left, signal.SIGKILL, 10), f"the local SuperLink's processes survived: {left}"


@pytest.fixture
def flwr(tmp_path):
    for port in SUPERLINK_PORTS:  # flwr run would hand the runs to that SuperLink, not start its own
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
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
    assert not kill_and_wait([*simulation, *descendants(simulation[0])], signal.SIGKILL, 30)
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
