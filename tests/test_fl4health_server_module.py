"""FL4Health 0.4's server modules (``fedckpt.fl4health.checkpointing.server_module``): Flower parameters
loaded into the model through a parameter exchanger, model checkpoints and the server state."""

import numpy as np
import pytest
from conftest import assert_same_tensors, make_model
from fl4health_stand_ins import Server
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

from fedckpt.fl4health.checkpointing.checkpointer import BestLossTorchModuleCheckpointer, LatestTorchModuleCheckpointer
from fedckpt.fl4health.checkpointing.server_module import (
    AdaptiveConstraintServerCheckpointAndStateModule,
    BaseServerCheckpointAndStateModule,
    ClippingBitServerCheckpointAndStateModule,
    LayerNamesServerCheckpointAndStateModule,
    NnUnetServerCheckpointAndStateModule,
    PackingServerCheckpointAndAndStateModule,
    ScaffoldServerCheckpointAndStateModule,
)
from fedckpt.fl4health.checkpointing.state_checkpointer import ServerStateCheckpointer
from fedckpt.fl4health.parameter_exchange.full_exchanger import FullParameterExchanger


def arrays_of(model) -> list[np.ndarray]:
    return FullParameterExchanger().push_parameters(model)


def test_base_module_checkpoints_the_global_model_and_saves_and_restores_the_server(runtime, tmp_path):
    source = make_model(7)
    parameters = ndarrays_to_parameters(arrays_of(source))
    module = BaseServerCheckpointAndStateModule(
        model=make_model(0),
        parameter_exchanger=FullParameterExchanger(),
        model_checkpointers=[
            LatestTorchModuleCheckpointer(str(tmp_path), "latest.safetensors"),
            BestLossTorchModuleCheckpointer(str(tmp_path), "best.pt"),
        ],
        state_checkpointer=ServerStateCheckpointer(tmp_path / "state"),
    )
    module.maybe_checkpoint(parameters, 0.5, {"accuracy": 0.9})
    assert_same_tensors(module.model_checkpointers[0].load_state_dict(), source.state_dict())
    assert_same_tensors(module.model_checkpointers[1].load_checkpoint().state_dict(), source.state_dict())

    server = Server("srv")
    server.current_round = 3
    server.history.add_loss_distributed(3, 0.5)
    module.save_state(server, parameters)
    module.flush()
    assert (tmp_path / "state" / "server_srv_state.pt").exists()

    restarted = BaseServerCheckpointAndStateModule(
        model=make_model(1),
        parameter_exchanger=FullParameterExchanger(),
        state_checkpointer=ServerStateCheckpointer(tmp_path / "state"),
    )
    new_server = Server("srv")
    restored = restarted.maybe_load_state(new_server)
    for got, expected in zip(parameters_to_ndarrays(restored), arrays_of(source), strict=True):
        assert np.array_equal(got, expected)
    assert new_server.current_round == 3 and new_server.history.losses_distributed == [(3, 0.5)]
    assert_same_tensors(restarted.model.state_dict(), source.state_dict())
    restarted.state_checkpointer = ServerStateCheckpointer(tmp_path / "state")
    assert restarted.maybe_load_state(Server("another")) is None  # server_another_state.pt: none saved


def test_base_module_refuses_incomplete_setups(runtime, tmp_path):
    checkpointer = LatestTorchModuleCheckpointer(str(tmp_path), "m.pt")
    with pytest.raises(ValueError, match="no model is defined"):
        BaseServerCheckpointAndStateModule(
            parameter_exchanger=FullParameterExchanger(), model_checkpointers=checkpointer
        )
    with pytest.raises(ValueError, match="no parameter_exchanger"):
        BaseServerCheckpointAndStateModule(model=make_model(0), model_checkpointers=checkpointer)
    with pytest.raises(ValueError, match="should be unique"):
        BaseServerCheckpointAndStateModule(
            make_model(0),
            FullParameterExchanger(),
            [checkpointer, BestLossTorchModuleCheckpointer(str(tmp_path), "m.pt")],
        )
    parameters = ndarrays_to_parameters(arrays_of(make_model(0)))
    stateless = BaseServerCheckpointAndStateModule(make_model(0), FullParameterExchanger())
    stateless.maybe_checkpoint(parameters, 0.1, {})  # no checkpointers: nothing to do
    with pytest.raises(ValueError, match="no state checkpointer"):
        stateless.save_state(Server("s"), parameters)
    with pytest.raises(ValueError, match="no state checkpointer"):
        stateless.maybe_load_state(Server("s"))
    modelless = BaseServerCheckpointAndStateModule(state_checkpointer=ServerStateCheckpointer(tmp_path))
    with pytest.raises(ValueError, match="self.model is None"):
        modelless.maybe_load_state(Server("s"))
    with pytest.raises(ValueError, match="Got 2 arrays for a model with 5"):
        BaseServerCheckpointAndStateModule(make_model(0), FullParameterExchanger(), checkpointer).maybe_checkpoint(
            ndarrays_to_parameters(arrays_of(make_model(0))[:2]), 0.1, {}
        )
    with pytest.raises(TypeError, match="FullParameterExchangerWithPacking"):
        PackingServerCheckpointAndAndStateModule(make_model(0), FullParameterExchanger())
    # nnU-Net's model comes later: its checkpointers need only the exchanger at first.
    late = NnUnetServerCheckpointAndStateModule(
        parameter_exchanger=FullParameterExchanger(), model_checkpointers=checkpointer
    )
    late.model = make_model(2)
    late.maybe_checkpoint(ndarrays_to_parameters(arrays_of(make_model(2))), 0.1, {})
    assert_same_tensors(checkpointer.load_checkpoint().state_dict(), make_model(2).state_dict())


def packed(kind: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """The server parameters of each kind of packing module: the model's arrays, then the extras."""
    extras = {
        "scaffold": [np.zeros_like(array) for array in arrays],  # control variates
        "adaptive": [np.array(0.1)],  # the loss weight
        "clipping": [np.array(0.5)],  # the clipping bit
        "layer_names": [np.array([f"layer{index}" for index in range(len(arrays))])],
    }
    return arrays + extras[kind]


MODULES = {
    "scaffold": ScaffoldServerCheckpointAndStateModule,
    "adaptive": AdaptiveConstraintServerCheckpointAndStateModule,
    "clipping": ClippingBitServerCheckpointAndStateModule,
    "layer_names": LayerNamesServerCheckpointAndStateModule,
}


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_packing_modules_unpack_the_model_from_the_server_parameters(runtime, tmp_path, kind):
    source = make_model(5)
    parameters = ndarrays_to_parameters(packed(kind, arrays_of(source)))
    checkpointer = LatestTorchModuleCheckpointer(str(tmp_path), "global.safetensors")
    module = MODULES[kind](
        model=make_model(0),
        model_checkpointers=checkpointer,
        state_checkpointer=ServerStateCheckpointer(tmp_path, "server.pt"),
    )
    module.maybe_checkpoint(parameters, 0.2, {})
    assert_same_tensors(checkpointer.load_state_dict(), source.state_dict())
    module.save_state(Server("s"), parameters)
    restored = MODULES[kind](model=make_model(1), state_checkpointer=ServerStateCheckpointer(tmp_path, "server.pt"))
    arrays = parameters_to_ndarrays(restored.maybe_load_state(Server("s")))
    assert len(arrays) == len(source.state_dict())  # the model's parameters, as FL4Health returns them
    assert_same_tensors(restored.model.state_dict(), source.state_dict())
    assert MODULES[kind]().parameter_exchanger is None  # no model, no exchanger, as in FL4Health
