"""``FEDCKPT_CALL_TRACE``: a Flower client's checkpoint calls, each split into fedckpt's steps with
their wall and CPU time and context switches (what ``benchmarks/call_breakdown.py`` tabulates)."""

import os
import subprocess
import sys
import textwrap

from fedckpt.flower.call_trace import TRACE_ENV, read_calls

PROGRAM = """
import torch, fedckpt
from fedckpt import LatestTorchModuleCheckpointer
from fedckpt.flower import ClientCheckpoints

directory = {directory!r}
model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
model(torch.randn(4, 16)).sum().backward()
optimizer.step()
checkpoints = ClientCheckpoints(directory, post_aggregation=LatestTorchModuleCheckpointer(directory, "post.pt"))
checkpoints.after_receiving_global_model(model, 0.5, {{}}, server_round=1)
checkpoints.save_state(1, optimizer)
fedckpt.flush()
restored = ClientCheckpoints(directory).restore_state(2, optimizer)
from fedckpt.runtime.coordinator import Coordinator
print("steps wrapped:", hasattr(Coordinator.save, "__wrapped__"))
print("restored round", restored["server_round"])
fedckpt.shutdown()
"""


def run_client(directory: str, trace: str | None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", TRACE_ENV)}
    env.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **({TRACE_ENV: trace} if trace else {})})
    script = textwrap.dedent(PROGRAM.format(directory=directory))
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)


def test_each_call_is_traced_with_the_steps_it_ran_and_their_times(tmp_path):
    traces = tmp_path / "traces"
    traces.mkdir()
    done = run_client(str(tmp_path / "client"), str(traces))
    assert done.returncode == 0, done.stderr[-3000:]
    assert {"steps wrapped: True", "restored round 1"} <= set(done.stdout.splitlines()), done.stdout
    calls = {call["activity"]: call for call in read_calls(str(traces))}
    assert set(calls) == {"post_aggregation", "save_state", "restore"}
    expected_steps = {
        "post_aggregation": {"snapshot_model", "Coordinator.save"},
        "save_state": {"PerRoundStateCheckpointer.snapshot_checkpoint", "Coordinator.save"},
        "restore": {"read_state_checkpoint", "Optimizer.load_state_dict"},
    }
    for activity, steps in expected_steps.items():
        call = calls[activity]
        assert steps <= set(call["steps"]), (activity, sorted(call["steps"]))
        for name, (wall, cpu, runs, waits, preempted) in call["steps"].items():
            assert runs >= 1 and 0 < wall <= call["wall"], (activity, name, wall, call["wall"])
            assert 0 <= cpu <= call["cpu"] + 1e-3, (activity, name, cpu, call["cpu"])  # thread_time's granularity
            # The thread's context switches within the step are among the call's.
            assert 0 <= waits <= call["waits"] and 0 <= preempted <= call["preempted"], (activity, name, call)


def test_without_the_variable_no_step_is_wrapped(tmp_path):
    """Tracing costs nothing unless asked for: fedckpt's functions stay as they are."""
    done = run_client(str(tmp_path / "client"), None)
    assert done.returncode == 0, done.stderr[-3000:]
    # Ray's log lines may follow the program's own on stdout.
    assert {"steps wrapped: False", "restored round 1"} <= set(done.stdout.splitlines()), done.stdout
