"""This app with fedckpt beside FL4Health-style synchronous saves, both measured, through ``flwr run``.

    python examples/flower_app/compare.py                      # 10 clients, 5 rounds, 3 runs of each
    python examples/flower_app/compare.py --repeats 5 --run-config "model-width=1024"

Runs ``flwr run`` of this app with ``checkpointing="sync"`` and with fedckpt in turn, ``--repeats``
times each, the order alternating (drifts of the machine fall on both), each run in a new
checkpoint directory and in a fresh simulation process with its own local Ray on 127.0.0.1. Each
run's ServerApp writes its figures (``summary-file``): the time the clients and the server waited
on their checkpoints, restores included, and its wall time. This prints the medians side by side,
and its last line is a JSON summary of both.

It uses Flower's command line only, in a temporary ``FLWR_HOME``: ``flwr run`` starts a local
SuperLink there (ports 39091 and 39093), which this stops at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent
SUPERLINK_PORTS = (39091, 39093)  # where Flower 1.42's local SuperLink listens (fixed by Flower)
MODES = ("sync", "fedckpt")


def flwr_environment(flwr_home: Path) -> dict[str, str]:
    """The environment of ``flwr`` and of the SuperLink it starts: this Python's packages, Ray on loopback."""
    return {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        # The app's dependencies are this environment's (else the SuperLink installs them on every run).
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray binds to 127.0.0.1
        "RAY_ADDRESS": "local",  # each run starts a Ray of its own
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    }


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def running_processes() -> dict[int, int]:
    """Every running process (zombies left out), with its parent."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[0] != "Z":
            found[int(entry)] = int(fields[1])
    return found


def descendants(root: int) -> list[int]:
    """The processes started by ``root``, and by those, and so on."""
    parents = running_processes()
    tree, added = {root}, True
    while added:
        children = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= children
        added = bool(children)
    return sorted(tree - {root})


def signal_and_wait(pids: list[int], sig: int, timeout: float) -> list[int]:
    """Send ``sig`` to ``pids``; the ones still running after ``timeout`` seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the processes' exit, bounded by the deadline
        running = running_processes()
        alive = [pid for pid in alive if pid in running]
    return alive


def local_superlink(flwr_home: Path) -> int | None:
    """The local SuperLink ``flwr run`` started for ``flwr_home`` (it runs detached), if it runs."""
    database = f"--database {flwr_home / 'local-superlink' / 'state.db'}"
    return next((pid for pid in running_processes() if "flower-superlink" in command_line(pid)
                 and database in command_line(pid)), None)  # fmt: skip


def stop_local_superlink(flwr_home: Path) -> list[int]:
    """Stop that SuperLink and what it started (SIGTERM, then SIGKILL); the processes that survived."""
    superlink = local_superlink(flwr_home)
    if superlink is None:
        return []
    left = signal_and_wait([superlink, *descendants(superlink)], signal.SIGTERM, 20)
    return signal_and_wait(left, signal.SIGKILL, 10)


def listening(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port``."""
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def no_superlink_listening() -> None:
    """``flwr run`` would hand the runs to a SuperLink already listening, not start one of its own."""
    for port in SUPERLINK_PORTS:
        if listening(port):
            raise SystemExit(f"a Flower SuperLink (or another server) listens on 127.0.0.1:{port}: stop it first")


@contextlib.contextmanager
def flower_home() -> Iterator[Path]:
    """A temporary ``FLWR_HOME``; the local SuperLink started there is stopped on the way out."""
    no_superlink_listening()
    with tempfile.TemporaryDirectory(prefix="fedckpt-compare-") as work:
        home = Path(work) / "flwr-home"
        try:
            yield home
        finally:
            survivors = stop_local_superlink(home)
            if survivors:
                print(f"the local SuperLink's processes {survivors} did not stop", file=sys.stderr)


def run_app(flwr_home: Path, mode: str, directory: Path, args: argparse.Namespace) -> dict:
    """One ``flwr run`` of this app with ``mode``'s checkpoints in ``directory``; its summary."""
    summary_file = directory.with_suffix(".json")
    run_config = (
        f"num-server-rounds={args.num_server_rounds} checkpoint-dir='{directory}' checkpointing='{mode}' "
        f"summary-file='{summary_file}' {args.run_config}"
    )
    federation = f"num-supernodes={args.num_supernodes} client-resources-num-cpus=1"
    log_file = directory.with_suffix(".log")
    with open(log_file, "w") as log:
        completed = subprocess.run(
            ["flwr", "run", str(APP_DIR), "--stream", "--run-config", run_config, "--federation-config", federation],
            cwd=APP_DIR, env=flwr_environment(flwr_home), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    if completed.returncode != 0 or not summary_file.exists():
        tail = log_file.read_text()[-4000:]
        raise RuntimeError(f"flwr run ({mode}) did not complete (exit status {completed.returncode}):\n{tail}")
    return json.loads(summary_file.read_text())


def comparison(runs: dict[str, list[dict]]) -> dict:
    """Medians (and every run's figure) per mode, and fedckpt's as ratios of sync's."""
    modes = {}
    for mode, mode_runs in runs.items():
        activities = sorted({name for run in mode_runs for name in run["blocked_by_activity"]})
        modes[mode] = {
            "blocked_seconds": statistics.median(run["blocked_seconds"] for run in mode_runs),
            "wall_seconds": statistics.median(run["wall_seconds"] for run in mode_runs),
            "blocked_runs": [run["blocked_seconds"] for run in mode_runs],
            "wall_runs": [run["wall_seconds"] for run in mode_runs],
            "blocked_by_activity": {
                name: round(statistics.median(run["blocked_by_activity"].get(name, 0.0) for run in mode_runs), 4)
                for name in activities
            },
            "checkpoints_written": mode_runs[-1]["checkpoints_written"],
        }
    fedckpt, sync = modes["fedckpt"], modes["sync"]
    first = runs["fedckpt"][0]
    return {
        "compare": True,
        "blocked_ratio": round(fedckpt["blocked_seconds"] / sync["blocked_seconds"], 3),
        "wall_ratio": round(fedckpt["wall_seconds"] / sync["wall_seconds"], 4),
        "repeats": len(runs["fedckpt"]),
        "num_clients": first["num_clients"],
        "num_rounds": first["num_rounds"],
        "model_bytes": first["model_bytes"],
        **modes,
    }


def comparison_table(summary: dict) -> str:
    """The medians side by side, with where each mode's blocked time went."""
    sync, fedckpt = summary["sync"], summary["fedckpt"]
    lines = [
        f"{summary['num_clients']} clients, {summary['num_rounds']} rounds, {summary['model_bytes'] / 1e3:.0f} KB "
        f"model: medians of {summary['repeats']} runs each, alternating",
        f"{'':28}{'sync (torch.save)':>20}{'fedckpt':>14}{'fedckpt/sync':>14}",
    ]

    def row(label: str, a: float, b: float, unit: str = "s") -> str:
        ratio = f"{b / a:.2f}x" if a > 0 else "-"
        return f"{label:28}{a:>18.3f} {unit}{b:>12.3f} {unit}{ratio:>14}"

    lines.append(row("blocked (restores included)", sync["blocked_seconds"], fedckpt["blocked_seconds"]))
    for name in sorted({*sync["blocked_by_activity"], *fedckpt["blocked_by_activity"]}):
        lines.append(
            row(f"  {name}", sync["blocked_by_activity"].get(name, 0.0), fedckpt["blocked_by_activity"].get(name, 0.0))
        )
    lines.append(row("wall", sync["wall_seconds"], fedckpt["wall_seconds"]))
    lines.append(f"{'checkpoints written':28}{sync['checkpoints_written']:>20}{fedckpt['checkpoints_written']:>14}")
    return "\n".join(lines)


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each mode (default 3)")
    parser.add_argument("--num-supernodes", type=int, default=10, help="clients (default 10)")
    parser.add_argument("--num-server-rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument(
        "--run-config", default="", help='more of the app\'s settings, as flwr run takes them: "model-width=1024"'
    )
    return parser


def interleaved_runs(args: argparse.Namespace) -> Iterator[tuple[str, dict]]:
    """The runs ``args`` ask for, the modes alternating (the order reverses every repeat), each
    ``(mode, summary)`` as it completes, with its progress printed."""
    if args.repeats < 1 or args.num_supernodes < 2 or args.num_server_rounds < 1:
        raise SystemExit("--repeats and --num-server-rounds must be at least 1, --num-supernodes at least 2 (FedAvg's)")
    with flower_home() as home:
        for repeat in range(args.repeats):
            for mode in MODES if repeat % 2 == 0 else tuple(reversed(MODES)):
                print(f"run {repeat + 1}/{args.repeats}: {mode} ...", end=" ", flush=True)
                started = time.perf_counter()
                run = run_app(home, mode, home.parent / f"{mode}-{repeat}", args)
                print(f"{time.perf_counter() - started:.0f} s, blocked {run['blocked_seconds']:.3f} s", flush=True)
                yield mode, run


def compare(args: argparse.Namespace) -> dict:
    """The runs ``args`` ask for, with their progress and the table printed; the summary."""
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for mode, run in interleaved_runs(args):
        runs[mode].append(run)
    summary = comparison(runs)
    print(comparison_table(summary), flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    print(json.dumps(compare(argument_parser().parse_args(argv))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
