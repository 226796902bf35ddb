"""The ``fedckpt`` command: ``ls`` lists checkpoints with their manifest data, ``verify`` re-hashes them,
``status`` shows the live writer pools of a Ray cluster, ``bench`` compares fedckpt with other ways to
save a model. Only ``status`` and ``bench`` import Ray (and ``bench`` torch). ``bench`` needs rich
(``pip install 'fedckpt[bench]'``); the other commands print plain tables without it."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING

from fedckpt.cli_tables import Column, print_table
from fedckpt.errors import MissingExtraError
from fedckpt.storage.base import storage_for

if TYPE_CHECKING:
    from fedckpt.runtime.pool_status import WriterStatus  # imports Ray: for status only


def _human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} B"


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC).isoformat(timespec="seconds")


def command_ls(directory: str, as_json: bool) -> int:
    rows = [
        {"path": os.path.relpath(path, directory), **asdict(entry), "saved_at_iso": _iso(entry.saved_at)}
        for path, entry in storage_for(directory).iter_entries(directory)
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    # The path is kept whole on a narrow terminal (checksums are in --json, and verify checks them).
    columns = [Column("path", keep_whole=True), Column("format"), Column("seq", right=True), Column("score"),
               Column("bytes", right=True), Column("saved (UTC)")]  # fmt: skip
    cells = []
    for row in rows:
        score = "" if row["score"] is None else f"{row['score_name']}={row['score']:.6g}"
        saved = datetime.datetime.fromtimestamp(row["saved_at"], tz=datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
        cells.append([row["path"], row["format"], str(row["sequence"][1]), score, _human_bytes(row["bytes"]), saved])
    print_table(f"fedckpt checkpoints in {directory}", columns, cells)
    if not rows:
        print(f"No fedckpt checkpoints under {directory}")
    return 0


def command_ls_rounds(directory: str, server_state: str, client_state: str, as_json: bool) -> int:
    from fedckpt.round_table import round_table

    rows = round_table(directory, server_state, client_state)
    if as_json:
        print(json.dumps([asdict(row) for row in rows], indent=2))
        return 0
    columns = [Column("round", right=True), Column("complete"), Column("server state"),
               Column("client states", right=True), Column("bytes kept", right=True),
               Column("freed by its saves", right=True)]  # fmt: skip
    cells = [
        [
            str(row.server_round), "yes" if row.complete else "no", "kept" if row.server_state else "-",
            str(row.clients_kept) if row.clients_committed is None else f"{row.clients_kept}/{row.clients_committed}",
            _human_bytes(row.bytes_kept), _human_bytes(row.bytes_freed),
        ]
        for row in rows
    ]  # fmt: skip
    print_table(f"fedckpt rounds kept in {directory}", columns, cells)
    if not rows:
        print(f"No rounds kept under {directory} (checkpointers keep rounds with keep=, see fedckpt.retention)")
    return 0


def command_verify(directory: str) -> int:
    report = storage_for(directory).verify(directory)
    for problem in report.problems:
        print(f"CORRUPT {problem}", file=sys.stderr)
    for leftover in report.leftovers:
        print(f"LEFTOVER {leftover} (no manifest entry names it: an upload cut off by a crash)")
    print(
        f"verified {report.checked} checkpoint(s) under {directory}: {len(report.problems)} problem(s)"
        + (f", {len(report.leftovers)} leftover object(s)" if report.leftovers else "")
    )
    return 1 if report.problems else 0


DESCRIPTION = "fedckpt's checkpoints from a shell: list, verify, watch the writers, benchmark."
EPILOG = (
    "ls and verify import neither torch nor Ray. bench needs pip install 'fedckpt[bench]' (rich); the "
    "other commands print plain tables without it. fedckpt COMMAND --help gives a command's options."
)


def build_parser(describe_bench_cases: bool = True) -> argparse.ArgumentParser:
    """The command line; ``describe_bench_cases=False`` leaves the case names out of ``bench``'s
    help, which would import torch (``ls`` and ``verify`` start without it)."""
    parser = argparse.ArgumentParser(prog="fedckpt", description=DESCRIPTION, epilog=EPILOG)
    commands = parser.add_subparsers(dest="command", required=True)
    ls = commands.add_parser("ls", help="list checkpoints with their manifest data")
    ls.add_argument("directory")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.add_argument(
        "--rounds", action="store_true", help="one row per kept round: complete or not (resumable), and its bytes"
    )
    ls.add_argument("--server-state", default="server_state.pt", help="--rounds: the server state's name")
    ls.add_argument("--client-state", default="client_state.pt", help="--rounds: the clients' state name")
    verify = commands.add_parser("verify", help="re-hash every checkpoint; exit 1 on any mismatch")
    verify.add_argument("directory")
    status = commands.add_parser("status", help="the live writer pools of a Ray cluster: queues and throughput")
    status.add_argument("--address", default="auto", help="the Ray cluster (default: auto, the one on this machine)")
    status.add_argument("--interval", type=float, default=1.0, help="seconds between the two readings for the rates")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench = commands.add_parser(
        "bench",
        help="time fedckpt beside torch.save, a hand-rolled async save and dcp.async_save on the same model",
        description="Blocking time, time until durable and persist throughput of each save method, per case, "
        "as medians with ratios against torch.save measured in the same run. fedckpt's scripts in benchmarks/ "
        "(in its source repository) measure whole Flower runs.",
    )
    bench.add_argument("--cases", nargs="+", metavar="NAME", help=_cases_help() if describe_bench_cases else None)
    bench.add_argument(
        "--repeats", type=int, metavar="N", help="saves (or loops) per method and case (default 10, 5 with --quick)"
    )
    bench.add_argument("--dir", help="make the run's temp directory here (default: the system temp dir)")
    bench.add_argument("--json", metavar="FILE", help="also write every raw sample to FILE")
    bench.add_argument("--quick", action="store_true", help="small cases and fewer repeats (a few minutes)")
    bench.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: GPU saves (fp32-256mb, fp32-2gb, bf16-512mb-loop) beside the pinned-copy floor, torch.save and "
        "dcp.async_save; needs a CUDA device (benchmarks/gpu.py runs the same)",
    )
    bench.add_argument("--out", metavar="DIR", help="--device cuda: write gpu.json and gpu.txt under DIR")
    bench.add_argument(
        "--storage",
        metavar="URL",
        help="instead: persist each case to this object store URL (s3://bucket/prefix) beside a plain put of the "
        "same bytes (default cases: fp32-100mb fp32-1gb; credentials from the environment)",
    )
    return parser


def _cases_help() -> str:
    from fedckpt.bench.cases import DEFAULT_CASES, QUICK_CASES, case_names

    return (
        f"cases to run, of: {' '.join(case_names())} (default: {' '.join(DEFAULT_CASES)}; "
        f"with --quick: {' '.join(QUICK_CASES)})"
    )


def command_bench(args: argparse.Namespace) -> int:
    if args.device == "cuda":
        return command_bench_gpu(args)
    from fedckpt.bench.runner import run_bench  # torch and Ray: only for this command

    if args.storage:
        from fedckpt.bench.object_store import run_object_store_bench
        from fedckpt.bench.runner import default_console

        cases = args.cases or ["fp32-100mb", "fp32-1gb"]
        result = run_object_store_bench(args.storage, cases, args.repeats or 3, default_console())
        if args.json:
            with open(args.json, "w", encoding="utf-8") as out:
                json.dump(result, out, indent=2)
        return 0
    try:
        run_bench(cases=args.cases, repeats=args.repeats, directory=args.dir, json_path=args.json, quick=args.quick)
    except ValueError as error:
        print(f"fedckpt bench: {error}", file=sys.stderr)
        return 2
    return 0


def command_bench_gpu(args: argparse.Namespace) -> int:
    from fedckpt.bench.gpu import CudaUnavailable, run_gpu_bench  # torch, CUDA and Ray: only for this command

    try:
        result = run_gpu_bench(out=args.out, cases=args.cases, repeats=args.repeats, directory=args.dir)
    except CudaUnavailable as error:
        print(f"fedckpt bench --device cuda: {error}; run it on a machine with a GPU", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"fedckpt bench: {error}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=2)
    return 0


def command_status(address: str, interval: float, as_json: bool) -> int:
    import warnings

    import ray  # only for this command

    warnings.filterwarnings("ignore", category=FutureWarning, module="ray")  # Ray's tips, not ours

    from fedckpt.runtime.pool_status import live_writers

    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    except ConnectionError as error:
        print(f"fedckpt status: no Ray cluster at {address}: {error}", file=sys.stderr)
        return 2
    try:
        writers = live_writers(interval)
    finally:
        ray.shutdown()
    if as_json:
        rows = [{**asdict(writer), "stats": asdict(writer.stats)} for writer in writers]
        print(json.dumps(rows, indent=2))
        return 0
    if not writers:
        print(f"No fedckpt writers on the Ray cluster at {address}")
        return 0
    columns = [
        Column(name, right=name != "node")
        for name in ("#", "node", "queue", "saved", "failed", "resent", "written", "saves/s", "MiB/s")
    ]
    for namespace in sorted({writer.namespace for writer in writers}):
        pool = [writer for writer in writers if writer.namespace == namespace]
        cells = [_status_row(writer) for writer in pool]
        print_table(f"pool {namespace}: {len(pool)} writer(s)", columns, cells, compact=True)
    return 0


def _status_row(writer: WriterStatus) -> list[str]:
    stats, mib_per_second = writer.stats, writer.bytes_per_second / (1 << 20)
    return [
        writer.writer, writer.node_ip, str(stats.pending), str(stats.saved), str(stats.failed), str(stats.resends),
        _human_bytes(stats.bytes_written), f"{writer.saves_per_second:.1f}", f"{mib_per_second:.1f}",
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    bench = bool(words) and words[0] == "bench"
    if bench:
        try:
            import fedckpt.bench  # noqa: F401  (its extra: checked before the help, which lists its cases)
        except MissingExtraError as error:
            print(f"fedckpt bench: {error}", file=sys.stderr)
            return 2
    args = build_parser(describe_bench_cases=bench).parse_args(argv)
    if args.command == "bench":
        return command_bench(args)
    if args.command == "status":
        return command_status(args.address, args.interval, args.json)
    if not storage_for(args.directory).is_directory(args.directory):
        print(f"fedckpt: {args.directory} is not a directory", file=sys.stderr)
        return 2
    if args.command == "ls" and args.rounds:
        return command_ls_rounds(args.directory, args.server_state, args.client_state, args.json)
    if args.command == "ls":
        return command_ls(args.directory, args.json)
    return command_verify(args.directory)


if __name__ == "__main__":
    sys.exit(main())
