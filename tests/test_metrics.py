"""What a user sees of the runtime: fedckpt.stats(), the writers' Ray metrics on the Prometheus
endpoint of their node (127.0.0.1), and `fedckpt status`."""

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

import pytest
import ray
import torch
from prometheus_client.parser import text_string_to_metric_families

import fedckpt
from fedckpt import LatestTorchModuleCheckpointer, PerRoundStateCheckpointer
from fedckpt.runtime import lifecycle


@pytest.fixture
def metrics_pool(ray_instance):
    """A pool of its own for each test, whose counters start at zero (a stopped writer's series stay
    on the endpoint for a while, under the same labels)."""
    fedckpt.init(namespace=f"fedckpt-metrics-{uuid.uuid4().hex[:8]}", num_writers=2)
    yield lifecycle.coordinator().pool()
    fedckpt.flush()
    lifecycle.coordinator().stop_writers()
    fedckpt.init()


def _save_a_few(directory) -> int:
    """Four model saves (two of them identical content: linked) and two states; returns the saves."""
    model = torch.nn.Linear(128, 128)
    for name in ("a.safetensors", "b.safetensors"):
        checkpointer = LatestTorchModuleCheckpointer(str(directory), name)
        checkpointer.maybe_checkpoint(model, 0.0, {})
        fedckpt.flush()
        checkpointer.maybe_checkpoint(model, 0.0, {})
    states = PerRoundStateCheckpointer(directory)
    for server_round in range(2):
        states.save_checkpoint("state.pt", {"round": server_round, "w": torch.ones(1000)})
    fedckpt.flush()
    return 6


def test_stats_counts_this_process_saves_bytes_and_time(metrics_pool, tmp_path):
    before = fedckpt.stats()
    saves = _save_a_few(tmp_path)
    after = fedckpt.stats()
    assert after.saves - before.saves == saves
    assert after.snapshots - before.snapshots == saves
    # Writers on this node: every byte went through shared memory, none through the object store.
    model_bytes = 128 * 128 * 4 + 128 * 4
    assert after.bytes_shared_memory - before.bytes_shared_memory >= 4 * model_bytes
    assert after.bytes_object_store == before.bytes_object_store
    assert after.blocked_seconds > before.blocked_seconds
    assert after.waited_seconds > before.waited_seconds
    assert after.resends == before.resends


def _scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """The samples on a Prometheus endpoint, summed over Ray's own labels (worker, node, session)."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    samples: dict[tuple[str, frozenset], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith("ray_fedckpt_"):
                continue
            ours = frozenset((k, v) for k, v in sample.labels.items() if k in ("pool", "writer", "outcome", "le"))
            samples[(sample.name, ours)] = samples.get((sample.name, ours), 0.0) + sample.value
    return samples


def _total(samples: dict, pool: str, name: str, **labels: str) -> float:
    """The sum of ``name`` over ``pool`` (and ``labels``); a series never recorded counts 0."""
    wanted = {("pool", pool), *labels.items()}
    return sum(value for (metric, tags), value in samples.items() if metric == name and wanted <= tags)


def test_writer_metrics_reach_the_prometheus_endpoint_of_their_node(metrics_pool, tmp_path):
    saves = _save_a_few(tmp_path)
    stats, pool = metrics_pool.stats(), metrics_pool.namespace
    nodes = {node["NodeID"]: node for node in ray.nodes() if node["Alive"]}
    urls = {f"http://127.0.0.1:{nodes[writer.node_id]['MetricsExportPort']}/metrics" for writer in stats}
    assert all(nodes[writer.node_id]["NodeManagerAddress"] == "127.0.0.1" for writer in stats)
    expected = {
        "ray_fedckpt_saves_total": sum(s.saved + s.superseded + s.failed + s.abandoned for s in stats),
        "ray_fedckpt_bytes_written_total": sum(s.bytes_written for s in stats),
        "ray_fedckpt_bytes_linked_total": sum(s.bytes_linked for s in stats),
        "ray_fedckpt_save_seconds_count": sum(s.saved + s.superseded + s.failed + s.abandoned for s in stats),
    }
    assert expected["ray_fedckpt_saves_total"] == saves and expected["ray_fedckpt_bytes_linked_total"] > 0

    # The writers report every 10 s (Ray's default): poll until their counters are exported.
    deadline = time.monotonic() + 90
    pause = threading.Event()
    while True:
        samples: dict = {}
        for url in urls:
            samples.update(_scrape(url))
        seen = {name: _total(samples, pool, name) for name in expected}
        if seen == expected or time.monotonic() > deadline:
            break
        pause.wait(0.5)  # between scrapes of a 10 s report cycle
    assert seen == expected
    assert _total(samples, pool, "ray_fedckpt_saves_total", outcome="saved") == sum(s.saved for s in stats)
    assert _total(samples, pool, "ray_fedckpt_save_seconds_bucket", le="+Inf") == saves
    assert _total(samples, pool, "ray_fedckpt_queue_depth") == 0  # all written
    assert _total(samples, pool, "ray_fedckpt_resends_total") == 0


def test_status_shows_the_live_pool(metrics_pool, tmp_path):
    _save_a_few(tmp_path)
    address = ray.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "fedckpt.cli", "status", "--address", address, "--interval", "0.1"]
    shown = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=120, check=True)
    rows = [row for row in json.loads(shown.stdout) if row["namespace"] == metrics_pool.namespace]
    stats = metrics_pool.stats()
    assert sorted(row["writer"] for row in rows) == ["0", "1"]
    assert sum(row["stats"]["saved"] for row in rows) == sum(s.saved for s in stats)
    assert {row["node_ip"] for row in rows} == {"127.0.0.1"}
    table = subprocess.run(
        command, capture_output=True, text=True, timeout=120, check=True, env={**os.environ, "COLUMNS": "80"}
    )
    assert f"pool {metrics_pool.namespace}: 2 writer(s)" in table.stdout
    assert all(len(line) <= 80 for line in table.stdout.splitlines())


def test_status_leaves_out_a_writer_that_died_between_listing_and_lookup(metrics_pool):
    """The cluster lists named actors and then looks each up: one gone in between is not an error."""
    from fedckpt.runtime.pool_status import _handle_of

    listed_then_gone = {"name": "fedckpt-writer-0", "namespace": f"gone-{uuid.uuid4().hex[:8]}"}
    assert _handle_of(listed_then_gone) is None
    live = {"name": "fedckpt-writer-0", "namespace": metrics_pool.namespace}
    assert ray.get(_handle_of(live).stats.remote()).saved == 0
