"""The writer's counters, kept for ``stats()`` and exported as Ray metrics.

Ray exports them on each node's Prometheus endpoint (and the dashboard's Metrics view) with a
``ray_`` prefix: ``ray_fedckpt_saves_total{outcome="saved"}``, ``ray_fedckpt_bytes_written_total``,
``ray_fedckpt_bytes_linked_total``, ``ray_fedckpt_queue_depth``, ``ray_fedckpt_save_seconds``
(a histogram), ``ray_fedckpt_resends_total``. Every metric is tagged with the writer's pool (its
Ray namespace) and the writer (a home's index, a node writer's name). They need Ray's metrics
agent: ``pip install fedckpt[metrics]``
(``ray[default]``); without it they are counted here only.
"""

from __future__ import annotations

import logging

from ray.util import metrics

from fedckpt.runtime.messages import Outcome

log = logging.getLogger("fedckpt.writer")

# Seconds from a save's arrival at the writer until it left memory: from a small model's
# millisecond to a large model's minute behind a queue.
LATENCY_BOUNDARIES = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0]


class WriterMetrics:
    """Counts outcomes, bytes, re-sends and latency; mirrors each into a Ray metric."""

    def __init__(self, pool: str, writer: str) -> None:
        self.counts = {Outcome.SAVED: 0, Outcome.SUPERSEDED: 0, Outcome.FAILED: 0, Outcome.ABANDONED: 0}
        self.bytes_written = 0
        self.bytes_linked = 0
        self.resends = 0
        self.depth = 0  # saves arrived and not yet finished with
        self._tags = {"pool": pool, "writer": writer}
        keys = ("pool", "writer")
        self._saves = metrics.Counter(
            "fedckpt_saves", "Saves that left the writer, by outcome (saved, superseded, failed, abandoned)",
            tag_keys=(*keys, "outcome"),
        )  # fmt: skip
        self._written = metrics.Counter("fedckpt_bytes_written", "Checkpoint bytes written to storage", tag_keys=keys)
        self._linked = metrics.Counter(
            "fedckpt_bytes_linked", "Checkpoint bytes not written: identical content was linked", tag_keys=keys
        )
        self._resends = metrics.Counter(
            "fedckpt_resends", "Saves received again after the writer's earlier incarnation lost them", tag_keys=keys
        )
        self._queue = metrics.Gauge("fedckpt_queue_depth", "Saves queued or being written", tag_keys=keys)
        self._latency = metrics.Histogram(
            "fedckpt_save_seconds", "Seconds from a save's arrival at the writer until it left memory",
            boundaries=LATENCY_BOUNDARIES, tag_keys=keys,
        )  # fmt: skip

    def arrived(self) -> None:
        self.depth += 1
        self._queue.set(self.depth, self._tags)

    def finished(self, outcome: Outcome, seconds: float) -> None:
        """A save left the writer, ``seconds`` after it arrived."""
        self.depth -= 1
        self._queue.set(self.depth, self._tags)
        self.counts[outcome] += 1
        self._saves.inc(1, {**self._tags, "outcome": outcome})
        if seconds is not None:
            self._latency.observe(seconds, self._tags)

    def persisted(self, nbytes: int, linked: bool) -> None:
        if linked:
            self.bytes_linked += nbytes
            self._linked.inc(nbytes, self._tags)
        else:
            self.bytes_written += nbytes
            self._written.inc(nbytes, self._tags)

    def resent(self) -> None:
        self.resends += 1
        self._resends.inc(1, self._tags)
