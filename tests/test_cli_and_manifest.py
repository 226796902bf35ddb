"""The manifest beside the checkpoints, and the ``fedckpt ls`` / ``verify`` commands."""

import errno
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import make_model

from fedckpt import BestLossTorchModuleCheckpointer, PerRoundStateCheckpointer
from fedckpt.cli import main
from fedckpt.storage import manifest
from fedckpt.storage.checksum import checksum_of_file
from fedckpt.storage.paths import entry_path


def write_some(tmp_path):
    best = BestLossTorchModuleCheckpointer(str(tmp_path), "best.safetensors")
    best.maybe_checkpoint(make_model(0), 0.42, {})
    state = PerRoundStateCheckpointer(tmp_path)
    state.save_checkpoint("round/state.pt", {"round": 1, "w": torch.ones(10)})
    best.flush()
    state.flush()
    return best


def test_manifest_records_sequence_score_size_hash_and_time(runtime, tmp_path):
    started = time.time()
    best = write_some(tmp_path)
    entry = manifest.read_entry(best.checkpoint_path)
    assert entry.format == "module" and entry.score == 0.42 and entry.score_name == "Loss"
    assert entry.bytes == os.path.getsize(best.checkpoint_path)
    assert entry.checksum == checksum_of_file(best.checkpoint_path) and entry.checksum.startswith("xxh3:")
    assert started - 1 <= entry.saved_at <= time.time() + 1
    assert len(entry.sequence) == 2 and entry.sequence[1] >= 1


def test_ls_json_lists_every_checkpoint(runtime, tmp_path, capsys):
    write_some(tmp_path)
    assert main(["ls", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["path"] for row in rows] == ["best.safetensors", os.path.join("round", "state.pt")]
    for row in rows:
        assert {"sequence", "score", "bytes", "checksum", "saved_at", "saved_at_iso", "format"} <= set(row)
    assert main(["ls", str(tmp_path)]) == 0
    assert "best.safetensors" in capsys.readouterr().out


def test_verify_passes_then_names_a_corrupted_file(runtime, tmp_path):
    best = write_some(tmp_path)
    command = [sys.executable, "-m", "fedckpt.cli", "verify", str(tmp_path)]
    ok = subprocess.run(command, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "verified 2 checkpoint(s)" in ok.stdout
    with open(best.checkpoint_path, "r+b") as file:  # flip one byte inside the tensor data
        file.seek(-3, os.SEEK_END)
        byte = file.read(1)
        file.seek(-3, os.SEEK_END)
        file.write(bytes([byte[0] ^ 0xFF]))
    bad = subprocess.run(command, capture_output=True, text=True)
    assert bad.returncode == 1
    assert best.checkpoint_path in bad.stderr and "checksum does not match" in bad.stderr
    os.remove(best.checkpoint_path)
    missing = subprocess.run(command, capture_output=True, text=True)
    assert missing.returncode == 1 and "missing" in missing.stderr


def test_ls_and_verify_import_neither_ray_nor_torch(runtime, tmp_path):
    """They run where no cluster is, e.g. on a login node over a copy of the checkpoints."""
    write_some(tmp_path)
    script = (
        "import sys\n"
        "from fedckpt.cli import main\n"
        f"assert main(['ls', {str(tmp_path)!r}]) == 0 and main(['verify', {str(tmp_path)!r}]) == 0\n"
        "print(sorted(name for name in ('ray', 'torch') if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "best.safetensors" in result.stdout and "verified 2 checkpoint(s)" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_help_is_plain_text_naming_every_command_and_no_repository_file():
    """``fedckpt --help`` and ``fedckpt bench --help`` as a pip user reads them: no reST markup, and no
    path into fedckpt's source repository given as if it were installed."""
    for argv in (["fedckpt", "--help"], ["fedckpt", "bench", "--help"]):
        result = subprocess.run(
            [sys.executable, "-m", "fedckpt.cli", *argv[1:]], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        assert "``" not in result.stdout and ":func:" not in result.stdout and ":class:" not in result.stdout
        assert "benchmarks/README.md" not in result.stdout
    top = subprocess.run([sys.executable, "-m", "fedckpt.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert all(command in top.stdout for command in ("ls", "verify", "status", "bench"))


def test_verify_on_a_non_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_an_entry_staged_before_a_crash_is_rolled_forward(runtime, tmp_path):
    """A crash between publishing the file and its entry: the staged entry matches the file."""
    best = write_some(tmp_path)
    old = manifest.read_entry(best.checkpoint_path)
    new = manifest.ManifestEntry(**{**old.__dict__, "sequence": (old.sequence[0], old.sequence[1] + 1), "score": 0.1})
    manifest.stage_entry(best.checkpoint_path, new)  # file unchanged, so the checksum still matches
    assert manifest.read_entry(best.checkpoint_path).score == 0.1
    assert not os.path.exists(entry_path(best.checkpoint_path) + manifest.NEXT_SUFFIX)
    # A staged entry whose file never arrived is dropped.
    stale = manifest.ManifestEntry(**{**new.__dict__, "checksum": "xxh3:" + "0" * 32, "score": 9.0})
    manifest.stage_entry(best.checkpoint_path, stale)
    assert manifest.read_entry(best.checkpoint_path).score == 0.1


def test_entries_of_fedckpt_0_1_with_sha256_still_verify(runtime, tmp_path, capsys):
    best = write_some(tmp_path)
    entry = manifest.read_entry(best.checkpoint_path)
    old = {**entry.__dict__, "sha256": checksum_of_file(best.checkpoint_path, "sha256").split(":")[1]}
    del old["checksum"]
    with open(entry_path(best.checkpoint_path), "w") as file:
        json.dump(old, file)
    assert manifest.read_entry(best.checkpoint_path).checksum.startswith("sha256:")
    assert main(["verify", str(tmp_path)]) == 0
    with open(best.checkpoint_path, "r+b") as file:
        file.seek(-1, os.SEEK_END)
        last = file.read(1)[0]
        file.seek(-1, os.SEEK_END)
        file.write(bytes([last ^ 0xFF]))  # one flipped byte
    assert main(["verify", str(tmp_path)]) == 1
    assert "checksum does not match" in capsys.readouterr().err


def test_a_transient_read_error_never_drops_a_staged_entry(runtime, tmp_path, monkeypatch):
    """A reader that cannot read a staged entry (EIO, an NFS hiccup) raises and leaves it: it may be
    the only record of the newest version. The next reader rolls it forward."""
    best = write_some(tmp_path)
    old = manifest.read_entry(best.checkpoint_path)
    new = manifest.ManifestEntry(**{**old.__dict__, "sequence": (old.sequence[0], old.sequence[1] + 1), "score": 0.1})
    manifest.stage_entry(best.checkpoint_path, new)
    staged = entry_path(best.checkpoint_path) + manifest.NEXT_SUFFIX
    read_text = manifest._read_text

    def flaky(path):
        if path == staged:
            raise OSError(errno.EIO, "Input/output error")
        return read_text(path)

    monkeypatch.setattr(manifest, "_read_text", flaky)
    with pytest.raises(OSError, match="Input/output error"):
        manifest.read_entry(best.checkpoint_path)
    assert os.path.exists(staged)
    monkeypatch.setattr(manifest, "_read_text", read_text)
    assert manifest.read_entry(best.checkpoint_path).score == 0.1


def test_a_file_system_without_locks_is_a_clear_error_to_writers_and_a_warning_to_readers(tmp_path, monkeypatch):
    """NFS mounted with ``nolock`` answers every lock with ENOLCK (injected here: the fault cannot be
    made without such a mount). Publishing refuses with an error that says what to do, and nothing
    already saved is lost; ls and verify read on, with one warning."""
    from fedckpt.snapshot import snapshot_state
    from fedckpt.storage.posix import persist_checkpoint

    path = str(tmp_path / "state.pt")

    def publish(number):
        snapshot = snapshot_state({"n": number})
        data = np.empty(snapshot.nbytes, dtype=np.uint8)
        snapshot.copy_into(data)
        return persist_checkpoint(path, "state", snapshot.layout, memoryview(data), (1, number), None, None, "w")

    publish(1)

    def no_locks(fd, command, *args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(manifest.fcntl, "lockf", no_locks)
    with pytest.raises(manifest.LocksUnavailable, match="nolock"):
        publish(2)
    assert torch.load(path, weights_only=False)["n"] == 1
    assert os.listdir(os.path.join(tmp_path, ".fedckpt", "tmp")) == []  # the refused version's temp is gone
    with pytest.warns(RuntimeWarning, match="file locks are not available"):
        assert main(["verify", str(tmp_path)]) == 0
    assert main(["ls", str(tmp_path)]) == 0


def test_threads_of_one_process_never_publish_under_each_other(tmp_path):
    """POSIX locks exclude other processes only. In a writer, one I/O thread publishes a checkpoint
    while another reads its entry under the lock (to link identical content to it): the reader must
    not roll the publisher's staged entry forward in the middle of its publish."""
    import threading

    from fedckpt.snapshot import snapshot_state
    from fedckpt.storage.posix import persist_checkpoint

    path = str(tmp_path / "contested.pt")
    failures: list[BaseException] = []
    done = threading.Event()

    def publish_versions():
        try:
            for number in range(1, 150):
                snapshot = snapshot_state({"n": number})
                data = np.empty(snapshot.nbytes, dtype=np.uint8)
                snapshot.copy_into(data)
                persist_checkpoint(path, "state", snapshot.layout, memoryview(data), (1, number), None, None, "w")
        except BaseException as error:
            failures.append(error)
        finally:
            done.set()

    publisher = threading.Thread(target=publish_versions)
    publisher.start()
    while not done.is_set():
        with manifest.publishing_lock(path):
            manifest.read_entry_locked(path)
    publisher.join()
    assert failures == []
    assert manifest.read_entry(path).sequence[1] == 149 == torch.load(path, weights_only=False)["n"]
    assert main(["verify", str(tmp_path)]) == 0
