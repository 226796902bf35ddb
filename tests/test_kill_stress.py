"""A writer SIGKILLed over and over under a stream of saves, on local files and on S3: no save is
lost, none is left pending, and a flush always means durable.

Long (about 5 to 10 minutes per storage on 2 cores), so marked ``slow`` and outside the default run:

    .venv/bin/python -m pytest -m slow tests/test_kill_stress.py

``FEDCKPT_KILL_CYCLES`` sets the number of kills (200 by default).
"""

import os
import random
import signal
import sys

import pytest
import ray
import torch

import fedckpt
from fedckpt import PerRoundStateCheckpointer
from fedckpt.runtime import lifecycle
from fedckpt.runtime.pool import writer_name

CYCLES = int(os.environ.get("FEDCKPT_KILL_CYCLES", "200"))
KEYS = [f"k{index}.pt" for index in range(4)]
NUMEL = 1 << 20  # 8 MB of int64 per save: some are queued, some being written, at each kill
FLUSH_SECONDS = 120.0


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("storage", ["local", "s3"])
def test_a_writer_killed_again_and_again_loses_no_save_and_leaves_nothing_pending(
    ray_instance, request, tmp_path, storage
):
    options = {}
    directory = str(tmp_path)
    if storage == "s3":
        server = request.getfixturevalue("s3_server")
        options = server.options()
        directory = f"s3://{server.new_bucket()}/stress"
    namespace = f"fedckpt-kill-stress-{storage}"
    fedckpt.init(namespace=namespace, num_writers=1, io_threads=2, storage_options=options)
    try:
        writer = ray.get_actor(writer_name(0), namespace=namespace)
        states = PerRoundStateCheckpointer(directory)
        chooser = random.Random(23)
        resends = 0
        for cycle in range(CYCLES):
            kill_after = chooser.randrange(len(KEYS) + 1)  # how many saves of the cycle go before the kill
            pid = ray.get(writer.stats.remote(), timeout=FLUSH_SECONDS).pid  # after the last restart
            for index, key in enumerate(KEYS):
                if index == kill_after:
                    os.kill(pid, signal.SIGKILL)
                states.save_checkpoint(key, {"v": cycle, "x": torch.full((NUMEL,), cycle)})
            if kill_after == len(KEYS):
                os.kill(pid, signal.SIGKILL)
            fedckpt.flush(timeout=FLUSH_SECONDS)
            stats = fedckpt.stats()
            assert (stats.pending_saves, stats.pending_bytes) == (0, 0), f"cycle {cycle}: {stats}"
            for key in KEYS:
                state = states.load_checkpoint(key)
                assert state["v"] == cycle and bool(torch.all(state["x"] == cycle)), f"cycle {cycle}: {key}"
            resends = stats.resends
            if cycle % 20 == 19:
                print(f"[{storage}] {cycle + 1}/{CYCLES} kills: every save on storage, nothing pending, "
                      f"{resends} saves sent again so far", file=sys.stderr, flush=True)  # fmt: skip
        assert lifecycle.coordinator().inflight_bytes() == 0
    finally:
        lifecycle.coordinator().stop_writers()
        fedckpt.init(storage_options={})
