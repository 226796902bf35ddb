"""Every private Ray, torch, s3fs and fsspec name fedckpt uses, and every undocumented behaviour of Ray
and Flower it relies on, each behind one small function.

Where a public API does the job, fedckpt uses it and nothing of it is here. What is here has no
public equivalent in the versions fedckpt supports (README.md, "Supported versions"); each
function says why, and which versions it was checked against. An upgrade that removes or changes
one of these names fails its canary test in ``tests/test_compat.py``, which names the library, the
name and the version installed: run that file first after upgrading any of these libraries.
:data:`PRIVATE_NAMES` lists them all, and a test checks that each has a canary and that no module
outside this one touches a private name of these libraries.

One module, not one per library: the whole list is read in one place when an upgrade breaks
something. Importing it imports none of those libraries; each function imports what it needs when
called, so that ``fedckpt ls``/``verify`` and the writer processes (which never import torch) pay
only for what they use. The few functions on a per-tensor or per-module path take the object they
look into, and import nothing.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Result, Strategy
    from torch import nn

# Checked against (their canaries pass): Ray 2.55.1 (Flower 1.42's pin) and 2.51.1 (Flower 1.24's
# pin), torch 2.13.0, s3fs and fsspec 2026.9.0, Flower 1.42.0 and 1.24.0, on Python 3.11. fedckpt's
# saves also ran on the GPU host's torch 2.11 (Python 3.12), but the canaries have not been run there.

PRIVATE_NAMES: dict[str, str] = {
    # name (as the library spells it) -> the library's distribution
    "ray._private.ray_constants.ENABLE_RAY_CLUSTER": "ray",
    "ray._private.ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "ray",
    "ray.runtime_context.RuntimeContext.worker": "ray",
    "ray._private.state.jobs": "ray",
    "ray.experimental.internal_kv._internal_kv_get": "ray",
    "ray.experimental.internal_kv._internal_kv_put": "ray",
    "ray.experimental.internal_kv._internal_kv_del": "ray",
    "ray.shutdown (replaced)": "ray",
    "ray.shutdown() at the end of a simulation": "flwr",
    "flwr.serverapp.strategy.Strategy.start (its round loop)": "flwr",
    "torch.serialization._save": "torch",
    "torch.UntypedStorage._cdata": "torch",
    "torch._utils.get_tensor_metadata": "torch",
    "torch._utils._validate_loaded_sparse_tensors": "torch",
    "torch._utils._rebuild_tensor_v2 (rebuild_host_tensor's copy of it)": "torch",
    "torch._guards.detect_fake_mode": "torch",
    "torch._guards.TracingContext.try_get": "torch",
    "torch._C._len_torch_dispatch_stack": "torch",
    "torch.nn.Module._parameters": "torch",
    "torch.nn.Module._buffers": "torch",
    "torch.nn.Module._modules": "torch",
    "torch.nn.Module._compiled_call_impl": "torch",
    "torch.cuda.cudart().cudaHostRegister": "torch",
    "torch.cuda.cudart().cudaHostUnregister": "torch",
    "s3fs.S3FileSystem._call_s3": "s3fs",
    "s3fs.S3FileSystem._s3creator": "s3fs",
    "fsspec.AbstractFileSystem._get_kwargs_from_urls": "fsspec",
}


# ---- Ray ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def ray_binds_loopback() -> Iterator[None]:
    """Within this block, a local ``ray.init`` binds its node to 127.0.0.1, not to the machine's
    network interface.

    Ray picks the node's address from ``ray._private.ray_constants.ENABLE_RAY_CLUSTER``; off means
    loopback. The public switch, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, is read once when Ray is
    imported, usually before fedckpt runs, and ``ray.init(_node_ip_address="127.0.0.1")`` resolves
    loopback back to the interface while the switch is on. Checked against Ray 2.55.1.
    """
    from ray._private import ray_constants

    previous = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous


@contextlib.contextmanager
def ray_failure_signal_handler_off() -> Iterator[bool]:
    """Within this block, ``ray.init`` does not install Ray's C++ failure-signal handler in this
    process; yields whether this Ray has the switch (2.55.1 has, 2.51.1 has not: there the block
    changes nothing).

    That handler (Abseil's) takes SIGTERM as well as crash signals: a SIGTERM while it is in place
    prints a stack and aborts the process (status -6), and the program's handler, with fedckpt's
    flush of acknowledged saves, never runs. On the main thread ``ray.init`` sets a Python handler
    over it, but only once the core worker is up; off it (fedckpt's background start) nothing does.
    Ray reads ``ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER`` when it creates the core worker;
    the public switch, the environment variable of that name, is read when Ray is imported, usually
    before fedckpt runs. Checked against Ray 2.55.1 and 2.51.1.
    """
    from ray._private import ray_constants

    switch = "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"
    if not hasattr(ray_constants, switch):
        yield False
        return
    previous = getattr(ray_constants, switch)
    setattr(ray_constants, switch, True)
    try:
        yield True
    finally:
        setattr(ray_constants, switch, previous)


def in_ray_worker_process() -> bool:
    """Whether this process is one of Ray's worker processes (running tasks or actors), not a driver
    (a script, Flower's ServerApp). Ray must be initialized.

    ``ray.WORKER_MODE`` is public, but the mode it is compared with is only on the runtime
    context's undocumented ``worker`` attribute. ``get_actor_id()`` tells only actors from the rest,
    and ``get_task_id()`` logs a warning in a driver. Checked against Ray 2.55.1.
    """
    import ray

    return bool(ray.get_runtime_context().worker.mode == ray.WORKER_MODE)


def ray_job_is_dead(job_id: str) -> bool:
    """Whether Ray's job table says the job ``job_id`` (hex, as ``get_job_id()`` gives it) ended;
    False for a job it does not list. Raises if the table cannot be read.

    ``ray._private.state.jobs()`` reads the table from the GCS. The public ways (``ray.util.state``,
    ``JobSubmissionClient``) go through the dashboard, which fedckpt's writers cannot count on
    (``include_dashboard=False``, ``ray`` without ``[default]``). Checked against Ray 2.55.1.
    """
    from ray._private import state

    return any(job.get("JobID") == job_id and bool(job.get("IsDead")) for job in state.jobs())


def ray_kv_get(key: str, namespace: str) -> bytes | None:
    """The value stored under ``key`` in Ray's key-value store (the GCS), or None.

    ``ray.experimental.internal_kv`` is the only key-value store of the cluster that needs no
    dashboard and outlives an actor's restarts; its functions are underscored. Checked against Ray
    2.55.1.
    """
    from ray.experimental import internal_kv

    value = internal_kv._internal_kv_get(key, namespace=namespace)
    return None if value is None else bytes(value)


def ray_kv_put(key: str, value: str | bytes, namespace: str) -> None:
    """Store ``value`` under ``key`` in Ray's key-value store, replacing any value there (see
    :func:`ray_kv_get` for why this one). Checked against Ray 2.55.1."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(key, value, overwrite=True, namespace=namespace)


def ray_kv_delete(key: str, namespace: str) -> None:
    """Remove ``key`` from Ray's key-value store (nothing if absent; see :func:`ray_kv_get`).
    Checked against Ray 2.55.1."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(key, namespace=namespace)


_WRAPPED_MARK = "__wrapped_by_fedckpt__"


def wrap_ray_shutdown(make_wrapper: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Callable[..., Any]:
    """Replace ``ray.shutdown`` by ``make_wrapper(ray.shutdown)``, once per process; return Ray's own.

    Ray has no shutdown hook, and Flower ends a simulation with ``ray.shutdown()`` while writers
    still hold the last saves. The function is public, replacing it is not: this relies on every
    caller looking it up on the ``ray`` module when it calls it (Flower's simulation backend does).
    Ray's own ``atexit`` handler keeps the unwrapped function. Checked against Ray 2.55.1 and Flower
    1.42.0.
    """
    import ray

    if not getattr(ray.shutdown, _WRAPPED_MARK, False):
        original = ray.shutdown
        wrapper = make_wrapper(original)
        wrapper.__wrapped__ = original  # type: ignore[attr-defined]
        setattr(wrapper, _WRAPPED_MARK, True)
        ray.shutdown = wrapper
    return ray.shutdown.__wrapped__  # type: ignore[attr-defined,no-any-return]


# ---- Flower ---------------------------------------------------------------------------------------


def run_strategy_rounds(
    strategy: Strategy,
    grid: Grid,
    initial_arrays: ArrayRecord,
    num_rounds: int,
    timeout: float,
    train_config: ConfigRecord | None,
    evaluate_config: ConfigRecord | None,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None,
) -> Result:
    """Run Flower's own round loop, ``Strategy.start``, with ``strategy`` in it; return its ``Result``.

    ``Strategy.start`` is public, but what fedckpt's ``ServerCheckpoints`` relies on is the shape of
    its loop, which Flower documents only as "training, evaluation, and optional centralized
    evaluation" per round:

    - it calls ``evaluate_fn(0, initial_arrays)`` once before the first round, if given;
    - round ``r`` (1 to ``num_rounds``) calls ``configure_train(r, arrays, ...)``,
      ``aggregate_train(r, replies)``, ``configure_evaluate(r, arrays, ...)`` with the arrays
      ``aggregate_train`` returned (the previous ones where it returned None),
      ``aggregate_evaluate(r, replies)``, then ``evaluate_fn(r, arrays)`` if given, in that order:
      the round is over after the last of these;
    - nothing else of the strategy but ``summary()``.

    Called on the class, so that it is Flower's loop even where ``type(strategy)`` overrides
    ``start``. Checked against Flower 1.24.0 and 1.42.0; the loop reads the same in every release
    from 1.21 to 1.42 that was compared (1.21 to 1.25, 1.30 to 1.35, 1.38, 1.41).
    """
    from flwr.serverapp.strategy import Strategy

    return Strategy.start(
        strategy, grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn
    )  # fmt: skip


# ---- torch ----------------------------------------------------------------------------------------


class RecordWriter(Protocol):
    """What torch's zip writer offers ``torch.save``'s pickling: one call per record, in order
    (``write_record_metadata`` instead of ``write_record`` for a storage's bytes, under ``skip_data``)."""

    def write_record(self, name: str, data: Any, nbytes: int) -> None: ...

    def write_record_metadata(self, name: str, nbytes: int) -> None: ...


def torch_save_records(obj: Any, records: RecordWriter, skip_data: bool = False) -> None:
    """Run ``torch.save``'s own pickling of ``obj``, handing each record (``data.pkl``, the version
    and byte-order records, every storage as an ``UntypedStorage``) to ``records.write_record``.

    ``torch.save`` only writes a zip file, and reading the records back from one costs a copy of
    every storage; fedckpt views them in place. ``torch.serialization._save`` is the pickling
    ``torch.save`` runs for its default (zip) format, with the same arguments, so the records are
    byte for byte those of ``torch.save``. With ``skip_data`` (public: ``torch.serialization.skip_data``)
    every storage is only named, with its size, through ``records.write_record_metadata``: its bytes
    are not touched, where without it ``_save`` first copies a GPU storage to the CPU, blocking. Checked
    against torch 2.13.0.
    """
    import contextlib
    import pickle

    import torch

    with torch.serialization.skip_data() if skip_data else contextlib.nullcontext():
        torch.serialization._save(
            obj, records, pickle, torch.serialization.DEFAULT_PROTOCOL, _disable_byteorder_record=False
        )


def storage_identity(storage: torch.UntypedStorage) -> int:
    """The identity ``torch.save`` gives a storage: two tensors viewing one storage share it, and
    each storage is written once under it.

    ``torch.save`` tells storages apart by ``_cdata``, the address of the C++ storage. Python's
    ``id()`` of ``untyped_storage()`` holds only while that Python object lives, and ``data_ptr()``
    is 0 for every empty storage. Checked against torch 2.13.0.
    """
    identity: int = storage._cdata
    return identity


def tensor_serialization_metadata(tensor: torch.Tensor) -> dict[str, Any]:
    """The metadata ``torch.save`` pickles with a tensor beyond its storage, offset, size, stride
    and ``requires_grad``: empty for a plain tensor (today: its conjugate and negative bits).

    ``is_conj()`` and ``is_neg()`` cover what torch records today, but this is torch's own list, so a
    bit added later still keeps a tensor that has it out of fedckpt's cached pickles. Checked
    against torch 2.13.0.
    """
    # A tensor exists, so torch (and torch._utils) is imported: no import statement on this
    # per-tensor path.
    metadata: dict[str, Any] = sys.modules["torch._utils"].get_tensor_metadata(tensor)
    return metadata


def validate_loaded_sparse_tensors() -> None:
    """What ``torch.load`` does after unpickling: check the sparse tensors rebuilt meanwhile (torch
    queues them while unpickling). fedckpt's own loader of small state files ends the same way.
    Checked against torch 2.13.0."""
    sys.modules["torch._utils"]._validate_loaded_sparse_tensors()


def fake_mode_active() -> bool:
    """Whether a torch fake-tensor mode is active (tracing, ``torch.compile``): tensors unpickled
    then must learn their fake device, as torch's ``_rebuild_tensor_v2`` does for each. Checked
    against torch 2.13.0."""
    guards, torch = sys.modules["torch._guards"], sys.modules["torch"]
    # No tracing context and no mode on the dispatch stack (a fake mode is one): none, at a tenth of
    # detect_fake_mode's cost (tens of µs with cold caches, on every small-state load).
    if torch._C._len_torch_dispatch_stack() == 0 and guards.TracingContext.try_get() is None:
        return False
    return guards.detect_fake_mode(None) is not None


def rebuild_host_tensor(
    storage: Any,
    storage_offset: int,
    size: Any,
    stride: Any,
    requires_grad: bool,
    backward_hooks: Any,
    metadata: Any = None,
) -> torch.Tensor:
    """torch's ``_rebuild_tensor_v2`` (what a pickle of a tensor calls) for a load with no fake mode
    active (:func:`fake_mode_active`, asked once per load): the same tensor, without looking for a
    fake mode per tensor, which is half of its cost. Checked against torch 2.13.0."""
    utils = sys.modules["torch._utils"]
    tensor = utils._rebuild_tensor(storage, storage_offset, size, stride)
    tensor.requires_grad = requires_grad
    if metadata:
        utils.set_tensor_metadata(tensor, metadata)
    tensor._backward_hooks = backward_hooks
    return tensor


# The instance attributes in which nn.Module keeps its parameters, buffers and children (ordered
# dicts, None values included), and the one its __getstate__ leaves out of a pickle. fedckpt reads
# them to tell whether a model is the same as at its last save, and to describe what pickling a
# module tree writes. The public iterators (named_parameters(recurse=False), ...) skip None entries,
# drop duplicates and cost a generator per module on every save. Checked against torch 2.13.0.
MODULE_PARAMETERS = "_parameters"
MODULE_BUFFERS = "_buffers"
MODULE_CHILDREN = "_modules"
MODULE_NOT_PICKLED = "_compiled_call_impl"


def module_registries(module: nn.Module) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The dicts ``module`` keeps its own parameters, buffers and children in (not copies, not
    recursive; None values included). See :data:`MODULE_PARAMETERS` for why not the public
    iterators. Checked against torch 2.13.0."""
    return module._parameters, module._buffers, module._modules


# cudaHostRegisterPortable: the memory counts as page-locked for every CUDA context (every device), not
# only for the one current where it was registered.
CUDA_HOST_REGISTER_PORTABLE = 1


def cuda_host_register(address: int, nbytes: int) -> int:
    """Register ``nbytes`` of host memory at ``address`` with CUDA (``cudaHostRegister``, portable), so
    that copies between it and a GPU run at the page-locked speed and without blocking; returns CUDA's
    error code (0: registered).

    torch reaches the CUDA runtime through ``torch.cuda.cudart()`` (public), whose functions are
    bindings of libcudart without documentation of their own; torch's own staging for distributed
    checkpoints registers memory this way. They return the error (they never raise), and the error
    also stays the calling thread's "last CUDA error", which a later kernel launch check of that thread
    would raise: call this from a thread that launches no kernels (runtime/cuda.py does). Read from
    torch's source (``torch/csrc/cuda/shared/cudart.cpp``); its canary needs a GPU (marker ``cuda``) and
    has not run yet.
    """
    import torch

    return int(torch.cuda.cudart().cudaHostRegister(address, nbytes, CUDA_HOST_REGISTER_PORTABLE))


def cuda_host_unregister(address: int) -> int:
    """Undo :func:`cuda_host_register` for the memory at ``address``; returns CUDA's error code (0: done).
    Same binding, same caveat about the thread it runs on; its canary needs a GPU, like the one above."""
    import torch

    return int(torch.cuda.cudart().cudaHostUnregister(address))


# ---- s3fs and fsspec ------------------------------------------------------------------------------


async def s3_call(fs: Any, method: str, **kwargs: Any) -> dict[str, Any]:
    """Call the S3 API ``method`` (botocore's name, such as ``"upload_part"``) through the s3fs file
    system ``fs``'s client, on its event loop.

    ``fs.call_s3`` is the public, blocking form: one call at a time per thread. A multipart upload
    sends its parts concurrently, as coroutines on s3fs's loop, and ``_call_s3`` is that coroutine
    (fsspec's convention for async file systems: ``_name`` is the coroutine of ``name``). Checked
    against s3fs 2026.9.0.
    """
    answer: dict[str, Any] = await fs._call_s3(method, **kwargs)
    return answer


def options_from_url(implementation: type, url: str) -> dict[str, Any]:
    """The options an fsspec file system class reads from a URL itself (an Azure account in
    ``abfs://container@account``, s3fs's ``version_aware`` from ``?versionId=``).

    ``fsspec.url_to_fs(url, **options)`` merges these too, but fails (a ``TypeError``) where an
    option passed differs from the URL's, while fedckpt lets ``storage_options`` win. Checked against
    fsspec and s3fs 2026.9.0.
    """
    options: dict[str, Any] = implementation._get_kwargs_from_urls(url)  # type: ignore[attr-defined]
    return dict(options)


def close_s3_session(fs: Any) -> None:
    """Close an s3fs file system's client session now; a file system of another kind is left alone.

    s3fs closes it from a ``weakref.finalize`` at interpreter exit, when the thread running its
    event loop may be going away; fedckpt closes it at its own exit handler instead, as that
    finalizer does: ``close_session(loop, fs._s3creator)`` (the client's context manager, which
    s3fs keeps only privately). A later use opens a new session. Checked against s3fs 2026.9.0.
    """
    creator = getattr(fs, "_s3creator", None)
    if creator is None or not callable(getattr(type(fs), "close_session", None)):
        return
    type(fs).close_session(fs.loop, creator)
    fs._s3 = None
    fs._s3creator = None
