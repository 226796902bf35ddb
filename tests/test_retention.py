"""Retention across rounds: the policies, versioned checkpointers, and deletion in the writer.

Real Ray writers, real files, and moto's S3 server; the writer killed mid-deletion is a SIGKILL of
its process while it is held at the deletion step.
"""

import json
import math
import os
import signal

import pytest
import ray
import torch
from conftest import assert_same_tensors, make_model
from hypothesis import given
from hypothesis import strategies as st

import fedckpt
from fedckpt import (
    BestLossTorchModuleCheckpointer,
    LatestTorchModuleCheckpointer,
    PerRoundStateCheckpointer,
    ScoreError,
)
from fedckpt.cli import main as fedckpt_cli
from fedckpt.retention import AnyOf, BestN, EveryNRounds, LatestN, RetentionPolicy, Version, version_path
from fedckpt.round_table import drop_rounds_after, round_table
from fedckpt.runtime import failpoints, lifecycle
from fedckpt.storage.base import storage_for
from fedckpt.storage.paths import checkpoint_key

# ---- the policies (pure) ---------------------------------------------------------------------------


def versions(*rounds: int, **scores: list[float]) -> list[Version]:
    return [Version(r, {name: values[index] for name, values in scores.items()}) for index, r in enumerate(rounds)]


def test_latest_n_keeps_the_newest_rounds_whatever_their_order():
    assert LatestN(3).keep(versions(5, 1, 4, 2, 3)) == {3, 4, 5}
    assert LatestN(10).keep(versions(1, 2)) == {1, 2}


def test_every_n_rounds_keeps_the_multiples_of_k():
    assert EveryNRounds(10).keep(versions(*range(1, 36))) == {10, 20, 30}
    assert EveryNRounds(1).keep(versions(3, 7)) == {3, 7}


def test_best_n_ranks_by_its_metric_and_breaks_ties_for_the_newer_round():
    losses = versions(1, 2, 3, 4, 5, loss=[0.5, 0.2, 0.9, 0.2, 0.3])
    assert BestN(2).keep(losses) == {2, 4}
    assert BestN(1).keep(losses) == {4}  # 0.2 twice: the newer round wins
    accuracy = versions(1, 2, 3, acc=[0.7, 0.9, 0.9])
    assert BestN(1, metric="acc", mode="max").keep(accuracy) == {3}
    assert BestN(1, metric="acc", mode="min").keep(accuracy) == {1}


def test_best_n_never_keeps_a_nan_score_or_a_version_without_its_metric():
    scored = [Version(1, {"loss": math.nan}), Version(2, {}), Version(3, {"loss": 4.0})]
    assert BestN(2).keep(scored) == {3}


def test_any_of_keeps_what_any_policy_keeps():
    history = versions(*range(1, 13), loss=[float(12 - r) if r != 3 else -1.0 for r in range(1, 13)])
    assert AnyOf(LatestN(2), EveryNRounds(5), BestN(1)).keep(history) == {11, 12, 5, 10, 3}
    assert AnyOf(BestN(1), BestN(1, metric="acc")).metrics() == {"loss", "acc"}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: LatestN(0), "LatestN's n must be a positive int"),
        (lambda: LatestN(2.5), "LatestN's n must be a positive int"),
        (lambda: EveryNRounds(-1), "EveryNRounds' k must be a positive int"),
        (lambda: BestN(1, mode="lowest"), "BestN's mode must be 'min' or 'max'"),
        (lambda: BestN(1, metric=""), "BestN's metric must be a non-empty string"),
        (lambda: AnyOf(), "AnyOf needs at least one policy"),
    ],
)
def test_bad_policies_name_the_problem(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@given(
    st.lists(st.integers(min_value=0, max_value=200), unique=True, max_size=30),
    st.integers(min_value=1, max_value=8),
    st.integers(min_value=1, max_value=8),
)
def test_policies_keep_only_rounds_they_were_shown_and_any_of_is_the_union(rounds, n, k):
    shown = [Version(r, {"loss": float((r * 7919) % 13)}) for r in rounds]
    policies = [LatestN(n), EveryNRounds(k), BestN(n)]
    for policy in policies:
        assert policy.keep(shown) <= set(rounds)
    assert len(LatestN(n).keep(shown)) == min(n, len(rounds))
    assert len(BestN(n).keep(shown)) == min(n, len(rounds))
    assert AnyOf(*policies).keep(shown) == set().union(*(policy.keep(shown) for policy in policies))


# ---- versioned checkpointers -----------------------------------------------------------------------


def test_latest_n_keeps_rounds_beside_the_plain_name_which_holds_the_newest(runtime, tmp_path):
    checkpointer = LatestTorchModuleCheckpointer(str(tmp_path), "global.safetensors", keep=LatestN(3))
    models = {}
    for server_round in range(1, 7):
        models[server_round] = make_model(seed=server_round)
        checkpointer.maybe_checkpoint(models[server_round], 1.0, {}, server_round=server_round)
    checkpointer.flush()
    assert checkpointer.versions() == [4, 5, 6]
    assert sorted(os.listdir(tmp_path)) == [
        ".fedckpt", "global.round-00004.safetensors", "global.round-00005.safetensors",
        "global.round-00006.safetensors", "global.safetensors",
    ]  # fmt: skip
    assert_same_tensors(checkpointer.load_state_dict(), models[6].state_dict())
    for server_round in (4, 5, 6):
        loaded = checkpointer.load_state_dict(server_round=server_round)
        assert_same_tensors(loaded, models[server_round].state_dict())
    # Each of rounds 4 to 6 deleted one version as large as its own (of rounds 1 to 3).
    rows = round_table(str(tmp_path))
    assert [(row.server_round, row.bytes_freed == row.bytes_kept > 0) for row in rows] == [
        (4, True),
        (5, True),
        (6, True),
    ]
    with pytest.raises(FileNotFoundError, match=r"No version of round 2 .* the rounds kept are \[4, 5, 6\]"):
        checkpointer.load_checkpoint(server_round=2)
    # What is kept verifies, and nothing is left of the deleted rounds (no entries, no lock files).
    assert storage_for(str(tmp_path)).verify(str(tmp_path)).problems == []
    control = sorted(os.listdir(tmp_path / ".fedckpt"))
    assert not [name for name in control if "round-0000" in name and not name.startswith(("global.round-00004",
                "global.round-00005", "global.round-00006"))]  # fmt: skip


def test_best_n_keeps_the_best_rounds_even_when_the_newest_is_not_among_them(runtime, tmp_path):
    checkpointer = LatestTorchModuleCheckpointer(str(tmp_path), "global.pt", keep=BestN(2))
    losses = {1: 0.5, 2: 0.2, 3: 0.9, 4: 0.2, 5: 0.3}
    for server_round, loss in losses.items():
        checkpointer.maybe_checkpoint(make_model(seed=server_round), loss, {}, server_round=server_round)
    assert checkpointer.versions() == [2, 4]  # versions() waits for the saves and their deletions
    newest = torch.load(checkpointer.checkpoint_path, weights_only=False)
    assert_same_tensors(newest.state_dict(), make_model(seed=5).state_dict())  # the plain name: round 5
    assert not os.path.exists(version_path(checkpointer.checkpoint_path, 5))


def test_a_best_checkpointer_keeps_its_improvements_and_a_missing_metric_raises_before_saving(runtime, tmp_path):
    checkpointer = BestLossTorchModuleCheckpointer(
        str(tmp_path), "best.safetensors", keep=AnyOf(LatestN(1), BestN(1, metric="acc", mode="max"))
    )
    checkpointer.maybe_checkpoint(make_model(1), 0.5, {"acc": 0.6}, server_round=1)
    checkpointer.maybe_checkpoint(make_model(2), 0.9, {"acc": 0.9}, server_round=2)  # no improvement: not saved
    checkpointer.maybe_checkpoint(make_model(3), 0.4, {"acc": 0.7}, server_round=3)
    with pytest.raises(ScoreError, match="ranks by 'acc'"):
        checkpointer.maybe_checkpoint(make_model(4), 0.1, {}, server_round=4)
    assert checkpointer.best_score == 0.4  # the failed call moved nothing
    assert checkpointer.versions() == [3]  # LatestN(1) and the best accuracy among saved rounds: both 3
    with pytest.raises(ValueError, match="server_round must be a non-negative int"):
        checkpointer.maybe_checkpoint(make_model(5), 0.1, {"acc": 1.0}, server_round=-2)


def test_without_a_policy_one_file_per_name_as_before(runtime, tmp_path):
    checkpointer = LatestTorchModuleCheckpointer(str(tmp_path), "model.pt")
    for server_round in range(1, 4):
        checkpointer.maybe_checkpoint(make_model(server_round), 1.0, {}, server_round=server_round)
    assert checkpointer.versions() == []
    assert sorted(os.listdir(tmp_path)) == [".fedckpt", "model.pt"]


def test_state_versions_are_numbered_per_name_without_a_round_and_ranked_by_their_own_entries(runtime, tmp_path):
    counted = PerRoundStateCheckpointer(tmp_path, keep=EveryNRounds(2))
    for step in range(1, 6):  # 5 is not kept, and the next save is 6 all the same
        counted.save_checkpoint("counted.pt", {"step": step, "x": torch.full((4,), step)})
    assert counted.versions("counted.pt") == [2, 4]
    assert counted.load_checkpoint("counted.pt", server_round=4)["step"] == 4
    assert counted.load_checkpoint("counted.pt")["step"] == 5
    # A new checkpointer (a new process, say) goes on numbering after the newest kept version.
    again = PerRoundStateCheckpointer(tmp_path, keep=EveryNRounds(2))
    again.save_checkpoint("counted.pt", {"step": 6})
    assert again.versions("counted.pt") == [2, 4, 6]  # numbered 6, after the plain name's 5
    ranked = PerRoundStateCheckpointer(tmp_path, keep=BestN(1, metric="val_loss"))
    ranked.save_checkpoint("ranked.pt", {"val_loss": 0.3}, server_round=1)
    ranked.save_checkpoint("ranked.pt", {"val_loss": 0.1}, 2)  # the positional round of FL4Health 0.3 code
    ranked.save_checkpoint("ranked.pt", {"val_loss": 0.2}, server_round=3)
    with pytest.raises(ScoreError, match="ranks by 'val_loss'"):
        ranked.save_checkpoint("ranked.pt", {"loss": 0.0}, server_round=4)
    assert ranked.versions("ranked.pt") == [2]
    assert ranked.load_checkpoint("ranked.pt", server_round=2)["val_loss"] == 0.1
    assert ranked.saved_round("ranked.pt") == 3


def test_a_save_of_an_older_round_drops_the_rounds_of_the_run_it_abandoned(runtime, tmp_path):
    """A run resumed from round 3 saves round 4 again: rounds 5 and 6 of the abandoned run go, and the
    round it resumed from stays."""
    states = PerRoundStateCheckpointer(tmp_path, keep=LatestN(3))
    for server_round in range(1, 7):
        states.save_checkpoint("server.pt", {"round": server_round, "run": "first"}, server_round=server_round)
    assert states.versions("server.pt") == [4, 5, 6]
    states.save_checkpoint("server.pt", {"round": 4, "run": "resumed"}, server_round=4)
    assert states.versions("server.pt") == [4]  # LatestN(3) of rounds <= 4 that are still here
    assert states.load_checkpoint("server.pt", server_round=4)["run"] == "resumed"
    assert states.load_checkpoint("server.pt")["run"] == "resumed"


def test_dedup_links_survive_the_deletion_of_another_names_versions(runtime, tmp_path):
    """Ten clients' copies of one global model are links to one file; each name's versions are links
    too. Deleting client 0's old rounds leaves every other name's file (the same inode) intact."""
    clients = [
        LatestTorchModuleCheckpointer(str(tmp_path), f"client_{index}_post.safetensors", keep=LatestN(1))
        for index in range(4)
    ]
    global_models = {server_round: make_model(seed=1000 + server_round) for server_round in (1, 2)}
    for client in clients:
        client.maybe_checkpoint(global_models[1], 1.0, {}, server_round=1)
    fedckpt.flush()
    first = {client.checkpoint_path: os.stat(version_path(client.checkpoint_path, 1)).st_ino for client in clients}
    assert len(set(first.values())) == 1  # one file for every name and version of round 1
    clients[0].maybe_checkpoint(global_models[2], 1.0, {}, server_round=2)
    assert clients[0].versions() == [2]
    for client in clients[1:]:
        assert client.versions() == [1]
        assert_same_tensors(client.load_state_dict(server_round=1), global_models[1].state_dict())
        assert_same_tensors(client.load_state_dict(), global_models[1].state_dict())
    assert storage_for(str(tmp_path)).verify(str(tmp_path)).problems == []


@ray.remote(num_cpus=0)
class Rendezvous:
    """A point another process reached: ``arrive`` from there, ``arrived`` here."""

    def __init__(self) -> None:
        import asyncio

        self.reached = asyncio.Event()

    async def arrive(self) -> None:
        self.reached.set()

    async def arrived(self) -> None:
        await self.reached.wait()


def test_a_writer_killed_mid_deletion_keeps_every_kept_version_and_the_deletion_is_finished(ray_instance, tmp_path):
    fedckpt.init(namespace="fedckpt-retention-kill", num_writers=1)
    try:
        states = PerRoundStateCheckpointer(tmp_path, keep=LatestN(5))
        for server_round in range(1, 6):
            states.save_checkpoint("state.pt", {"round": server_round}, server_round=server_round)
        assert states.versions("state.pt") == [1, 2, 3, 4, 5]
        pool = lifecycle.coordinator().pool()
        writer = pool.handles[pool.owner_of(checkpoint_key(str(tmp_path / "state.pt")))]
        pid = ray.get(writer.stats.remote()).pid
        rendezvous = Rendezvous.remote()
        # A resume from round 1: its save drops rounds 2 to 5. The first deletion goes through; the
        # writer is killed at the second.
        ray.get(writer.__ray_call__.remote(failpoints.meet_in_actor, "retention.removing", rendezvous, 1))
        states.save_checkpoint("state.pt", {"round": 1, "run": "resumed"}, server_round=1)
        ray.get(rendezvous.arrived.remote())
        os.kill(pid, signal.SIGKILL)
        on_disk = sorted(name for name in os.listdir(tmp_path) if name.startswith("state.round-"))
        assert on_disk == [f"state.round-0000{r}.pt" for r in (1, 3, 4, 5)]  # round 2 went; the kill came at 3
        for r in (1, 3, 4, 5):
            kept = torch.load(tmp_path / f"state.round-0000{r}.pt", weights_only=False)
            assert kept["round"] == r
        assert torch.load(tmp_path / "state.round-00001.pt", weights_only=False)["run"] == "resumed"
        # The save is sent again to the restarted writer, whose deletion step starts afresh.
        assert states.versions("state.pt") == [1]
        states.save_checkpoint("state.pt", {"round": 2, "run": "resumed"}, server_round=2)
        assert states.versions("state.pt") == [1, 2]
        assert storage_for(str(tmp_path)).verify(str(tmp_path)).problems == []
        assert ray.get(writer.describe.remote()).pid != pid
    finally:
        fedckpt.init()


def test_a_deletion_cut_off_between_file_and_entry_is_finished_by_the_next_save(runtime, tmp_path):
    states = PerRoundStateCheckpointer(tmp_path, keep=LatestN(2))
    for server_round in (1, 2):
        states.save_checkpoint("s.pt", {"round": server_round}, server_round=server_round)
    assert states.versions("s.pt") == [1, 2]
    os.remove(version_path(str(tmp_path / "s.pt"), 1))  # what a crash after the file's removal leaves
    assert states.versions("s.pt") == [2]  # an entry without its file is not a version
    states.save_checkpoint("s.pt", {"round": 3}, server_round=3)
    assert states.versions("s.pt") == [2, 3]
    assert not os.path.exists(tmp_path / ".fedckpt" / "s.round-00001.pt.json")


class KeepOdd(RetentionPolicy):
    """A user's own policy, defined in the test module (pickled by value to the writer)."""

    def keep(self, versions):
        return {version.round for version in versions if version.round % 2}


def test_a_users_own_policy_decides_in_the_writer(runtime, tmp_path):
    checkpointer = LatestTorchModuleCheckpointer(str(tmp_path), "m.safetensors", keep=KeepOdd())
    for server_round in range(1, 6):
        checkpointer.maybe_checkpoint(make_model(server_round), 1.0, {}, server_round=server_round)
    assert checkpointer.versions() == [1, 3, 5]


def test_keep_takes_a_policy_only(tmp_path):
    with pytest.raises(TypeError, match="keep= takes a retention policy"):
        LatestTorchModuleCheckpointer(str(tmp_path), "m.pt", keep=3)


# ---- S3 --------------------------------------------------------------------------------------------


def test_versions_on_s3_are_kept_and_deleted_with_nothing_left_over(s3_dir, s3_server):
    model_checkpointer = LatestTorchModuleCheckpointer(s3_dir, "global.safetensors", keep=LatestN(2))
    states = PerRoundStateCheckpointer(s3_dir, keep=AnyOf(LatestN(1), EveryNRounds(3)))
    for server_round in range(1, 7):
        model_checkpointer.maybe_checkpoint(make_model(server_round), 1.0, {}, server_round=server_round)
        states.save_checkpoint("state.pt", {"round": server_round}, server_round=server_round)
    assert model_checkpointer.versions() == [5, 6]
    assert states.versions("state.pt") == [3, 6]
    assert_same_tensors(model_checkpointer.load_state_dict(server_round=5), make_model(5).state_dict())
    assert states.load_checkpoint("state.pt", server_round=3)["round"] == 3
    report = storage_for(s3_dir).verify(s3_dir)
    assert report.problems == [] and report.leftovers == []
    fs = storage_for(s3_dir).fs
    kept_objects = [key for key in fs.find(s3_dir) if "/versions/" in key]
    assert len(kept_objects) == 2 + 2 + 1 + 1  # the kept rounds and the two plain names, one object each


def test_a_bad_round_raises_whether_or_not_the_checkpointer_saves(tmp_path):
    best = BestLossTorchModuleCheckpointer(str(tmp_path), "best.pt", keep=BestN(1))
    best.best_score = 0.1
    assert best.decide(0.5, {}, server_round=3) is None  # no improvement: no save
    with pytest.raises(ValueError, match="server_round must be a non-negative int, got '3'"):
        best.decide(0.5, {}, server_round="3")


# ---- complete rounds and resuming from one ---------------------------------------------------------


def test_the_round_table_tells_complete_rounds_and_resume_refuses_the_others(runtime, tmp_path, capsys):
    from fedckpt.flower import ServerCheckpoints
    from fedckpt.server_module import ServerCheckpointAndStateModule

    server = PerRoundStateCheckpointer(tmp_path / "server", keep=LatestN(5))
    clients = [
        PerRoundStateCheckpointer(tmp_path / "clients" / "client_0", keep=LatestN(5)),
        PerRoundStateCheckpointer(tmp_path / "clients" / "client_1", keep=LatestN(1)),  # keeps its newest only
    ]
    for server_round in (1, 2, 3):
        for client in clients:
            client.save_checkpoint("client_state.pt", {"round": server_round}, server_round=server_round)
        fedckpt.flush()
        state = server.snapshot_checkpoint("server_state.pt", {"server_round": server_round})
        server.save_snapshot(state, server_round, round_clients=2)
    fedckpt.flush()
    rows = round_table(str(tmp_path), "server/server_state.pt")
    assert [(row.server_round, row.complete, row.clients_kept, row.clients_committed) for row in rows] == [
        (1, False, 1, 2), (2, False, 1, 2), (3, True, 2, 2)
    ]  # fmt: skip
    assert all(row.bytes_kept > 0 for row in rows)
    assert fedckpt_cli(["ls", "--rounds", str(tmp_path), "--server-state", "server/server_state.pt", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(row["server_round"], row["complete"]) for row in listed] == [(1, False), (2, False), (3, True)]

    module = ServerCheckpointAndStateModule(model=make_model(), state_checkpointer=server)
    checkpoints = ServerCheckpoints(module, clients_dir=str(tmp_path / "clients"))
    assert [row.server_round for row in checkpoints.rounds() if row.complete] == [3]
    with pytest.raises(ValueError, match=r"Round 2 cannot be resumed from: 1 of its 2 client states are kept; "
                                         r"complete rounds: \[3\]"):  # fmt: skip
        checkpoints.resume(round=2)
    with pytest.raises(ValueError, match="Round 7 cannot be resumed from: no version of it is kept"):
        checkpoints.resume(round=7)
    assert checkpoints.resume() == 3


def test_drop_rounds_after_deletes_the_later_versions_of_every_checkpoint_below_a_directory(runtime, tmp_path):
    states = PerRoundStateCheckpointer(tmp_path, keep=LatestN(9))
    model = LatestTorchModuleCheckpointer(str(tmp_path / "c0"), "pre.safetensors", keep=LatestN(9))
    for server_round in range(1, 5):
        states.save_checkpoint("c0/state.pt", {"round": server_round}, server_round=server_round)
        model.maybe_checkpoint(make_model(server_round), 1.0, {}, server_round=server_round)
    fedckpt.flush()
    dropped = drop_rounds_after(str(tmp_path), 2)
    assert [os.path.basename(path) for path in dropped] == [
        "pre.round-00003.safetensors", "pre.round-00004.safetensors", "state.round-00003.pt", "state.round-00004.pt"
    ]  # fmt: skip
    assert states.versions("c0/state.pt") == [1, 2] and model.versions() == [1, 2]
    assert storage_for(str(tmp_path)).verify(str(tmp_path)).problems == []
