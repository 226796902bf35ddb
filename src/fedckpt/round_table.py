"""Which rounds of a federated run can be resumed from: the round table of a checkpoint directory.

A round is *complete* when the server state of that round and the state of every client that
trained in it are kept (each a round version, :mod:`fedckpt.retention`) and durable (a version has
a manifest entry only once it is). The server state's version records how many clients' states its
round commits (``round_clients``: the clients whose training replies the round aggregated); the
clients' state versions of that round are counted below the clients' directory.

Reads manifest entries only: no torch, no Ray (``fedckpt ls --rounds`` uses it on a login node).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedckpt.retention import VERSION_MARK, version_round
from fedckpt.storage.base import RoundVersion, storage_for
from fedckpt.storage.manifest import ManifestEntry
from fedckpt.storage.paths import Location

SERVER_STATE = "server_state.pt"
CLIENT_STATE = "client_state.pt"


@dataclass(frozen=True)
class RoundRow:
    """One round of a run, as its checkpoints on storage tell it."""

    server_round: int
    complete: bool  # its server state and every client state it commits are kept and durable
    server_state: bool  # the round's server state is kept
    clients_committed: int | None  # the clients whose states the round commits (None: not recorded)
    clients_kept: int  # client states of the round kept
    bytes_kept: int  # every version of the round (models and states), counted once per file name
    bytes_freed: int  # what the round's saves deleted (versions of earlier rounds, or of an abandoned run)


def round_table(
    directory: str,
    server_state: str = SERVER_STATE,
    client_state: str = CLIENT_STATE,
    clients_dir: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> list[RoundRow]:
    """Every round with a version kept below ``directory``, oldest first.

    ``server_state``: the server state's path in ``directory`` (``server/server_state.pt`` for the
    example's layout); ``client_state``: each client's state name, in any directory below
    ``clients_dir`` (default: ``directory``).
    """
    root = Location.of(directory)
    clients_root = Location.of(clients_dir if clients_dir is not None else directory)
    server_path = str(root.join(server_state))
    server_dir = Location.of(server_path).parent
    storage = storage_for(str(root), storage_options)
    committed: dict[int, int | None] = {}
    clients: dict[int, int] = defaultdict(int)
    kept_bytes: dict[int, int] = defaultdict(int)
    freed_bytes: dict[int, int] = defaultdict(int)
    roots = [root] if _below(clients_root, root) else [root, clients_root]
    for path, entry in (found for top in roots for found in storage.iter_entries(str(top))):
        location = Location.of(path)
        if not _is_version(path, entry):
            continue  # a plain name: the newest save, not a kept round
        kept_bytes[entry.server_round] += entry.bytes
        freed_bytes[entry.server_round] += entry.freed_bytes or 0
        if version_round(server_path, location.name) is not None and location.parent == server_dir:
            committed[entry.server_round] = entry.round_clients
        elif version_round(str(location.parent.join(client_state)), location.name) is not None and _below(
            location.parent, clients_root
        ):
            clients[entry.server_round] += 1
    rows = []
    for server_round in sorted(kept_bytes):
        has_server = server_round in committed
        expected = committed.get(server_round)
        complete = has_server and (expected is None or clients[server_round] >= expected)
        rows.append(
            RoundRow(
                server_round,
                complete,
                has_server,
                expected,
                clients[server_round],
                kept_bytes[server_round],
                freed_bytes[server_round],
            )
        )
    return rows


def complete_rounds(rows: list[RoundRow]) -> list[int]:
    return [row.server_round for row in rows if row.complete]


def _below(location: Location, root: Location) -> bool:
    """Whether ``location`` is ``root`` or below it."""
    path, top = str(location), str(root)
    return path == top or path.startswith(top.rstrip("/") + "/")


def drop_rounds_after(directory: str, server_round: int, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Delete every round version below ``directory`` of a round after ``server_round``: a run resumed
    from ``server_round`` abandons them (else a client that does not train again for a while would
    find a state of the abandoned run newer than the round it resumes from). Returns what went.

    Call it with no saves of these checkpoints in flight (before the resumed run starts)."""
    storage = storage_for(directory, storage_options)
    later = [
        RoundVersion(entry.server_round, path, entry)
        for path, entry in storage.iter_entries(directory)
        if _is_version(path, entry) and entry.server_round > server_round
    ]
    for version in later:  # after the listing, which holds each entry's lock while it looks
        storage.remove_version(version)
    return sorted(version.path for version in later)


def _is_version(path: str, entry: ManifestEntry) -> bool:
    """Whether a checkpoint is a round version (a plain name records its round too, but is the newest save)."""
    return entry.server_round is not None and VERSION_MARK in Location.of(path).name
