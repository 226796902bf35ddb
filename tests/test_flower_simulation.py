"""The example Flower simulation end to end: real Flower, real Ray (its own, on 127.0.0.1), real files."""

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_same_tensors

from fedckpt import PerRoundStateCheckpointer
from fedckpt.cli import main as fedckpt_cli
from fedckpt.round_table import round_table
from fedckpt.storage.base import storage_for
from fedckpt.storage.reading import read_state_dict

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "flower_simulation" / "run.py"
ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_ADDRESS": "local"}
SMALL = ["--width", "64", "--local-steps", "3"]


def example_command(directory, *options):
    return [sys.executable, str(EXAMPLE), "--checkpoint-dir", str(directory), *options]


def run_example(directory, *options, timeout=420, output=None):
    """The example's JSON summary; ``output``, a list, also gets everything it printed."""
    completed = subprocess.run(
        example_command(directory, *options), capture_output=True, text=True, env=ENV, timeout=timeout
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    if output is not None:
        output.append(completed.stdout + completed.stderr)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def client_states(directory, client):
    """The client's state slots, by the round that saved them."""
    folder = Path(directory) / "clients" / f"client_{client}"
    states = [torch.load(folder / f"client_state.{slot}.pt", weights_only=False) for slot in (0, 1)]
    return {state["server_round"]: state for state in states}


def test_simulation_writes_every_checkpoint_and_carries_client_state(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE.parent))  # the .pt files pickle the example's model class
    clients, rounds, steps = 4, 3, 3
    output: list[str] = []
    summary = run_example(tmp_path, "--num-clients", str(clients), "--num-rounds", str(rounds), *SMALL, output=output)
    # Progress as Flower prints it, and a line per round with the model's loss and the checkpoints written.
    assert all(f"[ROUND {r}/{rounds}]" in output[0] for r in range(1, rounds + 1))
    assert re.search(
        rf"\[ROUND {rounds}/{rounds}\] loss [0-9.e-]+, accuracy [0-9.e-]+, \d+ checkpoints written", output[0]
    )
    assert summary["rounds_completed"] == rounds and summary["resumed_from_round"] == 0
    assert summary["checkpointing"] == "fedckpt" and summary["blocked_seconds"] > 0
    # Where the blocked time went: every client call and the server's, adding up to the total.
    breakdown = summary["blocked_by_activity"]
    assert {"client restore", "client save_state", "client pre_aggregation", "client post_aggregation",
            "server end_of_round"} <= set(breakdown)  # fmt: skip
    assert sum(breakdown.values()) == pytest.approx(summary["blocked_seconds"], abs=1e-3)
    # Per client and round: pre, state, post; the server: latest and state per round, best when it improved.
    assert clients * rounds * 3 + rounds * 2 <= summary["checkpoints_written"] <= clients * rounds * 3 + rounds * 3

    server = read_state_dict(str(tmp_path / "server" / "global_latest.safetensors"))
    server_state = torch.load(tmp_path / "server" / "server_state.pt", weights_only=False)
    assert server_state["server_round"] == rounds
    assert_same_tensors(server_state["arrays"], server)
    assert sorted(server_state["history"]["train_metrics_clientapp"]) == list(range(1, rounds + 1))
    assert (tmp_path / "server" / "global_best.safetensors").exists()
    for client in range(clients):
        folder = tmp_path / "clients" / f"client_{client}"
        # The post-aggregation checkpoint is the global model the client received in the last round.
        # FL4Health's names: the files torch.save(model) writes.
        assert_same_tensors(torch.load(folder / "post_latest.pt", weights_only=False).state_dict(), server)
        assert torch.load(folder / "pre_latest.pt", weights_only=False).state_dict().keys() == server.keys()
        states = client_states(tmp_path, client)
        assert sorted(states) == [rounds - 1, rounds]
        # Each round restored the previous round's state, in whichever Ray worker it ran.
        assert states[rounds]["local_steps"] == rounds * steps
        momentum = states[rounds]["optimizer"]["state"]
        assert len(momentum) == len(server) and all("momentum_buffer" in entry for entry in momentum.values())
    assert fedckpt_cli(["verify", str(tmp_path)]) == 0


def session_processes(session):
    """PIDs of the running processes in a session (the example and the Ray it started), zombies left out."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    running = stat.read().rpartition(")")[2].split()[0] != "Z"
                if running and os.getsid(int(entry)) == session:
                    found.append(int(entry))
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                pass
    return found


def kill_session(session):
    for _ in range(50):
        pids = session_processes(session)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    raise AssertionError(f"processes of session {session} survived SIGKILL: {session_processes(session)}")


def durable_round(directory, storage_options=None):
    """The round of the server state on storage (0: none yet); a URL is read through its manifest entry."""
    path = f"{directory}/server/server_state.pt"
    storage = storage_for(path, storage_options)
    if not storage.exists(path):
        return 0
    return torch.load(io.BytesIO(storage.read_version(path).data), weights_only=False)["server_round"]


def kill_once_durable(process, directory, server_round, storage_options=None):
    """SIGKILL a run (its whole session: no flush, no exit handlers) once ``server_round`` is durable."""
    try:
        deadline = time.monotonic() + 300
        while durable_round(directory, storage_options) < server_round:
            assert process.poll() is None, "the run ended before it was killed"
            assert time.monotonic() < deadline, "no round became durable in time"
            time.sleep(0.05)  # polling a condition, bounded by the deadline
    finally:
        kill_session(process.pid)
        process.wait()


def test_compare_runs_the_synchronous_baseline_and_fedckpt_and_reports_both_measured(tmp_path):
    """``run.py --compare``: each mode run to the end in its own process, their figures side by side."""
    clients, rounds = 3, 2
    completed = subprocess.run(
        [
            sys.executable,
            str(EXAMPLE),
            "--compare",
            "--compare-repeats",
            "1",
            "--num-clients",
            str(clients),
            "--num-rounds",
            str(rounds),
            "--model-mb",
            "0.05",
            "--local-steps",
            "3",
            "--model-format",
            "safetensors",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )  # fmt: skip  (--model-format is fedckpt's: the sync runs go without it, as they would fail with it)
    assert completed.returncode == 0, completed.stderr[-4000:]
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    sync, fedckpt = summary["sync"], summary["fedckpt"]
    assert summary["model_bytes"] == pytest.approx(50_000, rel=0.05)  # --model-mb sized the MLP
    # The baseline really saved: per client and round pre, state and post with torch.save; the server two.
    assert sync["checkpoints_written"] == clients * rounds * 3 + rounds * 2
    assert sync["blocked_by_activity"]["client restore"] > 0  # rounds after the first load the state back
    assert clients * rounds * 3 + rounds * 2 <= fedckpt["checkpoints_written"]
    assert summary["blocked_ratio"] == pytest.approx(fedckpt["blocked_seconds"] / sync["blocked_seconds"], rel=1e-2)
    assert summary["wall_ratio"] == pytest.approx(fedckpt["wall_seconds"] / sync["wall_seconds"], rel=1e-3)
    assert "blocked (restores included)" in completed.stdout and "fedckpt/sync" in completed.stdout


def test_the_cnn_with_safetensors_names_trains_and_saves_its_batch_norm_buffers(tmp_path):
    """``--model cnn``: a 4.3 MB CNN with batch norm on image-shaped inputs; ``--model-format
    safetensors`` names the clients' model files ``.safetensors``, which hold every tensor of the
    received global model, buffers included."""
    summary = run_example(
        tmp_path, "--num-clients", "2", "--num-rounds", "1", "--local-steps", "2", "--model", "cnn",
        "--model-format", "safetensors",
    )  # fmt: skip
    assert summary["model"] == "cnn" and summary["model_format"] == "safetensors"
    assert summary["model_bytes"] == pytest.approx(4.3e6, rel=0.05)
    server = read_state_dict(str(tmp_path / "server" / "global_latest.safetensors"))
    for client in range(2):
        folder = tmp_path / "clients" / f"client_{client}"
        assert not (folder / "post_latest.pt").exists()
        received = read_state_dict(str(folder / "post_latest.safetensors"))
        assert "features.1.running_mean" in received and "features.1.num_batches_tracked" in received
        assert_same_tensors(received, server)


def test_a_baseline_run_whose_clients_fail_is_an_error_not_a_summary(tmp_path):
    """A simulation whose clients raise (torch's SGD refuses a negative learning rate, in each client)
    completes no rounds: no summary is printed as if it had run."""
    completed = subprocess.run(
        [sys.executable, str(EXAMPLE), "--checkpointing", "sync", "--checkpoint-dir", str(tmp_path),
         "--num-clients", "2", "--num-rounds", "1", "--lr", "-1", *SMALL[:2]],
        capture_output=True, text=True, env=ENV, timeout=420,
    )  # fmt: skip
    assert completed.returncode != 0
    assert "did not complete its rounds" in completed.stderr


def test_simulation_killed_with_sigkill_resumes_from_the_last_durable_round(tmp_path):
    clients, rounds, steps = 4, 6, 3
    options = ["--num-clients", str(clients), "--num-rounds", str(rounds), *SMALL]
    process = subprocess.Popen(
        example_command(tmp_path, *options),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
        start_new_session=True,  # its own session: the kill takes the example and the Ray it started
    )
    kill_once_durable(process, tmp_path, 2)
    killed_at = durable_round(tmp_path)
    assert 2 <= killed_at < rounds
    assert fedckpt_cli(["verify", str(tmp_path)]) == 0  # nothing torn on disk

    summary = run_example(tmp_path, *options)
    assert summary["resumed_from_round"] == killed_at
    assert summary["rounds_completed"] == rounds
    server_state = torch.load(tmp_path / "server" / "server_state.pt", weights_only=False)
    assert server_state["server_round"] == rounds
    assert sorted(server_state["history"]["train_metrics_clientapp"]) == list(range(1, rounds + 1))
    for client in range(clients):
        # The resumed rounds started from the state each client had at the durable round: no step lost or repeated.
        assert client_states(tmp_path, client)[rounds]["local_steps"] == rounds * steps
    assert fedckpt_cli(["verify", str(tmp_path)]) == 0
    leftovers = [name for name in os.listdir("/dev/shm") if name.startswith("fedckpt-")]
    dead = [name for name in leftovers if not os.path.exists(f"/proc/{name.split('-')[1]}")]
    assert dead == [], "staging segments of killed processes were not removed"


def test_a_run_on_s3_killed_with_sigkill_resumes_from_the_last_durable_round(s3_server):
    directory, options = f"s3://{s3_server.new_bucket()}/run", s3_server.options()
    env = {**ENV, **s3_server.env()}  # the standard AWS variables: the example passes no options
    rounds = 4
    arguments = ["--num-clients", "3", "--num-rounds", str(rounds), *SMALL]
    process = subprocess.Popen(
        example_command(directory, *arguments), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        start_new_session=True,
    )  # fmt: skip
    kill_once_durable(process, directory, 2, options)
    killed_at = durable_round(directory, options)
    assert 2 <= killed_at < rounds
    assert storage_for(directory, options).verify(directory).problems == []  # nothing torn on the store

    completed = subprocess.run(
        example_command(directory, *arguments), capture_output=True, text=True, env=env, timeout=420
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    assert summary["resumed_from_round"] == killed_at and summary["rounds_completed"] == rounds
    assert durable_round(directory, options) == rounds
    report = storage_for(directory, options).verify(directory)
    assert report.problems == [] and report.checked >= 3 * 3 + 3


def test_a_server_app_that_never_flushes_still_gets_every_client_save(tmp_path):
    """Flower shuts Ray down as soon as the ServerApp returns; the clients' last-round saves, still
    in the writers' queues then, are on disk afterwards (fedckpt flushes inside ``ray.shutdown``)."""
    clients, rounds, copies = 4, 2, 4
    app = Path(__file__).resolve().parent / "flower_app_without_flush.py"
    command = [sys.executable, str(app), str(tmp_path), str(clients), str(rounds), "2048", str(copies)]
    completed = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=420)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert completed.stdout.strip().splitlines()[-1] == "simulation returned"
    for client in range(clients):
        for copy in range(copies):
            weight = read_state_dict(str(tmp_path / f"client_{client}" / f"model_{copy}.safetensors"))["weight"]
            assert torch.all(weight == rounds), (client, copy)
    assert fedckpt_cli(["verify", str(tmp_path)]) == 0


def test_a_flower_run_sent_sigterm_mid_round_has_every_acknowledged_client_save_on_disk(tmp_path):
    """Preemption of a Flower simulation: SIGTERM to the driver while its clients save. When it has
    ended, every save a client saw acknowledged is on disk (or a newer one), and nothing is torn."""
    clients, rounds, copies = 4, 200, 2
    app = Path(__file__).resolve().parent / "flower_app_without_flush.py"
    acks = tmp_path / "acks.txt"
    checkpoints = tmp_path / "checkpoints"
    command = [sys.executable, str(app), str(checkpoints), str(clients), str(rounds), "1024", str(copies), str(acks)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
                               start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not acks.exists() or len(acks.read_text().splitlines()) < clients * copies * 3:
            assert process.poll() is None, "the run ended before it was sent SIGTERM"
            assert time.monotonic() < deadline, "no saves in time"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
    finally:
        kill_session(process.pid)  # what SIGKILL after the grace period would leave: nothing runs on
        process.wait()
    assert code != 0, "the run was stopped: it should not report success"
    acknowledged: dict[tuple[int, int], int] = {}
    for line in acks.read_text().splitlines():
        client, copy, server_round = (int(field) for field in line.split())
        acknowledged[(client, copy)] = max(server_round, acknowledged.get((client, copy), 0))
    for (client, copy), server_round in acknowledged.items():
        weight = read_state_dict(str(checkpoints / f"client_{client}" / f"model_{copy}.safetensors"))["weight"]
        assert int(weight[0, 0]) >= server_round and torch.all(weight == weight[0, 0]), (client, copy)
    assert fedckpt_cli(["verify", str(checkpoints)]) == 0


# dp-fedadam holds all the state the others do (FedAdam's moments, inside a wrapper) and the RNG
# besides: the default run has it; the plain ones (3 runs of a simulation each) are in -m slow.
@pytest.mark.parametrize(
    "strategy",
    [pytest.param("fedadam", marks=pytest.mark.slow), "dp-fedadam", pytest.param("fedprox", marks=pytest.mark.slow)],
)
def test_a_resumed_run_of_a_stateful_strategy_ends_on_the_model_of_an_uninterrupted_one(tmp_path, strategy):
    """FedAdam's moments, also inside a differential-privacy wrapper, and the server's RNG (the DP
    noise) are part of the server state: a run killed after round 2 and resumed ends on the global
    model of a run that was never interrupted."""
    rounds = 6
    app = Path(__file__).resolve().parent / "flower_app_strategies.py"
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"

    def command(directory):
        return [sys.executable, str(app), str(directory), strategy, str(rounds)]

    completed = subprocess.run(command(whole), capture_output=True, text=True, env=ENV, timeout=420)
    assert completed.returncode == 0, completed.stderr[-4000:]
    process = subprocess.Popen(command(resumed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                               start_new_session=True)  # fmt: skip
    kill_once_durable(process, resumed, 2)
    assert 2 <= durable_round(resumed) < rounds
    completed = subprocess.run(command(resumed), capture_output=True, text=True, env=ENV, timeout=420)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert durable_round(resumed) == rounds
    final = read_state_dict(str(resumed / "server" / "global.safetensors"))
    expected = read_state_dict(str(whole / "server" / "global.safetensors"))
    for name in expected:
        assert torch.allclose(final[name], expected[name], atol=1e-6), (name, final[name], expected[name])


def test_a_run_resumes_from_an_older_complete_round_and_drops_the_rounds_it_abandoned(tmp_path):
    """Every round kept (LatestN(4)); a second run restarts from round 2: each client's round 3 goes on
    from its round-2 state, not from the newer state of the abandoned run, and `ls --rounds` shows it."""
    clients, steps = 3, 3
    options = ["--num-clients", str(clients), "--num-rounds", "4", "--keep-rounds", "4", *SMALL]
    first = run_example(tmp_path, *options)
    assert first["rounds_completed"] == 4 and first["resumed_from_round"] == 0
    rows = round_table(str(tmp_path), "server/server_state.pt")
    assert [(row.server_round, row.complete, row.clients_kept, row.clients_committed) for row in rows] == [
        (server_round, True, clients, clients) for server_round in (1, 2, 3, 4)
    ]
    client_0 = PerRoundStateCheckpointer(tmp_path / "clients" / "client_0")
    assert client_0.load_checkpoint("client_state.pt")["local_steps"] == 4 * steps
    storage = storage_for(str(tmp_path))
    server_version = str(tmp_path / "server" / "server_state.round-0000{}.pt").format
    first_run_ended = storage.read_entry(server_version(4)).saved_at

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert fedckpt_cli(["ls", "--rounds", str(tmp_path), "--server-state", "server/server_state.pt"]) == 0
    assert re.search(r"^\s*│?\s*2\s*│?\s*yes\s*│?\s*kept\s*│?\s*3/3", printed.getvalue(), re.MULTILINE), (
        printed.getvalue()
    )

    resumed = run_example(tmp_path, *options, "--resume-round", "2")
    assert resumed["resumed_from_round"] == 2 and resumed["rounds_completed"] == 4
    for client in range(clients):
        states = PerRoundStateCheckpointer(tmp_path / "clients" / f"client_{client}")
        assert states.versions("client_state.pt") == [1, 2, 3, 4]
        # Round 3 of the new run continued from round 2's state (the abandoned run's round 4 had 12 steps).
        assert states.load_checkpoint("client_state.pt", server_round=3)["local_steps"] == 3 * steps
        assert states.load_checkpoint("client_state.pt")["local_steps"] == 4 * steps
    server = PerRoundStateCheckpointer(tmp_path / "server")
    assert server.versions("server_state.pt") == [1, 2, 3, 4]
    assert storage.read_entry(server_version(2)).saved_at < first_run_ended  # kept from the first run
    assert storage.read_entry(server_version(3)).saved_at > first_run_ended  # made again by the resumed run
    assert all(row.complete for row in round_table(str(tmp_path), "server/server_state.pt"))
    assert fedckpt_cli(["verify", str(tmp_path)]) == 0
