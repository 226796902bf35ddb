"""fedckpt quickstart: a few federated rounds of a small model with non-blocking checkpoints.

Three clients train a small PyTorch MLP on synthetic data; after each round the server averages
their weights (FedAvg). Each client keeps a post-aggregation checkpoint (the global model it
received), pre-aggregation checkpoints (latest, and best by validation loss) and its per-round
state (model, optimizer, round). For every save the script prints how long training was blocked
and how long a synchronous ``torch.save`` of the same state takes, then reloads everything.

Run:  python examples/quickstart.py [--rounds 3] [--clients 3] [--width 2048] [--checkpoint-dir DIR]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

# Keep a Ray started by fedckpt on loopback (fedckpt does this itself too).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fedckpt  # noqa: E402
from fedckpt import (  # noqa: E402
    BestLossTorchModuleCheckpointer,
    CheckpointMode,
    ClientCheckpointAndStateModule,
    LatestTorchModuleCheckpointer,
    PerRoundStateCheckpointer,
)


def make_model(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4))


def client_data(client: int, samples: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-identical clients: each has its own input shift and its own rule for the labels."""
    generator = torch.Generator().manual_seed(client)
    x = torch.randn(samples, 32, generator=generator) + client * 0.5
    w = torch.randn(32, 4, generator=torch.Generator().manual_seed(100 + client))
    return x, (x @ w).argmax(dim=1)


def sync_save_seconds(obj: object) -> float:
    """What FL4Health does per save: a synchronous torch.save (to a real file, page cache)."""
    with tempfile.NamedTemporaryFile(suffix=".pt") as file:
        start = time.perf_counter()
        torch.save(obj, file.name)
        return time.perf_counter() - start


def timed(call, *args) -> float:
    start = time.perf_counter()
    call(*args)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--width", type=int, default=2048, help="hidden width (2048: ~17 MB model)")
    parser.add_argument("--checkpoint-dir", default=None, help="default: a new temporary directory")
    args = parser.parse_args()
    root = args.checkpoint_dir or tempfile.mkdtemp(prefix="fedckpt-quickstart-")
    torch.manual_seed(0)
    global_model = make_model(args.width)
    megabytes = sum(p.numel() * p.element_size() for p in global_model.parameters()) / 2**20
    print(f"fedckpt quickstart: {args.clients} clients, {args.rounds} rounds, {megabytes:.1f} MB model, "
          f"checkpoints in {root}")  # fmt: skip

    modules, optimizers, models = [], [], []
    for client in range(args.clients):
        directory = os.path.join(root, f"client_{client}")
        modules.append(
            ClientCheckpointAndStateModule(
                pre_aggregation=[
                    LatestTorchModuleCheckpointer(directory, "pre_latest.safetensors"),
                    BestLossTorchModuleCheckpointer(directory, "pre_best_loss.safetensors"),
                ],
                post_aggregation=LatestTorchModuleCheckpointer(directory, "post_latest.safetensors"),
                state_checkpointer=PerRoundStateCheckpointer(directory),
            )
        )
        models.append(copy.deepcopy(global_model))
        optimizers.append(torch.optim.Adam(models[-1].parameters(), lr=1e-3))

    rows: list[tuple[str, float, float]] = []
    for round_number in range(1, args.rounds + 1):
        for client in range(args.clients):
            model, optimizer, module = models[client], optimizers[client], modules[client]
            model.load_state_dict(global_model.state_dict())
            x, y = client_data(client)
            loss_fn = nn.CrossEntropyLoss()
            with torch.no_grad():
                val_loss = loss_fn(model(x[-128:]), y[-128:]).item()
            blocked = timed(module.maybe_checkpoint, model, val_loss, {}, CheckpointMode.POST_AGGREGATION)
            rows.append(("post-aggregation", blocked, sync_save_seconds(model)))
            for _ in range(5):  # a few local steps
                optimizer.zero_grad()
                loss_fn(model(x[:384]), y[:384]).backward()
                optimizer.step()
            with torch.no_grad():
                val_loss = loss_fn(model(x[-128:]), y[-128:]).item()
            blocked = timed(module.maybe_checkpoint, model, val_loss, {}, CheckpointMode.PRE_AGGREGATION)
            rows.append(("pre-aggregation (x2)", blocked, sync_save_seconds(model) * 2))
            state = {"model": model, "optimizer": optimizer.state_dict(), "round": round_number}
            blocked = timed(module.save_state, "state.pt", state)
            rows.append(("state", blocked, sync_save_seconds(state)))
            print(
                f"round {round_number} client {client}: val loss {val_loss:.4f}; blocked "
                + ", ".join(f"{kind} {b * 1e3:.1f} ms (torch.save {s * 1e3:.1f} ms)" for kind, b, s in rows[-3:])
            )
        with torch.no_grad():  # FedAvg
            for name, tensor in global_model.state_dict().items():
                tensor.copy_(torch.stack([m.state_dict()[name] for m in models]).mean(dim=0))

    start = time.perf_counter()
    fedckpt.flush()
    flush_seconds = time.perf_counter() - start

    print("\nTime the training loop was blocked per save (first save excluded: it starts Ray)")
    print(f"{'save':<22}{'count':>6}{'fedckpt p50 ms':>16}{'torch.save p50 ms':>19}{'speed-up':>10}")
    for kind in dict.fromkeys(kind for kind, _, _ in rows):
        samples = [(b, s) for index, (k, b, s) in enumerate(rows) if k == kind and index > 0]
        blocked = statistics.median(b for b, _ in samples)
        sync = statistics.median(s for _, s in samples)
        print(f"{kind:<22}{len(samples):>6}{blocked * 1e3:>16.2f}{sync * 1e3:>19.2f}{sync / blocked:>9.1f}x")
    print(f"final flush (everything durable): {flush_seconds * 1e3:.0f} ms")

    # Reload and check against what is in memory.
    for client, module in enumerate(modules):
        post = module.post_aggregation[0].load_checkpoint()
        reloaded = module.pre_aggregation[0].load_state_dict()
        state = module.maybe_load_state("state.pt")
        assert state is not None and state["round"] == args.rounds
        for name, tensor in models[client].state_dict().items():
            assert torch.equal(reloaded[name], tensor), name
        assert isinstance(post, nn.Module)
        restored = torch.optim.Adam(state["model"].parameters(), lr=1e-3)
        restored.load_state_dict(state["optimizer"])
    print(f"reloaded and checked {args.clients} clients' checkpoints and state; see them with: fedckpt ls {root}")
    fedckpt.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
