"""A plain PyTorch program's first saves do not wait for Ray and the writer pool to start: they are
copied, held, and made by a background thread once the pool is up, in order; what cannot be made is
an error at the next save of its key, at flush() and at exit."""

import os
import subprocess
import sys
import textwrap

import torch
from conftest import make_model, shared_pool_env

from fedckpt.runtime.priming import prime_models, prime_serialization

PREAMBLE = """
import os, sys, threading, atexit
import ray, torch, fedckpt
from fedckpt import LatestTorchModuleCheckpointer, PerRoundStateCheckpointer
from fedckpt.runtime import failpoints

starting = threading.Event()
go_on = threading.Event()

def hold_the_start(**_):
    starting.set()
    go_on.wait()

def refuse(**_):  # the pool cannot be started
    raise ConnectionError("no cluster here")
"""


def run_program(body: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """A fresh interpreter, with no Ray running in it, that runs ``body`` after the preamble."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **(env_extra or {})})
    script = PREAMBLE + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)


def test_first_saves_return_before_ray_starts_and_are_written_in_order(tmp_path):
    """The start is held at its first step: the saves return while Ray is down, the state changed
    right after each save does not leak into it, and the file ends with the last one."""
    result = run_program(f"""
        failpoints.set_hook("background_start.starting", hold_the_start)
        model = torch.nn.Linear(64, 64)
        checkpointer = LatestTorchModuleCheckpointer({str(tmp_path)!r}, "model.pt")
        states = PerRoundStateCheckpointer({str(tmp_path)!r})
        for version in range(3):
            with torch.no_grad():
                model.weight.fill_(version)
            checkpointer.maybe_checkpoint(model, 1.0 - version / 10, {{}})
            states.save_checkpoint("state.pt", {{"round": version, "tensor": model.weight}})
            with torch.no_grad():
                model.weight.fill_(-1)  # after the save returned: not in the file
        assert starting.wait(60)
        print("returned while Ray was down:", not ray.is_initialized())
        go_on.set()
        fedckpt.flush()
        saved = torch.load({str(tmp_path / "model.pt")!r}, weights_only=False)
        state = torch.load({str(tmp_path / "state.pt")!r})
        print("model:", float(saved.weight.min()), float(saved.weight.max()))
        print("state:", state["round"], float(state["tensor"].min()), float(state["tensor"].max()))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-3:] == [
        "returned while Ray was down: True",
        "model: 2.0 2.0",
        "state: 2 2.0 2.0",
    ], result.stdout


def test_a_program_that_exits_right_after_saving_writes_its_saves_and_stops_the_ray_it_started(tmp_path):
    """The exit comes while Ray is still starting: the exit handler waits for the pool, flushes,
    and shuts down the Ray instance that fedckpt started (Ray's own exit hook came too late to run)."""
    result = run_program(f"""
        def after_everything():  # registered first, so it runs last
            print("ray up at the very end:", ray.is_initialized(), flush=True)

        atexit.register(after_everything)
        failpoints.set_hook("background_start.starting", hold_the_start)
        PerRoundStateCheckpointer({str(tmp_path)!r}).save_checkpoint("state.pt", {{"round": 7}})
        assert starting.wait(60)
        go_on.set()  # the start goes on while the interpreter exits
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == "ray up at the very end: False", result.stdout
    import torch

    assert torch.load(tmp_path / "state.pt")["round"] == 7


def test_saves_held_for_a_pool_that_cannot_start_are_errors_at_the_next_save_and_at_flush(tmp_path):
    """The start fails: the held saves are named at the next save of their key and at flush (each
    once), nothing already on disk is touched, and the next save starts the pool again."""
    (tmp_path / "state.pt").write_bytes(b"kept")
    result = run_program(f"""
        states = PerRoundStateCheckpointer({str(tmp_path)!r})
        with failpoints.hooked("background_start.starting", refuse):
            states.save_checkpoint("state.pt", {{"round": 1}})
            states.save_checkpoint("other.pt", {{"round": 1}})
            try:
                fedckpt.flush()
            except fedckpt.CheckpointError as error:
                print("flush:", "other.pt" in str(error), "no cluster here" in str(error))
        print("on disk:", open({str(tmp_path / "state.pt")!r}, "rb").read())
        states.save_checkpoint("state.pt", {{"round": 2}})  # its failure was told at flush: starts again
        fedckpt.flush()
        print("saved:", torch.load({str(tmp_path / "state.pt")!r})["round"])
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-3:] == ["flush: True True", "on disk: b'kept'", "saved: 2"], result.stdout


def test_a_failed_start_is_raised_by_the_next_save_of_the_key(tmp_path):
    result = run_program(f"""
        states = PerRoundStateCheckpointer({str(tmp_path)!r})
        with failpoints.hooked("background_start.starting", refuse):
            states.save_checkpoint("state.pt", {{"round": 1}})
            fedckpt.runtime.lifecycle.coordinator()._background_start.wait()
        try:
            states.save_checkpoint("state.pt", {{"round": 2}})
        except fedckpt.CheckpointError as error:
            print("next save:", "state.pt" in str(error) and "no cluster here" in str(error))
        fedckpt.flush()  # reported once: nothing left to raise
        print("exists:", os.path.exists({str(tmp_path / "state.pt")!r}))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-2:] == ["next save: True", "exists: False"], result.stdout


def test_an_unreported_failed_start_fails_the_exit(tmp_path):
    result = run_program(f"""
        failpoints.set_hook("background_start.starting", refuse)
        PerRoundStateCheckpointer({str(tmp_path)!r}).save_checkpoint("state.pt", {{"round": 1}})
    """)
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    assert "state.pt" in result.stderr and "no cluster here" in result.stderr


def test_saves_past_the_held_bytes_cap_wait_for_the_start(tmp_path):
    """With 1 MiB in flight at most, a second 0.75 MiB save waits until the pool is up and the first
    save was made; the first returned at once."""
    result = run_program(
        f"""
        failpoints.set_hook("background_start.starting", hold_the_start)
        states = PerRoundStateCheckpointer({str(tmp_path)!r})
        states.save_checkpoint("a.pt", {{"t": torch.ones(3 << 16)}})  # 0.75 MiB: held
        second = threading.Thread(target=states.save_checkpoint, args=("b.pt", {{"t": torch.ones(3 << 16)}}))
        second.start()
        assert starting.wait(60)
        second.join(1.0)
        print("second waits while the start is held:", second.is_alive())
        go_on.set()
        second.join(120)
        fedckpt.flush()
        print("both:", torch.load({str(tmp_path / "a.pt")!r})["t"].sum().item(),
              torch.load({str(tmp_path / "b.pt")!r})["t"].sum().item())
    """,
        {"FEDCKPT_MAX_INFLIGHT_BYTES": str(1 << 20)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-2:] == [
        "second waits while the start is held: True",
        f"both: {float(3 << 16)} {float(3 << 16)}",
    ], result.stdout


def test_priming_pays_the_first_saves_one_time_costs_in_memory(tmp_path):
    """What a client's warm-up thread runs while its first round trains: the modules a first save and
    load import on first use are imported, and nothing is written anywhere."""
    script = textwrap.dedent("""
        import sys
        from fedckpt.runtime.priming import prime_serialization
        first_use = ["fedckpt.storage.posix", "torch.utils.serialization.config"]
        before = [name in sys.modules for name in first_use]
        prime_serialization()
        print(before, [name in sys.modules for name in first_use])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[0] == "[False, False] [True, True]"
    assert list(tmp_path.iterdir()) == []


def test_priming_costs_a_process_that_never_trains_no_optimizer_machinery(tmp_path):
    """A ServerApp primes at its start, while Flower starts the clients on the same cores: building a
    torch optimizer there would import torch._dynamo (about a second of CPU) for a process that never
    steps one. The primed state is an optimizer's state dict all the same."""
    script = textwrap.dedent("""
        import sys
        from fedckpt.runtime.priming import prime_serialization
        prime_serialization()
        print("torch._dynamo" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["False"], done.stdout


def test_priming_leaves_torchs_random_number_generator_as_it_was():
    """The warm-up primes on a background thread while the program builds its models: torch's
    generator is shared by every thread, so a draw there would change what a seeded program builds
    (a model made after ``torch.manual_seed(2)`` would differ from run to run)."""
    model = make_model(1)
    before = torch.get_rng_state()
    prime_serialization()
    prime_models([model])
    assert torch.equal(torch.get_rng_state(), before)


def test_a_server_warmed_up_when_ray_came_up_maps_and_connects_nothing_at_its_first_save(tmp_path, runtime):
    """A Flower ServerApp starts before Ray and calls ``start_writers_when_ray_is_up``: once Ray is up,
    the background thread also opens the channel to this node's writer and maps the staging memory,
    so that the server's first end of round pays for neither."""
    script = textwrap.dedent(f"""
        import os
        import ray, fedckpt
        from fedckpt import PerRoundStateCheckpointer
        from fedckpt.runtime import lifecycle
        warming = lifecycle.start_writers_when_ray_is_up()
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        warming.join(120)
        transport = lifecycle.coordinator()._transport
        ready = {{segment.path for segment in transport.arena._free}}
        channels = len(transport.open_channels())
        PerRoundStateCheckpointer({str(tmp_path)!r}).save_checkpoint("s.pt", {{"x": torch.ones(1000)}})
        used = {{segment.path for segment in transport.arena._busy}}
        fedckpt.flush()
        print(len(ready), channels, len(used), used <= ready)
    """)
    env = {**shared_pool_env(), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    done = subprocess.run([sys.executable, "-c", "import torch\n" + script], capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ready, channels, used, reused = done.stdout.split()[-4:]
    assert int(ready) >= 2 and int(channels) >= 1, done.stdout
    assert (used, reused) == ("1", "True"), done.stdout  # the save took a segment mapped ahead
    assert torch.load(tmp_path / "s.pt")["x"].sum() == 1000


def test_priming_the_server_states_generators_imports_numpy_random_and_changes_no_generator(tmp_path):
    """The first server state's ``rng()`` would import numpy.random (numpy 2 does so on first use, ~5 ms
    in the first round's end): the server primes it while the clients start, drawing nothing."""
    script = textwrap.dedent("""
        import sys
        from fedckpt.flower import strategy_state
        before = "numpy.random" in sys.modules
        strategy_state.prime_rng()
        import numpy as np, random, torch
        np.random.seed(7); random.seed(7); torch.manual_seed(7)
        first = (np.random.rand(), random.random(), torch.rand(1).item())
        np.random.seed(7); random.seed(7); torch.manual_seed(7)
        strategy_state.prime_rng()
        print(before, "numpy.random" in sys.modules, first == (np.random.rand(), random.random(), torch.rand(1).item()))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["False", "True", "True"], done.stdout
