"""Which writer a key belongs to: the same answer in every process, on every node, in every run."""

from __future__ import annotations

import functools
import hashlib


@functools.lru_cache(maxsize=1 << 16)  # every save asks; a run has a bounded set of checkpoint keys
def shard_of(key: str, shards: int) -> int:
    """The index, below ``shards``, of the writer that owns ``key``."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") % shards
