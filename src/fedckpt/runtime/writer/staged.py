"""The writer's access to a save's staged bytes: a caller's shared-memory segment or a Ray object."""

from __future__ import annotations

import ray

from fedckpt.runtime.messages import ObjectStorePayload, Payload, SharedMemoryPayload
from fedckpt.runtime.staging import SegmentReader


class CallerDied(Exception):
    """The snapshot of a save is gone with the process that staged it (a writer on another node
    had not fetched it from Ray's object store yet)."""


class StagedBytes:
    """Maps callers' segments (kept while in use) and fetches object-store snapshots."""

    def __init__(self) -> None:
        self.segments = SegmentReader()

    def map(self, payload: Payload) -> memoryview | None:
        """Map a shared-memory payload's segment now, when the save arrives: a save whose call
        returned stays readable even if its caller dies and another process removes the file."""
        if isinstance(payload, SharedMemoryPayload):
            return self.segments.open(payload.path)
        return None

    async def get(self, payload: Payload, segment: memoryview | None) -> memoryview:
        if isinstance(payload, SharedMemoryPayload):
            assert segment is not None
            return segment[: payload.nbytes]
        assert isinstance(payload, ObjectStorePayload)
        try:
            array = await payload.refs[0]
        except ray.exceptions.ObjectLostError as error:  # OwnerDiedError among them
            raise CallerDied(
                f"its snapshot was lost with its caller before this writer fetched it ({type(error).__name__})"
            ) from error
        return memoryview(array)[: payload.nbytes]

    def finished(self, payload: Payload) -> None:
        if isinstance(payload, SharedMemoryPayload):
            self.segments.finished(payload.path)
