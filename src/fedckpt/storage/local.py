"""Persisting one checkpoint version on a local (or shared, POSIX) file system."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from fedckpt.storage import manifest
from fedckpt.storage.atomic import claim_temp, discard_temp, publish, write_durable_temp
from fedckpt.storage.checksum import checksum_of
from fedckpt.storage.dedup import ContentIndex, link_identical
from fedckpt.storage.formats import MODULE
from fedckpt.storage.formats.safetensors_file import safetensors_header, write_module_file
from fedckpt.storage.formats.torch_zip import write_state_file


@dataclass(frozen=True)
class Persisted:
    """A version now on storage."""

    entry: manifest.ManifestEntry
    linked: bool  # its content was on storage already: hard-linked, not written


def persist_checkpoint(
    path: str,
    kind: str,
    layout: dict[str, Any],
    data: memoryview,
    sequence: tuple[int, int],
    score: float | None,
    score_name: str | None,
    writer_name: str,
    content_index: ContentIndex | None = None,
) -> Persisted | None:
    """Write a snapshot (its ``layout`` and staged ``data``) atomically and durably at ``path``,
    and record it in the manifest.

    A model file's checksum is computed before it is written, and names its content: if
    ``content_index`` knows a checkpoint with that content, the new version is a hard link to it.
    Returns None, leaving the checkpoint untouched, when the version on disk has a newer sequence
    (a re-sent save of a restarted writer must never replace a newer checkpoint).
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if kind != MODULE:
        temp, checksum = write_durable_temp(path, lambda target: write_state_file(layout, data, target))
        return _publish(path, kind, temp, checksum, sequence, score, score_name, writer_name, linked=False)
    header = safetensors_header(layout)
    checksum = checksum_of(header, data)
    if content_index is None:
        temp, _ = write_durable_temp(path, lambda target: write_module_file(header, data, target))
        return _publish(path, kind, temp, checksum, sequence, score, score_name, writer_name, linked=False)
    with content_index.writing(checksum) as candidate:
        linked = False

        def write(temp: str) -> None:
            nonlocal linked
            linked = candidate is not None and link_identical(candidate, checksum, temp)
            if not linked:
                claim_temp(temp)
                write_module_file(header, data, temp)

        temp, _ = write_durable_temp(path, write, claim=False)
        persisted = _publish(path, kind, temp, checksum, sequence, score, score_name, writer_name, linked)
        if persisted is not None:
            content_index.record(checksum, path)
    return persisted


def _publish(
    path: str,
    kind: str,
    temp: str,
    checksum: str,
    sequence: tuple[int, int],
    score: float | None,
    score_name: str | None,
    writer_name: str,
    linked: bool,
) -> Persisted | None:
    """Move a durable temp file into place with its manifest entry, unless a newer version is there."""
    try:
        with manifest.publishing_lock(path):
            # Checked under the lock: another incarnation of this writer (Ray restarted it while the
            # old one, on a node being lost, still ran) may have published a newer version meanwhile.
            # A stale save (a rare re-send) thus costs a discarded temp file, not a read on every save.
            current = manifest.read_entry_locked(path)
            if current is not None and tuple(current.sequence) > tuple(sequence):
                discard_temp(temp)
                return None
            entry = manifest.ManifestEntry(
                name=os.path.basename(path),
                format=kind,
                sequence=tuple(sequence),
                score=score,
                score_name=score_name,
                bytes=os.path.getsize(temp),
                checksum=checksum,
                saved_at=time.time(),
                writer=writer_name,
            )
            manifest.stage_entry(path, entry)
            publish(temp, path)
            manifest.commit_entry(path)
    except BaseException:
        discard_temp(temp)
        raise
    return Persisted(entry, linked)
