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
        import ray, torch
        from fedckpt import LatestTorchModuleCheckpointer
        assert not ray.is_initialized()
        LatestTorchModuleCheckpointer({str(tmp_path)!r}, "m.pt").maybe_checkpoint(torch.nn.Linear(2, 2), 0.0, {{}})
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


def test_ray_shut_down_under_pending_saves_is_reported(tmp_path):
    """Saves that Ray's shutdown cut off are reported at the next call, not dropped silently."""
    result = run_script(
        f"""
        import ray, torch, fedckpt
        ray.init(address="local", include_dashboard=False, num_cpus=1)
        from safetensors.torch import load_file
        checkpointers = [fedckpt.LatestTorchModuleCheckpointer({str(tmp_path)!r}, f"m{{i}}.pt") for i in range(4)]
        model = torch.nn.Linear(4096, 4096)
        for version in (1.0, 2.0):
            with torch.no_grad():
                model.weight.fill_(version)
            for checkpointer in checkpointers:
                checkpointer.maybe_checkpoint(model, 0.0, {{}})
        ray.shutdown()  # without fedckpt.flush() first
        try:
            checkpointers[0].maybe_checkpoint(model, 0.0, {{}})
        except fedckpt.CheckpointError as error:
            print("reported:", "ray.shutdown" in str(error) and ".pt" in str(error))
        else:  # everything had reached the disk before Ray went down
            print("saved before shutdown:", all(
                bool((load_file(c.checkpoint_path)["weight"] == 2.0).all()) for c in checkpointers))
        """,
        {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last in ("reported: True", "saved before shutdown: True"), result.stdout
