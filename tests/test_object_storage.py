"""Checkpoints on S3, against a real S3-protocol server (moto's server mode) on 127.0.0.1, through
s3fs and botocore as a user's program talks to it."""

import io
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import ray
import s3fs
import torch
from conftest import assert_same_tensors, make_model

import fedckpt
from fedckpt import (
    BestLossTorchModuleCheckpointer,
    BestMetricTorchModuleCheckpointer,
    CheckpointError,
    CheckpointMode,
    ClientCheckpointAndStateModule,
    LatestTorchModuleCheckpointer,
    PerRoundStateCheckpointer,
)
from fedckpt.runtime import lifecycle
from fedckpt.runtime.pool import writer_name
from fedckpt.storage.base import storage_for


def _objects(s3_server, url: str) -> list[str]:
    return sorted(s3fs.S3FileSystem(**s3_server.options()).find(url.removeprefix("s3://")))


def test_every_checkpointer_and_the_state_round_trip(s3_dir, s3_server):
    pre = [
        LatestTorchModuleCheckpointer(s3_dir, "pre_latest.safetensors"),
        BestLossTorchModuleCheckpointer(s3_dir, "pre_best.pt"),
    ]
    post = BestMetricTorchModuleCheckpointer(s3_dir, "post_best.safetensors", "accuracy", prefix="", maximize=True)
    state = PerRoundStateCheckpointer(s3_dir)
    module = ClientCheckpointAndStateModule(pre_aggregation=pre, post_aggregation=post, state_checkpointer=state)
    local, global_ = make_model(1), make_model(2)
    module.maybe_checkpoint(local, 0.3, {}, CheckpointMode.PRE_AGGREGATION)
    module.maybe_checkpoint(global_, 0.3, {"accuracy": 0.7}, CheckpointMode.POST_AGGREGATION)
    saved_local = {name: tensor.clone() for name, tensor in local.state_dict().items()}
    optimizer = torch.optim.SGD(local.parameters(), lr=0.1, momentum=0.9)
    local(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    state.save_checkpoint("client_state.pt", {"optimizer": optimizer.state_dict(), "round": 3}, server_round=3)

    # Loads wait for the saves (no flush): read-your-writes.
    assert_same_tensors(pre[0].load_state_dict(), saved_local)
    assert_same_tensors(pre[1].load_checkpoint().state_dict(), saved_local)  # a .pt holds torch.save(model)
    assert_same_tensors(post.load_checkpoint().state_dict(), global_.state_dict())
    restored = state.load_checkpoint("client_state.pt")
    assert restored["round"] == 3
    assert_same_tensors(restored["optimizer"]["state"][0], optimizer.state_dict()["state"][0])
    assert state.saved_round("client_state.pt") == 3 and state.checkpoint_exists("client_state.pt")
    assert not state.checkpoint_exists("never_saved.pt")
    with pytest.raises(FileNotFoundError, match="never_saved.pt"):
        state.load_checkpoint("never_saved.pt")

    # A new checkpointer takes its bar from the checkpoint on the store.
    assert BestMetricTorchModuleCheckpointer(
        s3_dir, "post_best.safetensors", "accuracy", prefix="", maximize=True
    ).resume_best_score() == pytest.approx(0.7)
    # One object per version, the entries beside them; nothing written where a reader does not look.
    names = [key.split("/run/", 1)[1] for key in _objects(s3_server, s3_dir)]
    assert sorted(name for name in names if not name.startswith(".fedckpt/versions/")) == [
        ".fedckpt/client_state.pt.json", ".fedckpt/post_best.safetensors.json",
        ".fedckpt/pre_best.pt.json", ".fedckpt/pre_latest.safetensors.json",
    ]  # fmt: skip
    assert len(names) == 8


def test_superseded_versions_are_deleted_and_identical_content_is_copied_not_uploaded(s3_dir, s3_server):
    model = make_model(3)
    latest = LatestTorchModuleCheckpointer(s3_dir, "latest.safetensors")
    for step in range(5):
        with torch.no_grad():
            model.body[0].bias.fill_(step)
        latest.maybe_checkpoint(model, 0.1, {})
        fedckpt.flush()
    versions = [key for key in _objects(s3_server, s3_dir) if "/versions/latest.safetensors/" in key]
    assert len(versions) == 1  # the four superseded objects are gone
    assert latest.load_state_dict()["body.0.bias"].eq(4).all()

    stats_before = lifecycle_writer_stats()
    twin = LatestTorchModuleCheckpointer(s3_dir, "twin.safetensors")
    twin.maybe_checkpoint(model, 0.1, {})
    fedckpt.flush()
    stats_after = lifecycle_writer_stats()
    assert stats_after["bytes_linked"] - stats_before["bytes_linked"] > 0  # a server-side copy
    assert stats_after["bytes_written"] == stats_before["bytes_written"]
    assert_same_tensors(twin.load_state_dict(), model.state_dict())


def lifecycle_writer_stats() -> dict[str, int]:
    from fedckpt.runtime import lifecycle

    stats = lifecycle.coordinator().writer_stats()
    return {"bytes_linked": sum(s.bytes_linked for s in stats), "bytes_written": sum(s.bytes_written for s in stats)}


@ray.remote(num_cpus=0)
def _load_in_another_worker(directory: str) -> list[float]:
    """A Ray worker with its credentials and endpoint from the standard AWS environment variables."""
    checkpointer = LatestTorchModuleCheckpointer(directory, "shared.safetensors")
    return checkpointer.load_state_dict()["body.0.bias"].tolist()


def test_a_save_is_readable_from_another_ray_worker_at_once(s3_dir, s3_server):
    model = make_model(4)
    with torch.no_grad():
        model.body[0].bias.fill_(7.0)
    LatestTorchModuleCheckpointer(s3_dir, "shared.safetensors").maybe_checkpoint(model, 0.1, {})
    # No flush: the other worker's load waits for the save.
    remote = _load_in_another_worker.options(runtime_env={"env_vars": s3_server.env()})
    assert ray.get(remote.remote(s3_dir)) == [7.0] * 32


def test_verify_finds_a_corrupted_object_and_lists_leftovers(s3_dir, s3_server):
    checkpointer = LatestTorchModuleCheckpointer(s3_dir, "m.safetensors")
    checkpointer.maybe_checkpoint(make_model(5), 0.1, {})
    PerRoundStateCheckpointer(s3_dir).save_checkpoint("s.pt", {"x": torch.ones(10)})
    fedckpt.flush()
    env = {**os.environ, **s3_server.env()}  # the CLI takes the standard AWS environment
    clean = subprocess.run([sys.executable, "-m", "fedckpt.cli", "verify", s3_dir], env=env, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert clean.returncode == 0 and "verified 2 checkpoint(s)" in clean.stdout, clean.stderr
    fs = s3fs.S3FileSystem(**s3_server.options())
    (version,) = [key for key in fs.find(s3_dir.removeprefix("s3://")) if "/versions/m.safetensors/" in key]
    content = bytearray(fs.cat_file(version))
    content[-1] ^= 0xFF
    fs.pipe_file(version, bytes(content))
    fs.pipe_file(f"{s3_dir.removeprefix('s3://')}/.fedckpt/versions/s.pt/00-00-cut-off-upload", b"partial")
    found = subprocess.run([sys.executable, "-m", "fedckpt.cli", "verify", s3_dir], env=env, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert found.returncode == 1
    assert f"CORRUPT {s3_dir}/m.safetensors: checksum does not match" in found.stderr
    assert "LEFTOVER" in found.stdout and "cut-off-upload" in found.stdout
    listed = subprocess.run([sys.executable, "-m", "fedckpt.cli", "ls", s3_dir], env=env, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert "m.safetensors" in listed.stdout and "s.pt" in listed.stdout


def test_a_missing_bucket_is_a_clear_error_at_the_first_flush(s3_server, runtime):
    fedckpt.init(storage_options=s3_server.options())
    try:
        checkpointer = LatestTorchModuleCheckpointer("s3://no-such-bucket-here/run", "m.safetensors")
        checkpointer.maybe_checkpoint(make_model(6), 0.1, {})
        with pytest.raises(CheckpointError, match="s3://no-such-bucket-here/run/m.safetensors"):
            fedckpt.flush()
    finally:
        fedckpt.init(storage_options={})


def test_a_writer_killed_mid_upload_keeps_per_key_order_and_every_acknowledged_save(s3_server, ray_instance):
    fedckpt.init(namespace="fedckpt-s3-kill", num_writers=1, io_threads=1, storage_options=s3_server.options())
    directory = f"s3://{s3_server.new_bucket()}/run"
    try:
        writer = ray.get_actor(writer_name(0), namespace="fedckpt-s3-kill")
        pid = ray.get(writer.stats.remote()).pid
        states = PerRoundStateCheckpointer(directory)
        for counter in range(4):
            for key in range(2):
                states.save_checkpoint(f"k{key}.pt", {"counter": counter, "x": torch.full((4 << 20,), counter)})
        os.kill(pid, signal.SIGKILL)  # uploads under way, more queued
        for key in range(2):
            states.save_checkpoint(f"k{key}.pt", {"counter": 4, "x": torch.full((4 << 20,), 4)})
        fedckpt.flush()
        assert ray.get(writer.stats.remote()).pid != pid
        storage = storage_for(directory)
        for key in range(2):
            state = states.load_checkpoint(f"k{key}.pt")
            assert state["counter"] == 4 and torch.all(state["x"] == 4)
            assert storage.read_entry(f"{directory}/k{key}.pt").sequence[1] >= 1
        report = storage.verify(directory)
        assert report.checked == 2 and report.problems == []
        assert lifecycle.coordinator().inflight_bytes() == 0
        stats = fedckpt.stats()
        assert stats.pending_saves == 0 and stats.pending_bytes == 0
    finally:
        lifecycle.coordinator().stop_writers()
        fedckpt.init(storage_options={})


def test_the_server_stopped_mid_upload_is_an_error_naming_the_checkpoint_and_the_last_version_stays(s3_dir, s3_server):
    states = PerRoundStateCheckpointer(s3_dir)
    states.save_checkpoint("state.pt", {"version": 1, "x": torch.ones(8)})
    fedckpt.flush()
    states.save_checkpoint("state.pt", {"version": 2, "x": torch.zeros(32 << 20)})  # 128 MiB: two parts
    s3_server.stop()  # while its upload is under way, or before it starts
    try:
        with pytest.raises(CheckpointError, match=f"{s3_dir}/state.pt"):
            fedckpt.flush()
    finally:
        s3_server.start()
    assert states.load_checkpoint("state.pt")["version"] == 1  # the committed version is intact
    states.save_checkpoint("state.pt", {"version": 3, "x": torch.ones(8)})  # saving resumes
    fedckpt.flush()
    assert states.load_checkpoint("state.pt")["version"] == 3
    assert storage_for(s3_dir).verify(s3_dir).problems == []


def test_options_given_to_a_checkpointer_serve_its_saves_and_loads(s3_server, runtime):
    directory = f"s3://{s3_server.new_bucket()}/run"  # no fedckpt.init(storage_options=...) in this test
    options = s3_server.options()
    model = make_model(8)
    checkpointer = BestLossTorchModuleCheckpointer(directory, "best.safetensors", storage_options=options)
    checkpointer.maybe_checkpoint(model, 0.5, {})
    states = PerRoundStateCheckpointer(directory, storage_options=options)
    states.save_checkpoint("state.pt", {"round": 2}, server_round=2)
    assert_same_tensors(checkpointer.load_state_dict(), model.state_dict())
    assert states.load_checkpoint("state.pt") == {"round": 2} and states.saved_round("state.pt") == 2
    resumed = BestLossTorchModuleCheckpointer(directory, "best.safetensors", storage_options=options)
    assert resumed.resume_best_score() == pytest.approx(0.5)


def test_wrong_credentials_are_a_clear_error_at_the_first_flush_and_not_retried_forever(runtime):
    from s3_server import AuthenticatingS3Server

    with AuthenticatingS3Server() as server:
        good = {"endpoint_url": server.endpoint, **server.key}
        wrong = {**good, "secret": "not-the-secret"}
        checkpointer = LatestTorchModuleCheckpointer("s3://checked/run", "m.safetensors", storage_options=wrong)
        checkpointer.maybe_checkpoint(make_model(9), 0.1, {})
        with pytest.raises(CheckpointError, match=r"s3://checked/run/m\.safetensors.*signature"):
            fedckpt.flush(timeout=120)  # a retry loop would end in TimeoutError instead
        # The same checkpoint with the right key saves: nothing was left in the way.
        fixed = LatestTorchModuleCheckpointer("s3://checked/run", "m.safetensors", storage_options=good)
        model = make_model(10)
        fixed.maybe_checkpoint(model, 0.1, {})
        assert_same_tensors(fixed.load_state_dict(), model.state_dict())


def test_a_model_larger_than_a_part_goes_up_in_concurrent_parts_and_reads_back_whole(s3_dir, s3_server):
    from fedckpt.storage import s3_upload

    model = torch.nn.Linear(5900, 5900)  # 139 MB: three parts of 50 MiB, the header in the first
    assert model.weight.nbytes > 2 * s3_upload.PART_BYTES
    checkpointer = LatestTorchModuleCheckpointer(s3_dir, "large.safetensors")
    checkpointer.maybe_checkpoint(model, 0.1, {})
    assert_same_tensors(checkpointer.load_state_dict(), model.state_dict())
    assert storage_for(s3_dir).verify(s3_dir).problems == []  # size and checksum of the object as recorded


def test_parts_cut_a_header_and_the_data_at_exact_part_boundaries():
    from fedckpt.storage.s3_upload import parts_of

    header, data = memoryview(b"h" * 3), memoryview(bytes(range(10)))
    parts = [b"".join(part) for part in parts_of([header, data], part_bytes=4)]
    assert parts == [b"hhh\x00", b"\x01\x02\x03\x04", b"\x05\x06\x07\x08", b"\x09"]
    assert list(parts_of([memoryview(b"")], part_bytes=4)) == []


def test_a_store_without_conditional_writes_still_keeps_per_key_order(tmp_path):
    """fsspec's in-memory file system stands in for GCS or Azure (no conditional writes here): the
    generic upload path, the order check before the commit, and verify."""
    from fedckpt.storage.fsspec_storage import FsspecStorage

    storage = FsspecStorage(f"memory://generic-{os.getpid()}", {})
    path = f"memory://generic-{os.getpid()}/run/state.pt"

    def persist(version: int, sequence: tuple[int, int]):
        return _persist_state(storage, path, version, sequence)

    assert persist(2, (1, 2)) is not None
    assert persist(1, (1, 1)) is None  # an older sequence never replaces a newer version
    assert torch.load(io.BytesIO(storage.read_version(path).data), weights_only=False)["version"] == 2
    assert persist(3, (2, 0)) is not None
    report = storage.verify(f"memory://generic-{os.getpid()}/run")
    assert report.checked == 1 and report.problems == [] and report.leftovers == []


def _persist_state(storage, path: str, version: int, sequence: tuple[int, int]):
    """One state version persisted the way a writer does (without Ray)."""
    from fedckpt.snapshot import snapshot_state
    from fedckpt.storage.base import SaveTarget

    snapshot = snapshot_state({"version": version, "x": torch.full((1000,), version)})
    staged = np.empty(snapshot.nbytes, dtype=np.uint8)
    snapshot.copy_into(staged)
    target = SaveTarget(path, "state", snapshot.layout, sequence, None, None, "test")
    return storage.persist(target, memoryview(staged), None)


def test_a_lost_conditional_write_is_recognised_as_a_race_and_the_newer_save_still_commits(s3_server):
    from fedckpt.storage.fsspec_storage import FsspecStorage, _PreconditionFailed
    from fedckpt.storage.paths import entry_path

    storage = FsspecStorage("s3://", s3_server.options())
    path = f"s3://{s3_server.new_bucket()}/run/state.pt"
    assert _persist_state(storage, path, 1, (1, 1)) is not None
    current = storage.read_entry(path)
    with pytest.raises(_PreconditionFailed):  # If-Match on an ETag that is not the entry's any more
        storage._write_entry(entry_path(path), current, '"not-the-current-etag"')
    with pytest.raises((_PreconditionFailed, FileExistsError)):  # If-None-Match on an existing entry
        storage._write_entry(entry_path(path), current, None)
    assert _persist_state(storage, path, 2, (1, 2)) is not None
    assert torch.load(io.BytesIO(storage.read_version(path).data), weights_only=False)["version"] == 2
    assert storage.verify(path.rsplit("/", 1)[0]).problems == []


def test_a_store_that_ignores_conditional_writes_is_an_error_naming_it_unless_the_weaker_order_is_accepted(runtime):
    from s3_server import ConditionIgnoringS3Server

    server = ConditionIgnoringS3Server()
    server.start()
    try:
        directory = f"s3://{server.new_bucket()}/run"
        states = PerRoundStateCheckpointer(directory, storage_options=server.options())
        states.save_checkpoint("state.pt", {"version": 1})
        with pytest.raises(CheckpointError, match=r"run/state\.pt.*does not honour conditional writes"):
            fedckpt.flush()
        storage = storage_for(directory, server.options())
        assert storage.read_entry(f"{directory}/state.pt") is None
        assert storage.verify(directory).leftovers == []  # the check comes before the upload

        accepted = PerRoundStateCheckpointer(directory, storage_options=server.options(conditional_writes=False))
        accepted.save_checkpoint("state.pt", {"version": 2})
        fedckpt.flush()
        assert accepted.load_checkpoint("state.pt") == {"version": 2}
    finally:
        server.stop()


def test_an_entry_naming_a_missing_object_is_a_corrupt_checkpoint_not_a_missing_one(s3_dir):
    """A resume must not read a dangling entry as "no state yet" and start the run from scratch."""
    from fedckpt import CorruptCheckpointError

    states = PerRoundStateCheckpointer(s3_dir)
    states.save_checkpoint("state.pt", {"version": 1})
    fedckpt.flush()
    storage, path = storage_for(s3_dir), f"{s3_dir}/state.pt"
    entry = storage.read_entry(path)
    storage.fs.rm_file(storage._object_url(path, entry))
    with pytest.raises(CorruptCheckpointError, match=r"run/state\.pt.*missing"):
        states.load_checkpoint("state.pt")
    assert storage.verify(s3_dir).problems == [f"{path}: its object {entry.object} is missing"]


def test_an_upload_cut_off_by_a_crash_is_listed_by_verify_and_aborted_by_the_next_writer_of_its_key(s3_dir):
    storage, path = storage_for(s3_dir), f"{s3_dir}/state.pt"
    cut_off = storage.fs._strip_protocol(f"{storage._versions_prefix(path)}{0:020d}-{0:020d}-abcdef123456")
    bucket, key, _ = storage.fs.split_path(cut_off)
    upload = storage.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]
    storage.fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"x" * 1024)
    assert storage.verify(s3_dir).leftovers == [f"s3://{cut_off} (incomplete multipart upload)"]

    states = PerRoundStateCheckpointer(s3_dir)
    states.save_checkpoint("state.pt", {"version": 1})
    fedckpt.flush()
    report = storage.verify(s3_dir)
    assert report.checked == 1 and report.problems == [] and report.leftovers == []


def test_shutdown_closes_the_object_store_sessions_it_opened_and_a_later_save_opens_new_ones(s3_dir, s3_server):
    """fedckpt.shutdown() unregisters the exit handler that would close them: it closes them itself,
    while fsspec's event loop runs, rather than leave them to s3fs's finalizers at interpreter exit."""
    state = PerRoundStateCheckpointer(s3_dir)
    state.save_checkpoint("state.pt", {"round": 1}, server_round=1)
    assert state.load_checkpoint("state.pt")["round"] == 1  # read by this process, through its session
    file_system = storage_for(s3_dir, s3_server.options()).fs
    client = file_system.s3
    assert client._endpoint.http_session._sessions  # aiobotocore's connection pools, open

    fedckpt.shutdown()
    assert file_system._s3 is None and not client._endpoint.http_session._sessions

    fedckpt.init(storage_options=s3_server.options())
    state.save_checkpoint("state.pt", {"round": 2}, server_round=2)
    assert state.load_checkpoint("state.pt")["round"] == 2 and file_system.s3 is not client
