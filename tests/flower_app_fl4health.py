"""A Flower simulation whose client and server state go through FL4Health 0.4's API (``fedckpt.fl4health``).

Run as ``python flower_app_fl4health.py CHECKPOINT_DIR ROUNDS``. A client is a stand-in with the
attributes of FL4Health's ``BasicClient``: each round its ClientApp restores it with
``module.maybe_load_state(client)`` (a ``ClientStateCheckpointer``), trains, and saves it with
``module.save_state(client)``. The ServerApp's rounds keep a stand-in for FL4Health's ``FlServer``:
``BaseServerCheckpointAndStateModule.maybe_load_state(server)`` restores it and the global parameters,
and after each round the module checkpoints the global model and saves the server state.

So that a run killed at any moment resumes exactly, the app does what FL4Health leaves to it:
- the server state of a round is saved once every client save of the round is durable, and the next
  round starts once it is durable too (``fedckpt.flush()``): it is the round's commit record;
- a client alternates two state files by round parity, and a round restores the previous round's: a
  round cut short after some clients saved is run again from the state before it.
"""

import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on 127.0.0.1
os.environ.setdefault("RAY_ADDRESS", "local")  # a fresh instance, not one already running here

from fl4health_stand_ins import Client, Server, batch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common import ndarrays_to_parameters  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from simulate import simulate  # noqa: E402

import fedckpt  # noqa: E402
from fedckpt.fl4health.checkpointing.checkpointer import LatestTorchModuleCheckpointer  # noqa: E402
from fedckpt.fl4health.checkpointing.client_module import ClientCheckpointAndStateModule  # noqa: E402
from fedckpt.fl4health.checkpointing.server_module import BaseServerCheckpointAndStateModule  # noqa: E402
from fedckpt.fl4health.checkpointing.state_checkpointer import (  # noqa: E402
    ClientStateCheckpointer,
    ServerStateCheckpointer,
)
from fedckpt.fl4health.parameter_exchange.full_exchanger import FullParameterExchanger  # noqa: E402

DIRECTORY, ROUNDS = sys.argv[1], int(sys.argv[2])
CLIENTS, STEPS = 2, 2

client_app = ClientApp()


def client_state_name(partition: int, server_round: int) -> str:
    return f"client_{partition}_state.{server_round % 2}.pt"


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    partition = int(context.node_config["partition-id"])
    server_round = int(msg.content["config"]["server-round"])
    directory = os.path.join(DIRECTORY, "clients")
    client = Client(str(partition))
    states = ClientStateCheckpointer(directory, client_state_name(partition, server_round - 1))
    module = ClientCheckpointAndStateModule(state_checkpointer=states)
    module.maybe_load_state(client)  # the previous round's state (none before round 1)
    client.model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    losses = [client.train_step(*batch(1000 * partition + client.total_steps)) for _ in range(STEPS)]
    client.total_epochs += 1
    client.reports_manager.report({"round": server_round})
    states.set_checkpoint_path(directory, client_state_name(partition, server_round))
    module.save_state(client)
    metrics = MetricRecord({"num-examples": 16, "loss": sum(losses) / len(losses)})
    content = RecordDict({"arrays": ArrayRecord(client.model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    directory = os.path.join(DIRECTORY, "server")
    server = Server("fl4h")
    module = BaseServerCheckpointAndStateModule(
        model=Client("global").model,
        parameter_exchanger=FullParameterExchanger(),
        model_checkpointers=LatestTorchModuleCheckpointer(directory, "global.safetensors"),
        state_checkpointer=ServerStateCheckpointer(directory),
    )
    module.maybe_load_state(server)  # restores the server and module.model, or leaves both as they are
    print(f"resumed from round {server.current_round}", flush=True)
    arrays = ArrayRecord(module.model.state_dict())
    strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=CLIENTS, min_available_nodes=CLIENTS)
    for server_round in range(server.current_round + 1, ROUNDS + 1):
        replies = grid.send_and_receive(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        arrays, metrics = strategy.aggregate_train(server_round, replies)
        loss = float(metrics["loss"])
        server.current_round = server_round
        server.history.add_loss_distributed(server_round, loss)
        server.reports_manager.report({"round": server_round, "loss": loss})
        parameters = ndarrays_to_parameters(arrays.to_numpy_ndarrays())
        module.maybe_checkpoint(parameters, loss, {})
        fedckpt.flush()  # the clients' saves of this round are durable before the server state says it is done
        module.save_state(server, parameters)
        fedckpt.flush()  # and the next round's client saves come after it is durable
    print(f"finished round {server.current_round}", flush=True)


if __name__ == "__main__":
    simulate(server_app, client_app, CLIENTS)
