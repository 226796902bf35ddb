"""Identical bytes written once: a checkpoint whose content is already on storage is a hard link."""

import os
import shutil
import struct
import sys
import zipfile

import numpy as np
import ray
import torch
from conftest import assert_same_tensors, make_model
from safetensors.torch import load_file

import fedckpt
from fedckpt import (
    BestLossTorchModuleCheckpointer,
    LatestTorchModuleCheckpointer,
    PerRoundStateCheckpointer,
    ServerCheckpointAndStateModule,
)
from fedckpt.cli import main as fedckpt_cli
from fedckpt.runtime import lifecycle
from fedckpt.snapshot import snapshot_state
from fedckpt.storage import manifest
from fedckpt.storage.formats import STATE, torch_zip
from fedckpt.storage.formats.laid_out import lay_out, write_laid_out
from fedckpt.storage.paths import Location


def linked_bytes() -> int:
    return sum(stats.bytes_linked for stats in lifecycle.coordinator().writer_stats())


def unique_model(width: int = 32):
    """A model whose content no other run of the tests saved (the content index is node-wide)."""
    return make_model(seed=int.from_bytes(os.urandom(4), "little"), width=width)


def test_every_clients_copy_of_one_global_model_is_written_once(runtime, tmp_path):
    """Ten clients save the global model they received: one file is written, nine are links to it.
    Each loads on its own and verifies; deleting one leaves the rest; a new version of one checkpoint
    replaces that name only."""
    model = unique_model(width=256)
    clients = [LatestTorchModuleCheckpointer(str(tmp_path / f"client_{i}"), "post.safetensors") for i in range(10)]
    linked_before = linked_bytes()
    for checkpointer in clients:
        checkpointer.maybe_checkpoint(model, 0.5, {})
        checkpointer.flush()  # one after the other, as rounds of different clients land
    inodes = {os.stat(checkpointer.checkpoint_path).st_ino for checkpointer in clients}
    assert len(inodes) == 1 and os.stat(clients[0].checkpoint_path).st_nlink == 10
    size = os.path.getsize(clients[0].checkpoint_path)
    assert linked_bytes() - linked_before == 9 * size
    entries = [manifest.read_entry(checkpointer.checkpoint_path) for checkpointer in clients]
    assert len({entry.checksum for entry in entries}) == 1
    assert fedckpt_cli(["verify", str(tmp_path)]) == 0
    for checkpointer in clients:
        assert_same_tensors(checkpointer.load_state_dict(), model.state_dict())

    os.remove(clients[0].checkpoint_path)
    assert_same_tensors(load_file(clients[1].checkpoint_path), model.state_dict())
    newer = unique_model(width=256)
    clients[1].maybe_checkpoint(newer, 0.4, {})
    clients[1].flush()
    assert_same_tensors(clients[1].load_state_dict(), newer.state_dict())
    for checkpointer in clients[2:]:  # the shared file was never written into
        assert_same_tensors(load_file(checkpointer.checkpoint_path), model.state_dict())


def test_every_clients_pt_copy_of_one_global_model_is_written_once_and_loads_with_torch(runtime, tmp_path):
    """Under FL4Health's ``.pt`` names too: the files are what ``torch.save(model)`` writes, laid out the
    same for every client, so nine of ten are links; each loads with ``torch.load`` and verifies."""
    model = unique_model(width=256)
    clients = [LatestTorchModuleCheckpointer(str(tmp_path / f"client_{i}"), "post.pt") for i in range(10)]
    linked_before = linked_bytes()
    for checkpointer in clients:
        checkpointer.maybe_checkpoint(model, 0.5, {})
        checkpointer.flush()
    assert len({os.stat(checkpointer.checkpoint_path).st_ino for checkpointer in clients}) == 1
    assert linked_bytes() - linked_before == 9 * os.path.getsize(clients[0].checkpoint_path)
    assert fedckpt_cli(["verify", str(tmp_path)]) == 0
    loaded = torch.load(clients[9].checkpoint_path, weights_only=False)
    assert type(loaded) is type(model)
    assert_same_tensors(loaded.state_dict(), model.state_dict())


def test_a_servers_latest_and_best_share_one_file(runtime, tmp_path):
    model = unique_model()
    latest = LatestTorchModuleCheckpointer(str(tmp_path), "latest.safetensors")
    best = BestLossTorchModuleCheckpointer(str(tmp_path), "best.safetensors")
    latest.maybe_checkpoint(model, 0.3, {})
    latest.flush()
    best.maybe_checkpoint(model, 0.3, {})
    best.flush()
    assert os.path.samefile(latest.checkpoint_path, best.checkpoint_path)
    assert manifest.read_entry(best.checkpoint_path).score == 0.3  # each name keeps its own entry
    assert manifest.read_entry(latest.checkpoint_path).score is None
    # Saved again with nothing changed: the file already there is the content; no temp file is left.
    latest.maybe_checkpoint(model, 0.3, {})
    latest.flush()
    assert os.listdir(tmp_path / ".fedckpt" / "tmp") == []
    assert fedckpt_cli(["verify", str(tmp_path)]) == 0


def test_identical_saves_arriving_together_are_written_once(runtime, tmp_path):
    """One call saving a model under two checkpoints (a server's latest and best), and clients'
    copies of one model arriving at once: the writer's I/O threads write the content once and link
    the rest, even though none of them was on storage when they arrived."""
    model = unique_model(width=256)
    server = [LatestTorchModuleCheckpointer(str(tmp_path), "latest.safetensors"),
              BestLossTorchModuleCheckpointer(str(tmp_path), "best.safetensors")]  # fmt: skip
    module = ServerCheckpointAndStateModule(model=make_model(width=256), model_checkpointers=server)
    module.maybe_checkpoint(model.state_dict(), 0.5, {})
    clients = [LatestTorchModuleCheckpointer(str(tmp_path / f"c{i}"), "post.safetensors") for i in range(6)]
    other = unique_model(width=256)
    for checkpointer in clients:
        checkpointer.maybe_checkpoint(other, 0.5, {})  # no flush in between: they queue together
    fedckpt.flush()
    assert os.path.samefile(server[0].checkpoint_path, server[1].checkpoint_path)
    assert len({os.stat(checkpointer.checkpoint_path).st_ino for checkpointer in clients}) == 1
    assert fedckpt_cli(["verify", str(tmp_path)]) == 0


def test_a_candidate_that_changed_since_is_not_linked(runtime, tmp_path):
    """The content index is a hint: the candidate's manifest entry, read under its lock, decides."""
    first, second = unique_model(), unique_model()
    a = LatestTorchModuleCheckpointer(str(tmp_path / "a"), "m.safetensors")
    b = LatestTorchModuleCheckpointer(str(tmp_path / "b"), "m.safetensors")
    a.maybe_checkpoint(first, 0.0, {})
    a.flush()
    a.maybe_checkpoint(second, 0.0, {})  # a no longer holds the content the index names it for
    a.flush()
    b.maybe_checkpoint(first, 0.0, {})
    b.flush()
    assert not os.path.samefile(a.checkpoint_path, b.checkpoint_path)
    assert_same_tensors(b.load_state_dict(), first.state_dict())
    assert_same_tensors(a.load_state_dict(), second.state_dict())

    # A file replaced behind fedckpt's back (its size no longer matches its entry) is not linked either.
    c = LatestTorchModuleCheckpointer(str(tmp_path / "c"), "m.safetensors")
    with open(b.checkpoint_path, "ab") as file:
        file.write(b"tampered")
    c.maybe_checkpoint(first, 0.0, {})
    c.flush()
    assert not os.path.samefile(b.checkpoint_path, c.checkpoint_path)
    assert_same_tensors(c.load_state_dict(), first.state_dict())

    # Nor one whose manifest entry is no longer an entry: the save writes its own file, and succeeds.
    d = LatestTorchModuleCheckpointer(str(tmp_path / "d"), "m.safetensors")
    with open(str(Location.of(c.checkpoint_path).entry), "w") as file:
        file.write("{not an entry")
    d.maybe_checkpoint(first, 0.0, {})
    d.flush()
    assert not os.path.samefile(c.checkpoint_path, d.checkpoint_path)
    assert_same_tensors(d.load_state_dict(), first.state_dict())


def test_identical_content_on_another_file_system_is_written(runtime, tmp_path):
    """A hard link cannot cross file systems (here /dev/shm and the test's directory): the save is
    written instead."""
    other = "/dev/shm/fedckpt-test-dedup-elsewhere"
    shutil.rmtree(other, ignore_errors=True)
    try:
        model = unique_model()
        there = LatestTorchModuleCheckpointer(other, "m.safetensors")
        here = LatestTorchModuleCheckpointer(str(tmp_path), "m.safetensors")
        there.maybe_checkpoint(model, 0.0, {})
        there.flush()
        linked_before = linked_bytes()
        here.maybe_checkpoint(model, 0.0, {})
        here.flush()
        assert os.stat(here.checkpoint_path).st_dev != os.stat(there.checkpoint_path).st_dev
        assert linked_bytes() == linked_before
        assert_same_tensors(here.load_state_dict(), model.state_dict())
    finally:
        shutil.rmtree(other, ignore_errors=True)


def test_state_files_hold_torch_saves_records_and_equal_states_give_equal_files(runtime, tmp_path):
    """A state file is a valid zip (every CRC-32 checks) of the records torch.save writes, its version and
    a serialization id; torch.load reads it, mapped or not. Equal states give byte-identical files (so
    the second is a link to the first), and another value another serialization id."""
    state = {"round": 3, "x": torch.arange(1000), "y": torch.randn(7, 3)}
    checkpointer = PerRoundStateCheckpointer(tmp_path)
    checkpointer.save_checkpoint("one.pt", state)
    checkpointer.save_checkpoint("two.pt", state)
    checkpointer.save_checkpoint("other.pt", {**state, "round": 4})
    checkpointer.flush()
    with open(tmp_path / "reference.pt", "wb") as file:  # a file object: torch names the archive "archive"
        torch.save(state, file)
    assert (tmp_path / "one.pt").read_bytes() == (tmp_path / "two.pt").read_bytes()
    assert os.path.samefile(tmp_path / "one.pt", tmp_path / "two.pt")
    ours, reference = zip_records(tmp_path / "one.pt"), zip_records(tmp_path / "reference.pt")
    assert list(ours) == list(reference)  # the same records in the same order
    assert {name: data for name, data in ours.items() if not name.endswith("serialization_id")} == {
        name: data for name, data in reference.items() if not name.endswith("serialization_id")
    }
    assert (
        zip_records(tmp_path / "other.pt")["archive/.data/serialization_id"] != ours["archive/.data/serialization_id"]
    )
    for mmap in (False, True):
        loaded = checkpointer.load_checkpoint("one.pt", mmap=mmap)
        assert loaded["round"] == 3 and torch.equal(loaded["x"], state["x"]) and torch.equal(loaded["y"], state["y"])
    assert torch.load(tmp_path / "one.pt", weights_only=True)["round"] == 3


def zip_records(path) -> dict[str, bytes]:
    """The records of a zip file in order, after checking each one's CRC-32 and that its data is aligned
    to 64 bytes as torch aligns it."""
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        for info in archive.infolist():
            name_length, extra_length = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
            assert (info.header_offset + 30 + name_length + extra_length) % 64 == 0, info.filename
        return {info.filename: archive.read(info) for info in archive.infolist()}


def test_large_records_and_offsets_are_written_as_zip64_and_load(tmp_path, monkeypatch):
    """Records and offsets past the zip limit (2 GiB; lowered here so the test stays small) get zip64
    fields, and the directory past it zip64's end records; the file still checks and loads, mapped or not."""
    monkeypatch.setattr(torch_zip, "ZIP64_LIMIT", 1 << 10)
    state = {"round": 1, "big": torch.arange(4096, dtype=torch.float64), "after": torch.ones(300)}
    snapshot = snapshot_state(state)
    data = np.empty(snapshot.nbytes, dtype=np.uint8)
    snapshot.copy_into(data)
    write_laid_out(lay_out(STATE, snapshot.layout, memoryview(data)), str(tmp_path / "s.pt"))
    raw = (tmp_path / "s.pt").read_bytes()
    with zipfile.ZipFile(tmp_path / "s.pt") as archive:
        infos = {info.filename: info for info in archive.infolist()}
    assert infos["archive/data/0"].file_size > torch_zip.ZIP64_LIMIT
    assert infos["archive/data/1"].header_offset > torch_zip.ZIP64_LIMIT
    assert b"PK\x06\x06" in raw[-200:] and b"PK\x06\x07" in raw[-200:]  # zip64's end record and locator
    assert set(zip_records(tmp_path / "s.pt")) >= {"archive/data.pkl", "archive/data/0", "archive/version"}
    for mmap in (False, True):
        loaded = torch.load(tmp_path / "s.pt", weights_only=False, mmap=mmap)
        assert torch.equal(loaded["big"], state["big"]) and torch.equal(loaded["after"], state["after"])


def test_a_writer_process_never_imports_torch(runtime, tmp_path):
    """Writers write both formats without torch (importing it costs a writer about 1.3 s of CPU)."""
    PerRoundStateCheckpointer(tmp_path).save_checkpoint("s.pt", {"x": torch.ones(3), "round": 1})
    LatestTorchModuleCheckpointer(str(tmp_path), "m.safetensors").maybe_checkpoint(make_model(), 0.0, {})
    fedckpt.flush()
    assert os.path.exists(tmp_path / "s.pt") and os.path.exists(tmp_path / "m.safetensors")
    writers = lifecycle.coordinator().writers()
    assert ray.get([writer.__ray_call__.remote(lambda _: "torch" in sys.modules) for writer in writers]) == [
        False
    ] * len(writers)


def test_the_content_index_stays_bounded_across_writer_starts(tmp_path):
    """Each run starts new writers, which record fewer entries than a prune waits for: a new index
    prunes what earlier ones left beyond its capacity, the newest entries kept."""
    from fedckpt.storage.dedup import ContentIndex

    directory = str(tmp_path / "index")
    for run in range(5):
        index = ContentIndex(directory, capacity=8)
        for number in range(6):
            index.record(f"xxh3:{run:02d}{number:030d}", f"/ckpt/run{run}/m{number}")
        assert len(os.listdir(directory)) <= 8 + 6  # what earlier runs left, pruned, and this run's
    index = ContentIndex(directory, capacity=8)
    assert len(os.listdir(directory)) == 8
    assert index.candidate(f"xxh3:04{5:030d}") == "/ckpt/run4/m5"  # the newest survive
    assert index.candidate(f"xxh3:00{0:030d}") is None
