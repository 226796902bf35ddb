"""A Flower simulation of a stateful strategy under ``fedckpt.flower.ServerCheckpoints``.

Run as ``python flower_app_strategies.py CHECKPOINT_DIR STRATEGY ROUNDS``, STRATEGY one of
``fedadam``, ``dp-fedadam`` (FedAdam inside server-side DP clipping, whose noise comes from numpy's
global RNG) and ``fedprox``. Clients train deterministically (their data and steps depend on their
partition and the round only), so a run resumed after a kill must end on the global model of an
uninterrupted one: only the strategy's state (FedAdam's moments, inside a wrapper too) and the
server's RNG carry the history.
"""

import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on 127.0.0.1
os.environ.setdefault("RAY_ADDRESS", "local")  # a fresh instance, not one already running here

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAdam, FedProx  # noqa: E402
from simulate import simulate  # noqa: E402

from fedckpt import LatestTorchModuleCheckpointer, PerRoundStateCheckpointer, ServerCheckpointAndStateModule  # noqa: E402
from fedckpt.flower import ServerCheckpoints  # noqa: E402

DIRECTORY, STRATEGY, ROUNDS = sys.argv[1], sys.argv[2], int(sys.argv[3])
CLIENTS = 3

client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    model = torch.nn.Linear(8, 2)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    partition = int(context.node_config["partition-id"])
    server_round = int(msg.content["config"]["server-round"])
    generator = torch.Generator().manual_seed(1000 * partition + server_round)
    inputs, targets = torch.randn(32, 8, generator=generator), torch.randn(32, 2, generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": 32})})
    return Message(content=content, reply_to=msg)


def make_strategy():
    common = {"fraction_evaluate": 0.0, "min_train_nodes": CLIENTS, "min_available_nodes": CLIENTS}
    if STRATEGY == "fedprox":
        return FedProx(proximal_mu=0.1, **common)
    adam = FedAdam(eta=0.05, **common)
    if STRATEGY == "fedadam":
        return adam
    return DifferentialPrivacyServerSideFixedClipping(
        adam, noise_multiplier=0.5, clipping_norm=5.0, num_sampled_clients=CLIENTS
    )


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    np.random.seed(7)  # a fresh run and a resumed one start alike; the RNG's later state is the server's
    torch.manual_seed(7)
    server_dir = os.path.join(DIRECTORY, "server")
    module = ServerCheckpointAndStateModule(
        model=torch.nn.Linear(8, 2),
        model_checkpointers=[LatestTorchModuleCheckpointer(server_dir, "global.safetensors")],
        state_checkpointer=PerRoundStateCheckpointer(server_dir),
    )
    ServerCheckpoints(module).start(make_strategy(), grid, ArrayRecord(torch.nn.Linear(8, 2).state_dict()), ROUNDS)


if __name__ == "__main__":
    simulate(server, client, CLIENTS)
