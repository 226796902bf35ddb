"""Persisting one checkpoint version on a local (or shared, POSIX) file system."""

from __future__ import annotations

import os
import time
from typing import Any

from fedckpt.storage import manifest
from fedckpt.storage.atomic import publish, remove_quietly, write_durable_temp
from fedckpt.storage.formats import WRITERS


def persist_checkpoint(
    path: str,
    kind: str,
    layout: dict[str, Any],
    data: memoryview,
    sequence: tuple[int, int],
    score: float | None,
    score_name: str | None,
    writer_name: str,
) -> manifest.ManifestEntry | None:
    """Write a snapshot (its ``layout`` and staged ``data``) atomically and durably at ``path``,
    and record it in the manifest.

    Returns None, leaving the checkpoint untouched, when the version on disk has a newer sequence (a re-sent save
    of a restarted writer must never replace a newer checkpoint).
    """
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    temp, checksum = write_durable_temp(path, lambda target: WRITERS[kind](layout, data, target))
    try:
        with manifest.publishing_lock(path):
            # Checked under the lock: another incarnation of this writer (Ray restarted it while the
            # old one, on a node being lost, still ran) may have published a newer version meanwhile.
            # A stale save (a rare re-send) thus costs a discarded temp file, not a read on every save.
            current = manifest.read_entry_locked(path)
            if current is not None and tuple(current.sequence) > tuple(sequence):
                remove_quietly(temp)
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
        remove_quietly(temp)
        raise
    return entry
