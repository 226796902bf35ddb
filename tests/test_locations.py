"""Locations: one type tells local paths from URLs, and what works on local files only refuses URLs
(issue 23: a URL joined as a local path made an ``s3:`` directory of lock files in the working directory)."""

import os

import pytest

from fedckpt.storage import atomic, manifest
from fedckpt.storage.base import storage_for
from fedckpt.storage.dedup import link_identical
from fedckpt.storage.fsspec_storage import FsspecStorage
from fedckpt.storage.paths import Location, checkpoint_key, checkpoint_path_in, entry_path, temp_path
from fedckpt.storage.posix import POSIX, persist_checkpoint

URL = "s3://bucket/run/model.safetensors"


def test_a_url_is_normalised_after_its_protocol_and_a_local_path_with_os_path():
    url = Location.of("S3://bucket//run/./a/../model.safetensors")
    assert (url.protocol, url.path, url.is_url) == ("s3", "bucket/run/model.safetensors", True)
    assert str(url) == url.key == URL
    assert str(url.entry) == entry_path(URL) == "s3://bucket/run/.fedckpt/model.safetensors.json"
    assert str(url.parent.join("other.pt")) == "s3://bucket/run/other.pt"
    assert str(Location.of("abfs://container@account/run/x.pt").control_dir) == "abfs://container@account/run/.fedckpt"

    local = Location.of("run/./model.pt")
    assert (local.protocol, local.path, local.is_url) == ("", "run/model.pt", False)
    assert local.key == os.path.abspath("run/model.pt")  # relative paths stay relative; their key is absolute
    assert str(local.entry) == os.path.join("run", ".fedckpt", "model.pt.json")
    assert (
        Location.of("file:///tmp/run/model.pt")
        == Location.of("local:///tmp/run/model.pt")
        == Location("", "/tmp/run/model.pt")
    )
    # fedckpt's own files: their control directory is the one they are in.
    assert str(Location.of("/tmp/run/.fedckpt/versions").control_dir) == "/tmp/run/.fedckpt"
    assert checkpoint_key("s3://bucket/run/../x.pt") == "s3://bucket/x.pt"


def test_names_inside_a_directory_stay_on_its_file_system():
    assert checkpoint_path_in("s3://bucket/run", "sub/x.pt") == "s3://bucket/run/sub/x.pt"
    assert checkpoint_path_in("s3://bucket/run", "s3://bucket/run/sub/x.pt") == "s3://bucket/run/sub/x.pt"
    assert checkpoint_path_in("run", "x.pt") == os.path.join("run", "x.pt")
    outside = [
        ("s3://bucket/run", "gs://bucket/run/x.pt"),
        ("s3://bucket/run", "/tmp/x.pt"),
        ("/tmp/run", "s3://bucket/run/x.pt"),
        ("s3://bucket/run", "s3://bucket/other/x.pt"),
    ]
    for directory, name in outside:
        with pytest.raises(ValueError, match="not inside the checkpoint directory"):
            checkpoint_path_in(directory, name)


def test_storage_for_picks_the_backend_by_location(tmp_path):
    assert storage_for(str(tmp_path / "x.pt")) is POSIX
    assert storage_for(f"file://{tmp_path}/x.pt") is POSIX
    assert isinstance(storage_for("memory://run/x.pt"), FsspecStorage)
    with pytest.raises(ValueError, match="takes URLs"):
        FsspecStorage(str(tmp_path / "x.pt"), {})


def _refusals(tmp_path):
    entry = manifest.ManifestEntry("m", "module", (1, 1), None, None, 0, "xxh3_128:0", 0.0, "w")
    return {
        "publishing_lock": lambda: manifest.publishing_lock(URL).__enter__(),
        "read_entry": lambda: manifest.read_entry(URL),
        "read_entry_locked": lambda: manifest.read_entry_locked(URL),
        "stage_entry": lambda: manifest.stage_entry(URL, entry),
        "commit_entry": lambda: manifest.commit_entry(URL),
        "iter_entries": lambda: list(manifest.iter_entries("s3://bucket/run")),
        "temp_path": lambda: temp_path(URL),
        "write_durable_temp": lambda: atomic.write_durable_temp(URL, lambda temp: None),
        "publish": lambda: atomic.publish(str(tmp_path / "temp"), URL),
        "persist_checkpoint": lambda: persist_checkpoint(URL, "module", {}, memoryview(b""), (1, 1), None, None, "w"),
    }


@pytest.mark.parametrize("function", list(_refusals(None)))
def test_what_works_on_local_files_only_refuses_a_url_and_makes_nothing(function, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"works on local files only, not on the URL s3://bucket/run.*fsspec backend"):
        _refusals(tmp_path)[function]()
    assert list(tmp_path.iterdir()) == []


def test_no_hard_link_to_a_checkpoint_on_an_object_store(tmp_path, monkeypatch):
    """The node's content index names checkpoints on object stores too: a local save with the same
    content links to none of them (and touches nothing locally for them)."""
    monkeypatch.chdir(tmp_path)
    assert not link_identical(URL, "xxh3_128:0", str(tmp_path / "target"))
    assert list(tmp_path.iterdir()) == []


def test_a_flower_clients_directory_under_a_url_is_a_url():
    from types import SimpleNamespace

    from fedckpt.flower import client_checkpoint_dir

    context = SimpleNamespace(node_config={"partition-id": 3}, node_id=99)
    assert client_checkpoint_dir("s3://bucket/run/", context) == "s3://bucket/run/client_3"
    assert client_checkpoint_dir("run", context) == os.path.join("run", "client_3")
