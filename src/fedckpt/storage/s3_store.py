"""What the fsspec backend relies on S3 for beyond fsspec's file interface: conditional writes
(checked once per bucket, since some S3-compatible stores ignore them), telling a lost race from
other errors, and the multipart uploads a crashed writer left behind.
"""

from __future__ import annotations

import contextlib
import posixpath
import threading
import uuid
from dataclasses import dataclass
from typing import Any

S3_PROTOCOLS = ("s3", "s3a")

# The stores (file system, bucket) whose conditional writes this process checked.
_checked_stores: set[tuple[Any, str]] = set()
_checked_lock = threading.Lock()

_NO_CONDITIONAL_WRITES = (
    "The S3 store of bucket {bucket} does not honour conditional writes ({why}). fedckpt writes each "
    "manifest entry with If-Match / If-None-Match so that two incarnations of a writer racing never "
    "put an older version over a newer one. Use a store that supports them (AWS S3 does; for an "
    "S3-compatible store, a version that does), or accept that race by passing "
    "storage_options={{'conditional_writes': False}}"
)


class ConditionalWritesUnsupported(OSError):
    """An S3-compatible store that ignores or refuses conditional writes, which keep per-key order."""


@dataclass(frozen=True)
class IncompleteUpload:
    """A multipart upload neither completed nor aborted: in progress, or cut off by a crash."""

    path: str  # bucket/key
    upload_id: str


def _botocore_response(error: OSError) -> dict[str, Any]:
    """The S3 answer behind an s3fs error (s3fs keeps botocore's error as the cause)."""
    return getattr(error.__cause__, "response", None) or {}


def error_code(error: OSError) -> str | None:
    """S3's error code behind an s3fs error (``InvalidRange``, ``PreconditionFailed``...), if any."""
    return _botocore_response(error).get("Error", {}).get("Code")


def _status(error: OSError) -> int | None:
    return _botocore_response(error).get("ResponseMetadata", {}).get("HTTPStatusCode")


def lost_race(error: OSError, tag: str | None) -> bool:
    """Whether a conditional write failed because another writer's came first: S3's 412
    (PreconditionFailed), 409 (ConditionalRequestConflict: retry), or 404 for If-Match (``tag``) on
    an object deleted meanwhile."""
    code = error_code(error)
    if _status(error) in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
        return True
    return tag is not None and isinstance(error, FileNotFoundError)


def check_conditional_writes_once(fs: Any, directory: str) -> None:
    """Write a probe object into ``directory`` twice with ``If-None-Match: *``: a store that honours
    conditional writes refuses the second. Once per bucket and process; raises
    :class:`ConditionalWritesUnsupported` for a store that takes both writes or refuses the header."""
    bucket = fs.split_path(directory)[0]
    store = (fs, bucket)  # fsspec file systems compare and hash by what they were created with
    with _checked_lock:
        if store in _checked_stores:
            return
    probe = f"{directory}/conditional-write-probe-{uuid.uuid4().hex}"
    accepted_twice = False
    try:
        fs.pipe_file(probe, b"", IfNoneMatch="*")
        try:
            fs.pipe_file(probe, b"", IfNoneMatch="*")
            accepted_twice = True
        except OSError as error:
            if not lost_race(error, None):
                raise
    except OSError as error:
        if _status(error) not in (400, 501):  # a store refusing the header says so; other errors are the save's
            raise
        raise ConditionalWritesUnsupported(_NO_CONDITIONAL_WRITES.format(bucket=bucket, why=error)) from error
    finally:
        with contextlib.suppress(OSError):  # never written, or a few bytes left: the check's answer stands
            fs.rm_file(probe)
    if accepted_twice:
        why = "it accepted a second If-None-Match: * write of one object"
        raise ConditionalWritesUnsupported(_NO_CONDITIONAL_WRITES.format(bucket=bucket, why=why))
    with _checked_lock:
        _checked_stores.add(store)


def incomplete_uploads(fs: Any, prefix: str) -> list[IncompleteUpload]:
    """The multipart uploads below ``prefix`` (``bucket/key-prefix``) neither completed nor aborted."""
    bucket, key, _ = fs.split_path(prefix)
    found: list[IncompleteUpload] = []
    page_after: dict[str, str] = {}
    while True:
        page = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key, **page_after)
        found += [
            IncompleteUpload(posixpath.join(bucket, upload["Key"]), upload["UploadId"])
            for upload in page.get("Uploads", [])
        ]
        if not page.get("IsTruncated"):
            return found
        page_after = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}


def abort_upload(fs: Any, upload: IncompleteUpload) -> None:
    bucket, key, _ = fs.split_path(upload.path)
    fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload.upload_id)
