"""FL4Health 0.4's state checkpointers (``fedckpt.fl4health``), as FL4Health's tests/checkpointing use them,
on stand-ins for its client and server; saves in the background, loads seeing them at once."""

import copy
import os

import pytest
import ray
import torch
from conftest import assert_same_tensors
from fl4health_stand_ins import Client, LossMeter, Server, batch
from torch.optim import Optimizer

from fedckpt.fl4health.checkpointing.state_checkpointer import ClientStateCheckpointer, ServerStateCheckpointer
from fedckpt.fl4health.utils.snapshotter import (
    OptimizerSnapshotter,
    SerializableObjectSnapshotter,
    SingletonSnapshotter,
    StringSnapshotter,
    TorchModuleSnapshotter,
)


def momentum(client: Client) -> torch.Tensor:
    return client.optimizers["global"].state_dict()["state"][0]["momentum_buffer"]


def test_client_state_works_for_per_round_checkpointing(runtime, tmp_path):
    client = Client("original_client")
    fresh = copy.deepcopy(client)
    checkpointer = ClientStateCheckpointer(tmp_path / "client_state", checkpoint_name="client_state.pt")
    assert not checkpointer.checkpoint_exists()
    client.train_step(*batch(0))
    checkpointer.save_client_state(client)

    # A new checkpointer, as after a restart; the save above is seen without a flush.
    checkpointer = ClientStateCheckpointer(tmp_path / "client_state", checkpoint_name="client_state.pt")
    assert checkpointer.checkpoint_exists()
    saved = checkpointer.load_checkpoint()
    expected = {"model", "optimizers", "lr_schedulers", "total_steps", "total_epochs", "reports_manager"}
    assert expected | {"train_loss_meter", "train_metric_manager"} == set(saved)
    assert saved["total_steps"] == {"None": 1}
    assert fresh.optimizers["global"].state_dict()["state"] == {}

    assert checkpointer.maybe_load_client_state(fresh) is True
    assert torch.equal(momentum(fresh), momentum(client))
    assert fresh.lr_schedulers["global"].state_dict() == client.lr_schedulers["global"].state_dict()
    assert fresh.total_steps == 1
    assert_same_tensors(fresh.model.state_dict(), client.model.state_dict())
    assert checkpointer.client is None and checkpointer.snapshot_ckpt == {}


def test_client_state_works_for_training_loop_checkpointing(runtime, tmp_path):
    """Everything the training loop needs to pick up where it was: meters, metrics, reports; the file is
    named after the client when no name is given."""
    client = Client("loop")
    fresh = copy.deepcopy(client)
    for step in range(3):
        client.train_step(*batch(step))
    checkpointer = ClientStateCheckpointer(tmp_path)
    checkpointer.save_client_state(client)
    assert checkpointer.checkpoint_path == os.path.join(tmp_path, "client_loop_state.pt")

    assert ClientStateCheckpointer(tmp_path).maybe_load_client_state(fresh)
    assert fresh.total_steps == 3
    assert fresh.train_loss_meter.losses_list == client.train_loss_meter.losses_list
    assert fresh.train_metric_manager.compute() == client.train_metric_manager.compute()
    assert fresh.reports_manager.reports == client.reports_manager.reports
    assert_same_tensors(fresh.model.state_dict(), client.model.state_dict())
    assert torch.equal(momentum(fresh), momentum(client))
    fedckpt_file = torch.load(tmp_path / "client_loop_state.pt", weights_only=False)  # torch.save's format
    assert fedckpt_file["total_steps"] == {"None": 3}


def test_client_state_checkpointing_with_custom_attrs(runtime, tmp_path):
    client, fresh = Client("original_client"), Client("original_client", seed=1)
    attrs = {
        "total_steps": (SingletonSnapshotter(), int),
        "optimizers": (OptimizerSnapshotter(), Optimizer),
        "client_name": (StringSnapshotter(), str),
    }
    checkpointer = ClientStateCheckpointer(tmp_path, None, attrs)
    client.train_step(*batch(0))
    client.total_steps += 2
    client.client_name = "updated_client"
    checkpointer.save_client_state(client)
    assert checkpointer.checkpoint_path == os.path.join(tmp_path, "client_updated_client_state.pt")
    assert checkpointer.checkpoint_exists()
    assert set(checkpointer.load_checkpoint()) == {"total_steps", "optimizers", "client_name"}

    assert checkpointer.maybe_load_client_state(fresh)
    assert fresh.total_steps == 3 and fresh.client_name == "updated_client"
    assert torch.equal(momentum(fresh), momentum(client))
    assert not torch.equal(fresh.model[0].weight, client.model[0].weight)  # not among the attributes
    assert checkpointer.snapshot_ckpt == {}

    # Attributes added and removed; a load of some of them only.
    checkpointer.add_to_snapshot_attr("train_loss_meter", SerializableObjectSnapshotter(), LossMeter)
    checkpointer.delete_from_snapshot_attr("client_name")
    checkpointer.save_client_state(client)
    assert set(checkpointer.load_checkpoint()) == {"total_steps", "optimizers", "train_loss_meter"}
    other = Client("other", seed=2)
    checkpointer.set_checkpoint_path(tmp_path, "client_updated_client_state.pt")
    assert checkpointer.maybe_load_client_state(other, attributes=["train_loss_meter"])
    assert other.train_loss_meter.losses_list == client.train_loss_meter.losses_list
    assert other.total_steps == 0 and other.client_name == "other"


def test_server_state_checkpointer(runtime, tmp_path):
    server = Server("original_server")
    server.history.add_loss_distributed(1, 0.6)
    server.history.add_loss_centralized(1, 0.3)
    server.reports_manager.report({"fit_start": "10.10", "host_type": "server"})
    server.current_round = 1
    model = Client("unused", seed=42).model
    checkpointer = ServerStateCheckpointer(tmp_path / "server_state", checkpoint_name="server_state.pt")
    assert not checkpointer.checkpoint_exists()
    checkpointer.save_server_state(server=server, model=model)
    assert checkpointer.checkpoint_exists()

    restarted, new_model = Server("new_server"), Client("unused", seed=12).model
    assert not torch.equal(new_model[0].weight, model[0].weight)
    checkpointer = ServerStateCheckpointer(tmp_path / "server_state", checkpoint_name="server_state.pt")
    loaded = checkpointer.maybe_load_server_state(server=restarted, model=new_model)
    assert loaded is new_model
    assert_same_tensors(new_model.state_dict(), model.state_dict())
    assert restarted.current_round == 1 and restarted.server_name == "original_server"
    assert vars(restarted.history) == vars(server.history)
    assert restarted.reports_manager.reports == [{"fit_start": "10.10", "host_type": "server"}]
    assert checkpointer.server is None and checkpointer.server_model is None
    assert ServerStateCheckpointer(tmp_path).maybe_load_server_state(Server("none"), new_model) is None


def test_a_save_holds_the_values_at_the_call(runtime, tmp_path):
    """Snapshot isolation: changing the model, the optimizer and the counters right after
    ``save_client_state`` returns does not reach the file."""
    client = Client("isolated")
    client.train_step(*batch(0))
    weights = {name: tensor.clone() for name, tensor in client.model.state_dict().items()}
    buffer = momentum(client).clone()
    reports = copy.deepcopy(client.reports_manager.reports)
    checkpointer = ClientStateCheckpointer(tmp_path)
    checkpointer.save_client_state(client)
    with torch.no_grad():
        for parameter in client.model.parameters():
            parameter.add_(100.0)  # in place: the memory the save was taken from
    momentum(client).mul_(-3.0)
    client.total_steps = 99
    client.reports_manager.report({"step": 99})

    fresh = Client("isolated", seed=5)
    assert checkpointer.maybe_load_client_state(fresh)
    assert_same_tensors(fresh.model.state_dict(), weights)
    assert torch.equal(momentum(fresh), buffer)
    assert fresh.total_steps == 1 and fresh.reports_manager.reports == reports


@ray.remote(num_cpus=0)
def steps_seen_by_another_process(directory: str) -> int:
    """Load a client state in a Ray worker (another process) into a stand-in without optimizer or model."""

    class Counters:
        total_steps = -1

    attrs = {"total_steps": (SingletonSnapshotter(), int)}
    counters = Counters()
    assert ClientStateCheckpointer(directory, "counters.pt", attrs).maybe_load_client_state(counters)
    return counters.total_steps


def test_another_process_sees_the_state_saved_before_it_loads(runtime, tmp_path):
    client = Client("shared")
    attrs = {"total_steps": (SingletonSnapshotter(), int), "model": (TorchModuleSnapshotter(), torch.nn.Module)}
    checkpointer = ClientStateCheckpointer(tmp_path, "counters.pt", attrs)
    for steps in (1, 2, 3):
        client.total_steps = steps
        checkpointer.save_client_state(client)
        assert ray.get(steps_seen_by_another_process.remote(str(tmp_path))) == steps
    checkpointer.flush()
    assert checkpointer.saved_keys() == [os.path.join(tmp_path, "counters.pt")]


def test_what_cannot_be_saved_or_loaded_says_why(runtime, tmp_path):
    client = Client("plain")
    checkpointer = ClientStateCheckpointer(tmp_path)
    assert checkpointer.maybe_load_client_state(client) is False  # nothing saved yet
    with pytest.raises(FileNotFoundError):
        checkpointer.load_checkpoint()
    with pytest.raises(ValueError, match="Checkpoint path is not set"):
        ClientStateCheckpointer(tmp_path, None, {}).save_state()  # no client to name the file after
    del client.train_metric_manager
    with pytest.raises(AttributeError, match="train_metric_manager.*delete_from_snapshot_attr"):
        checkpointer.save_client_state(client)
    assert checkpointer.client is None
    client.train_metric_manager = None
    client.optimizers = {"global": client.optimizers["global"], "bad": "not an optimizer"}
    with pytest.raises(ValueError, match="for key bad"):
        checkpointer.save_client_state(client)
    client.total_steps = "seven"
    client.optimizers = client.optimizers["global"]  # a single optimizer is fine too
    with pytest.raises(ValueError, match="expected <class 'int'>"):
        checkpointer.save_client_state(client)
    checkpointer.flush()
    assert not os.path.exists(checkpointer.checkpoint_path)
