"""Property-based bad input: every name, metric and state gets a clear error or a correct round trip.

Never a corrupt file, a file outside the checkpoint directory, or a hang.
"""

import copy
import math
import os
import shutil
import threading
import time

import numpy as np
import pytest
import torch
from conftest import assert_same_tensors, make_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedckpt
from fedckpt import (
    BestLossTorchModuleCheckpointer,
    BestMetricTorchModuleCheckpointer,
    CheckpointMode,
    ClientCheckpointAndStateModule,
    LatestTorchModuleCheckpointer,
    PerRoundStateCheckpointer,
)
from fedckpt.cli import main as fedckpt_cli
from fedckpt.errors import ScoreError
from fedckpt.storage.reading import read_state_dict

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

name_parts = st.one_of(
    st.text(min_size=0, max_size=12),
    st.sampled_from(["..", ".", "", "/", "\x00", ".fedckpt", "x" * 250, "ü/ß", "a/../..", "~", " "]),
)
names = st.lists(name_parts, min_size=1, max_size=4).map("".join)


def inside(path: str, directory: str) -> bool:
    return os.path.commonpath([os.path.realpath(path), os.path.realpath(directory)]) == os.path.realpath(directory)


@SETTINGS
@given(name=names)
def test_any_checkpoint_name_is_rejected_clearly_or_saved_inside_the_directory(runtime, tmp_path_factory, name):
    directory = str(tmp_path_factory.mktemp("names"))
    checkpointer = PerRoundStateCheckpointer(directory)
    try:
        checkpointer.save_checkpoint(name, {"name": name})
    except (ValueError, TypeError) as error:
        assert str(error), "an error without a message"
        assert not any(entry != ".fedckpt" for entry in os.listdir(directory))
        return
    except OSError as error:  # a name the file system itself refuses: named in the error
        assert name in str(error) or error.filename
        return
    checkpointer.flush()
    path = os.path.join(directory, name)
    assert inside(path, directory)
    assert checkpointer.load_checkpoint(name) == {"name": name}


scores = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**6), 10**6),
    st.sampled_from(["0.5", "high", None, [1.0], {"a": 1}, b"1", torch.tensor(0.25), np.float32(0.75)]),
)


@SETTINGS
@given(metrics=st.lists(st.one_of(st.none(), scores), min_size=1, max_size=5))
def test_any_metric_value_saves_correctly_or_fails_before_saving(runtime, tmp_path_factory, metrics):
    """A best-metric checkpointer over a series of metric values (None: the key is missing)."""
    directory = str(tmp_path_factory.mktemp("metrics"))
    checkpointer = BestMetricTorchModuleCheckpointer(directory, "best.safetensors", "accuracy", maximize=True)
    best = None
    saved_seed = None
    for seed, value in enumerate(metrics):
        given_metrics = {} if value is None else {"val - prediction - accuracy": value}
        try:
            number = None if value is None else float(value)
        except (TypeError, ValueError):
            number = None
        try:
            checkpointer.maybe_checkpoint(make_model(seed), 0.0, given_metrics)
        except KeyError as error:
            assert value is None and "accuracy" in str(error)
            continue
        except ScoreError as error:  # a TypeError and a ValueError
            assert number is None and "accuracy" in str(error)
            continue
        assert number is not None
        if not math.isnan(number) and (best is None or number >= best):
            best, saved_seed = number, seed
        assert checkpointer.best_score == best
    checkpointer.flush()
    path = os.path.join(directory, "best.safetensors")
    if saved_seed is None:
        assert not os.path.exists(path)  # NaN and bad values never save
    else:
        expected = make_model(saved_seed).state_dict()
        assert all(torch.equal(read_state_dict(path)[k], expected[k]) for k in expected)
    assert fedckpt_cli(["verify", directory]) == 0


DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
    torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64,
]  # fmt: skip


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
    base = (torch.rand(*shape, 2) * 100).to(dtype) if dtype != torch.bool else torch.rand(*shape, 2) > 0.5
    view = draw(st.sampled_from(["contiguous", "strided", "transposed"]))
    if view == "strided":
        return base[..., 0]  # every other element: not contiguous
    if view == "transposed" and len(shape) >= 2:
        return base[..., 0].transpose(0, 1)
    return base[..., 0].contiguous()


leaves = st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=8), st.none(), st.booleans(), tensors())
states = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)


def same(left, right) -> bool:
    if isinstance(left, torch.Tensor):
        return (
            isinstance(right, torch.Tensor)
            and left.dtype == right.dtype
            and left.shape == right.shape
            and torch.equal(left.contiguous(), right.contiguous())
        )
    if isinstance(left, dict):
        return isinstance(right, dict) and left.keys() == right.keys() and all(same(left[k], right[k]) for k in left)
    if isinstance(left, list):
        return isinstance(right, list) and len(left) == len(right) and all(map(same, left, right))
    return left == right


@SETTINGS
@given(state=st.dictionaries(st.text(max_size=6), states, max_size=5))
def test_any_nested_state_round_trips(runtime, tmp_path_factory, state):
    directory = str(tmp_path_factory.mktemp("states"))
    checkpointer = PerRoundStateCheckpointer(directory)
    expected = copy.deepcopy(state)
    checkpointer.save_checkpoint("state.pt", state)
    for value in state.values():  # snapshot isolation: changing the state after the call changes nothing
        if isinstance(value, torch.Tensor) and value.numel() and value.dtype != torch.bool:
            value.add_(1)
    loaded = checkpointer.load_checkpoint("state.pt")
    assert same(expected, loaded)
    assert fedckpt_cli(["verify", directory]) == 0


@pytest.mark.parametrize(
    "bad",
    [lambda x: x, threading.Lock(), (i for i in range(3)), open(os.devnull)],  # noqa: SIM115
    ids=["lambda", "lock", "generator", "open file"],
)
def test_unpicklable_state_is_refused_by_name_and_nothing_is_written(runtime, tmp_path, bad):
    checkpointer = PerRoundStateCheckpointer(tmp_path)
    checkpointer.save_checkpoint("good.pt", {"ok": 1})
    with pytest.raises(TypeError, match="bad.pt"):
        checkpointer.save_checkpoint("bad.pt", {"nested": [{"deep": bad}]})
    checkpointer.flush()
    assert not os.path.exists(tmp_path / "bad.pt")
    assert checkpointer.load_checkpoint("good.pt") == {"ok": 1}


def test_a_huge_nested_structure_round_trips(runtime, tmp_path):
    state = {"rounds": [{"client": c, "metrics": {f"m{i}": float(i) for i in range(20)}} for c in range(5_000)]}
    deep = current = {}
    for level in range(200):
        current["next"] = current = {"level": level}
    state["deep"] = deep
    checkpointer = PerRoundStateCheckpointer(tmp_path)
    checkpointer.save_checkpoint("huge.pt", state)
    loaded = checkpointer.load_checkpoint("huge.pt")
    assert loaded["rounds"][4_999]["metrics"]["m19"] == 19.0
    node, depth = loaded["deep"], 0
    while "next" in node:
        node, depth = node["next"], depth + 1
    assert depth == 200


def wait_for_the_failure_notice(deadline_seconds: float = 60.0) -> None:
    """Until this process took in the outcome of every save it sent (a failure is then held)."""
    from fedckpt.runtime import lifecycle

    end = time.monotonic() + deadline_seconds
    while lifecycle.coordinator().inflight_bytes() and time.monotonic() < end:
        time.sleep(0.01)  # polling a condition, bounded by the deadline
    assert lifecycle.coordinator().inflight_bytes() == 0


def test_a_save_that_raises_leaves_the_best_score_where_it_was(runtime, tmp_path):
    """An unpicklable model, and a save refused for an earlier failure held against its key: the
    bar stays, so the next good model is still compared with the last one saved."""
    checkpointer = BestLossTorchModuleCheckpointer(str(tmp_path / "best"), "best.pt")
    checkpointer.maybe_checkpoint(make_model(1), 0.5, {})
    unpicklable = make_model(2)
    unpicklable.lock = threading.Lock()
    with pytest.raises(TypeError):
        checkpointer.maybe_checkpoint(unpicklable, 0.1, {})
    assert checkpointer.best_score == 0.5
    module = ClientCheckpointAndStateModule(pre_aggregation=checkpointer)
    with pytest.raises(TypeError):
        module.maybe_checkpoint(unpicklable, 0.1, {}, CheckpointMode.PRE_AGGREGATION)
    assert checkpointer.best_score == 0.5
    checkpointer.maybe_checkpoint(make_model(3), 0.4, {})  # still an improvement on 0.5
    checkpointer.flush()
    assert checkpointer.best_score == 0.4
    assert_same_tensors(checkpointer.load_state_dict(), make_model(3).state_dict())

    shutil.rmtree(tmp_path / "best")
    (tmp_path / "best").write_text("a file where the directory was")
    checkpointer.maybe_checkpoint(make_model(4), 0.3, {})  # taken, then fails in the writer
    assert checkpointer.best_score == 0.3
    wait_for_the_failure_notice()
    with pytest.raises(fedckpt.CheckpointError, match="earlier save failed"):
        checkpointer.maybe_checkpoint(make_model(5), 0.2, {})
    assert checkpointer.best_score == 0.3
    with pytest.raises(fedckpt.CheckpointError, match="File exists"):  # the writer reports it to a flush too
        checkpointer.flush()


def test_numpy_and_tensor_attributes_reassigned_between_saves_save_what_the_model_holds(runtime, tmp_path):
    """Reassigned arrays used to be compared with ``==`` (elementwise: an error, or equal values of
    another dtype taken for the old tensor)."""
    checkpointer = LatestTorchModuleCheckpointer(str(tmp_path), "model.pt")
    model = make_model(0)
    model.mask = np.arange(10)
    model.register_buffer("steps", torch.tensor(5, dtype=torch.int64))
    checkpointer.maybe_checkpoint(model, 0.0, {})
    for step in range(3):
        model.mask = np.arange(10)  # an equal array, a new object
        model.steps = torch.tensor(5.0 + step, dtype=torch.float64)  # equal at first, but float64
        model.scale = torch.full((3,), float(step))  # a tensor attribute, neither parameter nor buffer
        checkpointer.maybe_checkpoint(model, 0.0, {})
        saved = checkpointer.load_checkpoint()
        assert saved.steps.dtype == torch.float64 and saved.steps.item() == 5.0 + step
        assert np.array_equal(saved.mask, np.arange(10)) and torch.equal(saved.scale, model.scale)
        assert_same_tensors(saved.state_dict(), model.state_dict())
