"""Canaries for the private Ray, torch, s3fs, fsspec and Flower names fedckpt uses (``fedckpt/_compat.py``).

Run this file first after upgrading any of those libraries. Each canary calls the name for real on
a tiny input (real Ray, the moto S3 server) and checks the behaviour fedckpt relies on; when an
upgrade removes or changes it, the test fails with the library, the name and the installed version.
The last tests check that every name the adapter lists has a canary, and that no module of
fedckpt outside the adapter touches a private name of these libraries.
"""

from __future__ import annotations

import ast
import asyncio
import functools
import io
import os
import subprocess
import sys
import textwrap
import uuid
import zipfile
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from torch import nn

import fedckpt
from fedckpt import _compat
from fedckpt.storage.small_state import load_small_state

CANARIES: dict[str, str] = {}  # private name -> the test that guards it


def canary(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a test as the canary of ``name`` (a key of ``_compat.PRIVATE_NAMES``): any failure in it
    is reported as that name having changed in the installed version of its library."""
    library = _compat.PRIVATE_NAMES[name]

    def decorate(test: Callable[..., Any]) -> Callable[..., Any]:
        CANARIES[name] = test.__name__

        @functools.wraps(test)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return test(*args, **kwargs)
            except Exception as error:
                pytest.fail(
                    f"{library} {version(library)}: {name} is gone or no longer does what fedckpt relies on "
                    f"({type(error).__name__}: {error}). Adapt its function in src/fedckpt/_compat.py, or keep "
                    f"{library} at a version listed in README.md, 'Supported versions'."
                )

        return run

    return decorate


def without_ray_env() -> dict[str, str]:
    """This environment without the switches conftest sets for Ray (a child that starts its own)."""
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}


def python(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=180, env=env
    )


def run_python(script: str, env: dict[str, str]) -> str:
    result = python(script, env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


# ---- Ray ------------------------------------------------------------------------------------------


@canary("ray._private.ray_constants.ENABLE_RAY_CLUSTER")
def test_ray_binds_loopback_starts_a_local_node_on_127_0_0_1():
    """In a process that imported Ray without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (the switch on)."""
    out = run_python(
        """
        import ray
        from ray._private import ray_constants
        from fedckpt import _compat

        assert ray_constants.ENABLE_RAY_CLUSTER is True, "the switch is on by default on Linux"
        with _compat.ray_binds_loopback():
            ray.init(address="local", include_dashboard=False, num_cpus=1, log_to_driver=False)
        assert ray_constants.ENABLE_RAY_CLUSTER is True, "the switch is restored"
        print(sorted({node["NodeManagerAddress"] for node in ray.nodes()}), ray.util.get_node_ip_address())
        ray.shutdown()
        """,
        without_ray_env(),
    )
    assert out.strip().splitlines()[-1] == "['127.0.0.1'] 127.0.0.1"


@canary("ray._private.ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER")
def test_ray_failure_signal_handler_off_leaves_sigterm_to_the_program(ray_instance):
    """A ``ray.init`` off the main thread, as fedckpt's background start makes it (joining a running
    instance): where Ray has the switch (2.55.1), a SIGTERM right after ``ray.init``, still inside the
    block, runs the program's Python handler, not Ray's C++ one (which aborts the process). Where it
    has not (2.51.1), fedckpt puts SIGTERM's action back after the block: a SIGTERM then runs it too."""
    result = python(
        """
        import signal, threading
        import ray
        from fedckpt import _compat
        from fedckpt.runtime.preemption import keeping_sigterm_handler

        signal.signal(signal.SIGTERM, lambda signum, frame: print("program's handler ran", flush=True))

        def connect():
            with keeping_sigterm_handler(), _compat.ray_failure_signal_handler_off() as switched:
                ray.init(include_dashboard=False, log_to_driver=False)
                print("switched:", switched, flush=True)
                if switched:  # Ray's handler, had it been installed, would abort here
                    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
            if not switched:
                signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

        thread = threading.Thread(target=connect)
        thread.start()
        thread.join()
        ray.shutdown()
        """,
        {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address},
    )
    assert result.returncode == 0 and "program's handler ran" in result.stdout, result.stderr[-3000:]
    assert "SIGTERM received" not in result.stderr
    has_switch = tuple(int(part) for part in version("ray").split(".")[:2]) >= (2, 55)
    assert f"switched: {has_switch}" in result.stdout, result.stdout


@canary("ray.runtime_context.RuntimeContext.worker")
def test_in_ray_worker_process_tells_tasks_and_actors_from_the_driver(ray_instance):
    @ray.remote(num_cpus=0)
    def in_task() -> bool:
        return _compat.in_ray_worker_process()

    @ray.remote(num_cpus=0)
    class InActor:
        def probe(self) -> bool:
            return _compat.in_ray_worker_process()

    assert _compat.in_ray_worker_process() is False
    assert ray.get(in_task.remote()) is True
    actor = InActor.remote()
    assert ray.get(actor.probe.remote()) is True
    ray.kill(actor)


@canary("ray._private.state.jobs")
def test_ray_job_is_dead_once_its_driver_left(ray_instance):
    own = ray.get_runtime_context().get_job_id()
    assert _compat.ray_job_is_dead(own) is False
    assert _compat.ray_job_is_dead("ffffffff") is False  # a job the table does not list
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}  # a driver joining this cluster
    out = run_python("import ray; ray.init(log_to_driver=False); print(ray.get_runtime_context().get_job_id())", env)
    left = out.strip().splitlines()[-1]
    assert left != own
    assert _compat.ray_job_is_dead(left) is True  # marked when its driver disconnected


KV_NAMESPACE = "fedckpt-canary"


@ray.remote(num_cpus=0)
def kv_get_in_a_worker(key: str, namespace: str) -> bytes | None:
    return _compat.ray_kv_get(key, namespace)


@canary("ray.experimental.internal_kv._internal_kv_put")
def test_ray_kv_put_stores_and_replaces_for_the_whole_cluster(ray_instance):
    key = f"put-{uuid.uuid4().hex}"
    _compat.ray_kv_put(key, "1", KV_NAMESPACE)
    _compat.ray_kv_put(key, "2", KV_NAMESPACE)  # replaces
    assert _compat.ray_kv_get(key, KV_NAMESPACE) == b"2"
    assert ray.get(kv_get_in_a_worker.remote(key, KV_NAMESPACE)) == b"2"  # another process sees it
    assert _compat.ray_kv_get(key, "fedckpt-canary-other") is None  # per namespace
    _compat.ray_kv_delete(key, KV_NAMESPACE)


@canary("ray.experimental.internal_kv._internal_kv_get")
def test_ray_kv_get_gives_bytes_or_none(ray_instance):
    key = f"get-{uuid.uuid4().hex}"
    assert _compat.ray_kv_get(key, KV_NAMESPACE) is None
    _compat.ray_kv_put(key, str(2**62), KV_NAMESPACE)
    value = _compat.ray_kv_get(key, KV_NAMESPACE)
    assert type(value) is bytes and int(value) == 2**62
    _compat.ray_kv_delete(key, KV_NAMESPACE)


@canary("ray.experimental.internal_kv._internal_kv_del")
def test_ray_kv_delete_forgets_a_key(ray_instance):
    key = f"del-{uuid.uuid4().hex}"
    _compat.ray_kv_put(key, "1", KV_NAMESPACE)
    _compat.ray_kv_delete(key, KV_NAMESPACE)
    assert _compat.ray_kv_get(key, KV_NAMESPACE) is None
    assert ray.get(kv_get_in_a_worker.remote(key, KV_NAMESPACE)) is None
    _compat.ray_kv_delete(key, KV_NAMESPACE)  # absent: nothing happens


@pytest.fixture(scope="module")
def shutdown_wrapping() -> dict[str, str]:
    """A fresh process: fedckpt imported before Ray, then Ray, then Flower's simulation backend, whose
    end of a simulation is run. What it saw, by name (its last lines of stderr
    under "stderr": a canary that misses its line fails with them)."""
    result = python(
        """
        import sys
        import fedckpt
        assert "ray" not in sys.modules
        import ray
        import ray._private.worker
        from fedckpt import _compat
        from fedckpt.runtime import ray_session

        print("wrapped", bool(getattr(ray.shutdown, "__wrapped_by_fedckpt__", False)))
        print("original", ray_session.unwrapped_shutdown is ray._private.worker.shutdown)
        wrapper = ray.shutdown
        print("once", _compat.wrap_ray_shutdown(lambda shutdown: None) is ray_session.unwrapped_shutdown
              and ray.shutdown is wrapper)
        sys.stdout.flush()
        from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
        before = ray_session.generation
        backend = RayBackend.__new__(RayBackend)  # its end of a simulation only: no Ray started
        backend.pool = None
        backend.terminate()
        print("flower", ray_session.generation == before + 1)
        """,
        without_ray_env(),
    )
    seen = dict(line.split(" ", 1) for line in result.stdout.strip().splitlines() if " " in line)
    return {**seen, "stderr": result.stderr[-3000:]}


@canary("ray.shutdown (replaced)")
def test_ray_shutdown_is_wrapped_once_when_ray_is_imported(shutdown_wrapping):
    assert "once" in shutdown_wrapping, shutdown_wrapping["stderr"]
    assert shutdown_wrapping["wrapped"] == "True", "ray.shutdown is fedckpt's wrapper once Ray is imported"
    assert shutdown_wrapping["original"] == "True", "the wrapper keeps Ray's own shutdown"
    assert shutdown_wrapping["once"] == "True", "wrapping again changes nothing"


@canary("ray.shutdown() at the end of a simulation")
def test_flowers_simulation_backend_calls_the_wrapped_ray_shutdown(shutdown_wrapping):
    assert "flower" in shutdown_wrapping, shutdown_wrapping["stderr"]
    assert shutdown_wrapping["flower"] == "True", "Flower's RayBackend.terminate() did not go through ray.shutdown"


# ---- Flower (imported in the tests only: the GPU host runs this file without Flower) ----------------


@canary("flwr.serverapp.strategy.Strategy.start (its round loop)")
def test_flowers_round_loop_calls_the_strategy_as_server_checkpoints_expects():
    """The arguments ServerCheckpoints passes on, and the calls Flower's loop makes, in order: a round
    ends with aggregate_evaluate, or with evaluate_fn where one is given; the arrays go from each
    aggregate to the next calls (kept where a round aggregates nothing)."""
    import inspect

    from flower_loop import CentralEvaluation, NoClientsGrid, RecordingStrategy, arrays_of, value_of
    from flwr.serverapp.strategy import Strategy

    assert list(inspect.signature(Strategy.start).parameters) == [
        "self", "grid", "initial_arrays", "num_rounds", "timeout", "train_config", "evaluate_config", "evaluate_fn",
    ]  # fmt: skip

    def round_calls(server_round: int, given: float, aggregated: float) -> list[tuple]:
        return [
            ("configure_train", server_round, given), ("aggregate_train", server_round),
            ("configure_evaluate", server_round, aggregated), ("aggregate_evaluate", server_round),
        ]  # fmt: skip

    strategy, grid = RecordingStrategy(rounds_without_aggregate={2}), NoClientsGrid()
    result = _compat.run_strategy_rounds(strategy, grid, arrays_of(0), 3, 5.0, None, None, None)
    assert strategy.calls == [
        ("summary",), *round_calls(1, 0, 10), *round_calls(2, 10, 10), *round_calls(3, 10, 30)
    ]  # fmt: skip
    assert grid.sends == 6
    assert value_of(result.arrays) == 30
    assert sorted(result.train_metrics_clientapp) == sorted(result.evaluate_metrics_clientapp) == [1, 2, 3]
    assert result.evaluate_metrics_serverapp == {}

    strategy = RecordingStrategy()
    central = CentralEvaluation(strategy.calls)
    result = _compat.run_strategy_rounds(strategy, NoClientsGrid(), arrays_of(0), 2, 5.0, None, None, central)
    assert strategy.calls == [
        ("summary",), ("evaluate_fn", 0, 0),
        *round_calls(1, 0, 10), ("evaluate_fn", 1, 10), *round_calls(2, 10, 20), ("evaluate_fn", 2, 20),
    ]  # fmt: skip
    assert sorted(result.evaluate_metrics_serverapp) == [0, 1, 2]


# ---- torch ----------------------------------------------------------------------------------------


class Records:
    """Each record the pickling hands over, as bytes."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes]] = []

    def write_record(self, name: str, data: Any, nbytes: int) -> None:
        if isinstance(data, str):
            data = data.encode()
        elif not isinstance(data, bytes):  # an UntypedStorage
            data = torch.empty(0, dtype=torch.uint8).set_(data, 0, (nbytes,), (1,)).numpy().tobytes()
        assert len(data) == nbytes
        self.records.append((name, data))


def records_of(state: Any) -> list[tuple[str, bytes]]:
    records = Records()
    _compat.torch_save_records(state, records)
    return records.records


def torch_save_file_records(state: Any) -> list[tuple[str, bytes]]:
    """The records of the file ``torch.save`` writes, less the two its zip writer adds itself."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
        records = [(info.filename.split("/", 1)[1], archive.read(info)) for info in archive.infolist()]
    return [(name, data) for name, data in records if name not in ("version", ".data/serialization_id")]


@canary("torch.serialization._save")
def test_torch_save_records_are_those_of_torch_save():
    base = torch.arange(6.0)
    state = {"a": base, "b": base[2:], "round": 3, "lr": 0.1, "ids": torch.ones(2, dtype=torch.int64)}
    assert records_of(state) == torch_save_file_records(state)


@canary("torch.UntypedStorage._cdata")
def test_storage_identity_is_what_torch_save_writes_one_record_per():
    base = torch.arange(4.0)
    empty, other_empty = torch.zeros(0), torch.zeros(0)
    storages = [t.untyped_storage() for t in (base, base[1:], torch.arange(4.0), empty, other_empty)]
    identities = [_compat.storage_identity(storage) for storage in storages]
    assert identities[0] == identities[1] == _compat.storage_identity(base.untyped_storage())  # views share it
    assert len(set(identities)) == 4  # two empty storages differ (their data_ptr() is 0 for both)
    state = {"a": base, "b": base[1:], "c": torch.arange(4.0), "d": empty, "e": other_empty}
    assert sum(name.startswith("data/") for name, _ in records_of(state)) == len(set(identities))


@canary("torch._utils.get_tensor_metadata")
def test_tensor_serialization_metadata_is_empty_for_a_plain_tensor_only():
    conjugate = torch.zeros(2, dtype=torch.complex64).conj()
    negative = conjugate.imag
    assert negative.is_neg()
    assert not _compat.tensor_serialization_metadata(torch.zeros(2))
    assert _compat.tensor_serialization_metadata(conjugate)
    assert _compat.tensor_serialization_metadata(negative)


@canary("torch._utils._validate_loaded_sparse_tensors")
def test_validate_loaded_sparse_tensors_rejects_a_sparse_tensor_rebuilt_out_of_bounds(tmp_path):
    """torch queues the sparse tensors it rebuilds while unpickling, and this checks them (with torch's
    invariant checks on): a small state file with an index past its tensor's size fails to load, as
    with torch.load."""
    broken = torch.sparse_coo_tensor(torch.tensor([[5]]), torch.tensor([1.0]), (2,), check_invariants=False)
    torch.save({"x": broken}, tmp_path / "s.pt")
    with torch.sparse.check_sparse_tensor_invariants(), pytest.raises(RuntimeError, match="out of bounds|index"):
        torch.load(tmp_path / "s.pt", weights_only=False)
    with torch.sparse.check_sparse_tensor_invariants(), pytest.raises(RuntimeError, match="out of bounds|index"):
        load_small_state(str(tmp_path / "s.pt"))
    torch.save({"x": torch.sparse_coo_tensor(torch.tensor([[1]]), torch.tensor([1.0]), (2,))}, tmp_path / "s.pt")
    assert load_small_state(str(tmp_path / "s.pt"))["x"].to_dense().tolist() == [0.0, 1.0]


@canary("torch._utils._rebuild_tensor_v2 (rebuild_host_tensor's copy of it)")
def test_rebuild_host_tensor_rebuilds_what_torchs_rebuild_does(tmp_path):
    """fedckpt's small-state loader rebuilds each tensor with its copy of torch's ``_rebuild_tensor_v2``
    (without the per-tensor fake-mode lookup): from the arguments a pickle of each kind of tensor
    passes, both give the same tensor over the same memory, and the loader gives what torch.load does."""
    base = torch.arange(24.0).reshape(4, 6)
    complex_values = torch.arange(6.0).view(3, 2).contiguous().view(torch.complex64)
    tensors = {
        "plain": torch.arange(5, dtype=torch.int16),
        "offset_and_stride": base[1:, ::2],
        "transposed": base.t(),
        "trainable": nn.Parameter(torch.ones(3)).data.requires_grad_(True),
        "conjugate": complex_values.conj(),
        "negative": torch.arange(4.0).view(torch.complex64).conj().imag,  # its own storage: one type per storage
        "bf16": torch.ones(2, 2, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 3),
    }
    for name, tensor in tensors.items():
        rebuild, arguments = tensor.__reduce_ex__(2)
        assert rebuild is torch._utils._rebuild_tensor_v2, name
        ours, torchs = _compat.rebuild_host_tensor(*arguments), rebuild(*arguments)
        assert (ours.dtype, ours.shape, ours.stride(), ours.storage_offset()) == (
            torchs.dtype, torchs.shape, torchs.stride(), torchs.storage_offset()
        ), name  # fmt: skip
        assert (ours.requires_grad, ours.is_conj(), ours.is_neg(), ours._backward_hooks) == (
            torchs.requires_grad, torchs.is_conj(), torchs.is_neg(), torchs._backward_hooks
        ), name  # fmt: skip
        assert ours.untyped_storage().data_ptr() == torchs.untyped_storage().data_ptr(), name
        assert torch.equal(ours.resolve_conj().resolve_neg(), torchs.resolve_conj().resolve_neg()), name
    torch.save(tensors, tmp_path / "s.pt")
    loaded, expected = load_small_state(str(tmp_path / "s.pt")), torch.load(tmp_path / "s.pt", weights_only=False)
    for name, tensor in expected.items():
        got = loaded[name]
        assert (got.dtype, got.shape, got.stride(), got.requires_grad, got.is_conj(), got.is_neg()) == (
            tensor.dtype, tensor.shape, tensor.stride(), tensor.requires_grad, tensor.is_conj(), tensor.is_neg()
        ), name  # fmt: skip
        assert torch.equal(got.resolve_conj().resolve_neg(), tensor.resolve_conj().resolve_neg()), name


@canary("torch._guards.detect_fake_mode")
def test_fake_mode_active_only_inside_a_fake_tensor_mode():
    """Inside a fake-tensor mode the small-state loader leaves each tensor to torch's own rebuild
    (which gives it its fake device); outside, it asks once per load."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert not _compat.fake_mode_active()
    with FakeTensorMode():
        assert _compat.fake_mode_active()
    assert not _compat.fake_mode_active()


@canary("torch._C._len_torch_dispatch_stack")
def test_a_fake_mode_is_on_the_dispatch_stack():
    """fake_mode_active's shortcut: with nothing on the dispatch stack there is no fake mode."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert torch._C._len_torch_dispatch_stack() == 0
    with FakeTensorMode():
        assert torch._C._len_torch_dispatch_stack() >= 1
        assert _compat.fake_mode_active()
    assert torch._C._len_torch_dispatch_stack() == 0


@canary("torch._guards.TracingContext.try_get")
def test_a_tracing_contexts_fake_mode_is_seen_with_an_empty_dispatch_stack():
    """Dynamo's tracing context carries its fake mode without pushing it: the shortcut asks it too."""
    from torch._guards import TracingContext, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert TracingContext.try_get() is None
    with tracing(TracingContext(FakeTensorMode())):
        assert torch._C._len_torch_dispatch_stack() == 0
        assert TracingContext.try_get() is not None
        assert _compat.fake_mode_active()
    assert not _compat.fake_mode_active()


def _pickled_state(module: nn.Module) -> dict[str, Any]:
    state: dict[str, Any] = module.__getstate__()
    return state


@canary("torch.nn.Module._parameters")
def test_module_registries_hold_its_parameters_none_included():
    module = nn.Linear(2, 2)
    module.register_parameter("absent", None)
    parameters, _, _ = _compat.module_registries(module)
    assert parameters is vars(module)[_compat.MODULE_PARAMETERS]
    assert list(parameters) == ["weight", "bias", "absent"]
    assert parameters["weight"] is module.weight and parameters["absent"] is None
    module.weight = nn.Parameter(torch.zeros(2, 2))
    assert parameters["weight"] is module.weight  # the same dict, updated in place
    assert _compat.MODULE_PARAMETERS in _pickled_state(module)


@canary("torch.nn.Module._buffers")
def test_module_registries_hold_its_buffers():
    module = nn.BatchNorm1d(2)
    _, buffers, _ = _compat.module_registries(module)
    assert buffers is vars(module)[_compat.MODULE_BUFFERS]
    assert buffers["running_mean"] is module.running_mean
    assert list(buffers) == [name for name, _ in module.named_buffers(recurse=False)]
    assert _compat.MODULE_BUFFERS in _pickled_state(module)


@canary("torch.nn.Module._modules")
def test_module_registries_hold_its_children():
    module = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    _, _, children = _compat.module_registries(module)
    assert children is vars(module)[_compat.MODULE_CHILDREN]
    assert list(children.values()) == list(module.children())
    assert _compat.MODULE_CHILDREN in _pickled_state(module)


@canary("torch.nn.Module._compiled_call_impl")
def test_a_compiled_modules_call_is_an_attribute_its_pickle_leaves_out():
    module = nn.Linear(2, 2)
    module.compile()  # compiles lazily, at the first call: this only sets the attribute
    assert _compat.MODULE_NOT_PICKLED in vars(module)
    assert _compat.MODULE_NOT_PICKLED not in _pickled_state(module)


class NamedRecords(Records):
    """Records under ``skip_data``: a storage is only named, with its size."""

    def write_record_metadata(self, name: str, nbytes: int) -> None:
        self.records.append((name, nbytes))  # type: ignore[arg-type]


@canary("torch.serialization._save")
def test_torch_save_records_under_skip_data_name_each_storage_with_its_size():
    base = torch.arange(6.0)
    state = {"a": base, "b": base[2:], "ids": torch.ones(2, dtype=torch.int64), "round": 3}
    named = NamedRecords()
    _compat.torch_save_records(state, named, skip_data=True)
    expected = [(name, len(data) if name.startswith("data/") else data) for name, data in records_of(state)]
    assert named.records == expected  # the same data.pkl; each storage named, in order, with its size


needs_cuda = pytest.mark.cuda  # outside the default run (pytest -m cuda on the GPU host)


def _register(address: int, nbytes: int) -> int:
    from fedckpt.runtime.cuda import _on_own_thread

    return _on_own_thread(functools.partial(_compat.cuda_host_register, address, nbytes))


def _unregister(address: int) -> int:
    from fedckpt.runtime.cuda import _on_own_thread

    return _on_own_thread(functools.partial(_compat.cuda_host_unregister, address))


@needs_cuda
@canary("torch.cuda.cudart().cudaHostRegister")
def test_cuda_host_register_makes_a_mapping_take_asynchronous_copies():
    import mmap

    import numpy as np

    size = 8 << 20
    mapping = mmap.mmap(-1, size)
    array = np.frombuffer(mapping, dtype=np.uint8)
    address = array.ctypes.data
    assert _register(address, size) == 0
    try:
        assert _register(address, size) != 0  # registered already: an error code, never an exception
        source = torch.randint(0, 256, (size,), dtype=torch.uint8, device="cuda")
        torch.from_numpy(array).copy_(source, non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(torch.from_numpy(array), source.cpu())
    finally:
        assert _unregister(address) == 0


@needs_cuda
@canary("torch.cuda.cudart().cudaHostUnregister")
def test_cuda_host_unregister_undoes_a_registration_once():
    import mmap

    import numpy as np

    mapping = mmap.mmap(-1, 2 << 20)
    address = np.frombuffer(mapping, dtype=np.uint8).ctypes.data
    assert _register(address, 2 << 20) == 0
    assert _unregister(address) == 0
    assert _unregister(address) != 0  # not registered any more


# ---- s3fs and fsspec ------------------------------------------------------------------------------


@canary("s3fs.S3FileSystem._call_s3")
def test_s3_call_runs_concurrent_calls_on_s3fs_loop(s3_server):
    import s3fs
    from fsspec.asyn import sync

    fs = s3fs.S3FileSystem(**s3_server.options())
    bucket, key = s3_server.new_bucket(), "canary/multipart"
    first, last = b"a" * (5 << 20), b"last part"  # S3's smallest part but the last: 5 MiB

    async def multipart() -> None:
        created = await _compat.s3_call(fs, "create_multipart_upload", Bucket=bucket, Key=key)
        upload = {"Bucket": bucket, "Key": key, "UploadId": created["UploadId"]}
        answers = await asyncio.gather(
            _compat.s3_call(fs, "upload_part", PartNumber=1, Body=first, **upload),
            _compat.s3_call(fs, "upload_part", PartNumber=2, Body=last, **upload),
        )
        parts = [{"PartNumber": number, "ETag": answer["ETag"]} for number, answer in enumerate(answers, 1)]
        await _compat.s3_call(fs, "complete_multipart_upload", MultipartUpload={"Parts": parts}, **upload)

    sync(fs.loop, multipart)
    assert fs.cat_file(f"{bucket}/{key}") == first + last


@canary("s3fs.S3FileSystem._s3creator")
def test_close_s3_session_closes_the_client_and_a_later_use_opens_a_new_one(s3_server):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server.options(), skip_instance_cache=True)
    bucket = s3_server.new_bucket()
    fs.pipe_file(f"{bucket}/before", b"1")
    client = fs.s3
    _compat.close_s3_session(fs)
    assert not client._endpoint.http_session._sessions  # aiobotocore's connection pools are closed
    fs.pipe_file(f"{bucket}/after", b"2")  # a new session
    assert fs.s3 is not client and fs.cat_file(f"{bucket}/after") == b"2"


@canary("fsspec.AbstractFileSystem._get_kwargs_from_urls")
def test_options_from_url_reads_a_file_systems_options_from_its_url():
    import fsspec

    s3 = fsspec.get_filesystem_class("s3")
    assert _compat.options_from_url(s3, "s3://bucket/key") == {}
    assert _compat.options_from_url(s3, "s3://bucket/key?versionId=abc") == {"version_aware": True}
    ftp = fsspec.get_filesystem_class("ftp")
    assert _compat.options_from_url(ftp, "ftp://user:secret@example.org:2121/dir/file") == {
        "host": "example.org", "port": 2121, "username": "user", "password": "secret",
    }  # fmt: skip


def test_equal_s3_file_systems_are_one_store_for_the_conditional_write_check(s3_server):
    """Not a private name: fsspec's public equality, which replaced ``fs._fs_token`` in s3_store."""
    import s3fs

    one = s3fs.S3FileSystem(**s3_server.options(), skip_instance_cache=True)
    same = s3fs.S3FileSystem(**s3_server.options(), skip_instance_cache=True)
    other = s3fs.S3FileSystem(**s3_server.options(endpoint_url="http://127.0.0.1:1"), skip_instance_cache=True)
    assert one is not same and (same, "bucket") in {(one, "bucket")}
    assert (other, "bucket") not in {(one, "bucket")}


# ---- every private name has a canary, and is used only in the adapter -----------------------------

LIBRARIES = frozenset({"ray", "torch", "fsspec", "s3fs", "flwr", "botocore", "aiobotocore"})
SOURCE = Path(fedckpt.__file__).parent
ADAPTER = SOURCE / "_compat.py"


def test_every_private_name_the_adapter_lists_has_a_canary():
    assert sorted(set(_compat.PRIVATE_NAMES) - set(CANARIES)) == []


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def names_defined(sources: list[str]) -> set[str]:
    """Every name fedckpt's own code defines (functions, classes, assignments, attributes it
    sets, arguments, imports): ``x._name`` with such a name is fedckpt's own."""
    defined: set[str] = set()
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                defined.add(node.attr)
            elif isinstance(node, ast.arg):
                defined.add(node.arg)
            elif isinstance(node, ast.alias):
                defined.add(node.asname or node.name.split(".")[0])
    return defined


def private_uses(source: str, defined: set[str], private_strings: set[str]) -> list[tuple[int, str]]:
    """(line, code) of each private use of the LIBRARIES in ``source``:

    - an import of a private or experimental module of theirs, or of an underscored name;
    - ``module._name`` on a name bound to one of their modules (``torch.serialization._save``);
    - ``anything._name`` where fedckpt defines no ``_name`` and ``anything`` is not a standard
      library module (``fs._call_s3``, ``storage._cdata``), also through ``getattr`` and the like;
    - ``get_runtime_context().worker``; an assignment to an attribute of one of their modules;
    - a string naming one of the private attributes the adapter declares (``"_parameters"``).
    """
    tree = ast.parse(source)
    library_names: set[str] = set()
    standard_names: set[str] = set()
    found: set[tuple[int, str]] = set()

    def flag(node: ast.AST) -> None:
        found.add((node.lineno, ast.unparse(node)))  # type: ignore[attr-defined]

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                bound = alias.asname or parts[0]
                if parts[0] in LIBRARIES:
                    library_names.add(bound)
                    if any(_private(part) or part == "experimental" for part in parts):
                        flag(node)
                elif parts[0] in sys.stdlib_module_names:
                    standard_names.add(bound)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] in LIBRARIES:
                library_names.update(alias.asname or alias.name for alias in node.names)
                if any(_private(part) or part == "experimental" for part in parts) or any(
                    _private(alias.name) for alias in node.names
                ):
                    flag(node)
            elif parts[0] in sys.stdlib_module_names:
                standard_names.update(alias.asname or alias.name for alias in node.names)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            root_name = root.id if isinstance(root, ast.Name) else None
            if _private(node.attr) and (
                root_name in library_names or (root_name not in standard_names and node.attr not in defined)
            ):
                flag(node)
            if isinstance(node.ctx, ast.Store) and root_name in library_names:
                flag(node)
            if (
                node.attr == "worker"
                and isinstance(node.value, ast.Call)
                and ast.unparse(node.value.func).endswith("get_runtime_context")
            ):
                flag(node)
        elif _reflects_a_private_name(node, defined) or _names_a_declared_private(node, private_strings):
            flag(node)
    return sorted(found)


def _reflects_a_private_name(node: ast.AST, defined: set[str]) -> bool:
    """``getattr(x, "_name")`` (or set/has/delattr) with a ``_name`` fedckpt does not define."""
    if not (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
        and len(node.args) >= 2
        and isinstance(node.args[1], ast.Constant)
    ):
        return False
    name = node.args[1].value
    return isinstance(name, str) and _private(name) and name not in defined


def _names_a_declared_private(node: ast.AST, private_strings: set[str]) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in private_strings


def adapter_private_strings() -> set[str]:
    """The private attribute names the adapter declares as constants (``MODULE_PARAMETERS``, ...)."""
    return {
        value for name, value in vars(_compat).items() if name.isupper() and isinstance(value, str) and _private(value)
    }


def test_the_scan_flags_private_names_of_the_libraries_and_not_fedckpts_own():
    code = textwrap.dedent(
        """
        import os
        import ray
        import torch
        from torch import nn
        from ray._private import state
        from ray.experimental import internal_kv
        from torch.serialization import _save
        def f(fs, storage, checkpointer, own):
            torch.serialization._save(1)
            torch._utils.get_tensor_metadata(2)
            fs._call_s3("x")
            storage._cdata
            nn.Module._parameters
            ray.get_runtime_context().worker.mode
            ray.shutdown = None
            getattr(fs, "_fs_token")
            registry = "_parameters"
            os._exit(0)
            checkpointer._saved_keys
            getattr(own, "_saved_keys")
            ray.get_runtime_context().get_job_id()
            own.__dict__
        """
    )
    flagged = {line for line, _ in private_uses(code, {"_saved_keys"}, {"_parameters"})}
    assert flagged == set(range(6, 9)) | set(range(10, 19))


def test_no_private_name_of_the_libraries_outside_the_adapter():
    files = {path: path.read_text(encoding="utf-8") for path in sorted(SOURCE.rglob("*.py")) if path != ADAPTER}
    defined = names_defined(list(files.values())) | {path.stem for path in files} | {"_compat"}
    private_strings = adapter_private_strings()
    assert private_strings  # the scan for them runs
    found = [
        f"{path.relative_to(SOURCE.parent)}:{line}: {code}"
        for path, source in files.items()
        for line, code in private_uses(source, defined, private_strings)
    ]
    assert not found, (
        "private names of Ray, torch, s3fs, fsspec or Flower outside src/fedckpt/_compat.py (move each into a "
        "function there, with a canary in tests/test_compat.py):\n" + "\n".join(found)
    )
