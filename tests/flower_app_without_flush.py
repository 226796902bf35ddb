"""A Flower simulation whose ServerApp never flushes fedckpt: Flower shuts Ray down right after it.

Run as ``python flower_app_without_flush.py CHECKPOINT_DIR CLIENTS ROUNDS WIDTH COPIES [ACKS]``; each
client saves its trained model (every weight set to the round number) under COPIES names in every
round, the last one included. With ACKS, each client appends ``<client> <copy> <round>`` to that file
once a save's call returned (the save was acknowledged).
"""

import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on 127.0.0.1
os.environ.setdefault("RAY_ADDRESS", "local")  # a fresh instance, not one already running here

import torch  # noqa: E402
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from simulate import simulate  # noqa: E402

import fedckpt  # noqa: E402

DIRECTORY = sys.argv[1]
CLIENTS, ROUNDS, WIDTH, COPIES = (int(argument) for argument in sys.argv[2:6])
ACKS = sys.argv[6] if len(sys.argv) > 6 else None

client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    model = torch.nn.Linear(WIDTH, WIDTH)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    with torch.no_grad():
        model.weight.fill_(int(msg.content["config"]["server-round"]))
    partition = int(context.node_config["partition-id"])
    for copy in range(COPIES):
        directory = os.path.join(DIRECTORY, f"client_{partition}")
        checkpointer = fedckpt.LatestTorchModuleCheckpointer(directory, f"model_{copy}.safetensors")
        checkpointer.maybe_checkpoint(model, 0.0, {})  # returns at once; written in the background
        if ACKS:
            with open(ACKS, "a") as acks:  # one short append: whole lines, whichever process writes
                acks.write(f"{partition} {copy} {msg.content['config']['server-round']}\n")
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": 1})})
    return Message(content=content, reply_to=msg)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=CLIENTS, min_available_nodes=CLIENTS)
    strategy.start(grid, ArrayRecord(torch.nn.Linear(WIDTH, WIDTH).state_dict()), ROUNDS)


if __name__ == "__main__":
    simulate(server, client, CLIENTS)
