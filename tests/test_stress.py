"""Load: many clients saving from several Ray worker processes at once (short variant for CI).

The full variant (10,000 clients) runs by hand: FEDCKPT_STRESS_CLIENTS=10000 pytest tests/test_stress.py -s
"""

import json
import os

from load import run_stress

import fedckpt
from fedckpt.runtime import lifecycle

CLIENTS = int(os.environ.get("FEDCKPT_STRESS_CLIENTS", "300"))
ROUNDS = int(os.environ.get("FEDCKPT_STRESS_ROUNDS", "3"))


def test_every_final_checkpoint_is_the_newest_and_the_pool_stays_small(runtime, tmp_path):
    # A budget small enough that backpressure engages.
    result = run_stress(str(tmp_path), clients=CLIENTS, rounds=ROUNDS, workers=2, budget=64 << 10)
    print(json.dumps(result.as_dict()))
    assert result.wrong_checkpoints == 0
    assert result.writer_counts["failed"] == result.writer_counts["abandoned"] == 0
    assert result.writer_counts["saved"] + result.writer_counts["superseded"] >= result.saves
    assert 0 < result.peak_inflight_bytes <= result.inflight_budget_bytes
    assert result.writers == lifecycle.coordinator().settings.num_writers  # not one per client
    fedckpt.flush()
