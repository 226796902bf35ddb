"""How long a caller waited on fedckpt: the figure a run reports as its checkpointing overhead."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class BlockedTime:
    """Accumulates the seconds spent inside fedckpt calls."""

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextmanager
    def measure(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start
