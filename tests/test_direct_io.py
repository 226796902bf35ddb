"""The O_DIRECT file writer: any sequence of writes gives the same bytes and checksum as a plain write."""

import fcntl
import mmap
import os

import numpy as np
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from fedckpt.storage.direct import BLOCK, BOUNCE_BYTES, HashingFile


def page_aligned(data: bytes) -> memoryview:
    """``data`` in page-aligned memory, as staged snapshots are."""
    buffer = mmap.mmap(-1, max(len(data), 1))
    buffer[: len(data)] = data
    return memoryview(buffer)[: len(data)]


def filesystem_of(path: str) -> str:
    """The type of the file system ``path`` is on (the longest matching mount point)."""
    with open("/proc/mounts") as mounts:
        entries = [line.split() for line in mounts]
    matching = [entry for entry in entries if path == entry[1] or path.startswith(entry[1].rstrip("/") + "/")]
    return max(matching, key=lambda entry: len(entry[1]))[2] if matching else ""


def write_pieces(path, pieces, direct=True):
    out = HashingFile(str(path), direct=direct)
    for piece in pieces:
        out.write(piece)
    return out, out.close()


def expected_of(pieces):
    joined = b"".join(bytes(piece) for piece in pieces)
    return joined, f"xxh3:{xxhash.xxh3_128_hexdigest(joined)}"


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(
        st.one_of(st.integers(0, 3 * BLOCK), st.sampled_from([BLOCK, 2 * BLOCK, BOUNCE_BYTES + 5])), max_size=6
    ),
    offsets=st.lists(st.integers(0, 17), min_size=6, max_size=6),
)
def test_any_write_sequence_round_trips(tmp_path_factory, sizes, offsets):
    rng = np.random.default_rng(len(sizes))
    pieces = []
    for size, offset in zip(sizes, offsets, strict=False):
        data = rng.integers(0, 256, size + offset, dtype=np.uint8).tobytes()
        pieces.append(page_aligned(data)[offset:])  # aligned and misaligned sources alike
    path = tmp_path_factory.mktemp("direct") / "file.bin"
    _, checksum = write_pieces(path, pieces)
    joined, expected_sha = expected_of(pieces)
    assert path.read_bytes() == joined
    assert checksum == expected_sha


def test_a_model_checkpoint_goes_to_disk_without_the_page_cache(tmp_path):
    header = b"h" * BLOCK  # the safetensors header is padded to a block
    data = page_aligned(np.arange(3 * BOUNCE_BYTES // 8 + 3, dtype=np.int64).tobytes())
    out, checksum = write_pieces(tmp_path / "model.safetensors", [header, data])
    joined, expected_sha = expected_of([header, data])
    assert (tmp_path / "model.safetensors").read_bytes() == joined and checksum == expected_sha
    filesystem = filesystem_of(str(tmp_path))
    if filesystem in ("ext4", "xfs", "btrfs"):
        assert out.direct, f"O_DIRECT was not used on {filesystem}"


def test_a_file_system_that_refuses_direct_writes_gets_buffered_ones(tmp_path, monkeypatch):
    """Some file systems take O_DIRECT at open and refuse the writes (EINVAL): the rest goes buffered."""
    import errno

    from fedckpt.storage import direct

    real_write, refused = os.write, []

    def write_refusing_direct(fd, data):
        if os.O_DIRECT & fcntl.fcntl(fd, fcntl.F_GETFL):
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(direct.os, "write", write_refusing_direct)
    refused_at_close = [b"header", page_aligned(b"x" * (2 * BLOCK + 1)), b"more"]
    refused_mid_stream = [page_aligned(b"y" * (3 * BLOCK)), b"z" * 5, page_aligned(b"w" * BLOCK)]
    for name, pieces in (("close", refused_at_close), ("stream", refused_mid_stream)):
        refused.clear()
        out, checksum = write_pieces(tmp_path / name, pieces)
        joined, expected_sha = expected_of(pieces)
        assert (tmp_path / name).read_bytes() == joined and checksum == expected_sha
        assert not out.direct and refused  # it did try, then fell back


def test_buffered_mode_on_request(tmp_path):
    pieces = [b"", b"tail"]
    out, checksum = write_pieces(tmp_path / "f", pieces, direct=False)
    assert not out.direct and (tmp_path / "f").read_bytes() == b"tail"
    assert checksum == f"xxh3:{xxhash.xxh3_128_hexdigest(b'tail')}"
