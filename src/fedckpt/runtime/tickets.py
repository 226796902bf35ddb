"""Tickets: what a caller sent a writer, kept in the staging segment of the save itself.

A caller writes the ticket (the pool, each key's home and request with its sequence, and the
payload) at the end of the segment after its copy and before it sends the save, and clears it once
every save of the segment is finished. The segment outlives its caller, so a node's ``/dev/shm``
holds every save sent and not known finished, of live callers and of dead ones.

A writer that Ray restarted reads them (:func:`scan`: its own node's, and its node writers read
theirs) and queues what its predecessor was sent before it answers any flush: a flush from any
process then covers the saves of callers that are idle, or dead, without waiting for them to send
those saves again (they do, and the writer takes each save once, by its id).

The end of a segment: ``... | body (pickled Ticket) | trailer (magic, state, body length, checksum)``.
A body is written before its trailer, and a trailer whose checksum does not match is ignored (a
ticket being rewritten: its caller sends the save again once it sees the writer died).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import struct
from dataclasses import dataclass

import xxhash

from fedckpt.runtime.messages import SaveRequest, SharedMemoryPayload

log = logging.getLogger("fedckpt")

TRAILER = struct.Struct("<8sQQQ")  # magic, state, body length, xxh64 of the body
MAGIC = b"fedckpt\x01"
FREE, POSTED = 0, 1
# Room kept at the end of a segment for its ticket, beyond the pickled layout and requests.
SLACK_BYTES = 1024


@dataclass(frozen=True)
class Ticket:
    """The saves of one staged snapshot, as sent to their homes."""

    namespace: str  # the pool's
    homes: dict[int, list[SaveRequest]]  # home index -> the requests sent to it
    payload: SharedMemoryPayload


@dataclass(frozen=True)
class FoundSave:
    request: SaveRequest
    payload: SharedMemoryPayload


def room_for(layout: bytes, requests: list[SaveRequest]) -> int:
    """Bytes to keep at the end of a segment for the ticket of these saves."""
    return len(layout) + len(pickle.dumps(requests, protocol=pickle.HIGHEST_PROTOCOL)) + SLACK_BYTES + TRAILER.size


def write(buffer: memoryview, ticket: Ticket, data_bytes: int) -> bool:
    """Write ``ticket`` at the end of the segment ``buffer`` (whose first ``data_bytes`` are the
    snapshot); False if it does not fit (the save goes on without one: only a restart's recovery
    of it then waits for its caller to send it again)."""
    body = pickle.dumps(ticket, protocol=pickle.HIGHEST_PROTOCOL)
    end = len(buffer) - TRAILER.size
    start = end - len(body)
    if start < data_bytes:
        log.debug("fedckpt: no room for a ticket of %d bytes in a %d-byte segment", len(body), len(buffer))
        clear(buffer)
        return False
    TRAILER.pack_into(buffer, end, MAGIC, FREE, 0, 0)  # a reader never pairs the new body with the old trailer
    buffer[start:end] = body
    TRAILER.pack_into(buffer, end, MAGIC, POSTED, len(body), xxhash.xxh64_intdigest(body))
    return True


def clear(buffer: memoryview) -> None:
    """Every save of the segment is finished: nothing to recover from it."""
    TRAILER.pack_into(buffer, len(buffer) - TRAILER.size, MAGIC, FREE, 0, 0)


def read(path: str) -> Ticket | None:
    """The posted ticket of segment ``path``, or None (free, torn, not a segment, another user's)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if info.st_uid != os.getuid() or info.st_size < TRAILER.size:  # never unpickle another user's bytes
            return None
        magic, state, length, checksum = TRAILER.unpack(os.pread(fd, TRAILER.size, info.st_size - TRAILER.size))
        if magic != MAGIC or state != POSTED or length > info.st_size - TRAILER.size:
            return None
        body = os.pread(fd, length, info.st_size - TRAILER.size - length)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(body) != length or xxhash.xxh64_intdigest(body) != checksum:
        return None
    try:
        ticket = pickle.loads(body)
    except Exception:
        return None
    return ticket if isinstance(ticket, Ticket) else None


def scan(directory: str, prefix: str, namespace: str, home: int, node_id: str) -> list[FoundSave]:
    """The saves posted to home ``home`` of pool ``namespace`` whose segments (``prefix*`` files in
    ``directory``) of node ``node_id`` still hold their tickets, oldest sequence first. (Nodes that
    share one ``/dev/shm``, as a cluster on one machine does, each take only their own.)"""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(directory):
            if not name.startswith(prefix) or "-seq-" in name:
                continue
            ticket = read(os.path.join(directory, name))
            if ticket is None or ticket.namespace != namespace or ticket.payload.node_id != node_id:
                continue
            found += [FoundSave(request, ticket.payload) for request in ticket.homes.get(home, [])]
    return sorted(found, key=lambda save: save.request.sequence or (1 << 64, 0))
