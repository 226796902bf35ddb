"""A small state file loaded in one read gives exactly what torch.load gives, or is left to torch.load."""

import gc
import io
import sys
import zipfile

import pytest
import torch
from hypothesis import given, settings
from test_state_records import states

from fedckpt.storage.reading import read_state
from fedckpt.storage.small_state import NeedsTorchLoad, load_small_state

OTHER_BYTE_ORDER = b"big" if sys.byteorder == "little" else b"little"


def assert_same(ours, theirs, seen=None):
    """Equal values of the same types, tensors equal in dtype, shape, strides and values, and sharing
    the same way: objects shared in one are shared in the other, as are tensors' storages."""
    seen = {} if seen is None else seen
    assert type(ours) is type(theirs)
    if id(theirs) in seen:
        assert seen[id(theirs)] is ours
        return
    if isinstance(theirs, (dict, list, tuple, torch.Tensor)):
        seen[id(theirs)] = ours
    if isinstance(theirs, torch.Tensor):
        assert (ours.dtype, ours.shape, ours.stride(), ours.storage_offset(), ours.requires_grad) == (
            theirs.dtype, theirs.shape, theirs.stride(), theirs.storage_offset(), theirs.requires_grad,
        )  # fmt: skip
        assert torch.equal(ours, theirs)
        storage = theirs.untyped_storage().data_ptr()
        assert seen.setdefault(("storage", storage), ours.untyped_storage().data_ptr()) == (
            ours.untyped_storage().data_ptr()
        )
    elif isinstance(theirs, dict):
        assert list(ours) == list(theirs)
        for key in theirs:
            assert_same(ours[key], theirs[key], seen)
    elif isinstance(theirs, (list, tuple)):
        assert len(ours) == len(theirs)
        for mine, other in zip(ours, theirs, strict=True):
            assert_same(mine, other, seen)
    elif theirs != theirs:  # NaN
        assert ours != ours
    else:
        assert ours == theirs


@settings(max_examples=150, deadline=None)
@given(state=states())
def test_a_small_state_loads_as_torch_load_loads_it(state, tmp_path_factory):
    path = tmp_path_factory.mktemp("state") / "client_state.pt"  # torch names the archive after the file
    torch.save(state, path)
    assert_same(load_small_state(str(path)), torch.load(path, weights_only=False))
    with open(path, "wb") as file:  # a file object: torch names the archive "archive", as fedckpt's files
        torch.save(state, file)
    assert_same(load_small_state(str(path)), torch.load(path, weights_only=False))


def test_parameters_gradients_flags_and_empty_tensors_come_back(tmp_path):
    weight = torch.nn.Parameter(torch.randn(3, 2))
    state = {
        "w": weight,
        "frozen": torch.nn.Parameter(torch.ones(2), requires_grad=False),
        "grad": torch.ones(2, requires_grad=True),
        "empty": torch.empty(0, 5),
        "half": torch.ones(4).half(),
    }
    torch.save(state, tmp_path / "s.pt")
    assert_same(load_small_state(str(tmp_path / "s.pt")), torch.load(tmp_path / "s.pt", weights_only=False))


def test_tensors_keep_the_bytes_read_alive(tmp_path):
    torch.save({"x": torch.arange(1000.0)}, tmp_path / "s.pt")
    tensor = load_small_state(str(tmp_path / "s.pt"))["x"]
    gc.collect()
    [bytearray(1 << 20) for _ in range(20)]  # reuse freed memory, were the buffer gone
    assert torch.equal(tensor, torch.arange(1000.0))


def rewritten(path, *, compression=zipfile.ZIP_STORED, byteorder=None):
    """The torch.save file at ``path`` rewritten with zipfile: records compressed, or the byte order
    record changed."""
    with zipfile.ZipFile(path) as archive:
        records = [(info.filename, archive.read(info)) for info in archive.infolist()]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in records:
            archive.writestr(name, byteorder if byteorder is not None and name.endswith("/byteorder") else data)
    path.write_bytes(buffer.getvalue())


@pytest.mark.parametrize(
    "change",
    [
        {"compression": zipfile.ZIP_DEFLATED},
        {"byteorder": b"big" if torch.tensor(1).numpy().dtype.byteorder != ">" else b"little"},
    ],
)
def test_files_it_does_not_cover_are_left_to_torch_load(tmp_path, change):
    """A compressed record or another byte order: this reader refuses, and read_state gives torch.load's answer."""
    state = {"round": 2, "x": torch.arange(6, dtype=torch.int32)}
    torch.save(state, tmp_path / "s.pt")
    rewritten(tmp_path / "s.pt", **change)
    with pytest.raises(NeedsTorchLoad):
        load_small_state(str(tmp_path / "s.pt"))
    assert_same(read_state(str(tmp_path / "s.pt")), torch.load(tmp_path / "s.pt", weights_only=False))


def test_a_damaged_file_raises_torch_loads_error(tmp_path):
    torch.save({"x": torch.ones(100)}, tmp_path / "s.pt")
    data = (tmp_path / "s.pt").read_bytes()
    (tmp_path / "s.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError) as ours:
        read_state(str(tmp_path / "s.pt"))
    with pytest.raises(RuntimeError) as theirs:
        torch.load(tmp_path / "s.pt", weights_only=False)
    assert str(ours.value) == str(theirs.value)
