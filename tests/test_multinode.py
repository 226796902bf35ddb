"""fedckpt on a Ray cluster of three nodes, all on 127.0.0.1 (``ray.cluster_utils.Cluster``).

Clients are Ray actors pinned to a node by a custom resource (``node_head``, ``node_b``, ``node_c``).
The module starts its own cluster, so it shuts down the session's local Ray first; conftest.py runs
it last.
"""

import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from itertools import permutations

import pytest
import ray
import torch
from ray import cloudpickle
from ray.cluster_utils import Cluster
from safetensors.torch import load_file
from torch import nn

import fedckpt
from fedckpt import LatestTorchModuleCheckpointer, PerRoundStateCheckpointer
from fedckpt.cli import main as fedckpt_cli
from fedckpt.runtime import failpoints, lifecycle
from fedckpt.runtime.pool import shard_of
from fedckpt.runtime.pool_status import live_writers
from fedckpt.runtime.staging import PREFIX, SHM_DIR, remove_orphans
from fedckpt.storage.base import storage_for
from fedckpt.storage.paths import checkpoint_key

# Workers of this cluster cannot import this test module: ship its functions and classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

# Each test here takes well under a minute; one that hangs fails with a stack dump instead of holding the run.
pytestmark = pytest.mark.timeout(180)

MB = 1 << 20
NODE_NAMES = ("head", "b", "c")
GPU_SLOTS_PER_NODE = 1
# The GCS declares a node dead after 3 missed health checks 0.5 s apart (the default takes 30 s).
HEALTH_CHECKS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_failure_threshold": 3}


class ClusterNodes:
    """The running cluster, its nodes by name and their Ray node ids."""

    def __init__(self) -> None:
        self.node_args = node_args = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 512 * MB}
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                **node_args,
                "resources": {"node_head": 100},
                "include_dashboard": False,
                "_system_config": HEALTH_CHECKS,
            },
        )
        self.nodes = {"head": self.cluster.head_node}
        for name in NODE_NAMES[1:]:  # an emulated GPU slot each, which ClientApps ask halves of
            resources = {f"node_{name}": 100, "gpu_slot": GPU_SLOTS_PER_NODE}
            self.nodes[name] = self.cluster.add_node(**node_args, resources=resources)
        self.cluster.wait_for_nodes()
        self.ids: dict[str, str] = {}

    def connect(self) -> None:
        ray.init(address=self.cluster.address, log_to_driver=False)
        for node in ray.nodes():
            for name in NODE_NAMES:
                if f"node_{name}" in node["Resources"]:
                    self.ids[name] = node["NodeID"]

    def add(self, name: str) -> None:
        """A worker node of this name again (after :meth:`remove`), with a new node id."""
        resources = {f"node_{name}": 100, "gpu_slot": GPU_SLOTS_PER_NODE}
        self.nodes[name] = self.cluster.add_node(**self.node_args, resources=resources)
        self.cluster.wait_for_nodes()
        self.ids[name] = next(
            node["NodeID"] for node in ray.nodes() if node["Alive"] and f"node_{name}" in node["Resources"]
        )

    def alive(self) -> list[str]:
        return [name for name in NODE_NAMES if name in self.nodes]

    def name_of(self, node_id: str) -> str:
        return next(name for name, known in self.ids.items() if known == node_id)

    def remove(self, name: str) -> None:
        """Kill every process of a worker node at once (SIGKILL), as when its machine goes away.

        ``Cluster.remove_node`` kills the node's raylet and services; its workers would notice and
        exit only about 2 s later, finishing the writes they had started: kill them too.
        """
        node = self.nodes.pop(name)
        for pid in self.processes([node]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.cluster.remove_node(node, allow_graceful=False)

    def processes(self, nodes: list | None = None) -> set[int]:
        """Pids of the processes of ``nodes`` (default: all): GCS, raylets, agents, workers."""
        nodes = list(self.nodes.values()) if nodes is None else nodes
        roots = {info.process.pid for node in nodes for infos in node.all_processes.values() for info in infos}
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as stat:
                        parent = int(stat.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(parent, []).append(int(entry))
        found: set[int] = set()
        todo = list(roots)
        while todo:
            pid = todo.pop()
            if pid not in found:
                found.add(pid)
                todo.extend(children.get(pid, []))
        return found


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():  # the session's single-node instance
        fedckpt.shutdown()
        ray.shutdown()
    nodes = ClusterNodes()
    try:
        nodes.connect()
        yield nodes
    finally:
        try:
            fedckpt.shutdown()
        finally:
            ray.shutdown()
            nodes.cluster.shutdown()
            remove_orphans(settle_seconds=2.0, grace_seconds=0.0)  # staging segments of the killed workers


def state_of(counter: int, numel: int) -> dict:
    return {"counter": counter, "x": torch.full((numel,), float(counter))}


def model_of(counter: int, width: int) -> nn.Module:
    model = nn.Linear(width, width)
    with torch.no_grad():
        model.weight.fill_(counter)
        model.bias.fill_(counter)
    return model


def state_counter_on_disk(path: str) -> int | None:
    """The counter of a state file, read with torch.load alone (None if there is no file)."""
    if not os.path.exists(path):
        return None
    state = torch.load(path, weights_only=True)
    assert torch.all(state["x"] == state["counter"]), path
    return state["counter"]


def model_counter_on_disk(path: str) -> int | None:
    """The counter of a model file, read with safetensors alone (None if there is no file)."""
    if not os.path.exists(path):
        return None
    tensors = load_file(path)
    counter = int(tensors["weight"].flatten()[0])
    assert torch.all(tensors["weight"] == counter) and torch.all(tensors["bias"] == counter), path
    return counter


@ray.remote(num_cpus=0, max_concurrency=2)
class Client:
    """A federated client on one node: saves and loads through fedckpt in its own Ray worker."""

    def __init__(self, directory: str, namespace: str) -> None:
        fedckpt.init(namespace=namespace)  # joins the pool the driver created
        self.directory = directory
        self.states = PerRoundStateCheckpointer(directory)
        self.models: dict[str, LatestTorchModuleCheckpointer] = {}
        self.rounds_done = 0
        self.stopped = threading.Event()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def model_checkpointer(self, name: str) -> LatestTorchModuleCheckpointer:
        return self.models.setdefault(name, LatestTorchModuleCheckpointer(self.directory, name))

    def save_states(self, names: list[str], counter: int, numel: int) -> None:
        for name in names:
            self.states.save_checkpoint(name, state_of(counter, numel))

    def save_model(self, name: str, counter: int, width: int) -> None:
        self.model_checkpointer(name).maybe_checkpoint(model_of(counter, width), float(counter), {})

    def load_state(self, name: str) -> tuple[int | None, int]:
        """(the counter on disk before fedckpt waited, the counter fedckpt loaded)."""
        before = state_counter_on_disk(os.path.join(self.directory, name))
        state = self.states.load_checkpoint(name)
        assert torch.all(state["x"] == state["counter"])
        return before, state["counter"]

    def load_model(self, name: str) -> tuple[int | None, int]:
        before = model_counter_on_disk(os.path.join(self.directory, name))
        weight = self.model_checkpointer(name).load_state_dict()["weight"]
        return before, int(weight.flatten()[0])

    def run(self, state_names: list[str], model_name: str, pace: float) -> int:
        """Save every state and the model once per round until :meth:`stop`; returns the last counter issued."""
        counter = -1
        while not self.stopped.is_set():
            counter += 1
            self.save_states(state_names, counter, MB // 4)
            self.save_model(model_name, counter, 256)
            self.rounds_done = counter + 1
            self.stopped.wait(pace)  # paces the rounds; returns at once when stopped
        return counter

    def stop(self) -> None:
        self.stopped.set()

    def progress(self) -> int:
        return self.rounds_done

    def save_late(self, names: list[str], counter: int) -> None:
        """Save ``names`` in a burst the writers cannot keep up with: the first four are 48 MB, so
        that the rest queue behind them."""
        self.save_states(names[:4], counter, 12 * MB)
        self.save_states(names[4:], counter, 2 * MB)

    def flush(self) -> None:
        fedckpt.flush()

    def staged_in_shared_memory(self) -> bool:
        """Whether this process has staging segments in /dev/shm (the transport to writers on its node)."""
        return any(name.startswith(f"{PREFIX}{os.getpid()}-") for name in os.listdir(SHM_DIR))

    def stats(self) -> fedckpt.ProcessStats:
        return fedckpt.stats()

    def writers_of(self, names: list[str]) -> dict[str, str]:
        """The writer that wrote each checkpoint's current version, as its manifest entry names it."""
        paths = {name: os.path.join(self.directory, name) for name in names}
        return {name: storage_for(path).read_entry(path).writer for name, path in paths.items()}


def client_on(name: str, directory, namespace: str):
    return Client.options(resources={f"node_{name}": 1}).remote(str(directory), namespace)


def writer_nodes(writers: list) -> list[str]:
    return [info.node_id for info in ray.get([writer.describe.remote() for writer in writers])]


def pool_with_a_writer_on_a_worker_node(cluster: ClusterNodes, namespace: str, num_writers: int):
    """A writer pool with at least one writer on a node other than the head (which hosts this driver).

    Ray places an actor that asks for no resources (a writer: ``num_cpus=0``) on a random alive node,
    wherever it is created from; so create pools until one lands. Returns (namespace, writers, the
    worker node holding most of them).
    """
    for attempt in range(20):
        name = f"{namespace}-{attempt}"
        fedckpt.init(namespace=name, num_writers=num_writers)
        writers = lifecycle.coordinator().writers()
        hosts = writer_nodes(writers)
        workers = [node for node in cluster.alive() if node != "head" and cluster.ids[node] in hosts]
        if workers:
            return name, writers, max(workers, key=lambda node: hosts.count(cluster.ids[node]))
        lifecycle.coordinator().stop_writers()
    pytest.fail("Ray placed every writer pool on the head node")


def hold_writes(writers: list, point: str = "writer.writing") -> None:
    """These writers keep every save they are sent unwritten until their process ends (a kill)."""
    ray.get([writer.__ray_call__.remote(failpoints.hold_in_actor, point) for writer in writers])


def names_owned_by(writer_indexes: set[int], pool_size: int, directory, prefix: str, count: int) -> list[str]:
    """``count`` checkpoint names in ``directory`` whose keys belong to the writers ``writer_indexes``."""
    names = (f"{prefix}_{index}.pt" for index in range(10_000))
    owned = (
        name for name in names if shard_of(checkpoint_key(os.path.join(directory, name)), pool_size) in writer_indexes
    )
    return [next(owned) for _ in range(count)]


def _inet_sockets() -> dict[int, tuple[str, str]]:
    """Every TCP and UDP socket of this network namespace: inode -> (local address, remote address)."""
    sockets = {}
    for table, family in (
        ("tcp", socket.AF_INET),
        ("udp", socket.AF_INET),
        ("tcp6", socket.AF_INET6),
        ("udp6", socket.AF_INET6),
    ):
        if not os.path.exists(f"/proc/net/{table}"):  # no IPv6 here
            continue
        with open(f"/proc/net/{table}") as file:
            rows = file.read().splitlines()[1:]
        for row in rows:
            fields = row.split()
            addresses = []
            for endpoint in fields[1:3]:
                raw = bytes.fromhex(endpoint.split(":")[0])
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # little-endian words
                addresses.append(socket.inet_ntop(family, words))
            sockets[int(fields[9])] = (addresses[0], addresses[1])
    return sockets


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


# ---- tests ------------------------------------------------------------------------------------------


def test_every_node_and_every_socket_is_on_loopback(cluster):
    """The three nodes are alive on 127.0.0.1, and no socket of any process of the cluster (GCS,
    raylets, agents, workers) is bound or connected to any other address."""
    nodes = [node for node in ray.nodes() if node["Alive"]]
    assert len(nodes) == 3 and set(cluster.ids) == set(NODE_NAMES)
    assert {node["NodeManagerAddress"] for node in nodes} == {"127.0.0.1"}
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    sockets = _inet_sockets()
    checked, outside = 0, []
    for pid in cluster.processes():
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:  # exited meanwhile
            continue
        for link in links:
            if link.startswith("socket:[") and int(link[8:-1]) in sockets:
                local, remote = sockets[int(link[8:-1])]
                checked += 1
                if not _is_loopback(local) or not (_is_loopback(remote) or ipaddress.ip_address(remote).is_unspecified):
                    outside.append((pid, local, remote))
    assert checked > 20  # GCS, three raylets, their agents and workers
    assert outside == []


def test_saves_on_every_node_are_read_right_after_on_every_other_node(cluster, tmp_path):
    """Read your writes across nodes: a state or model save whose call returned on one node is what a
    load issued right after on another node returns (no flush in between), for every ordered pair of
    nodes. A client on a node without writers stages its saves in Ray's object store, not /dev/shm."""
    namespace = "fedckpt-multinode-ryw"
    fedckpt.init(namespace=namespace, num_writers=2)
    try:
        writers = lifecycle.coordinator().writers()
        hosts = writer_nodes(writers)
        clients = {name: client_on(name, tmp_path, namespace) for name in NODE_NAMES}
        assert {name: ray.get(client.node_id.remote()) for name, client in clients.items()} == cluster.ids
        counter, waited = 0, 0
        for saver, loader in permutations(NODE_NAMES, 2):
            for _ in range(2):
                counter += 1
                ray.get(clients[saver].save_states.remote(["rw.pt"], counter, 4 * MB))  # 16 MB
                before, loaded = ray.get(clients[loader].load_state.remote("rw.pt"))
                assert loaded == counter, (saver, loader)
                waited += before != counter
                ray.get(clients[saver].save_model.remote("rw.safetensors", counter, 1024))  # 4 MB
                before, loaded = ray.get(clients[loader].load_model.remote("rw.safetensors"))
                assert loaded == counter, (saver, loader)
                waited += before != counter
        # The loads found an older file on disk and had to wait: without the wait they would have failed.
        assert waited > 0
        fedckpt.flush()
        assert state_counter_on_disk(str(tmp_path / "rw.pt")) == counter
        assert model_counter_on_disk(str(tmp_path / "rw.safetensors")) == counter
        # Every client staged in its own node's /dev/shm, and nothing went through Ray's object store:
        # the keys' home is on one node, the bytes were written by each saver's node.
        assert len(set(hosts)) < len(NODE_NAMES)  # so some savers were away from the home
        for name, client in clients.items():
            assert ray.get(client.staged_in_shared_memory.remote()), name
            assert ray.get(client.stats.remote()).bytes_object_store == 0, name
        for client in clients.values():
            ray.kill(client)
    finally:
        lifecycle.coordinator().stop_writers()


def test_a_home_restarted_on_another_node_has_the_saves_written_where_they_were_staged(cluster, tmp_path):
    """A client beside its key's home stages in /dev/shm; once the home died and Ray restarted it on
    another node, the client still stages in its own /dev/shm and its node's writer writes the save:
    the home maps no segment and nothing goes through Ray's object store."""
    namespace = "fedckpt-multinode-moved"
    fedckpt.init(namespace=namespace, num_writers=1)
    try:
        home = lifecycle.coordinator().writers()[0]
        first_node = writer_nodes([home])[0]
        client = Client.options(resources={f"node_{cluster.name_of(first_node)}": 1}).remote(str(tmp_path), namespace)
        ray.get(client.save_states.remote(["s.pt"], 1, MB))
        if not ray.get(client.staged_in_shared_memory.remote()):
            pytest.fail("a client beside its writer did not stage in /dev/shm")
        for _ in range(20):  # Ray restarts the home on a random node
            os.kill(ray.get(home.describe.remote()).pid, signal.SIGKILL)
            if writer_nodes([home])[0] != first_node:
                break
        else:
            pytest.fail("Ray restarted the home on its node every time")
        ray.get(client.save_states.remote(["s.pt"], 2, MB))
        if ray.get(client.load_state.remote("s.pt"))[1] != 2:
            pytest.fail("the save to the restarted home was not read back")
        mapped = ray.get(home.__ray_call__.remote(lambda writer: sorted(writer.io.staged.segments._maps)))
        written_by = ray.get(client.writers_of.remote(["s.pt"]))["s.pt"]
        stats = ray.get(client.stats.remote())
        ray.kill(client)
    finally:
        lifecycle.coordinator().stop_writers()
    assert mapped == [], "the home read a /dev/shm segment of a process on another node"
    assert written_by.startswith(f"node-{first_node[:8]}-"), written_by
    assert stats.bytes_object_store == 0


def _writer_node(writer: str, homes: list) -> str:
    """The node (first 8 characters of its id) of the writer a manifest entry names."""
    if writer.startswith("node-"):
        return writer.split("-")[1]
    pid = int(writer.rsplit("@", 1)[1])
    return next(info.node_id[:8] for info in homes if info.pid == pid)


def test_clients_on_every_node_have_their_saves_written_on_their_own_node(cluster, tmp_path):
    """Clients on all three nodes save states and a model for several rounds: none of their bytes goes
    through Ray's object store, every version was written by a writer on the saving client's node,
    and node writers run exactly on the nodes whose clients' keys have their home elsewhere."""
    namespace = "fedckpt-multinode-local"
    fedckpt.init(namespace=namespace, num_writers=1)
    try:
        homes = ray.get([writer.describe.remote() for writer in lifecycle.coordinator().writers()])
        clients = {name: client_on(name, tmp_path / name, namespace) for name in NODE_NAMES}
        names = ["s0.pt", "s1.pt"]
        for counter in range(4):
            ray.get([client.save_states.remote(names, counter, MB) for client in clients.values()])
            ray.get([client.save_model.remote("m.safetensors", counter, 256) for client in clients.values()])
        ray.get([client.flush.remote() for client in clients.values()])
        for name, client in clients.items():
            stats = ray.get(client.stats.remote())
            assert stats.bytes_object_store == 0 and stats.bytes_shared_memory > 0, name
            written_by = ray.get(client.writers_of.remote([*names, "m.safetensors"]))
            assert {_writer_node(writer, homes) for writer in written_by.values()} == {cluster.ids[name][:8]}, name
            assert state_counter_on_disk(str(tmp_path / name / "s0.pt")) == 3
            assert model_counter_on_disk(str(tmp_path / name / "m.safetensors")) == 3
        node_writers = lifecycle.coordinator().pool().node_writers()
        nodes_with_writers = {stats.node_id for stats in ray.get([writer.stats.remote() for writer in node_writers])}
        assert nodes_with_writers == set(cluster.ids.values()) - {homes[0].node_id}
        shown = {status.writer for status in live_writers(0.0) if status.namespace == namespace}
        assert shown == {"0"} | {f"{node[:8]}/0" for node in nodes_with_writers}  # fedckpt status lists them
        for client in clients.values():
            ray.kill(client)
    finally:
        lifecycle.coordinator().stop_writers()


def test_a_node_writer_killed_mid_run_loses_no_acknowledged_save(cluster, tmp_path):
    """SIGKILL the writer of a node while it writes a burst of saves a client there acknowledged: Ray
    restarts it on the same node, the home's write calls reach it again, and every save is on disk."""
    namespace = "fedckpt-multinode-node-writer-kill"
    fedckpt.init(namespace=namespace, num_writers=1)
    try:
        home_node = cluster.name_of(writer_nodes(lifecycle.coordinator().writers())[0])
        away = next(name for name in NODE_NAMES if name != home_node)
        client = client_on(away, tmp_path, namespace)
        names = [f"late_{index}.pt" for index in range(16)]
        ray.get(client.save_states.remote(names, 0, 1024))
        ray.get(client.flush.remote())
        pool = lifecycle.coordinator().pool()
        (node_writer,) = pool.node_writers()
        hold_writes([node_writer], "node_writer.writing")
        ray.get(client.save_late.remote(names, 1))
        before = ray.get(node_writer.stats.remote())
        os.kill(before.pid, signal.SIGKILL)
        lost = [name for name in names if state_counter_on_disk(str(tmp_path / name)) != 1]
        ray.get(client.flush.remote())
        fedckpt.flush()
        assert [name for name in names if state_counter_on_disk(str(tmp_path / name)) != 1] == []
        after = ray.get(node_writer.stats.remote())
        assert after.pid != before.pid and after.node_id == before.node_id == cluster.ids[away]
        assert lost == names  # the held writes: none was written before the kill
        ray.kill(client)
    finally:
        lifecycle.coordinator().stop_writers()


def test_a_node_lost_with_acknowledged_saves_staged_on_it_is_an_error_naming_them(cluster, tmp_path, capsys):
    """A node goes (SIGKILL of all its processes) while its writer holds saves a client there had
    acknowledged, their home on another node: the bytes went with the node, so a flush from any
    process raises ``CheckpointError`` naming those checkpoints and the lost node; each keeps a
    complete earlier version, and ``fedckpt verify`` is clean. Node ``c`` goes, and comes back
    as a new node for the next tests."""
    namespace = "fedckpt-multinode-node-lost"
    fedckpt.init(namespace=namespace, num_writers=1)
    home = lifecycle.coordinator().writers()[0]
    for _ in range(20):  # the home must survive: not on the victim
        if writer_nodes([home])[0] != cluster.ids["c"]:
            break
        os.kill(ray.get(home.describe.remote()).pid, signal.SIGKILL)
    else:
        pytest.fail("Ray restarted the home on the victim node every time")
    client = client_on("c", tmp_path, namespace)
    names = [f"late_{index}.pt" for index in range(16)]
    ray.get(client.save_states.remote(names, 0, 1024))
    ray.get(client.flush.remote())
    (node_writer,) = lifecycle.coordinator().pool().node_writers()  # on c: it writes what c staged
    hold_writes([node_writer], "node_writer.writing")  # the node goes with the new saves unwritten
    ray.get(client.save_late.remote(names, 1))
    cluster.remove("c")
    try:
        with pytest.raises(fedckpt.CheckpointError, match="lost") as raised:
            fedckpt.flush(timeout=120)
        failed = set(raised.value.errors)
        assert failed == {checkpoint_key(str(tmp_path / name)) for name in names}
        assert all("node" in str(error) for error in raised.value.errors.values())
        for name in names:  # each keeps its complete earlier version
            assert state_counter_on_disk(str(tmp_path / name)) == 0, name
        fedckpt.flush()  # each error is reported once
        capsys.readouterr()
        assert fedckpt_cli(["verify", str(tmp_path)]) == 0
    finally:  # the next tests need the node back, whatever happened here
        lifecycle.coordinator().stop_writers()
        cluster.add("c")


def test_writers_never_hold_the_gpu_slots_clientapps_ask_for(cluster, tmp_path):
    """Clients ask for fractions of emulated GPU slots (a custom resource on the worker nodes) until
    every slot is taken; their saves still go through (node writers start without any resource), and
    once the clients are gone every slot is free again: no writer holds one."""
    namespace = "fedckpt-multinode-gpu-slots"
    fedckpt.init(namespace=namespace, num_writers=1)
    try:
        workers = [name for name in cluster.alive() if name != "head"]
        total = GPU_SLOTS_PER_NODE * len(workers)
        clients = [
            Client.options(resources={f"node_{name}": 1, "gpu_slot": 0.5}).remote(
                str(tmp_path / f"{name}{index}"), namespace
            )
            for name in workers
            for index in range(2 * GPU_SLOTS_PER_NODE)
        ]
        ray.get([client.save_states.remote(["s.pt"], 1, MB) for client in clients], timeout=120)
        ray.get([client.flush.remote() for client in clients], timeout=120)
        assert ray.available_resources().get("gpu_slot", 0) == 0  # the clients hold every slot
        for client in clients:
            ray.kill(client)
        deadline = time.monotonic() + 30
        while ray.available_resources().get("gpu_slot", 0) != total:
            assert time.monotonic() < deadline, f"writers hold gpu slots: {ray.available_resources()}"
            time.sleep(0.2)  # resource views update asynchronously
        node_writers = lifecycle.coordinator().pool().node_writers()
        assert {ray.get(writer.stats.remote()).node_id for writer in node_writers} >= {
            cluster.ids[n] for n in workers
        } - {writer_nodes(lifecycle.coordinator().writers())[0]}
    finally:
        lifecycle.coordinator().stop_writers()


def test_a_node_with_writers_removed_mid_run_loses_no_acknowledged_save(cluster, tmp_path, capsys):
    """SIGKILL a node that hosts writers while clients on another node keep saving, before, during and
    after: every save that returned is on disk after the clients and the driver flush (the clients
    re-send what the dead writers held), the writers restarted on surviving nodes, and
    ``fedckpt verify`` finds no problem."""
    namespace, writers, victim = pool_with_a_writer_on_a_worker_node(cluster, "fedckpt-multinode-removal", 2)
    survivor = next(name for name in cluster.alive() if name not in ("head", victim))
    before_removal = ray.get([writer.describe.remote() for writer in writers])
    on_victim = {info.index for info in before_removal if info.node_id == cluster.ids[victim]}
    savers = [client_on(survivor, tmp_path / f"client_{index}", namespace) for index in range(2)]
    late = client_on(survivor, tmp_path / "late", namespace)
    ray.get([client.node_id.remote() for client in [*savers, late]])
    state_names = ["a.pt", "b.pt", "c.pt"]
    runs = [saver.run.remote(state_names, "model.safetensors", 0.02) for saver in savers]

    def wait_for_rounds(target: list[int]) -> list[int]:
        deadline = time.monotonic() + 60
        while True:
            progress = ray.get([saver.progress.remote() for saver in savers])
            if all(done >= wanted for done, wanted in zip(progress, target, strict=True)):
                return progress
            ray.get(ray.wait(runs, timeout=0)[0])  # a client that failed raises here
            assert time.monotonic() < deadline, f"the clients stopped saving at rounds {progress}"
            time.sleep(0.02)  # polls the clients' progress

    wait_for_rounds([10, 10])
    # Saves acknowledged by the writers on the victim right before it goes, some still unwritten.
    late_names = names_owned_by(on_victim, len(writers), tmp_path / "late", "late", 16)
    hold_writes([writers[index] for index in on_victim])
    ray.get(late.save_late.remote(late_names, 7))
    cluster.remove(victim)
    # Right away: the late client re-sends what the dead writers held as soon as they restart.
    lost = [name for name in late_names if state_counter_on_disk(str(tmp_path / "late" / name)) != 7]
    progress_at_removal = ray.get([saver.progress.remote() for saver in savers])
    wait_for_rounds([done + 10 for done in progress_at_removal])  # the clients keep saving
    ray.get([saver.stop.remote() for saver in savers])
    last_counters = ray.get(runs)

    after_removal = ray.get([writer.describe.remote() for writer in writers])
    alive = {cluster.ids[name] for name in cluster.alive()}
    for old, new in zip(before_removal, after_removal, strict=True):
        assert new.node_id in alive
        assert (new.epoch != old.epoch) == (old.index in on_victim)  # only the victim's writers restarted
    assert lost == late_names  # the held writes: none was written before the node went

    ray.get([client.flush.remote() for client in [*savers, late]])
    fedckpt.flush()
    expected = {tmp_path / "late" / name: 7 for name in late_names}
    for index in range(2):
        expected.update({tmp_path / f"client_{index}" / name: last_counters[index] for name in state_names})
    for path, counter in expected.items():
        assert state_counter_on_disk(str(path)) == counter, path
        loaded = PerRoundStateCheckpointer(path.parent).load_checkpoint(path.name)
        assert loaded["counter"] == counter and torch.all(loaded["x"] == counter)
    for index in range(2):
        directory = str(tmp_path / f"client_{index}")
        assert model_counter_on_disk(os.path.join(directory, "model.safetensors")) == last_counters[index]
        model = LatestTorchModuleCheckpointer(directory, "model.safetensors").load_checkpoint()
        assert torch.all(model.weight == last_counters[index])
    capsys.readouterr()
    assert fedckpt_cli(["verify", str(tmp_path)]) == 0
    assert f"verified {len(expected) + 2} checkpoint(s)" in capsys.readouterr().out
    for client in [*savers, late]:
        ray.kill(client)
    cluster.add(victim)  # the next tests run on three nodes again


def test_a_flush_in_another_process_covers_saves_a_dead_writer_held(cluster, tmp_path):
    """``fedckpt.flush()`` waits for every save issued before it by any process (README): also for saves
    a client had acknowledged by a writer that then died with its node, while the client stays idle
    (its coordinator re-sends them in the background; the restarted writer waits for them)."""
    namespace, writers, victim = pool_with_a_writer_on_a_worker_node(cluster, "fedckpt-multinode-flush", 1)
    client = client_on("head", tmp_path, namespace)
    names = [f"late_{index}.pt" for index in range(16)]
    hold_writes(writers)
    ray.get(client.save_late.remote(names, 7))
    cluster.remove(victim)
    lost = [name for name in names if state_counter_on_disk(str(tmp_path / name)) != 7]
    assert lost == names  # the held writes: none was written before the node went
    fedckpt.flush()  # the client makes no call meanwhile
    missing = [name for name in lost if state_counter_on_disk(str(tmp_path / name)) != 7]
    assert missing == [], f"fedckpt.flush() returned, but {len(missing)} acknowledged saves are not on disk"
    assert cluster.name_of(writer_nodes(writers)[0]) != victim
    ray.get(client.flush.remote())
    ray.kill(client)
    cluster.add(victim)


def test_a_flower_simulation_spread_over_the_nodes_is_killed_and_resumed(cluster, tmp_path):
    """The example Flower simulation joins the cluster; its ClientApps (one CPU each, one CPU per node)
    run on every node, so a client saves from different nodes in different rounds. SIGKILLed once a
    round is durable, the same command resumes from that round and ends with every client's steps
    counted once; the clients' checkpoints were written on the nodes that saved them."""
    from test_flower_simulation import ENV, SMALL, client_states, durable_round, example_command, kill_once_durable

    env = {**ENV, "RAY_ADDRESS": cluster.cluster.address}
    clients, rounds, steps = 6, 5, 3
    options = ["--num-clients", str(clients), "--num-rounds", str(rounds), *SMALL]
    command = example_command(tmp_path, *options)
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True
    )
    kill_once_durable(process, tmp_path, 2)  # the example's driver: its job's ClientApps and writers go with it
    killed_at = durable_round(tmp_path)
    assert 2 <= killed_at < rounds
    assert fedckpt_cli(["verify", str(tmp_path)]) == 0

    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=420)
    assert completed.returncode == 0, completed.stderr[-4000:]
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    assert summary["resumed_from_round"] == killed_at and summary["rounds_completed"] == rounds
    for client in range(clients):
        assert client_states(tmp_path, client)[rounds]["local_steps"] == rounds * steps
    writers = {
        entry.writer for path, entry in storage_for(str(tmp_path)).iter_entries(str(tmp_path)) if "/clients/" in path
    }
    assert any(writer.startswith("node-") for writer in writers), writers  # written away from the home's node
    assert fedckpt_cli(["verify", str(tmp_path)]) == 0
