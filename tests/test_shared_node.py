"""A node shared by several Unix users: their files in /dev/shm and beside checkpoints never make fedckpt link
their bytes as ours, remove their files, or break start-up; and a /dev/shm without inodes left is a fallback.

"Another user" is uid OTHER: files chowned to it, or a child process that drops root to it. Tests that need
/dev/shm itself run in a private mount namespace (``unshare -m``) with a small tmpfs of their own over it, so
the node's real /dev/shm, which other processes use, is never touched."""

import errno
import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import pytest
from conftest import make_model
from safetensors.torch import load_file

from fedckpt.runtime.sequence import SequenceCounter, bucket_of
from fedckpt.runtime.staging import SEGMENT_GRANULARITY, StagingArena, StagingFull, remove_orphans
from fedckpt.snapshot import snapshot_module
from fedckpt.storage import manifest
from fedckpt.storage.checksum import checksum_of, file_matches
from fedckpt.storage.dedup import ContentIndex
from fedckpt.storage.formats import MODULE
from fedckpt.storage.formats.safetensors_file import safetensors_header
from fedckpt.storage.paths import entry_path
from fedckpt.storage.posix import persist_checkpoint

OTHER = 12345  # another user of the node
US = 12346  # a non-root user running fedckpt, where root would read anything


def run_in_private_dev_shm(script: str, mount_options: str, *args: str, timeout: float = 120):
    """Run ``script`` (Python, as root) in a mount namespace of its own, with a fresh tmpfs over /dev/shm."""
    command = f'mount -t tmpfs -o {mount_options} tmpfs /dev/shm && exec {sys.executable} -c "$0" "$@"'
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_ADDRESS": "local"}
    return subprocess.run(["unshare", "-m", "sh", "-c", command, script, *args], capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip


def staged_model(seed: int):
    """A model's snapshot as a writer gets it: its layout and its staged bytes."""
    snapshot = snapshot_module(make_model(seed))
    data = np.empty(snapshot.nbytes, dtype=np.uint8)
    snapshot.copy_into(data)
    return snapshot.layout, memoryview(data)


# ---- the content index --------------------------------------------------------------------------


def test_a_content_index_directory_of_another_user_open_to_others_or_a_link_is_never_used(tmp_path):
    """Its entries name the checkpoints a save is linked to: one another user can write would let them
    choose what our checkpoints become. Such a directory is not used (one warning naming it and why);
    the index then lives in the writer's memory."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, OTHER, OTHER)
    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    os.chmod(open_to_all, 0o777)
    link = tmp_path / "link"
    link.symlink_to(private)
    checksum = "xxh3:" + "ab" * 16
    for directory, why in [(theirs, f"owned by uid {OTHER}"), (open_to_all, "mode 0o777"), (link, "symbolic link")]:
        planted = directory / checksum.replace(":", "-")
        planted.write_text("/somewhere/their.safetensors")  # an entry naming a file of theirs
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            index = ContentIndex(str(directory))
            ContentIndex(str(directory))  # a second index of the same directory: no second warning
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and str(directory) in messages[0] and why in messages[0], messages
        assert index.directory is None
        assert index.candidate(checksum) is None  # their entry is never read
        index.record(checksum, "/ours/m.safetensors")  # kept in memory instead
        assert index.candidate(checksum) == "/ours/m.safetensors"
        assert planted.read_text() == "/somewhere/their.safetensors"
        planted.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ContentIndex(str(private)).directory == str(private)  # ours, 0700: used


def test_the_content_index_directory_is_made_private_whatever_the_umask(tmp_path):
    directory = tmp_path / "index"
    umask = os.umask(0o277)  # would leave 0500 of the 0700 asked for
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            index = ContentIndex(str(directory))
    finally:
        os.umask(umask)
    status = os.lstat(directory)
    assert stat.S_IMODE(status.st_mode) == 0o700 and status.st_uid == os.getuid()
    assert index.directory == str(directory)


# ---- linking identical content --------------------------------------------------------------------


def forge_entry(checkpoint: str, checksum: str) -> None:
    """Make the manifest entry of ``checkpoint`` claim content ``checksum`` (its size stays right)."""
    path = entry_path(checkpoint)
    with open(path, encoding="utf-8") as file:
        entry = json.load(file)
    entry["checksum"] = checksum
    with open(path, "w", encoding="utf-8") as file:
        json.dump(entry, file)


@pytest.mark.parametrize(
    "planted",
    [
        "another user's file claiming our content",
        "another user's file with our bytes",  # they could write into it later, through our link
        "our file, writable by others",
        "our file changed behind fedckpt's back",
    ],
)
def test_a_candidate_whose_bytes_are_not_the_content_is_never_linked(tmp_path, planted):
    """Another user's checkpoint whose manifest entry claims our content (loading it would run their
    pickle), another user's file at all, a file others may write, or a file of ours whose bytes no longer
    match its entry: the save writes its own bytes."""
    layout, data = staged_model(1)
    checksum = checksum_of(safetensors_header(layout), data)
    candidate = str(tmp_path / "candidate" / "m.safetensors")
    same_bytes = planted in ("another user's file with our bytes", "our file, writable by others")
    persist_checkpoint(candidate, MODULE, *staged_model(1 if same_bytes else 2), (1, 1), None, None, "w")
    if not same_bytes:
        forge_entry(candidate, checksum)
    if planted.startswith("another user's"):
        os.chown(candidate, OTHER, OTHER)
    if planted == "our file, writable by others":
        os.chmod(candidate, 0o666)
    index = ContentIndex(None)
    index.record(checksum, candidate)  # as the node's index would name it

    ours = str(tmp_path / "ours" / "m.safetensors")
    persisted = persist_checkpoint(ours, MODULE, layout, data, (1, 1), None, None, "w", index)
    assert not persisted.linked and not os.path.samefile(ours, candidate)
    assert file_matches(ours, checksum) and manifest.read_entry(ours).checksum == checksum
    assert all(np.array_equal(load_file(ours)[name], value) for name, value in make_model(1).state_dict().items())


def test_a_candidate_that_is_ours_and_matches_is_still_linked(tmp_path):
    layout, data = staged_model(3)
    index = ContentIndex(None)
    first = str(tmp_path / "a" / "m.safetensors")
    second = str(tmp_path / "b" / "m.safetensors")
    assert not persist_checkpoint(first, MODULE, layout, data, (1, 1), None, None, "w", index).linked
    assert persist_checkpoint(second, MODULE, layout, data, (1, 1), None, None, "w", index).linked
    assert os.path.samefile(first, second)


# ---- other users' files in /dev/shm ---------------------------------------------------------------


def test_the_orphan_sweep_never_removes_another_users_files(tmp_path):
    """A dead creator's segment is removed only if it is ours: root could remove anyone's."""
    shm = tmp_path / "shm"
    shm.mkdir()
    os.chmod(shm, 0o1777)  # as /dev/shm
    theirs, ours = shm / "fedckpt-999999-theirs", shm / "fedckpt-999999-ours"
    theirs.write_bytes(b"")
    os.chown(theirs, OTHER, OTHER)
    ours.write_bytes(b"")
    assert remove_orphans(str(shm), grace_seconds=0.0) == 1
    assert os.listdir(shm) == [theirs.name]


OTHER_USERS_FILES_AT_START_UP = """
import os, signal, sys
from fedckpt.runtime.staging import SegmentReader, StagingArena, remove_orphans

OTHER, US = int(sys.argv[1]), int(sys.argv[2])
# Another user's files, as root makes them for the test: a dead process's segment only they can read,
# a FIFO anyone can open (an open for reading would wait for a writer forever), a link to a file of ours.
os.close(os.open("/dev/shm/fedckpt-999999-private", os.O_CREAT | os.O_WRONLY, 0o600))
os.mkfifo("/dev/shm/fedckpt-999999-fifo")
os.close(os.open("/dev/shm/target", os.O_CREAT | os.O_WRONLY, 0o644))
os.symlink("/dev/shm/target", "/dev/shm/fedckpt-999999-link")
for name in ("fedckpt-999999-private", "fedckpt-999999-fifo", "fedckpt-999999-link"):
    os.chown(os.path.join("/dev/shm", name), OTHER, OTHER, follow_symlinks=False)
os.chmod("/dev/shm/fedckpt-999999-fifo", 0o666)
os.chown("/dev/shm/target", US, US)
# A segment of ours whose creator died: the sweep removes it.
os.close(os.open("/dev/shm/fedckpt-999998-ours", os.O_CREAT | os.O_WRONLY, 0o600))
os.chown("/dev/shm/fedckpt-999998-ours", US, US)

child = os.fork()
if child == 0:
    signal.alarm(30)  # a start-up that hangs on the FIFO dies here instead of forever
    try:
        os.setgid(US)
        os.setuid(US)
        arena = StagingArena(1 << 20)  # start-up sweeps /dev/shm (a caller's)
        segment = arena.acquire(4096)
        SegmentReader()  # and a writer's
        print("started; removed", remove_orphans(grace_seconds=0.0), flush=True)  # ours, past its grace
        arena.close()
    except BaseException as error:
        print("failed", type(error).__name__, error, flush=True)
        os._exit(1)
    os._exit(0)
_, status = os.waitpid(child, 0)
print("status", status, flush=True)
signal.alarm(30)
remove_orphans(grace_seconds=0.0)  # as root now
print("left", sorted(os.listdir("/dev/shm")), flush=True)
"""


def test_other_users_files_in_dev_shm_never_break_start_up_and_are_never_removed():
    """A caller's and a writer's start-up sweep /dev/shm for segments of dead processes. Another user's
    files there (unreadable for us, a FIFO, a symbolic link) are skipped, never opened or removed; our own
    dead segments still go."""
    result = run_in_private_dev_shm(OTHER_USERS_FILES_AT_START_UP, "size=16m,mode=1777", str(OTHER), str(US))
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "started; removed 1" and lines[1] == "status 0", result.stdout + result.stderr[-3000:]
    left = ["fedckpt-999999-fifo", "fedckpt-999999-link", "fedckpt-999999-private", "target"]  # not ours: kept
    assert lines[2] == f"left {left}", result.stdout


# ---- no inodes left in /dev/shm -------------------------------------------------------------------


def use_up_inodes(directory) -> list[str]:
    """Empty files until the file system has no inode left for another."""
    made = []
    while True:
        path = os.path.join(directory, f"filler-{len(made)}")
        try:
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
        except OSError as error:
            assert error.errno == errno.ENOSPC, error
            return made
        made.append(path)


@pytest.fixture
def tmpfs_without_inodes(tmp_path):
    """A tmpfs with room for bytes but no inode left (needs root, as the other storage fault tests)."""
    mount_point = tmp_path / "shm"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,nr_inodes=16", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point, use_up_inodes(mount_point)
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_no_inode_left_for_a_segment_or_a_counter_file_is_staging_full(tmpfs_without_inodes):
    directory, fillers = tmpfs_without_inodes
    arena = StagingArena(8 << 20, directory=str(directory))
    try:
        with pytest.raises(StagingFull):
            arena.acquire(4096)
        with pytest.raises(StagingFull):
            SequenceCounter.create(str(directory))
        assert not [name for name in os.listdir(directory) if name.startswith("fedckpt-")]
        os.remove(fillers[0])
        arena.release(arena.acquire(4096))  # an inode free again: staging works again
    finally:
        arena.close()
    assert not [name for name in os.listdir(directory) if name.startswith("fedckpt-")]


def test_segments_made_ready_ahead_serve_the_first_saves_and_stop_where_there_is_no_room(tmpfs_without_inodes):
    """A warm-up makes free segments of the smallest size ahead; the first small saves take them (no new
    memory mapped). Without an inode left it makes none and raises nothing: the saves find out."""
    directory, fillers = tmpfs_without_inodes
    arena = StagingArena(8 << 20, directory=str(directory))
    try:
        arena.make_ready(2)  # no inode left
        assert arena.total_bytes() == 0
        for filler in fillers[:2]:
            os.remove(filler)
        arena.make_ready(2)
        ready = set(arena._free)
        assert len(ready) == 2 and arena.total_bytes() == 2 * SEGMENT_GRANULARITY
        first, second = arena.acquire(300_000), arena.acquire(300_000)
        assert {first, second} == ready
        arena.make_ready(2)  # both busy, no inode left for a third
        assert arena.total_bytes() == 2 * SEGMENT_GRANULARITY
    finally:
        arena.close()


def test_segments_kept_ready_are_made_again_in_the_background_once_saves_take_them(tmp_path):
    """From a warm-up on, the arena keeps small segments free: saves take them without mapping memory,
    and a background thread makes the next ones (a save that maps a new segment waits milliseconds)."""
    arena = StagingArena(16 << 20, directory=str(tmp_path))
    try:
        arena.keep_ready(2)
        ready = set(arena._free)
        assert len(ready) == 2
        taken = {arena.acquire(300_000), arena.acquire(300_000)}
        assert taken == ready  # the saves took the segments made ahead
        assert arena.wait_ready(2, timeout=60)  # made again, off the savers' path
        remade = set(arena._free)
        assert len(remade) == 2 and not remade & taken
        assert arena.acquire(300_000) in remade
        refiller = arena._refiller
        assert refiller is not None and refiller.is_alive()
    finally:
        arena.close()
    refiller.join(30)
    assert not refiller.is_alive()  # closing the arena ends its thread
    assert not [name for name in os.listdir(tmp_path) if name.startswith("fedckpt-")]


SAVE_WITHOUT_INODES = """
import errno, os, sys, warnings
import ray, torch, fedckpt

ray.init(address="local", include_dashboard=False, num_cpus=1, object_store_memory=200 << 20)
fillers = 0
while True:  # /dev/shm: no inode left (before the writers start, so their counter files find none either)
    try:
        os.close(os.open(f"/dev/shm/filler-{fillers}", os.O_CREAT | os.O_WRONLY, 0o644))
    except OSError as error:
        assert error.errno == errno.ENOSPC, error
        break
    fillers += 1
print("fillers", fillers, flush=True)
model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 4))
checkpointer = fedckpt.LatestTorchModuleCheckpointer(sys.argv[1], "model.safetensors")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for step in range(3):
        with torch.no_grad():
            model[0].weight.fill_(step)
        checkpointer.maybe_checkpoint(model, 0.0, {})
    checkpointer.flush()
loaded = checkpointer.load_state_dict()
print("loaded:", all(torch.equal(loaded[name], value) for name, value in model.state_dict().items()), flush=True)
print("warnings:", [str(w.message) for w in caught if "object store" in str(w.message)], flush=True)
print("stats:", fedckpt.stats().bytes_object_store > 0, fedckpt.stats().bytes_shared_memory, flush=True)
fedckpt.shutdown()
ray.shutdown()
print("left:", [name for name in os.listdir("/dev/shm") if name.startswith("fedckpt-")], flush=True)
"""


def test_a_save_where_dev_shm_has_no_inode_left_goes_through_the_object_store(tmp_path):
    """Creating a segment (or a writer's counter file) fails at ``open`` when tmpfs has no inode left, before
    any memory is reserved: that is a full /dev/shm too. Saves go through Ray's object store with one warning,
    and load back."""
    result = run_in_private_dev_shm(SAVE_WITHOUT_INODES, "size=64m,nr_inodes=64", str(tmp_path), timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert "loaded: True" in lines, result.stdout + result.stderr[-3000:]
    (warned,) = [line for line in lines if line.startswith("warnings:")]
    assert warned.count("object store") == 1, warned  # once per process
    assert "stats: True 0" in lines, result.stdout
    assert "left: []" in lines, result.stdout


def test_the_writers_marks_after_each_save_never_wait_for_the_counters_lock(tmp_path):
    """The writer runs below training's priority: a writer descheduled inside the counter's lock would
    stall every caller on the node. So its marks after each save take no lock, while callers' numbers
    and reads still do (they exclude each other). A mark says quiet only for the count it saw taken."""
    counter = SequenceCounter.create(str(tmp_path))
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, os, sys
            fd = os.open({counter.path!r}, os.O_RDWR)
            fcntl.lockf(fd, fcntl.LOCK_EX)
            print("held", flush=True)
            sys.stdin.readline()  # hold the lock until the test is done
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        bucket = bucket_of("k")
        done = threading.Event()

        def writer_marks() -> None:
            counter.mark_bucket_quiet(bucket, 0)
            counter.mark_quiet(0)
            done.set()

        threading.Thread(target=writer_marks, daemon=True).start()
        assert done.wait(30), "a writer's mark waited for the lock another process holds"
        taking = threading.Thread(target=counter.take, args=(["k"],), daemon=True)
        taking.start()
        taking.join(0.5)
        assert taking.is_alive()  # a caller's number waits for the lock
    finally:
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(30)
    taking.join(30)
    assert not counter.keys_quiet(["k"]) and not counter.quiet()  # one save numbered, none marked yet
    counter.mark_bucket_quiet(bucket, 0)  # a stale count marks nothing
    counter.mark_quiet(0)
    assert not counter.keys_quiet(["k"]) and not counter.quiet()
    counter.mark_ready()
    counter.mark_bucket_quiet(bucket, 1)
    counter.mark_quiet(1)
    assert counter.keys_quiet(["k"]) and counter.quiet()
    counter.close(remove=True)
