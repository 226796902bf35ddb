"""A user's program that saves (to S3 and to local files), loads, and exits normally, exits 0: every
time. fedckpt's threads stop and its object-store sessions close before Ray and the interpreter go.

The default run repeats it a few times; the long run (50 times, about 5 minutes on 2 cores) is
marked ``slow``:

    .venv/bin/python -m pytest -m slow tests/test_exit.py
"""

import os
import subprocess
import sys
import textwrap

import pytest

PROGRAM = textwrap.dedent(
    """
    import sys, torch, fedckpt
    local_dir, s3_dir, endpoint = sys.argv[1:4]
    fedckpt.init(storage_options={"endpoint_url": endpoint, "key": "testing", "secret": "testing"})
    local = fedckpt.PerRoundStateCheckpointer(local_dir)
    remote = fedckpt.PerRoundStateCheckpointer(s3_dir)
    model = fedckpt.LatestTorchModuleCheckpointer(s3_dir, "model.safetensors")
    net = torch.nn.Linear(64, 64)
    for round in range(3):
        local.save_checkpoint("state.pt", {"round": round, "x": torch.full((1 << 16,), round)})
        remote.save_checkpoint("state.pt", {"round": round})
        model.maybe_checkpoint(net, float(round), {})
    assert remote.load_checkpoint("state.pt")["round"] == 2 and local.load_checkpoint("state.pt")["round"] == 2
    assert torch.equal(model.load_state_dict()["weight"], net.weight.detach())
    print("saved and loaded")
    """
)
RUNS = 3
LONG_RUNS = 50


def run_once(s3_server, tmp_path, index: int) -> None:
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    local = tmp_path / f"run-{index}"
    s3_dir = f"s3://{s3_server.new_bucket()}/run-{index}"
    result = subprocess.run([sys.executable, "-c", PROGRAM, str(local), s3_dir, s3_server.endpoint],
                            capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert result.returncode == 0, f"run {index}: exit status {result.returncode}\n{result.stderr[-4000:]}"
    assert result.stdout.strip().endswith("saved and loaded"), result.stdout


@pytest.mark.parametrize("index", range(RUNS))
def test_a_program_that_saves_and_exits_normally_exits_0(s3_server, tmp_path, index):
    run_once(s3_server, tmp_path, index)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_program_that_saves_and_exits_normally_exits_0_fifty_times_in_a_row(s3_server, tmp_path):
    for index in range(LONG_RUNS):
        run_once(s3_server, tmp_path, index)
        if index % 10 == 9:
            print(f"{index + 1}/{LONG_RUNS} runs exited 0", file=sys.stderr, flush=True)


def test_background_calls_run_in_turn_raise_to_their_waiter_and_fail_at_exit_if_never_run():
    """fedckpt's background-call thread (a Flower client's best-score read while it trains) runs calls
    in the order submitted; a call's error is raised to whoever waits for it; at exit, calls it never
    ran fail instead of leaving their waiters hanging."""
    script = textwrap.dedent("""
        import threading
        from fedckpt.runtime import threads

        calls = threads.BackgroundCalls()
        order, release, running = [], threading.Event(), threading.Event()

        def blocked():
            running.set()
            release.wait(60)
            order.append("first")

        def fails():
            raise ValueError("a read failed")

        first = calls.submit(blocked)
        second = calls.submit(lambda: order.append("second") or 2)
        third = calls.submit(fails)
        release.set()
        print(first.result(60), second.result(60), order)
        try:
            third.result(60)
        except ValueError as error:
            print("raised:", error)
        release.clear()
        running.clear()
        held = calls.submit(blocked)
        never = [calls.submit(lambda: order.append("never")) for _ in range(2)]
        running.wait(60)  # the thread is inside the held call when the exit comes
        stopper = threading.Thread(target=threads.stop_all, args=(60,))
        stopper.start()
        threads.stopping.wait(60)
        release.set()
        stopper.join(60)
        held.result(60)
        for future in never:
            try:
                future.result(60)
            except RuntimeError as error:
                print("never ran:", error)
        print(order)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [
        "None 2 ['first', 'second']",
        "raised: a read failed",
        "never ran: fedckpt stopped at exit before this background call ran",
        "never ran: fedckpt stopped at exit before this background call ran",
        "['first', 'second', 'first']",
    ], done.stdout
