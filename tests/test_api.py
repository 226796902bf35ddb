"""FL4Health's API and semantics, on the asynchronous runtime."""

import math
import os

import pytest
import torch
from conftest import SmallNet, assert_same_tensors, make_model
from torch import nn

import fedckpt
from fedckpt import (
    BestLossTorchModuleCheckpointer,
    BestMetricTorchModuleCheckpointer,
    CheckpointMode,
    ClientCheckpointAndStateModule,
    FunctionTorchModuleCheckpointer,
    LatestTorchModuleCheckpointer,
    PerRoundStateCheckpointer,
    TorchModuleCheckpointer,
)
from fedckpt.cli import main as fedckpt_cli
from fedckpt.storage.manifest import read_entry
from fedckpt.storage.reading import read_state_dict


def test_public_api_names():
    assert CheckpointMode.PRE_AGGREGATION.value == "pre_aggregation"
    assert CheckpointMode.POST_AGGREGATION.value == "post_aggregation"
    with pytest.raises(TypeError):
        TorchModuleCheckpointer("d", "n")  # abstract
    for name in ("init", "flush", "shutdown", "CheckpointError"):
        assert hasattr(fedckpt, name)


def test_latest_saves_every_call_and_loads_module(runtime, tmp_path):
    checkpointer = LatestTorchModuleCheckpointer(str(tmp_path), "latest.pt")
    assert checkpointer.checkpoint_path == os.path.join(str(tmp_path), "latest.pt")
    for seed in range(3):
        model = make_model(seed)
        checkpointer.maybe_checkpoint(model, loss=1.0, metrics={})
    loaded = checkpointer.load_checkpoint()
    assert isinstance(loaded, SmallNet)
    assert_same_tensors(loaded.state_dict(), model.state_dict())
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in loaded.parameters())
    assert_same_tensors(checkpointer.load_state_dict(), model.state_dict())


def test_best_loss_keeps_the_lowest(runtime, tmp_path):
    checkpointer = BestLossTorchModuleCheckpointer(str(tmp_path), "best.pt")
    models = {loss: make_model(seed) for seed, loss in enumerate([0.9, 0.5, 0.7, 0.5, 0.8])}
    for loss, model in models.items():
        checkpointer.maybe_checkpoint(model, loss, {})
    assert checkpointer.best_score == 0.5
    # 0.5 was seen twice: the later one wins (FL4Health saves on <=); dict keeps the later model.
    assert_same_tensors(checkpointer.load_state_dict(), models[0.5].state_dict())
    checkpointer.flush()
    entry = read_entry(checkpointer.checkpoint_path)
    assert entry.score == 0.5 and entry.score_name == "Loss"


def test_best_metric_maximize_and_missing_key_raises_synchronously(runtime, tmp_path):
    checkpointer = BestMetricTorchModuleCheckpointer(str(tmp_path), "acc.pt", "accuracy", maximize=True)
    good, worse = make_model(1), make_model(2)
    checkpointer.maybe_checkpoint(good, 1.0, {"val - prediction - accuracy": 0.8})
    checkpointer.maybe_checkpoint(worse, 1.0, {"val - prediction - accuracy": 0.7})
    assert checkpointer.best_score == 0.8
    with pytest.raises(KeyError, match="val - prediction - accuracy"):
        checkpointer.maybe_checkpoint(worse, 1.0, {"accuracy": 0.99})
    with pytest.raises(ValueError, match="not a number"):
        checkpointer.maybe_checkpoint(worse, 1.0, {"val - prediction - accuracy": "high"})
    assert_same_tensors(checkpointer.load_state_dict(), good.state_dict())


def test_function_checkpointer_should_checkpoint_and_score_edge_cases(runtime, tmp_path):
    checkpointer = FunctionTorchModuleCheckpointer(
        str(tmp_path), "f.pt", lambda loss, metrics: metrics["m"] - loss, "margin", maximize=True
    )
    assert checkpointer._should_checkpoint(-1e9)  # no best score yet
    checkpointer.maybe_checkpoint(make_model(0), 1.0, {"m": 1.0})  # score 0.0
    assert checkpointer.best_score == 0.0
    assert not checkpointer._should_checkpoint(-0.1)  # 0.0 is a real best score
    assert checkpointer._should_checkpoint(0.0)
    checkpointer.maybe_checkpoint(make_model(1), math.nan, {"m": 1.0})  # NaN: skipped, best kept
    assert checkpointer.best_score == 0.0
    assert not checkpointer._should_checkpoint(math.nan)
    checkpointer.maybe_checkpoint(make_model(2), 0.0, {"m": math.inf})
    assert checkpointer.best_score == math.inf


def test_client_module_routes_by_mode_and_snapshots_once(runtime, tmp_path):
    pre = [
        LatestTorchModuleCheckpointer(str(tmp_path), "pre_latest.pt"),
        BestLossTorchModuleCheckpointer(str(tmp_path), "pre_best.pt"),
    ]
    post = LatestTorchModuleCheckpointer(str(tmp_path), "post.pt")
    module = ClientCheckpointAndStateModule(pre_aggregation=pre, post_aggregation=post)
    local, global_ = make_model(1), make_model(2)
    module.maybe_checkpoint(local, 0.3, {}, CheckpointMode.PRE_AGGREGATION)
    module.maybe_checkpoint(global_, 0.3, {}, CheckpointMode.POST_AGGREGATION)
    module.flush()
    assert_same_tensors(pre[0].load_state_dict(), local.state_dict())
    assert_same_tensors(pre[1].load_state_dict(), local.state_dict())
    assert_same_tensors(post.load_state_dict(), global_.state_dict())
    # One snapshot served both pre-aggregation checkpointers: same bytes on disk.
    assert read_entry(pre[0].checkpoint_path).checksum == read_entry(pre[1].checkpoint_path).checksum
    with pytest.raises(ValueError, match="Unrecognized mode"):
        module.maybe_checkpoint(local, 0.3, {}, "mid_aggregation")
    empty = ClientCheckpointAndStateModule()
    empty.maybe_checkpoint(local, 0.3, {}, CheckpointMode.PRE_AGGREGATION)  # nothing to do, no error


def test_client_module_errors_like_fl4health(tmp_path):
    a = LatestTorchModuleCheckpointer(str(tmp_path), "same.pt")
    b = BestLossTorchModuleCheckpointer(str(tmp_path) + "/", "./same.pt")  # same file, spelled differently
    with pytest.raises(ValueError, match="should be unique"):
        ClientCheckpointAndStateModule(pre_aggregation=a, post_aggregation=b)
    module = ClientCheckpointAndStateModule(pre_aggregation=a)
    with pytest.raises(ValueError, match="no state checkpointer"):
        module.save_state("state.pt", {"round": 1})
    with pytest.raises(ValueError, match="no state checkpointer"):
        module.maybe_load_state("state.pt")


def test_state_round_trip_with_module_optimizer_and_nested_tensors(runtime, tmp_path):
    state_checkpointer = PerRoundStateCheckpointer(tmp_path)
    module = ClientCheckpointAndStateModule(state_checkpointer=state_checkpointer)
    assert module.maybe_load_state("client_0.pt") is None
    model = make_model(3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(5, 8)).sum().backward()
    optimizer.step()
    state = {
        "model": model,
        "optimizer": optimizer.state_dict(),
        "round": 7,
        "nested": {"a": [torch.arange(6).reshape(2, 3).t(), torch.randn(3, dtype=torch.bfloat16)], "b": "text"},
        "empty": torch.empty(0, 5),
    }
    module.save_state("client_0.pt", state)
    loaded = module.maybe_load_state("client_0.pt")
    assert loaded["round"] == 7 and loaded["nested"]["b"] == "text"
    assert_same_tensors(loaded["model"].state_dict(), model.state_dict())
    restored = torch.optim.Adam(loaded["model"].parameters(), lr=0.01)
    restored.load_state_dict(loaded["optimizer"])
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(loaded["nested"]["a"][0], state["nested"]["a"][0])
    assert loaded["nested"]["a"][1].dtype == torch.bfloat16
    assert loaded["empty"].shape == (0, 5)
    # The file is plain torch.save format.
    direct = torch.load(os.path.join(tmp_path, "client_0.pt"), weights_only=False)
    assert direct["round"] == 7
    assert state_checkpointer.checkpoint_exists("client_0.pt")
    with pytest.raises(ValueError, match="checkpoint_name only"):
        state_checkpointer.checkpoint_exists("client_0.pt", checkpoint_path="x")
    with pytest.raises(FileNotFoundError):
        state_checkpointer.load_checkpoint("missing.pt")


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.bf16 = nn.Linear(6, 6).to(torch.bfloat16)
        self.f16 = nn.Linear(6, 2).to(torch.float16)
        self.register_buffer("mask", torch.tensor([True, False, True]))
        self.cache = torch.arange(4.0)  # a plain tensor attribute: neither parameter nor buffer


def test_mixed_dtypes_tied_weights_and_extra_tensors(runtime, tmp_path):
    model = Tied()
    checkpointer = LatestTorchModuleCheckpointer(str(tmp_path), "tied.pt")
    checkpointer.maybe_checkpoint(model, 0.0, {})
    loaded = checkpointer.load_checkpoint()
    assert loaded.head.weight is loaded.embed.weight
    assert loaded.bf16.weight.dtype == torch.bfloat16 and loaded.f16.weight.dtype == torch.float16
    assert torch.equal(loaded.cache, model.cache)
    assert_same_tensors(loaded.state_dict(), model.state_dict())
    tensors = checkpointer.load_state_dict()
    assert set(tensors) == set(model.state_dict())
    assert tensors["bf16.weight"].dtype == torch.bfloat16


def test_unpicklable_model_is_a_clear_error(runtime, tmp_path):
    class Local(nn.Module):  # a local class cannot be pickled (torch.save fails the same way)
        pass

    checkpointer = LatestTorchModuleCheckpointer(str(tmp_path), "local.pt")
    with pytest.raises(TypeError, match="cannot be pickled"):
        checkpointer.maybe_checkpoint(Local(), 0.0, {})
    checkpointer.flush()
    assert not os.path.exists(checkpointer.checkpoint_path)


def test_load_checkpoint_reads_plain_torch_save_files(runtime, tmp_path):
    model = make_model(4)
    torch.save(model, tmp_path / "fl4health.pt")
    checkpointer = LatestTorchModuleCheckpointer(str(tmp_path), "other.pt")
    loaded = checkpointer.load_checkpoint(str(tmp_path / "fl4health.pt"))
    assert_same_tensors(loaded.state_dict(), model.state_dict())
    assert_same_tensors(checkpointer.load_state_dict(str(tmp_path / "fl4health.pt")), model.state_dict())
    torch.save({"not": "a model"}, tmp_path / "other_thing.pt")
    with pytest.raises(ValueError, match="not a model or its state dict"):
        checkpointer.load_state_dict(str(tmp_path / "other_thing.pt"))


@pytest.mark.parametrize("name", ["model.pt", "model.pth", "model.pkl", "model.ckpt", "model", "model.safetensors"])
def test_a_model_file_is_what_its_name_says(runtime, tmp_path, name):
    """FL4Health and its users ``torch.load`` model checkpoints: every name but ``.safetensors`` gets
    the file ``torch.save(model)`` writes; ``.safetensors`` keeps safetensors. Both load back, and
    ``load_state_dict`` reads safetensors without running pickle."""
    model = make_model(5)
    checkpointer = BestLossTorchModuleCheckpointer(str(tmp_path), name)
    checkpointer.maybe_checkpoint(model, 0.3, {})
    checkpointer.flush()
    path = checkpointer.checkpoint_path
    if name.endswith(".safetensors"):
        assert_same_tensors(read_state_dict(path), model.state_dict())  # safetensors' own reader
    else:
        loaded = torch.load(path, weights_only=False)  # what FL4Health's users do
        assert type(loaded) is type(model)
        assert_same_tensors(loaded.state_dict(), model.state_dict())
        assert torch.load(path, weights_only=False, mmap=True).steps.item() == model.steps.item()
    assert_same_tensors(checkpointer.load_checkpoint().state_dict(), model.state_dict())
    assert_same_tensors(checkpointer.load_state_dict(), model.state_dict())
    assert fedckpt_cli(["verify", str(tmp_path)]) == 0


def test_one_module_save_to_both_formats_writes_each_from_its_own_snapshot(runtime, tmp_path):
    """A module with a .pt and a .safetensors checkpointer of one model: one call, two formats."""
    model = make_model(6)
    pre = [LatestTorchModuleCheckpointer(str(tmp_path), "pre.pt"),
           LatestTorchModuleCheckpointer(str(tmp_path), "pre.safetensors")]  # fmt: skip
    module = ClientCheckpointAndStateModule(pre_aggregation=pre)
    module.maybe_checkpoint(model, 0.1, {}, CheckpointMode.PRE_AGGREGATION)
    module.flush()
    assert isinstance(torch.load(tmp_path / "pre.pt", weights_only=False), type(model))
    assert_same_tensors(read_state_dict(str(tmp_path / "pre.safetensors")), model.state_dict())


def test_fl4health_decision_only_checkpointers_and_full_paths_inside_the_directory(runtime, tmp_path):
    """From FL4Health's own tests: a checkpointer built with an empty directory and name only for its
    decisions, and loads given the full path of a file inside the checkpoint directory."""
    decider = BestLossTorchModuleCheckpointer("", "")
    assert decider._should_checkpoint(0.5) and decider.best_score is None
    with pytest.raises(ValueError, match="must not be empty"):
        decider.maybe_checkpoint(make_model(1), 0.5, {})  # checked at the first save
    assert decider.best_score is None
    states = PerRoundStateCheckpointer(tmp_path)
    states.save_checkpoint("state.pt", {"round": 3})
    assert states.load_checkpoint(str(tmp_path / "state.pt"))["round"] == 3
    assert states.checkpoint_exists(str(tmp_path / "state.pt"))
    for outside in ("/etc/passwd", str(tmp_path), str(tmp_path / ".." / "elsewhere.pt")):
        with pytest.raises(ValueError, match="not inside the checkpoint directory"):
            states.load_checkpoint(outside)


def test_loading_without_ray_reads_the_disk(tmp_path):
    """A fresh process that never saved (and has no Ray) can still load what is on disk."""
    import subprocess
    import sys

    model = make_model(5)
    torch.save(model.state_dict(), tmp_path / "expected.pt")
    script = f"""
import torch, sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
import ray
from fedckpt import PerRoundStateCheckpointer
c = PerRoundStateCheckpointer({str(tmp_path)!r})
assert not c.checkpoint_exists("absent.pt")
assert c.load_checkpoint("expected.pt")["body.0.weight"].shape == (32, 8)
assert not ray.is_initialized()
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


class EveryDtype(nn.Module):
    """One buffer per dtype a model checkpoint can hold, including zero-size and 0-dim ones."""

    def __init__(self):
        super().__init__()
        from fedckpt.storage.formats.safetensors_file import SAFETENSORS_CODES

        generator = torch.Generator().manual_seed(0)
        for index, name in enumerate(sorted(SAFETENSORS_CODES)):
            dtype = getattr(torch, name)
            values = torch.randint(0, 2 if dtype is torch.bool else 100, (3, 5), generator=generator)
            if dtype is torch.complex64:
                values = torch.complex(values.float(), -values.float())
            self.register_buffer(f"b{index}_{name}", values.to(dtype))
        self.register_buffer("empty", torch.empty(0, 7))
        self.register_buffer("scalar", torch.tensor(3.5, dtype=torch.float64))
        self.register_buffer("strided", torch.arange(12.0).reshape(3, 4).t())  # not contiguous


def test_every_dtype_round_trips_through_safetensors(runtime, tmp_path):
    from safetensors import safe_open

    model = EveryDtype()
    checkpointer = LatestTorchModuleCheckpointer(str(tmp_path), "dtypes.safetensors")
    checkpointer.maybe_checkpoint(model, 0.0, {})
    tensors = checkpointer.load_state_dict()
    for name, expected in model.state_dict().items():
        assert tensors[name].dtype == expected.dtype, name
        assert tensors[name].shape == expected.shape, name
        assert torch.equal(tensors[name].reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), name
    with safe_open(checkpointer.checkpoint_path, framework="pt") as handle:  # the library reads our header
        assert set(handle.keys()) == set(model.state_dict())
    reloaded = checkpointer.load_checkpoint()
    assert torch.equal(reloaded.strided, model.strided)


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 4)
        self.scale = 1.0
        self.activation = nn.ReLU()


def test_reused_structure_still_sees_every_change_between_saves(runtime, tmp_path):
    """The pickled structure is reused across saves; any reassigned attribute invalidates it."""
    model = Scaled()
    checkpointer = LatestTorchModuleCheckpointer(str(tmp_path), "scaled.safetensors")
    checkpointer.maybe_checkpoint(model, 0.0, {})
    assert checkpointer.load_checkpoint().scale == 1.0
    model.scale = 2.5  # a plain attribute
    checkpointer.maybe_checkpoint(model, 0.0, {})
    assert checkpointer.load_checkpoint().scale == 2.5
    model.eval()  # the training flags
    checkpointer.maybe_checkpoint(model, 0.0, {})
    assert checkpointer.load_checkpoint().training is False
    model.layer.bias.requires_grad_(False)  # freezing a parameter
    checkpointer.maybe_checkpoint(model, 0.0, {})
    assert checkpointer.load_checkpoint().layer.bias.requires_grad is False
    model.activation = nn.GELU()  # a submodule without parameters
    checkpointer.maybe_checkpoint(model, 0.0, {})
    assert isinstance(checkpointer.load_checkpoint().activation, nn.GELU)
    model.layer.weight = nn.Parameter(torch.full((4, 4), 7.0))  # a new parameter object
    checkpointer.maybe_checkpoint(model, 0.0, {})
    assert torch.all(checkpointer.load_checkpoint().layer.weight == 7.0)
    model.layer.weight.data = torch.full((4, 4), 3.0)  # the same parameter, new memory
    checkpointer.maybe_checkpoint(model, 0.0, {})
    assert torch.all(checkpointer.load_state_dict()["layer.weight"] == 3.0)
    with torch.no_grad():
        model.layer.weight.mul_(2)  # in place: same memory, new values
    checkpointer.maybe_checkpoint(model, 0.0, {})
    assert torch.all(checkpointer.load_state_dict()["layer.weight"] == 6.0)
    with torch.no_grad():
        model.layer.weight.copy_(torch.arange(16.0).reshape(4, 4))
    checkpointer.maybe_checkpoint(model, 0.0, {})
    model.layer.weight.data = model.layer.weight.data.t()  # same memory and shape, read transposed
    checkpointer.maybe_checkpoint(model, 0.0, {})
    assert torch.equal(checkpointer.load_state_dict()["layer.weight"], torch.arange(16.0).reshape(4, 4).t())


class BelowOneCheckpointer(TorchModuleCheckpointer):
    """A user subclass with its own rule, saving through ``save_model``."""

    def maybe_checkpoint(self, model, loss, metrics):
        if loss < 1.0:
            self.save_model(model, score=loss, score_name="loss")


def test_user_subclass_saves_through_save_model(runtime, tmp_path):
    checkpointer = BelowOneCheckpointer(str(tmp_path), "custom.safetensors")
    module = ClientCheckpointAndStateModule(pre_aggregation=checkpointer)
    module.maybe_checkpoint(make_model(1), 2.0, {}, CheckpointMode.PRE_AGGREGATION)
    module.flush()
    assert not os.path.exists(checkpointer.checkpoint_path)
    kept = make_model(2)
    module.maybe_checkpoint(kept, 0.5, {}, CheckpointMode.PRE_AGGREGATION)
    assert_same_tensors(checkpointer.load_state_dict(), kept.state_dict())
    module.flush()
    assert read_entry(checkpointer.checkpoint_path).score == 0.5
