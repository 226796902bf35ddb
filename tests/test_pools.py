"""Writer pools on a shared cluster: one per Ray job by default, ended with it; a named one is shared
on purpose; a pool of another version, or with settings other than a process chose, is an error."""

import os
import subprocess
import sys
import time

import pytest
import ray

import fedckpt
from fedckpt.runtime import lifecycle
from fedckpt.runtime.pool import WriterPool
from fedckpt.runtime.settings import Settings

JOB = """
import json, sys, fedckpt
from fedckpt.runtime import lifecycle
states = fedckpt.PerRoundStateCheckpointer(sys.argv[1])
for round_ in range(3):
    states.save_checkpoint("state.pt", {"round": round_})
fedckpt.flush()
pool = lifecycle.coordinator().pool()
stats = lifecycle.coordinator().writer_stats()
print(json.dumps({"namespace": pool.namespace, "pids": [s.pid for s in stats], "saved": sum(s.saved for s in stats)}),
      flush=True)
sys.stdin.read()  # the job runs until the test closes our stdin
"""


def start_job(directory, **env_extra):
    """Another driver on the test's cluster: a Ray job of its own."""
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, **env_extra}
    return subprocess.Popen([sys.executable, "-c", JOB, str(directory)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip


def report(job):
    import json

    line = job.stdout.readline()
    assert line, job.stderr.read()[-3000:]
    return json.loads(line)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_two_jobs_on_one_cluster_get_pools_of_their_own_that_end_with_them(runtime, tmp_path):
    """Neither job's flush (or a round commit, which is a flush) can wait on the other's saves: they
    go to other writers. When a job ends, its pool goes away."""
    first, second = start_job(tmp_path / "a"), start_job(tmp_path / "b")
    try:
        a, b = report(first), report(second)
        assert a["namespace"] != b["namespace"] and not set(a["pids"]) & set(b["pids"])
        assert a["saved"] <= 3 and b["saved"] <= 3  # each pool wrote its own job's saves only
        mine = {stats.pid for stats in lifecycle.coordinator().writer_stats()}
        assert not mine & (set(a["pids"]) | set(b["pids"]))
    finally:
        for job in (first, second):
            job.stdin.close()
            job.wait(timeout=60)
    deadline = time.monotonic() + 60
    while any(alive(pid) for pid in a["pids"] + b["pids"]):
        assert time.monotonic() < deadline, "the pools of ended jobs still run"
        time.sleep(0.1)  # polling a condition, bounded by the deadline
    assert fedckpt.PerRoundStateCheckpointer(tmp_path / "a").load_checkpoint("state.pt")["round"] == 2


def test_a_named_pool_is_shared_by_the_jobs_that_name_it(runtime, tmp_path):
    first = start_job(tmp_path / "a", FEDCKPT_NAMESPACE="fedckpt-shared-by-name")
    second = start_job(tmp_path / "b", FEDCKPT_NAMESPACE="fedckpt-shared-by-name")
    try:
        a, b = report(first), report(second)
        assert a["namespace"] == b["namespace"] == "fedckpt-shared-by-name" and a["pids"] == b["pids"]
    finally:
        for job in (first, second):
            job.stdin.close()
            job.wait(timeout=60)
    assert all(alive(pid) for pid in a["pids"])  # a named pool outlives the jobs
    WriterPool.find(Settings(namespace="fedckpt-shared-by-name")).stop()


def test_a_pool_of_another_version_or_with_other_chosen_settings_is_never_joined_silently(runtime):
    namespace = "fedckpt-settings-check"
    fedckpt.init(namespace=namespace, num_writers=1, io_threads=1)
    try:
        with pytest.raises(fedckpt.CheckpointError, match=r"num_writers=2 \(the pool's: 1\)"):
            fedckpt.init(namespace=namespace, num_writers=2)
        fedckpt.init(namespace=namespace)  # nothing chosen: it takes the pool's settings
        writer = lifecycle.coordinator().writers()[0]
        ray.get(writer.__ray_call__.remote(lambda actor: setattr(actor, "version", "0.0.1")))
        lifecycle.coordinator().forget()
        with pytest.raises(fedckpt.CheckpointError, match="runs fedckpt 0.0.1"):
            fedckpt.init(namespace=namespace)
        ray.get(writer.__ray_call__.remote(lambda actor: setattr(actor, "version", fedckpt.__version__)))
    finally:
        lifecycle.coordinator().forget()
        fedckpt.init(namespace=namespace)
        fedckpt.shutdown()
        fedckpt.init()
