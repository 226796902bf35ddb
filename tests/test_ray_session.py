"""fedckpt starts Ray by itself on loopback, and joins a Ray that is already running."""

import os
import subprocess
import sys
import textwrap


def run_script(script: str, env_extra: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip


def test_first_save_starts_a_local_ray_bound_to_loopback(tmp_path):
    """Without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, Ray alone would bind the machine's interface."""
    result = run_script(
        f"""
        import ray, torch, fedckpt
        from fedckpt import LatestTorchModuleCheckpointer
        assert not ray.is_initialized()
        LatestTorchModuleCheckpointer({str(tmp_path)!r}, "m.pt").maybe_checkpoint(torch.nn.Linear(2, 2), 0.0, {{}})
        fedckpt.flush()  # Ray and the pool start in the background: this waits for them
        addresses = {{node["NodeManagerAddress"] for node in ray.nodes()}}
        print(sorted(addresses))
        """,
        {},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "['127.0.0.1']"
    assert os.path.exists(tmp_path / "m.pt")


def test_joins_an_initialized_ray_and_leaves_it_running(tmp_path):
    result = run_script(
        f"""
        import ray, torch, fedckpt
        ray.init(address="local", include_dashboard=False, num_cpus=1)
        session = ray.get_runtime_context().gcs_address
        fedckpt.PerRoundStateCheckpointer({str(tmp_path)!r}).save_checkpoint("s.pt", {{"a": 1}})
        fedckpt.shutdown()  # flushes; Ray belongs to the user, so it stays up
        assert ray.is_initialized() and ray.get_runtime_context().gcs_address == session
        print(torch.load({str(tmp_path / "s.pt")!r}, weights_only=False)["a"])
        """,
        {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "1"


def test_ray_shutdown_waits_for_the_saves_of_every_process(tmp_path):
    """As at the end of a Flower simulation: a client process saved and returned, and the driver
    calls ray.shutdown() at once. The saves are written first; one that failed is raised after."""
    (tmp_path / "blocked").write_text("a file where a directory should be")
    result = run_script(
        f"""
        import ray, torch, fedckpt
        from safetensors.torch import load_file
        ray.init(address="local", include_dashboard=False, num_cpus=1)

        @ray.remote
        def client(version):
            model = torch.nn.Linear(4096, 4096)  # 64 MB
            with torch.no_grad():
                model.weight.fill_(version)
            for index in range(8):
                checkpointer = fedckpt.LatestTorchModuleCheckpointer({str(tmp_path)!r}, f"m{{index}}.safetensors")
                checkpointer.maybe_checkpoint(model, 0.0, {{}})
            if version == 2.0:  # fails in the writer, after this task returned
                fedckpt.PerRoundStateCheckpointer({str(tmp_path / "blocked")!r}).save_checkpoint("s.pt", {{}})

        ray.get([client.remote(1.0)])
        ray.get([client.remote(2.0)])
        try:
            ray.shutdown()  # without fedckpt.flush() first, as Flower does
        except fedckpt.CheckpointError as error:
            print("reported:", "blocked" in str(error) and not ray.is_initialized())
        print("written:", all(
            bool((load_file(f"{str(tmp_path)}/m{{index}}.safetensors")["weight"] == 2.0).all()) for index in range(8)))
        """,
        {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-2:] == ["reported: True", "written: True"], result.stdout


def test_ray_lost_under_pending_saves_is_reported(tmp_path):
    """Ray going down without fedckpt's flush (a crash): saves it cut off are reported at the next
    call, by name; those it did not cut off are on disk, whole."""
    result = run_script(
        f"""
        import os, ray, torch, fedckpt
        from fedckpt.cli import main
        ray.init(address="local", include_dashboard=False, num_cpus=1)
        checkpointers = [fedckpt.LatestTorchModuleCheckpointer({str(tmp_path)!r}, f"m{{i}}.pt") for i in range(16)]
        model = torch.nn.Linear(4096, 4096)
        for checkpointer in checkpointers:
            checkpointer.maybe_checkpoint(model, 0.0, {{}})
        ray.shutdown.__wrapped__()  # Ray's own shutdown, without the flush fedckpt adds to it
        written = [c.checkpoint_path for c in checkpointers if os.path.exists(c.checkpoint_path)]
        try:
            checkpointers[0].maybe_checkpoint(model, 0.0, {{}})
        except fedckpt.CheckpointError as error:
            lost = [c.checkpoint_path for c in checkpointers if c.checkpoint_path not in written]
            print("reported:", bool(lost) and all(path in str(error) for path in lost))
        else:
            print("reported:", len(written) == 16)  # nothing was cut off
        print("verified:", main(["verify", {str(tmp_path)!r}]) == 0)
        """,
        {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert "reported: True" in lines and lines[-1] == "verified: True", result.stdout


def test_ray_shutdown_under_an_exception_keeps_that_exception_and_notes_the_failed_saves(tmp_path):
    """A training script whose ``finally`` shuts Ray down: the error it was unwinding with is the one
    that propagates, and the save that failed in the flush before is named on it (and in the log).
    fedckpt is imported before Ray here: the wrapper goes in when Ray's import finishes."""
    (tmp_path / "blocked").write_text("a file where a directory should be")
    result = run_script(
        f"""
        import fedckpt, torch
        import ray
        ray.init(address="local", include_dashboard=False, num_cpus=1)
        fedckpt.PerRoundStateCheckpointer({str(tmp_path / "blocked")!r}).save_checkpoint("s.pt", {{}})
        try:
            try:
                raise ValueError("training crashed")
            finally:
                ray.shutdown()
        except ValueError as error:
            notes = getattr(error, "__notes__", [])
            print("kept:", str(error) == "training crashed", any("blocked" in note for note in notes))
        except fedckpt.CheckpointError:
            print("hidden")
        print("down:", not ray.is_initialized())
        """,
        {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-2:] == ["kept: True True", "down: True"], result.stdout
    assert "saves failed before ray.shutdown()" in result.stderr and "blocked" in result.stderr


def test_a_process_whose_saves_failed_at_exit_exits_non_zero(tmp_path):
    """A script that saves and ends without flushing: fedckpt flushes at exit, and a save that failed
    there is printed and makes the exit status 1, not 0 as if it had been saved."""
    (tmp_path / "blocked").write_text("a file where a directory should be")
    result = run_script(
        f"""
        import fedckpt
        fedckpt.PerRoundStateCheckpointer({str(tmp_path / "blocked")!r}).save_checkpoint("s.pt", {{"a": 1}})
        fedckpt.PerRoundStateCheckpointer({str(tmp_path / "fine")!r}).save_checkpoint("s.pt", {{"a": 2}})
        print("saved")
        """,
        {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_ADDRESS": "local"},
    )
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert result.stdout.strip().splitlines()[-1] == "saved"
    assert "saves failed before exit" in result.stderr and str(tmp_path / "blocked" / "s.pt") in result.stderr
    assert (tmp_path / "fine" / "s.pt").exists()
