"""Which incarnation of a writer actor this is: its epoch, and whether Ray restarted it.

Sequences are ``(epoch, number)``, and on storage an older sequence never replaces a newer one, so
every incarnation's epoch must sort above its predecessor's. The wall clock alone does not ensure
that: Ray may restart a writer on a node whose clock is behind, and all its saves would then be
dropped as stale. So each incarnation records its epoch in Ray's key-value store (GCS), under the
actor's id, which Ray keeps across restarts; the next one takes ``max(now, recorded + 1)``. Finding
a record is also how an incarnation knows it is a restart (Ray's own flag is deprecated, and
failed open).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from fedckpt import _compat

KV_NAMESPACE = "fedckpt"
# Fault injection for tests: a file holding seconds to add to this node's clock (a node running behind).
CLOCK_OFFSET_FILE_ENV = "FEDCKPT_TEST_CLOCK_OFFSET_FILE"


@dataclass(frozen=True)
class Incarnation:
    epoch: int
    restarted: bool
    previous_node: str | None = None  # where the incarnation before ran (its callers' tickets are there)


def _key(actor_id: str) -> str:
    return f"writer-epoch/{actor_id}"


def _clock_ns() -> int:
    now = time.time_ns()
    offset_file = os.environ.get(CLOCK_OFFSET_FILE_ENV)
    if offset_file:
        with open(offset_file, encoding="utf-8") as file:
            now += int(float(file.read().strip() or 0) * 1e9)
    return now


def begin(actor_id: str, node_id: str | None = None) -> Incarnation:
    """Start an incarnation of actor ``actor_id`` on node ``node_id``: an epoch above any earlier
    incarnation's, recorded with its node."""
    recorded = _compat.ray_kv_get(_key(actor_id), KV_NAMESPACE)
    previous = None if recorded is None else json.loads(recorded)
    if isinstance(previous, int):  # a record of fedckpt 0.1.0's first writers: the epoch alone
        previous = {"epoch": previous, "node": None}
    epoch = _clock_ns() if previous is None else max(_clock_ns(), previous["epoch"] + 1)
    record = json.dumps({"epoch": epoch, "node": node_id})
    _compat.ray_kv_put(_key(actor_id), record, KV_NAMESPACE)
    if previous is None:
        return Incarnation(epoch, restarted=False)
    return Incarnation(epoch, restarted=True, previous_node=previous["node"])


def end(actor_id: str) -> None:
    """The actor is stopped for good: forget its record."""
    _compat.ray_kv_delete(_key(actor_id), KV_NAMESPACE)
