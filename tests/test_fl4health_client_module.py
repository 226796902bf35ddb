"""``ClientCheckpointAndStateModule`` through ``fedckpt.fl4health``: FL4Health 0.4's tests of the module,
and its state methods in both forms (0.4: a client object; 0.3: a checkpoint name)."""

import pytest
import torch
from conftest import make_model
from fl4health_stand_ins import Client, batch

import fedckpt
from fedckpt import PerRoundStateCheckpointer
from fedckpt.fl4health.checkpointing.checkpointer import (
    BestLossTorchModuleCheckpointer,
    LatestTorchModuleCheckpointer,
    TorchModuleCheckpointer,
)
from fedckpt.fl4health.checkpointing.client_module import CheckpointMode, ClientCheckpointAndStateModule
from fedckpt.fl4health.checkpointing.state_checkpointer import ClientStateCheckpointer


def weight(model: torch.nn.Module) -> torch.Tensor:
    return model.body[0].weight


def test_the_0_4_paths_name_fedckpts_classes():
    assert ClientCheckpointAndStateModule is fedckpt.ClientCheckpointAndStateModule
    assert CheckpointMode is fedckpt.CheckpointMode
    assert LatestTorchModuleCheckpointer is fedckpt.LatestTorchModuleCheckpointer


def test_client_checkpointer_module(runtime, tmp_path):
    pre = BestLossTorchModuleCheckpointer(str(tmp_path), "pre_agg.pkl")
    post = BestLossTorchModuleCheckpointer(str(tmp_path), "post_agg.pkl")
    module = ClientCheckpointAndStateModule(pre_aggregation=pre, post_aggregation=post)
    model_1, model_2 = make_model(1), make_model(2)
    module.maybe_checkpoint(model_1, 0.78, {"test_1": 1.0}, CheckpointMode.PRE_AGGREGATION)
    module.maybe_checkpoint(model_2, 0.78, {"test_1": 1.0}, CheckpointMode.POST_AGGREGATION)
    assert torch.equal(weight(pre.load_checkpoint()), weight(model_1))
    assert torch.equal(weight(post.load_checkpoint()), weight(model_2))
    module.maybe_checkpoint(model_2, 0.68, {"test_1": 1.0}, CheckpointMode.PRE_AGGREGATION)
    module.maybe_checkpoint(model_1, 0.68, {"test_1": 1.0}, CheckpointMode.POST_AGGREGATION)
    assert torch.equal(weight(pre.load_checkpoint()), weight(model_2))
    assert torch.equal(weight(post.load_checkpoint()), weight(model_1))


def test_client_checkpointer_module_with_sequence_of_checkpointers(runtime, tmp_path):
    pre: list[TorchModuleCheckpointer] = [
        BestLossTorchModuleCheckpointer(str(tmp_path), "pre_agg_best.pkl"),
        LatestTorchModuleCheckpointer(str(tmp_path), "pre_agg_latest.pkl"),
    ]
    post = BestLossTorchModuleCheckpointer(str(tmp_path), "post_agg.pkl")
    module = ClientCheckpointAndStateModule(pre_aggregation=pre, post_aggregation=post)
    model_1, model_2 = make_model(1), make_model(2)
    module.maybe_checkpoint(model_1, 0.78, {"test_1": 1.0}, CheckpointMode.PRE_AGGREGATION)
    module.maybe_checkpoint(model_2, 0.78, {"test_1": 1.0}, CheckpointMode.POST_AGGREGATION)
    assert torch.equal(weight(pre[0].load_checkpoint()), weight(model_1))
    assert torch.equal(weight(pre[1].load_checkpoint()), weight(model_1))
    assert torch.equal(weight(post.load_checkpoint()), weight(model_2))
    module.maybe_checkpoint(model_2, 0.88, {"test_1": 1.0}, CheckpointMode.PRE_AGGREGATION)
    module.maybe_checkpoint(model_1, 0.68, {"test_1": 1.0}, CheckpointMode.POST_AGGREGATION)
    assert torch.equal(weight(pre[0].load_checkpoint()), weight(model_1))  # 0.88 is no better
    assert torch.equal(weight(pre[1].load_checkpoint()), weight(model_2))  # the latest always saves
    assert torch.equal(weight(post.load_checkpoint()), weight(model_1))


def test_path_duplication_check(tmp_path):
    with pytest.raises(ValueError, match="should be unique"):
        ClientCheckpointAndStateModule(
            pre_aggregation=[
                BestLossTorchModuleCheckpointer(str(tmp_path), "pre_agg_best.pkl"),
                LatestTorchModuleCheckpointer(str(tmp_path), "pre_agg_best.pkl"),
            ],
            post_aggregation=BestLossTorchModuleCheckpointer(str(tmp_path), "post_agg.pkl"),
        )
    with pytest.raises(ValueError, match="should be unique"):
        ClientCheckpointAndStateModule(
            pre_aggregation=[
                BestLossTorchModuleCheckpointer(str(tmp_path), "pre_agg_best.pkl"),
                LatestTorchModuleCheckpointer(str(tmp_path), "pre_agg_latest.pkl"),
            ],
            post_aggregation=BestLossTorchModuleCheckpointer(str(tmp_path), "pre_agg_best.pkl"),
        )


def test_module_state_of_a_client_object_0_4(runtime, tmp_path):
    module = ClientCheckpointAndStateModule(
        post_aggregation=LatestTorchModuleCheckpointer(str(tmp_path), "post.pt"),
        state_checkpointer=ClientStateCheckpointer(tmp_path),
    )
    client = Client("c0")
    assert module.maybe_load_state(client) is False
    client.train_step(*batch(0))
    module.save_state(client)
    restarted = Client("c0", seed=3)
    assert module.maybe_load_state(restarted) is True
    assert restarted.total_steps == 1
    assert torch.equal(restarted.model[0].weight, client.model[0].weight)
    module.flush()  # the state file is among the module's saves
    assert (tmp_path / "client_c0_state.pt").exists()


def test_module_state_of_a_checkpoint_name_0_3_and_mismatched_forms(runtime, tmp_path):
    old = ClientCheckpointAndStateModule(state_checkpointer=PerRoundStateCheckpointer(tmp_path))
    assert old.maybe_load_state("client_0.pt") is None
    old.save_state("client_0.pt", {"round": 4})
    assert old.maybe_load_state("client_0.pt") == {"round": 4}
    with pytest.raises(TypeError, match="name must be a string, got PosixPath"):  # a name, not a client
        old.maybe_load_state(tmp_path / "client_0.pt")
    with pytest.raises(TypeError, match="needs a ClientStateCheckpointer.*PerRoundStateCheckpointer"):
        old.save_state(Client("c"))
    with pytest.raises(TypeError, match="needs a ClientStateCheckpointer"):
        old.maybe_load_state(Client("c"))
    with pytest.raises(TypeError, match="no state to save"):
        old.save_state("client_0.pt")

    new = ClientCheckpointAndStateModule(state_checkpointer=ClientStateCheckpointer(tmp_path))
    with pytest.raises(TypeError, match="needs a PerRoundStateCheckpointer.*with a client"):
        new.save_state("client_0.pt", {"round": 5})
    with pytest.raises(TypeError, match="needs a PerRoundStateCheckpointer"):
        new.maybe_load_state("client_0.pt")
    with pytest.raises(TypeError, match="takes no state"):
        new.save_state(Client("c"), {"round": 5})
    none = ClientCheckpointAndStateModule()
    with pytest.raises(ValueError, match="Attempting to save state but no state checkpointer"):
        none.save_state(Client("c"))
    with pytest.raises(ValueError, match="Attempting to load state, but no state checkpointer"):
        none.maybe_load_state(Client("c"))
    assert old.maybe_load_state("client_0.pt") == {"round": 4}  # the refused calls saved nothing
