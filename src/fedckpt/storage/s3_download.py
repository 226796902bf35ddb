"""A byte range of an S3 object streamed straight into a caller's buffers (tensors' memory), in a
few concurrent ranged GETs: no copy of the range is ever held, only the HTTP client's small reads.

s3fs's own reads (``cat_file``, its file objects) return each range as ``bytes``, joined from the
body's chunks (twice the range at a time). Reading a large object that way in bounded chunks costs
a GET per chunk, and on some stores a GET of a range of a large object costs about as much as one
of the whole (moto reads the whole object each time). Here one read is at most CONCURRENT_RANGES
GETs, whatever its size, and it may fill many buffers: a module file's data section goes into every
tensor of the model in one read.
"""

from __future__ import annotations

import asyncio
from typing import Any

from botocore.exceptions import BotoCoreError
from fsspec.asyn import sync

from fedckpt import _compat
from fedckpt.storage import s3_store

CONCURRENT_RANGES = 4  # GETs in flight for one read
MIN_RANGE_BYTES = 16 << 20  # a read is cut into at most CONCURRENT_RANGES slices of at least this
READ_BYTES = 1 << 20  # the most the HTTP client hands over (and copies) at a time
ATTEMPTS = 3  # a GET whose body stopped (connection reset, timeout) resumes where it stopped


class ShortObject(EOFError):
    """The object ended before the range did."""


def read_into(fs: Any, path: str, start: int, views: list[memoryview]) -> None:
    """Fill ``views``, in order, with the bytes of the object ``path`` (``bucket/key``) from ``start``
    (the views are consecutive ranges of the object).

    ``FileNotFoundError`` if the object is not there (deleted by a newer commit); :class:`ShortObject`
    if it ends before the last view does.
    """
    total = sum(len(view) for view in views)
    if total == 0:
        return
    bucket, key, _ = fs.split_path(path)
    count = max(1, min(CONCURRENT_RANGES, total // MIN_RANGE_BYTES))
    step = -(-total // count)
    slices = [(offset, _cut(views, offset, min(step, total - offset))) for offset in range(0, total, step)]
    sync(fs.loop, _read_slices, fs, bucket, key, start, slices)


def _cut(views: list[memoryview], offset: int, length: int) -> list[memoryview]:
    """The non-empty pieces of ``views`` holding ``length`` bytes from ``offset`` of their concatenation."""
    pieces = []
    for view in views:
        if offset >= len(view):
            offset -= len(view)
            continue
        take = min(len(view) - offset, length)
        pieces.append(view[offset : offset + take])
        offset, length = 0, length - take
        if length == 0:
            break
    return pieces


async def _read_slices(fs: Any, bucket: str, key: str, start: int, slices: list[tuple[int, list[memoryview]]]) -> None:
    reading = [asyncio.ensure_future(_stream(fs, bucket, key, start + offset, pieces)) for offset, pieces in slices]
    try:
        await asyncio.gather(*reading)
    except BaseException:
        for task in reading:  # none may still write into the caller's buffers once this returns
            task.cancel()
        await asyncio.gather(*reading, return_exceptions=True)
        raise


async def _stream(fs: Any, bucket: str, key: str, start: int, pieces: list[memoryview]) -> None:
    """One GET of the range that ``pieces`` (consecutive) hold, streamed into them."""
    end = start + sum(len(piece) for piece in pieces)
    done, index, within = start, 0, 0  # the next byte to read, and where it goes
    for attempt in range(ATTEMPTS):
        # s3fs's call: its credentials, its retries of the request, its errors (NoSuchKey: FileNotFoundError).
        try:
            response = await _compat.s3_call(fs, "get_object", Bucket=bucket, Key=key, Range=f"bytes={done}-{end - 1}")
        except OSError as error:
            if s3_store.error_code(error) == "InvalidRange":  # the object ends before the range starts
                raise ShortObject(f"s3://{bucket}/{key} ends before {done} bytes") from error
            raise
        body = response["Body"]
        try:
            while done < end:
                piece = pieces[index]
                got = await body.readinto(piece[within : within + READ_BYTES])
                if got == 0:
                    raise ShortObject(f"s3://{bucket}/{key} ends at {done} bytes, before {end}")
                done, within = done + got, within + got
                if within == len(piece):
                    index, within = index + 1, 0
            return
        except (TimeoutError, BotoCoreError):  # the body stopped: read the rest again
            if attempt == ATTEMPTS - 1:
                raise
        finally:
            body.close()
