"""Model checkpoints under ``.pt``/``.pth``/``.pkl`` names: the file ``torch.save(model)`` writes, with
its pickle made once per architecture and reused by every later model of it (a Flower client builds a
new model every round); what the cache cannot describe is pickled in full, and every file loads equal."""

import zipfile

import pytest
import torch
from conftest import assert_same_tensors, make_model
from torch import nn

from fedckpt import LatestTorchModuleCheckpointer, _compat
from fedckpt.storage.formats import torch_records


class Pickled:
    """Counts torch's own pickling of whole models (what the cached pickle saves)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = _compat.torch_save_records

        def counting(obj, records, skip_data=False):
            if isinstance(obj, nn.Module):
                self.calls += 1
            return original(obj, records, skip_data)

        monkeypatch.setattr(_compat, "torch_save_records", counting)


def data_pkl(path) -> bytes:
    with zipfile.ZipFile(path) as archive:
        return next(archive.read(name) for name in archive.namelist() if name.endswith("/data.pkl"))


@pytest.mark.parametrize("name", ["model.pt", "model.pth", "model.pkl"])
def test_new_models_of_one_architecture_reuse_its_pickle_and_load_as_torch_save_wrote_them(
    runtime, tmp_path, monkeypatch, name
):
    torch_records._cache.clear()
    pickled = Pickled(monkeypatch)
    checkpointer = LatestTorchModuleCheckpointer(str(tmp_path), name)
    for seed in range(4):
        model = make_model(seed)  # a new model each time, as a Flower ClientApp's rounds build
        checkpointer.maybe_checkpoint(model, 0.0, {})
        checkpointer.flush()
        loaded = torch.load(tmp_path / name, weights_only=False)
        assert type(loaded) is type(model)
        assert_same_tensors(loaded.state_dict(), model.state_dict())
        torch.save(model, tmp_path / "reference.pt")
        assert data_pkl(tmp_path / name) == data_pkl(tmp_path / "reference.pt")  # the pickle torch.save makes
    assert pickled.calls == 1  # the first model only


def test_a_primed_architecture_is_never_pickled_by_a_save_and_its_file_loads_equal(runtime, tmp_path, monkeypatch):
    """``priming.prime_models`` (a ServerApp's start) makes the architecture's pickle ahead: the first
    save of a model of it, later, pickles nothing."""
    from fedckpt.runtime import priming

    torch_records._cache.clear()
    pickled = Pickled(monkeypatch)
    priming.prime_models([make_model(0)])
    assert pickled.calls == 1
    model = make_model(1)
    checkpointer = LatestTorchModuleCheckpointer(str(tmp_path), "global.pt")
    checkpointer.maybe_checkpoint(model, 0.0, {})
    checkpointer.flush()
    assert pickled.calls == 1  # the save reused the primed pickle
    assert_same_tensors(torch.load(tmp_path / "global.pt", weights_only=False).state_dict(), model.state_dict())


def test_models_the_cache_cannot_describe_are_pickled_in_full_and_saved_right(runtime, tmp_path, monkeypatch):
    """Tied weights, a non-persistent buffer, a frozen layer, another dtype: each file holds its own model."""
    torch_records._cache.clear()
    pickled = Pickled(monkeypatch)

    def stack(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))

    def tied(seed: int) -> nn.Module:
        model = stack(seed)
        model[2].weight = model[0].weight
        return model

    def with_non_persistent_buffer(seed: int) -> nn.Module:
        model = stack(seed)
        model.register_buffer("scratch", torch.full((3,), float(seed)), persistent=False)
        return model

    def frozen(seed: int) -> nn.Module:
        model = stack(seed)
        model[0].weight.requires_grad_(False)
        return model

    def half(seed: int) -> nn.Module:
        return stack(seed).to(torch.float16)

    checkpointer = LatestTorchModuleCheckpointer(str(tmp_path), "model.pt")
    for build in (tied, with_non_persistent_buffer, frozen, half, stack):
        for seed in range(3):
            model = build(seed)
            checkpointer.maybe_checkpoint(model, 0.0, {})
            checkpointer.flush()
            loaded = torch.load(tmp_path / "model.pt", weights_only=False)
            assert_same_tensors(loaded.state_dict(), model.state_dict())
            assert [p.requires_grad for p in loaded.parameters()] == [p.requires_grad for p in model.parameters()]
            if build is with_non_persistent_buffer:
                assert torch.equal(loaded.scratch, model.scratch)
            if build is tied:
                assert loaded[2].weight is loaded[0].weight
            torch.save(model, tmp_path / "reference.pt")
            assert data_pkl(tmp_path / "model.pt") == data_pkl(tmp_path / "reference.pt")
    # The non-persistent buffer is pickled every time (3); every other architecture once.
    assert pickled.calls == 3 + 4


def test_a_model_changed_in_place_after_its_save_is_saved_as_it_was(runtime, tmp_path):
    checkpointer = LatestTorchModuleCheckpointer(str(tmp_path), "model.pt")
    for _ in range(2):  # the second save takes the cached pickle
        model = make_model(0)
        expected = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        checkpointer.maybe_checkpoint(model, 0.0, {})
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(1.0)
        checkpointer.flush()
        assert_same_tensors(torch.load(tmp_path / "model.pt", weights_only=False).state_dict(), expected)


def test_a_pt_models_large_records_go_to_disk_from_staging_on_block_boundaries(tmp_path, monkeypatch):
    """A ``.pt`` model's tensors are laid out on block boundaries in staging and in the file, and the
    writer sends them to disk from the staged bytes with O_DIRECT, as a safetensors file's; a state's
    file stays buffered (it is read back next round). Either loads as torch.save's would."""
    import fcntl
    import mmap
    import os

    import numpy as np
    from test_direct_io import filesystem_of

    from fedckpt.snapshot import snapshot_state, snapshot_torch_module
    from fedckpt.storage import direct
    from fedckpt.storage.formats.laid_out import lay_out, write_laid_out
    from fedckpt.storage.formats.torch_zip import BLOCK_ALIGNED_RECORD_BYTES

    model = nn.Sequential(nn.Linear(300, 300), nn.ReLU(), nn.Linear(300, 7))  # 360 KB, 1.2 KB, 8.4 KB, 28 B
    writes = []
    real_write = os.write

    def recording_write(fd, data):
        view = memoryview(data)
        writes.append((int(np.frombuffer(view, np.uint8).ctypes.data), len(view), fd))
        writes[-1] += (bool(os.O_DIRECT & fcntl.fcntl(fd, fcntl.F_GETFL)),)
        return real_write(fd, data)

    monkeypatch.setattr(direct.os, "write", recording_write)
    for name, snapshot, direct_expected in (
        ("model.pt", snapshot_torch_module(model), True),
        ("state.pt", snapshot_state({"weight": model[0].weight.detach(), "round": 2}), False),
    ):
        staged = mmap.mmap(-1, snapshot.nbytes)  # page-aligned, as a staging segment
        buffer = np.frombuffer(staged, dtype=np.uint8)
        snapshot.copy_into(buffer)
        large = [
            (begin, end) for _, begin, end in snapshot.layout["records"] if end - begin >= BLOCK_ALIGNED_RECORD_BYTES
        ]
        assert large and all(begin % direct.BLOCK == 0 for begin, _ in large)
        file = lay_out(snapshot.kind, snapshot.layout, memoryview(staged))
        assert file.direct is direct_expected
        writes.clear()
        path = tmp_path / name
        write_laid_out(file, str(path))
        loaded = torch.load(path, weights_only=False)
        assert torch.equal(loaded[0].weight if name == "model.pt" else loaded["weight"], model[0].weight)
        assert torch.load(path, weights_only=False, mmap=True) is not None
        with zipfile.ZipFile(path) as archive:
            assert archive.testzip() is None
            weight = next(info for info in archive.infolist() if info.file_size == 300 * 300 * 4)
        with open(path, "rb") as raw:
            raw.seek(weight.header_offset + 26)
            name_length, extra_length = np.frombuffer(raw.read(4), dtype="<u2")
        assert (weight.header_offset + 30 + name_length + extra_length) % direct.BLOCK == 0
        if direct_expected and filesystem_of(str(tmp_path)) in ("ext4", "xfs", "btrfs"):
            base = int(buffer.ctypes.data)
            from_staging = sum(
                size for address, size, _, flag in writes if flag and base <= address < base + len(buffer)
            )
            assert from_staging >= sum(end - begin for begin, end in large) // direct.BLOCK * direct.BLOCK
        if not direct_expected:
            assert not any(flag for *_, flag in writes)
