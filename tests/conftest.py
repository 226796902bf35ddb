"""Shared fixtures: one real local Ray instance on loopback for the whole session."""

import faulthandler
import os

faulthandler.enable()  # a crash while tests are collected prints every thread's stack

# Before Ray is imported anywhere: keep Ray on 127.0.0.1 and start a fresh local instance.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_ADDRESS"] = "local"
# Ray's metrics report interval stays at its default (10 s): Ray's metric exporters go on running in
# this process after ray.shutdown(), and an export while the interpreter exits can crash it.

import pytest  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import fedckpt  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Run test_multinode.py last: it shuts down the session's Ray instance to start a cluster of its own."""
    items.sort(key=lambda item: item.path.name == "test_multinode.py")  # stable: keeps the order otherwise


def pytest_runtest_setup(item):
    """A CUDA test selected (``-m cuda``) on a machine without a GPU fails, saying so: never a silent skip."""
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        pytest.fail("this test needs a CUDA GPU: run pytest -m cuda on a machine with one", pytrace=False)


@pytest.fixture(scope="session")
def ray_instance():
    ray.init(address="local", include_dashboard=False, num_cpus=2, log_to_driver=False)
    yield
    fedckpt.shutdown()
    ray.shutdown()
    # Ray workers that staged snapshots were killed with Ray: remove their segments.
    from fedckpt.runtime.staging import remove_orphans

    remove_orphans(settle_seconds=2.0, grace_seconds=0.0)  # Ray workers may still be exiting


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 for the whole session (stopped at its end)."""
    from s3_server import S3Server

    server = S3Server()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_dir(s3_server, runtime):
    """A checkpoint directory in a new bucket, with this process's saves and loads set up for it."""
    fedckpt.init(storage_options=s3_server.options())
    yield f"s3://{s3_server.new_bucket()}/run"
    fedckpt.flush()
    fedckpt.init(storage_options={})


@pytest.fixture
def runtime(ray_instance):
    """The default writer pool; everything a test saved is flushed (or its error seen) after it."""
    fedckpt.init()
    yield
    fedckpt.flush()


class SmallNet(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 4))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        return self.body(x)


def make_model(seed: int = 0, width: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    return SmallNet(width)


def assert_same_tensors(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for name in left:
        assert left[name].dtype == right[name].dtype, name
        assert torch.equal(left[name], right[name]), name


def shared_pool_env() -> dict:
    """The environment of a process that joins this test's Ray cluster and its writer pool (another
    Ray job: without naming the pool it would get one of its own)."""
    from fedckpt.runtime import lifecycle

    pool = lifecycle.coordinator().pool()
    return {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "FEDCKPT_NAMESPACE": pool.namespace}
