"""The manifest beside the checkpoints, and the ``fedckpt ls`` / ``verify`` commands."""

import json
import os
import subprocess
import sys
import time

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
