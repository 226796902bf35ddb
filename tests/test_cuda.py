"""GPU saves, on a real GPU (marker ``cuda``; skipped where torch sees no CUDA device, as in CI).

Run on the GPU host with ``benchmarks/gpu_device_run.sh`` (with benchmarks/gpu.py, in under 5 minutes):

- snapshot isolation in both modes: a model and an optimizer state mutated right after their save
  (an optimizer step, ``load_state_dict``, an in-place op after ``wait_staged()``, or in the default
  mode any op on the caller's stream): the files hold the values before the mutation;
- both file formats, mixed dtypes, non-contiguous and tied tensors, CPU and GPU tensors in one state;
- loads onto the GPU (``device=``, ``map_location=``);
- the registered pool reused across rebuilt models (no registration after the first);
- every fallback: registration refused, over the cap, no ``/dev/shm``, no page-locked memory;
- several devices in one state dict (with two GPUs or more);
- four fractional-GPU Ray actors (``num_gpus=0.25``) saving together.
"""

from __future__ import annotations

import logging
import sys

import pytest
import ray
import torch
from conftest import assert_same_tensors
from ray import cloudpickle
from torch import nn

import fedckpt
from fedckpt import _compat
from fedckpt.runtime import cuda
from fedckpt.runtime.staging import remove_orphans

pytestmark = pytest.mark.cuda  # outside the default run; without a GPU, conftest fails them with a clear message

MIB = 1 << 20

# Ray's workers cannot import this test module: its actor class and functions travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def ray_instance():
    """Ray with the GPUs (and CPUs for four fractional-GPU actors); the session's Ray if one is up."""
    started = not ray.is_initialized()
    if started:
        ray.init(
            address="local", include_dashboard=False, num_cpus=8, num_gpus=torch.cuda.device_count(),
            log_to_driver=False,
        )  # fmt: skip
    yield
    if started:
        fedckpt.shutdown()
        ray.shutdown()
        remove_orphans(settle_seconds=2.0, grace_seconds=0.0)


def stack(megabytes: int, seed: int = 0, device: str = "cuda", dtype: torch.dtype = torch.float32) -> nn.Module:
    """Eight square Linear layers (with biases) adding up to about ``megabytes`` MiB, on ``device``."""
    side = int((megabytes * MIB / 8 / torch.empty((), dtype=dtype).element_size()) ** 0.5)
    torch.manual_seed(seed)
    return nn.Sequential(*(nn.Linear(side, side, dtype=dtype, device=device) for _ in range(8)))


def on_cpu(tensors: dict) -> dict:
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in tensors.items()}


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    side = model[0].in_features
    optimizer.zero_grad(set_to_none=True)
    model(torch.randn(64, side, device=model[0].weight.device, dtype=model[0].weight.dtype)).float().sum().backward()
    optimizer.step()


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state tensors, copied to the CPU, by (parameter index, name)."""
    state = optimizer.state_dict()["state"]
    return {f"{index}.{name}": value for index, values in state.items() for name, value in on_cpu(values).items()}


# ---- isolation -------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlap", [False, True], ids=["default", "overlap"])
@pytest.mark.parametrize("name", ["model.safetensors", "model.pt"])
def test_a_model_mutated_by_the_next_step_is_saved_as_it_was(runtime, tmp_path, overlap, name):
    """The optimizer step right after the save (in overlap mode: held back by the step pre-hook; in
    the default mode: by the caller's stream waiting for the copy)."""
    fedckpt.init(overlap=overlap)
    model = stack(256)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    train_step(model, optimizer)  # gradients exist: the step below changes every weight
    checkpointer = fedckpt.LatestTorchModuleCheckpointer(str(tmp_path), name)
    for _ in range(3):
        expected = on_cpu(model.state_dict())
        checkpointer.maybe_checkpoint(model, 0.0, {})
        train_step(model, optimizer)
        checkpointer.flush()
        assert_same_tensors(checkpointer.load_state_dict(), expected)
    assert not torch.equal(model[0].weight.cpu(), expected["0.weight"])  # the steps did change it


@pytest.mark.parametrize("overlap", [False, True], ids=["default", "overlap"])
def test_a_module_loaded_into_right_after_the_save_is_saved_as_it_was(runtime, tmp_path, overlap):
    fedckpt.init(overlap=overlap)
    model, other = stack(256, seed=1), stack(256, seed=2)
    checkpointer = fedckpt.LatestTorchModuleCheckpointer(str(tmp_path), "m.safetensors")
    expected = on_cpu(model.state_dict())
    checkpointer.maybe_checkpoint(model, 0.0, {})
    model.load_state_dict(other.state_dict())  # in place, on the current stream
    checkpointer.flush()
    assert_same_tensors(checkpointer.load_state_dict(), expected)


@pytest.mark.parametrize("overlap", [False, True], ids=["default", "overlap"])
def test_an_in_place_op_after_wait_staged_or_in_default_mode(runtime, tmp_path, overlap):
    """In the default mode any op on the caller's stream comes after the copy; in overlap mode only
    after ``wait_staged()`` (the contract)."""
    fedckpt.init(overlap=overlap)
    model = stack(256, seed=3)
    checkpointer = fedckpt.LatestTorchModuleCheckpointer(str(tmp_path), "m.safetensors")
    expected = on_cpu(model.state_dict())
    checkpointer.maybe_checkpoint(model, 0.0, {})
    if overlap:
        fedckpt.wait_staged()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(-2.0).add_(1.0)
    checkpointer.flush()
    assert_same_tensors(checkpointer.load_state_dict(), expected)


@pytest.mark.parametrize("overlap", [False, True], ids=["default", "overlap"])
def test_an_optimizer_state_on_the_gpu_is_saved_as_it_was(runtime, tmp_path, overlap):
    """Adam's state (exp_avg, exp_avg_sq on the GPU, step on the CPU) mutated by the next step."""
    fedckpt.init(overlap=overlap)
    model = stack(128, seed=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_step(model, optimizer)
    states = fedckpt.PerRoundStateCheckpointer(str(tmp_path))
    for round_ in range(3):  # the third save reuses the state's cached records: the fast path throughout
        expected = optimizer_state(optimizer)
        states.save_checkpoint("state.pt", {"optimizer": optimizer.state_dict(), "round": round_})
        train_step(model, optimizer)
        states.flush()
        loaded = states.load_checkpoint("state.pt")
        assert loaded["round"] == round_
        assert_same_tensors(optimizer_state_of(loaded["optimizer"]), expected)
        assert loaded["optimizer"]["state"][0]["exp_avg"].device.type == "cuda"  # restored where it was


def optimizer_state_of(state_dict: dict) -> dict:
    state = state_dict["state"]
    return {f"{index}.{name}": value for index, values in state.items() for name, value in on_cpu(values).items()}


def test_a_state_file_is_what_torch_save_writes(runtime, tmp_path):
    """Views, shared storages, mixed devices and dtypes: torch.load reads back what torch.save would."""
    base = torch.arange(1 << 20, dtype=torch.float32, device="cuda")
    state = {
        "views": [base, base[10:], base.view(1024, 1024).t()],
        "bf16": torch.randn(4096, dtype=torch.bfloat16, device="cuda"),
        "ids": torch.arange(100, device="cuda"),
        "mask": torch.rand(1000, device="cuda") > 0.5,
        "cpu": torch.ones(7),
        "round": 5,
    }
    expected = {name: value for name, value in state.items() if name != "views"}
    states = fedckpt.PerRoundStateCheckpointer(str(tmp_path))
    for _ in range(3):
        states.save_checkpoint("s.pt", state)
    states.flush()
    loaded = torch.load(tmp_path / "s.pt", weights_only=False)
    torch.save(state, tmp_path / "reference.pt")
    reference = torch.load(tmp_path / "reference.pt", weights_only=False)
    for name, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert loaded[name].device == value.device and torch.equal(loaded[name].cpu(), reference[name].cpu())
    views = loaded["views"]
    assert views[1].untyped_storage().data_ptr() == views[0].untyped_storage().data_ptr()  # still one storage
    assert torch.equal(views[2].cpu(), base.view(1024, 1024).t().cpu())


def test_mixed_dtypes_non_contiguous_and_tied_tensors(runtime, tmp_path):
    model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512, dtype=torch.bfloat16), nn.Embedding(64, 512))
    model.register_buffer("counts", torch.arange(10, dtype=torch.int64))
    model.register_buffer("flags", torch.ones(3, dtype=torch.bool))
    model = model.cuda()
    model[0].weight = nn.Parameter(model[0].weight.detach().t())  # non-contiguous
    model[2].weight = model[0].weight  # tied (a 512x512 "embedding" sharing the linear's weight)
    checkpointer = fedckpt.LatestTorchModuleCheckpointer(str(tmp_path), "m.safetensors")
    expected = on_cpu(model.state_dict())
    checkpointer.maybe_checkpoint(model, 0.0, {})
    loaded = checkpointer.load_checkpoint()
    assert_same_tensors(on_cpu(loaded.state_dict()), expected)
    assert loaded[2].weight is loaded[0].weight


# ---- loads onto the GPU --------------------------------------------------------------------------


def test_loads_onto_the_gpu(runtime, tmp_path):
    model = stack(64, seed=5)
    checkpointer = fedckpt.LatestTorchModuleCheckpointer(str(tmp_path), "m.safetensors")
    checkpointer.maybe_checkpoint(model, 0.0, {})
    tensors = checkpointer.load_state_dict(device="cuda")
    assert all(tensor.device.type == "cuda" for tensor in tensors.values())
    assert_same_tensors(on_cpu(tensors), on_cpu(model.state_dict()))
    rebuilt = checkpointer.load_checkpoint(device=torch.device("cuda", 0))
    assert rebuilt[0].weight.is_cuda and torch.equal(rebuilt[0].weight, model[0].weight)
    states = fedckpt.PerRoundStateCheckpointer(str(tmp_path))
    states.save_checkpoint("s.pt", {"w": model[0].weight.detach().cpu(), "n": 3})
    loaded = states.load_checkpoint("s.pt", map_location="cuda")
    assert loaded["w"].is_cuda and torch.equal(loaded["w"], model[0].weight)


# ---- the registered pool --------------------------------------------------------------------------


def test_the_registered_pool_is_reused_across_rebuilt_models(runtime, tmp_path):
    """A client rebuilds its model every round: after the first save no segment is registered again."""
    checkpointer = fedckpt.LatestTorchModuleCheckpointer(str(tmp_path), "m.safetensors")
    registered_before = fedckpt.stats().registration_seconds
    for round_ in range(4):
        model = stack(128, seed=10 + round_)
        expected = on_cpu(model.state_dict())
        checkpointer.maybe_checkpoint(model, 0.0, {})
        checkpointer.flush()
        assert_same_tensors(checkpointer.load_state_dict(), expected)
        counters = fedckpt.stats()
        if round_ == 0:
            after_first = counters.registration_seconds
            registered = counters.registered_bytes
            assert after_first > registered_before and registered >= 128 * MIB
        else:
            assert counters.registration_seconds == after_first
            assert counters.registered_bytes == registered


# ---- fallbacks -----------------------------------------------------------------------------------


@pytest.fixture
def fresh_logs(monkeypatch):
    monkeypatch.setattr(cuda, "_logged", set())


def save_and_check(directory, name: str = "m.safetensors", megabytes: int = 64) -> None:
    model = stack(megabytes, seed=20)
    checkpointer = fedckpt.LatestTorchModuleCheckpointer(str(directory), name)
    expected = on_cpu(model.state_dict())
    checkpointer.maybe_checkpoint(model, 0.0, {})
    with torch.no_grad():
        model[0].weight.add_(1.0)
    checkpointer.flush()
    assert_same_tensors(checkpointer.load_state_dict(), expected)


def test_registration_refused_goes_through_a_bounce_buffer(runtime, tmp_path, monkeypatch, fresh_logs, caplog):
    monkeypatch.setattr(_compat, "cuda_host_register", lambda address, nbytes: 999)
    fedckpt.init()  # a new pool
    with caplog.at_level(logging.WARNING, logger="fedckpt"):
        save_and_check(tmp_path)
    assert "refused to register" in caplog.text and fedckpt.stats().registered_bytes == 0


def test_over_the_cap_goes_through_a_bounce_buffer(runtime, tmp_path, fresh_logs, caplog):
    fedckpt.init(max_registered_bytes=MIB)
    with caplog.at_level(logging.WARNING, logger="fedckpt"):
        save_and_check(tmp_path)
    assert "max_registered_bytes" in caplog.text


def test_without_shared_memory_the_bytes_go_through_the_object_store(runtime, tmp_path):
    fedckpt.init(shared_memory_staging=False)
    before = fedckpt.stats().bytes_object_store
    save_and_check(tmp_path)
    assert fedckpt.stats().bytes_object_store > before


def test_without_page_locked_memory_the_copy_blocks(runtime, tmp_path, monkeypatch, fresh_logs):
    monkeypatch.setattr(_compat, "cuda_host_register", lambda address, nbytes: 999)
    monkeypatch.setattr(cuda, "_pinned", lambda nbytes: None)
    fedckpt.init()
    save_and_check(tmp_path)
    fedckpt.init(shared_memory_staging=False)
    save_and_check(tmp_path, "other.safetensors")


# ---- several devices -----------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_several_devices_in_one_state_dict(runtime, tmp_path):
    model = nn.Sequential(nn.Linear(2048, 2048).to("cuda:0"), nn.Linear(2048, 2048).to("cuda:1"))
    checkpointer = fedckpt.LatestTorchModuleCheckpointer(str(tmp_path), "m.safetensors")
    expected = on_cpu(model.state_dict())
    checkpointer.maybe_checkpoint(model, 0.0, {})
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    checkpointer.flush()
    assert_same_tensors(checkpointer.load_state_dict(), expected)
    states = fedckpt.PerRoundStateCheckpointer(str(tmp_path))
    states.save_checkpoint("s.pt", {"a": model[0].weight.detach(), "b": model[1].weight.detach()})
    loaded = states.load_checkpoint("s.pt")
    assert loaded["a"].device == torch.device("cuda:0") and loaded["b"].device == torch.device("cuda:1")


# ---- fractional GPUs ---------------------------------------------------------------------------------


@ray.remote(num_gpus=0.25, num_cpus=0)
class Client:
    """A client sharing the GPU with three others, as Flower's simulation runs them (num_gpus=0.25)."""

    def run(self, directory: str, index: int, rounds: int) -> list[bool]:
        from fedckpt import LatestTorchModuleCheckpointer, PerRoundStateCheckpointer

        results = []
        checkpointer = LatestTorchModuleCheckpointer(directory, f"client{index}.safetensors")
        states = PerRoundStateCheckpointer(directory)
        for round_ in range(rounds):
            model = stack(64, seed=100 * index + round_)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            train_step(model, optimizer)
            expected = on_cpu(model.state_dict())
            momentum = on_cpu(optimizer_state(optimizer))
            checkpointer.maybe_checkpoint(model, 0.0, {})
            states.save_checkpoint(f"state{index}.pt", {"optimizer": optimizer.state_dict(), "round": round_})
            train_step(model, optimizer)
            checkpointer.flush()
            states.flush()
            loaded = checkpointer.load_state_dict(device="cuda")
            state = states.load_checkpoint(f"state{index}.pt")
            saved_momentum = optimizer_state_of(state["optimizer"])
            results.append(
                all(torch.equal(loaded[name].cpu(), expected[name]) for name in expected)
                and all(torch.equal(value, momentum[name]) for name, value in saved_momentum.items())
                and state["round"] == round_
            )
        return results


def test_fractional_gpu_clients_save_together(runtime, tmp_path):
    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.fail("Ray sees no GPU: the fractional-GPU clients cannot be placed")
    clients = [Client.remote() for _ in range(4)]
    results = ray.get([client.run.remote(str(tmp_path), index, 3) for index, client in enumerate(clients)], timeout=100)
    assert results == [[True] * 3] * 4
    for client in clients:
        ray.kill(client)
