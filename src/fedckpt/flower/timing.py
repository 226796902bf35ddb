"""How long a caller waited on fedckpt: the figure a run reports as its checkpointing overhead."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


class BlockedTime:
    """Accumulates the seconds spent inside fedckpt calls, in all and by activity (``restore``,
    ``pre_aggregation``, ...), so that a run can tell where its checkpointing time went."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.by_activity: defaultdict[str, float] = defaultdict(float)

    @contextmanager
    def measure(self, activity: str = "other") -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds += elapsed
            self.by_activity[activity] += elapsed
