"""The server module, best scores carried across runs, client state slots and stale temp files."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import assert_same_tensors, make_model
from flwr.app import ArrayRecord
from flwr.common import ndarrays_to_parameters
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedckpt
from fedckpt import (
    BestLossTorchModuleCheckpointer,
    LatestTorchModuleCheckpointer,
    PerRoundStateCheckpointer,
    ServerCheckpointAndStateModule,
)
from fedckpt.cli import main as fedckpt_cli
from fedckpt.flower import ClientCheckpoints
from fedckpt.flower.client import SLOTS
from fedckpt.storage import atomic
from fedckpt.storage.paths import temp_file_owner, temp_path
from fedckpt.storage.reading import read_state_dict


def server_module(directory, model=None):
    return ServerCheckpointAndStateModule(
        model=model if model is not None else make_model(0),
        model_checkpointers=[
            LatestTorchModuleCheckpointer(str(directory), "latest.safetensors"),
            BestLossTorchModuleCheckpointer(str(directory), "best.safetensors"),
        ],
        state_checkpointer=PerRoundStateCheckpointer(str(directory)),
    )


@pytest.mark.parametrize("kind", ["ArrayRecord", "Parameters", "list", "state_dict"])
def test_server_checkpoints_every_kind_of_flower_parameters(runtime, tmp_path, kind):
    source = make_model(7)
    expected = {name: tensor.clone() for name, tensor in source.state_dict().items()}
    ndarrays = [tensor.numpy() for tensor in expected.values()]
    parameters = {
        "ArrayRecord": lambda: ArrayRecord(source.state_dict()),
        "Parameters": lambda: ndarrays_to_parameters(ndarrays),
        "list": lambda: ndarrays,
        "state_dict": lambda: expected,
    }[kind]()
    module = server_module(tmp_path)
    module.maybe_checkpoint(parameters, loss=0.5, metrics={})
    module.flush()
    for name in ("latest.safetensors", "best.safetensors"):
        assert_same_tensors(read_state_dict(str(tmp_path / name)), expected)
    assert module.model_checkpointers[1].best_score == 0.5


def test_server_module_rejects_bad_setups_and_parameters(runtime, tmp_path):
    with pytest.raises(ValueError, match="no model"):
        ServerCheckpointAndStateModule(model_checkpointers=LatestTorchModuleCheckpointer(str(tmp_path), "a"))
    with pytest.raises(ValueError, match="should be unique"):
        ServerCheckpointAndStateModule(
            model=make_model(0),
            model_checkpointers=[
                LatestTorchModuleCheckpointer(str(tmp_path), "same"),
                BestLossTorchModuleCheckpointer(str(tmp_path), "same"),
            ],
        )
    stateless = ServerCheckpointAndStateModule(model=make_model(0))
    with pytest.raises(ValueError, match="no state checkpointer"):
        stateless.save_state("s.pt", {"round": 1})
    with pytest.raises(ValueError, match="no state checkpointer"):
        stateless.maybe_load_state("s.pt")
    stateless.maybe_checkpoint([np.zeros(1)], 1.0, {})  # no checkpointers: nothing to do, no error
    module = server_module(tmp_path)
    with pytest.raises(ValueError, match="Got 1 arrays for a model with 5 state-dict entries"):
        module.maybe_checkpoint([np.zeros(3)], 1.0, {})
    with pytest.raises(TypeError, match="got str"):
        module.maybe_checkpoint("weights", 1.0, {})
    assert not os.path.exists(tmp_path / "latest.safetensors")


def test_server_state_round_trip(runtime, tmp_path):
    module = server_module(tmp_path)
    assert module.maybe_load_state("server.pt") is None
    arrays = {"w": torch.arange(6.0).reshape(2, 3)}
    module.save_state("server.pt", {"server_round": 4, "arrays": arrays, "history": {1: {"loss": 0.3}}})
    loaded = module.maybe_load_state("server.pt")  # read-your-writes: no flush needed
    assert loaded["server_round"] == 4 and loaded["history"] == {1: {"loss": 0.3}}
    assert_same_tensors(loaded["arrays"], arrays)


def test_a_new_best_loss_checkpointer_resumes_the_bar_from_disk(runtime, tmp_path):
    first = BestLossTorchModuleCheckpointer(str(tmp_path), "best.safetensors")
    first.maybe_checkpoint(make_model(1), loss=0.5, metrics={})
    # A new process, round or run builds the checkpointer anew: it must not replace the better model.
    second = BestLossTorchModuleCheckpointer(str(tmp_path), "best.safetensors")
    assert second.best_score is None
    assert second.resume_best_score() == 0.5
    second.maybe_checkpoint(make_model(2), loss=0.7, metrics={})
    assert_same_tensors(second.load_state_dict(), make_model(1).state_dict())
    second.maybe_checkpoint(make_model(3), loss=0.4, metrics={})
    assert_same_tensors(second.load_state_dict(), make_model(3).state_dict())
    # A checkpoint of another score (or none yet) leaves the bar alone.
    fresh = BestLossTorchModuleCheckpointer(str(tmp_path), "other.safetensors")
    assert fresh.resume_best_score() is None
    assert LatestTorchModuleCheckpointer(str(tmp_path), "best.safetensors").resume_best_score() is None


def test_client_checkpoints_rebuilt_every_round_keep_the_best_model_and_read_its_score_only_to_save(runtime, tmp_path):
    """A ClientApp builds its ClientCheckpoints anew in every handler: the best-loss bar comes back
    from storage on the first pre-aggregation save, and an evaluate handler, which saves only the
    post-aggregation checkpoint, never reads the pre-aggregation one."""
    directory = str(tmp_path / "client_0")

    def checkpoints() -> ClientCheckpoints:
        return ClientCheckpoints(
            directory,
            pre_aggregation=BestLossTorchModuleCheckpointer(directory, "pre_best.pt"),
            post_aggregation=LatestTorchModuleCheckpointer(directory, "post_latest.pt"),
        )

    checkpoints().after_local_training(make_model(1), 0.5, {}, server_round=1)
    evaluate = checkpoints()
    evaluate.after_receiving_global_model(make_model(2), 0.6, {}, server_round=1)
    assert evaluate.module.pre_aggregation[0].best_score is None  # not read: this handler does not save it
    assert "pre_aggregation" not in evaluate.blocked.by_activity
    worse = checkpoints()
    worse.after_local_training(make_model(3), 0.7, {}, server_round=2)  # reads the bar 0.5: no save
    assert worse.module.pre_aggregation[0].best_score == 0.5
    better = checkpoints()
    better.after_local_training(make_model(4), 0.4, {}, server_round=3)
    fedckpt.flush()
    assert_same_tensors(
        torch.load(f"{directory}/pre_best.pt", weights_only=False).state_dict(), make_model(4).state_dict()
    )
    assert_same_tensors(
        torch.load(f"{directory}/post_latest.pt", weights_only=False).state_dict(), make_model(2).state_dict()
    )
    assert better.module.pre_aggregation[0].best_score == 0.4


def test_a_train_handler_reads_its_best_score_while_it_trains_and_a_failed_read_fails_the_save(runtime, tmp_path):
    """A handler that restores its state trains next: its pre-aggregation checkpointers' scores are read
    on a background thread from the restore on, and the save after training waits for that read (its
    error raised there, nothing saved). A latest-model checkpointer has no score to read."""
    from fedckpt.storage.paths import Location

    directory = str(tmp_path / "client_0")

    def checkpoints() -> ClientCheckpoints:
        return ClientCheckpoints(
            directory,
            pre_aggregation=[
                BestLossTorchModuleCheckpointer(directory, "pre_best.pt"),
                LatestTorchModuleCheckpointer(directory, "pre_latest.pt"),
            ],
        )

    first = checkpoints()
    assert first.restore_state(1) is None
    first.after_local_training(make_model(1), 0.5, {}, server_round=1)
    first.save_state(1)
    train = checkpoints()
    assert train.restore_state(2)["server_round"] == 1
    reading = train._reading_scores
    assert reading is not None
    reading.result(timeout=60)  # done in the background, with no save called
    assert [checkpointer.best_score for checkpointer in train.module.pre_aggregation] == [0.5, None]
    train.after_local_training(make_model(2), 0.7, {}, server_round=2)  # worse: only the latest is saved
    assert train._reading_scores is None
    fedckpt.flush()
    assert_same_tensors(
        torch.load(f"{directory}/pre_best.pt", weights_only=False).state_dict(), make_model(1).state_dict()
    )
    assert_same_tensors(
        torch.load(f"{directory}/pre_latest.pt", weights_only=False).state_dict(), make_model(2).state_dict()
    )

    entry = str(Location.of(f"{directory}/pre_best.pt").entry)
    with open(entry, "w") as file:
        file.write("{not an entry")  # the score cannot be read
    broken = checkpoints()
    broken.restore_state(3)  # the restore itself reads no score
    with pytest.raises(ValueError):
        broken.after_local_training(make_model(3), 0.1, {}, server_round=3)
    fedckpt.flush()
    assert_same_tensors(
        torch.load(f"{directory}/pre_best.pt", weights_only=False).state_dict(), make_model(1).state_dict()
    )


def test_round_one_restores_nothing_and_reads_nothing(runtime, tmp_path):
    """Flower numbers rounds from 1: a run's first round has no earlier round to restore, so it reads
    neither slot, even where an earlier run left states (here with entries no longer readable)."""
    from fedckpt.storage.paths import Location

    directory = str(tmp_path / "client_0")
    for server_round in (1, 2):
        ClientCheckpoints(directory).save_state(server_round, steps=server_round)
    fedckpt.flush()
    for slot in SLOTS:
        with open(str(Location.of(f"{directory}/client_state.{slot}.pt").entry), "w") as file:
            file.write("{not an entry")
    assert ClientCheckpoints(directory).restore_state(1) is None
    with pytest.raises(ValueError):
        ClientCheckpoints(directory).restore_state(4)  # a later round reads them (round 3's slot is gone)


def test_client_state_slots_restore_the_newest_earlier_round(runtime, tmp_path):
    def optimizer_with_momentum(value):
        parameter = torch.nn.Parameter(torch.zeros(4))
        optimizer = torch.optim.SGD([parameter], lr=0.1, momentum=0.9)
        parameter.grad = torch.full((4,), float(value))
        optimizer.step()
        return optimizer

    def momentum(optimizer):
        return optimizer.state_dict()["state"][0]["momentum_buffer"]

    directory = str(tmp_path / "client_0")
    assert ClientCheckpoints(directory).restore_state(1) is None
    for server_round in (1, 2):  # each round a new helper, as in a ClientApp
        ClientCheckpoints(directory).save_state(server_round, optimizer_with_momentum(server_round), steps=server_round)
    fresh = optimizer_with_momentum(0)
    state = ClientCheckpoints(directory).restore_state(3, fresh)
    assert state["server_round"] == 2 and state["steps"] == 2
    assert torch.equal(momentum(fresh), torch.full((4,), 2.0))
    # Round 3 was interrupted after its save; the run resumes at round 3: it starts from round 2 again.
    ClientCheckpoints(directory).save_state(3, optimizer_with_momentum(3), steps=3)
    again = ClientCheckpoints(directory)
    assert again.restore_state(3)["server_round"] == 2
    again.save_state(3, optimizer_with_momentum(33), steps=3)  # overwrites the abandoned round 3
    assert ClientCheckpoints(directory).restore_state(4)["steps"] == 3
    restored = optimizer_with_momentum(0)
    ClientCheckpoints(directory).restore_state(4, restored)
    assert torch.equal(momentum(restored), torch.full((4,), 33.0))
    kept = ClientCheckpoints(directory)
    assert kept.blocked_seconds == 0  # opening reads nothing
    assert kept.restore_state(3)["server_round"] == 2  # round 2 was kept
    assert kept.blocked_seconds == kept.blocked.by_activity["restore"] > 0


def test_client_state_slots_record_their_round_and_older_slots_are_still_read(runtime, tmp_path, capsys):
    """A slot's manifest entry holds the round of the state in it (``fedckpt ls`` shows it), so a
    restore picks the newer slot without loading both. Slots saved without it (by hand, or by
    earlier versions) are read to find their round."""
    directory = str(tmp_path / "client_0")
    for server_round in (1, 2):
        ClientCheckpoints(directory).save_state(server_round, _optimizer_with_momentum(server_round))
    fedckpt.flush()
    states = PerRoundStateCheckpointer(directory)
    assert sorted(states.saved_round(f"client_state.{slot}.pt") for slot in (0, 1)) == [1, 2]
    capsys.readouterr()
    assert fedckpt_cli(["ls", directory, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted(entry["score"] for entry in listed) == [1.0, 2.0]
    assert {entry["score_name"] for entry in listed} == {"server_round"}

    by_hand = str(tmp_path / "client_1")  # slots as a plain PerRoundStateCheckpointer writes them
    plain = PerRoundStateCheckpointer(by_hand)
    plain.save_checkpoint("client_state.0.pt", {"server_round": 5, "steps": 50})
    plain.save_checkpoint("client_state.1.pt", {"server_round": 4, "steps": 40})
    assert plain.saved_round("client_state.0.pt") is None
    assert ClientCheckpoints(by_hand).restore_state(6)["steps"] == 50
    assert ClientCheckpoints(by_hand).restore_state(5)["steps"] == 40


ROUND_EVENTS = ("takes part", "skips", "crashes after saving")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(ROUND_EVENTS), min_size=1, max_size=10))
def test_client_state_slots_restore_the_newest_earlier_state_whatever_rounds_a_client_takes_part_in(
    runtime, tmp_path_factory, events
):
    """Whichever rounds a client skips, and whichever round runs again after a crash, a restore returns
    the state saved last in the newest earlier round, and a round run again starts where it started."""
    directory = str(tmp_path_factory.mktemp("client"))
    saved: dict[int, int] = {}  # round -> the steps of the state saved last in it

    def expected(server_round):
        earlier = [r for r in saved if r < server_round]
        return saved[max(earlier)] if earlier else None

    for server_round, event in enumerate(events, start=1):
        if event == "skips":
            continue
        handler = ClientCheckpoints(directory)  # one train handler: restore, train, save
        restored = handler.restore_state(server_round)
        assert (restored and restored["steps"]) == expected(server_round)
        handler.save_state(server_round, steps=server_round * 10)
        saved[server_round] = server_round * 10
        if event == "crashes after saving":  # the run resumes at this round: it runs again
            again = ClientCheckpoints(directory)
            restored = again.restore_state(server_round)
            assert (restored and restored["steps"]) == expected(server_round)
            again.save_state(server_round, steps=server_round * 10 + 1)
            saved[server_round] = server_round * 10 + 1
    fedckpt.flush()


def test_a_client_in_every_round_keeps_each_rounds_state_in_the_slot_of_its_parity(runtime, tmp_path):
    """The layout a restore reads first: the previous round's state in the slot of that round's parity."""
    directory = tmp_path / "client_0"
    for server_round in range(1, 6):
        handler = ClientCheckpoints(str(directory))
        assert (handler.restore_state(server_round) or {}).get("server_round") == (server_round - 1 or None)
        handler.save_state(server_round, _optimizer_with_momentum(server_round))
    fedckpt.flush()
    slots = {slot: torch.load(directory / f"client_state.{slot}.pt", weights_only=False) for slot in (0, 1)}
    assert {slot: state["server_round"] for slot, state in slots.items()} == {0: 4, 1: 5}


@pytest.mark.parametrize("numel", [16, 1 << 20])  # 64 B and 4 MB: read in full, and mapped then copied
def test_a_restored_client_state_is_in_memory_whatever_its_size(runtime, tmp_path, numel):
    directory = str(tmp_path / "client_0")
    ClientCheckpoints(directory).save_state(1, None, weights=torch.arange(numel, dtype=torch.float32))
    restored = ClientCheckpoints(directory).restore_state(2)
    assert torch.equal(restored["weights"], torch.arange(numel, dtype=torch.float32))
    assert not in_a_mapping_of(restored["weights"], directory)  # the optimizer would fault pages in


def in_a_mapping_of(tensor: torch.Tensor, directory: str) -> bool:
    """Whether ``tensor``'s memory lies in a mapping of a file under ``directory`` (/proc/self/maps)."""
    address = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip().startswith(os.path.realpath(directory)):
                start, end = (int(bound, 16) for bound in fields[0].split("-"))
                if start <= address < end:
                    return True
    return False


def _optimizer_with_momentum(value: float) -> torch.optim.Optimizer:
    parameter = torch.nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.SGD([parameter], lr=0.1, momentum=0.9)
    parameter.grad = torch.full((4,), float(value))
    optimizer.step()
    return optimizer


def test_a_client_restores_from_its_flower_context_and_from_files_after_a_restart(runtime, tmp_path):
    """Within a run, Flower keeps a client's Context in memory: a restore takes the state from it
    and reads no file (here the files are gone). A new run (a restart) has an empty context: the
    restore reads the state file, and the slots stay consistent between the two."""
    from flwr.app import Context, RecordDict

    directory = tmp_path / "client_0"
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    ClientCheckpoints(directory, context=context).save_state(1, _optimizer_with_momentum(1), steps=5)
    checkpoints = ClientCheckpoints(directory, context=context)
    fedckpt.flush()
    on_disk = {name: (directory / name).read_bytes() for name in os.listdir(directory) if name.endswith(".pt")}
    for name in on_disk:
        os.remove(directory / name)
    restored = _optimizer_with_momentum(0)
    state = checkpoints.restore_state(2, restored)
    assert state["server_round"] == 1 and state["steps"] == 5
    assert torch.equal(restored.state_dict()["state"][0]["momentum_buffer"], torch.full((4,), 1.0))
    for name, data in on_disk.items():
        (directory / name).write_bytes(data)

    momentum = _optimizer_with_momentum(2)
    ClientCheckpoints(directory, context=context).save_state(2, momentum, steps=10)
    momentum.state_dict()["state"][0]["momentum_buffer"].add_(100)  # later changes do not reach the context
    assert (
        ClientCheckpoints(directory, context=context)
        .restore_state(3)["optimizer"]["state"][0]["momentum_buffer"]
        .tolist()
        == [2.0] * 4
    )

    restarted = Context(run_id=2, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    from_files = ClientCheckpoints(directory, context=restarted).restore_state(3)
    assert from_files["server_round"] == 2 and from_files["steps"] == 10
    # A state too large for the context stays out of it (and an older one kept there is dropped).
    ClientCheckpoints(directory, context=context, context_state_max_bytes=8).save_state(3, momentum, steps=15)
    assert "fedckpt.client_state" not in context.state
    assert ClientCheckpoints(directory, context=context).restore_state(4)["steps"] == 15


def test_temp_files_of_dead_writers_are_removed(tmp_path):
    final = str(tmp_path / "model.safetensors")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    mine = temp_path(final)
    stale = mine.replace(f"-{os.getpid()}.", f"-{dead_pid}.")
    foreign = os.path.join(os.path.dirname(mine), "notes.txt")
    other_host = os.path.join(os.path.dirname(mine), f"model.safetensors.elsewhere-{dead_pid}.0123456789ab.tmp")
    os.makedirs(os.path.dirname(mine))
    atomic.claim_temp(mine)  # this process writes it: it holds its lock
    for path in (stale, foreign, other_host):
        open(path, "w").close()
    assert temp_file_owner(os.path.basename(stale))[1] == dead_pid
    assert temp_file_owner("notes.txt") is None
    assert atomic.remove_stale_temps(os.path.dirname(mine)) == [os.path.basename(stale)]
    assert sorted(os.listdir(os.path.dirname(mine))) == sorted(
        os.path.basename(path) for path in (mine, foreign, other_host)
    )
    atomic.discard_temp(mine)
