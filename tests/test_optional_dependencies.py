"""The core works without its optional dependencies: Flower (``fedckpt[flower]``) and rich
(``fedckpt[bench]``). Each check runs in a fresh interpreter where they are made unimportable (a
finder on ``sys.meta_path`` that refuses them, as if they were not installed), so a top-level import
of either anywhere on these paths fails it; the optional parts then name the extra to install."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import make_model

from fedckpt import BestLossTorchModuleCheckpointer, LatestTorchModuleCheckpointer

BLOCK = """
import sys

class NotInstalled:
    \"\"\"Refuses the named distributions' modules, as an environment without them would.\"\"\"

    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r} (made unimportable by the test)", name=name)
        return None

"""


def run_without(blocked: list[str], script: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``script`` in a fresh interpreter where the ``blocked`` packages cannot be imported."""
    code = BLOCK + f"sys.meta_path.insert(0, NotInstalled({blocked!r}))\n" + textwrap.dedent(script)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env or dict(os.environ)
    )


def joining_this_ray(runtime_env: dict[str, str]) -> dict[str, str]:
    """A child that joins this session's Ray cluster (its own writer pool: another job)."""
    import ray

    return {**runtime_env, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}


PLAIN_PYTORCH = """
import numpy as np
import torch
from torch import nn

import fedckpt
from fedckpt import (BestLossTorchModuleCheckpointer, CheckpointMode, ClientCheckpointAndStateModule,
                     LatestTorchModuleCheckpointer, PerRoundStateCheckpointer, ServerCheckpointAndStateModule)

for name in {blocked!r}:  # the finder is in place: an import fails
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise AssertionError(name + " was importable")

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
model(torch.randn(4, 8)).sum().backward()
optimizer.step()
directory = {directory!r}
client = ClientCheckpointAndStateModule(
    pre_aggregation=BestLossTorchModuleCheckpointer(directory, "pre_best.safetensors"),
    post_aggregation=LatestTorchModuleCheckpointer(directory, "post_latest.pt"),
    state_checkpointer=PerRoundStateCheckpointer(directory),
)
client.maybe_checkpoint(model, 0.5, {{}}, CheckpointMode.PRE_AGGREGATION)
client.maybe_checkpoint(model, 0.5, {{}}, CheckpointMode.POST_AGGREGATION)
client.save_state("state.pt", {{"optimizer": optimizer.state_dict(), "round": 3}})
server = ServerCheckpointAndStateModule(  # a server without Flower: parameters as a list of ndarrays
    model=nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)),
    model_checkpointers=LatestTorchModuleCheckpointer(directory, "global.safetensors"),
)
server.maybe_checkpoint([tensor.detach().numpy() for tensor in model.state_dict().values()], 0.4, {{}})
fedckpt.flush()

expected = model.state_dict()
for loaded in (client.pre_aggregation[0].load_state_dict(), server.model_checkpointers[0].load_state_dict(),
               client.post_aggregation[0].load_checkpoint().state_dict()):
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)
state = client.maybe_load_state("state.pt")
assert state["round"] == 3 and torch.equal(
    state["optimizer"]["state"][0]["momentum_buffer"], optimizer.state_dict()["state"][0]["momentum_buffer"])
print("optional modules imported:", sorted(name for name in ("flwr", "rich") if name in sys.modules))
"""


@pytest.mark.parametrize("blocked", [["flwr", "rich"], []], ids=["without-flower-and-rich", "with-them-installed"])
def test_import_fedckpt_and_plain_pytorch_saves_and_loads_need_neither_flower_nor_rich(runtime, tmp_path, blocked):
    """Without them installed it works; with them installed it imports neither (a new top-level
    import of either anywhere on this path fails one of the two)."""
    script = PLAIN_PYTORCH.format(blocked=blocked, directory=str(tmp_path))
    done = run_without(blocked, script, joining_this_ray(dict(os.environ)))
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip().splitlines()[-1] == "optional modules imported: []"
    assert sorted(os.listdir(tmp_path)) == [".fedckpt", "global.safetensors", "post_latest.pt", "pre_best.safetensors",
                                            "state.pt"]  # fmt: skip


def test_fedckpt_flower_without_flower_names_the_extra_to_install():
    done = run_without(
        ["flwr"],
        """
        for module in ("fedckpt.flower", "fedckpt.flower.server", "fedckpt.flower.client"):
            try:
                __import__(module)
            except ImportError as error:
                from fedckpt.errors import MissingExtraError
                assert isinstance(error, MissingExtraError), repr(error)
                print(module, "|", error)
            else:
                raise AssertionError(module + " imported without Flower")
        """,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 3
    for line in lines:
        assert "fedckpt.flower needs flwr, which is not installed: pip install 'fedckpt[flower]'" in line


def test_a_missing_dependency_of_an_installed_flower_is_not_reported_as_the_extra():
    """Flower is there but something it imports is not: that error, not "install fedckpt[flower]"."""
    done = run_without(["grpc"], "import fedckpt.flower")
    assert done.returncode != 0
    assert "No module named 'grpc" in done.stderr and "fedckpt[flower]" not in done.stderr


def test_fedckpt_bench_without_rich_names_the_extra_to_install():
    done = run_without(["rich"], "from fedckpt.cli import main; raise SystemExit(main(['bench', '--quick']))")
    assert done.returncode == 2, done.stderr[-4000:]
    assert "fedckpt bench needs rich, which is not installed: pip install 'fedckpt[bench]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_ls_and_verify_without_rich_print_plain_tables(runtime, tmp_path):
    checkpointer = BestLossTorchModuleCheckpointer(str(tmp_path / "run"), "model.safetensors")
    checkpointer.maybe_checkpoint(make_model(0), 0.25, {})
    checkpointer.flush()
    directory = str(tmp_path / "run")
    done = run_without(
        ["rich", "flwr"],
        f"""
        from fedckpt.cli import main
        assert main(["ls", {directory!r}]) == 0
        assert main(["verify", {directory!r}]) == 0
        """,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    assert lines[0] == f"fedckpt checkpoints in {directory}"
    assert lines[1].split() == ["path", "format", "seq", "score", "bytes", "saved", "(UTC)"]
    assert set(lines[2].replace(" ", "")) == {"-"}
    assert lines[3].startswith("model.safetensors  module") and "Loss=0.25" in lines[3]
    assert lines[4] == f"verified 1 checkpoint(s) under {directory}: 0 problem(s)"


STATUS_COLUMNS = ["#", "node", "queue", "saved", "failed", "resent", "written", "saves/s", "MiB/s"]


def test_status_without_rich_prints_plain_tables(runtime, tmp_path):
    from fedckpt.runtime import lifecycle

    LatestTorchModuleCheckpointer(str(tmp_path), "model.safetensors").maybe_checkpoint(make_model(0), 0.5, {})
    lifecycle.flush()
    pool = lifecycle.coordinator().pool()
    env = joining_this_ray(dict(os.environ))

    def status(*options: str) -> str:
        arguments = ["status", "--address", env["RAY_ADDRESS"], "--interval", "0.1", *options]
        script = f"from fedckpt.cli import main; raise SystemExit(main({arguments!r}))"
        done = run_without(["rich", "flwr"], script, env)
        assert done.returncode == 0, done.stderr[-4000:]
        return done.stdout

    rows = [row for row in json.loads(status("--json")) if row["namespace"] == pool.namespace]
    lines = status().splitlines()
    title = lines.index(f"pool {pool.namespace}: {len(rows)} writer(s)")
    assert lines[title + 1].split() == STATUS_COLUMNS
    shown = [line.split() for line in lines[title + 3 : title + 3 + len(rows)]]
    assert sorted(cells[0] for cells in shown) == sorted(row["writer"] for row in rows)
    assert all(cells[1] == "127.0.0.1" for cells in shown)
