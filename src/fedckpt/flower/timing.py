"""How long a caller waited on fedckpt: the figure a run reports as its checkpointing overhead."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from fedckpt.flower.call_trace import CallTrace, trace_directory


class BlockedTime:
    """Accumulates the seconds spent inside fedckpt calls, in all and by activity (``restore``,
    ``pre_aggregation``, ...), so that a run can tell where its checkpointing time went. With
    ``FEDCKPT_CALL_TRACE`` set, each call is also traced step by step (:mod:`fedckpt.flower.call_trace`)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.by_activity: defaultdict[str, float] = defaultdict(float)
        self._trace_to = trace_directory()

    @contextmanager
    def measure(self, activity: str = "other") -> Iterator[None]:
        trace = None if self._trace_to is None else CallTrace(self._trace_to, activity)
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds += elapsed
            self.by_activity[activity] += elapsed
            if trace is not None:
                trace.end()
