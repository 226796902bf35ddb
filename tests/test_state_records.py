"""A state's records reused from one of the same structure are exactly what torch.save writes for it."""

import math
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedckpt.snapshot import snapshot_state
from fedckpt.storage.formats import STATE
from fedckpt.storage.formats import torch_records as state_records
from fedckpt.storage.formats.laid_out import lay_out, write_laid_out
from fedckpt.storage.formats.torch_records import _RecordCollector, describe


def fresh_records(state) -> list[tuple[str, bytes]]:
    collector = _RecordCollector()
    torch.serialization._save(state, collector, pickle, torch.serialization.DEFAULT_PROTOCOL,
                              _disable_byteorder_record=False)  # fmt: skip
    return [(name, view.tobytes()) for name, view in collector.records]


def records_of(state) -> list[tuple[str, bytes]]:
    return [(name, view.tobytes()) for name, view in state_records.state_records(state)]


SCALARS = st.sampled_from([0, 1, 255, 256, 70000, 2**40, True, False, None, 0.0, -0.0, 1.5, math.inf, math.nan,
                           "momentum_buffer", "lr", b"raw", torch.float16])  # fmt: skip
DTYPES = st.sampled_from([torch.float32, torch.float64, torch.int64, torch.bfloat16, torch.uint8, torch.bool])


@st.composite
def states(draw):
    """A nested state: an optimizer-like dict with tensors (some sharing a storage), scalars,
    lists and tuples, and a string object used twice."""
    base = torch.arange(draw(st.integers(1, 64)), dtype=torch.float32)
    shared_key = "".join(["sha", "red"])  # not interned: its identity is this state's own
    tensors = [torch.zeros(draw(st.integers(0, 16)), dtype=draw(DTYPES)) for _ in range(draw(st.integers(0, 3)))]
    state = {
        "state": {index: {"momentum_buffer": tensor} for index, tensor in enumerate(tensors)},
        "param_groups": [{"lr": draw(SCALARS), "params": list(range(len(tensors))), "flags": (draw(SCALARS),)}],
        "round": draw(SCALARS),
        shared_key: [shared_key, draw(SCALARS)] if draw(st.booleans()) else ["shared", draw(SCALARS)],
        "views": [base, base[1:]] if draw(st.booleans()) else [base],
    }
    if draw(st.booleans()):
        state["alias"] = state["param_groups"]  # the same list twice: pickle writes a reference
    return state


@settings(max_examples=200, deadline=None)
@given(first=states(), second=states(), mutate=st.booleans())
def test_records_are_exactly_torch_saves_whether_reused_or_not(first, second, mutate):
    records_of(first)  # primes the cache with one structure (the second sighting makes its template)
    records_of(first)
    if mutate:
        for value in second["state"].values():
            if value["momentum_buffer"].dtype.is_floating_point:
                value["momentum_buffer"].add_(1)
    assert records_of(second) == fresh_records(second)
    assert records_of(second) == fresh_records(second)  # the second time from the cache, if it has a key


def renumbered(value, draw_int, draw_float, copies=None):
    """``value`` with every int and float replaced by another of the same pickle encoding (new
    containers, sharing kept; tensors and strings the same objects)."""
    copies = {} if copies is None else copies
    kind = type(value)
    if kind is int:
        low, high = (0, 255) if 0 <= value < 256 else (256, 65535) if 0 <= value < 65536 else (-(2**31), 2**31 - 1)
        return draw_int(low, high) if -(2**31) <= value < 2**31 else value
    if kind is float:
        return draw_float()
    if kind not in (dict, list, tuple) or id(value) in copies:
        return copies.get(id(value), value)
    if kind is dict:
        copy = copies[id(value)] = {}
        for key, item in value.items():
            copy.setdefault(
                renumbered(key, draw_int, draw_float, copies), renumbered(item, draw_int, draw_float, copies)
            )
        return copy
    if kind is list:
        copy = copies[id(value)] = []
        copy.extend(renumbered(item, draw_int, draw_float, copies) for item in value)
        return copy
    copy = copies[id(value)] = tuple(renumbered(item, draw_int, draw_float, copies) for item in value)
    return copy


@settings(max_examples=150, deadline=None)
@given(first=states(), data=st.data())
def test_a_state_of_the_same_structure_with_other_numbers_is_exactly_torch_saves(first, data):
    """The round counter case: the cached data.pkl is a template whose numbers are rewritten."""
    second = renumbered(first, lambda low, high: data.draw(st.integers(low, high)), lambda: data.draw(st.floats()))
    records_of(first)
    records_of(first)
    assert records_of(second) == fresh_records(second)


def _pair(detail):
    """Two states alike but for one detail that compares equal yet pickles differently."""
    base = torch.arange(8.0)
    name = "".join(["sha", "red"])
    other = "".join(["sha", "red"])
    group = [1, 2]
    return {
        "zero": ({"x": 0.0}, {"x": -0.0}),
        "int-float-bool": ({"x": 1}, {"x": 1.0}),
        "bool": ({"x": True}, {"x": 1}),
        "shared string": ({"a": name, "b": name}, {"a": name, "b": other}),
        "alias": ({"a": group, "b": group}, {"a": group, "b": list(group)}),
        "views": ({"a": base, "b": base[2:]}, {"a": base, "b": torch.arange(2.0, 8.0)}),
        "dtype": ({"x": torch.zeros(2)}, {"x": torch.zeros(2, dtype=torch.float64)}),
    }[detail]


@pytest.mark.parametrize("detail", ["zero", "int-float-bool", "bool", "shared string", "alias", "views", "dtype"])
def test_states_that_only_compare_equal_do_not_share_a_pickle(detail):
    first, second = _pair(detail)
    records_of(first)
    records_of(first)
    assert records_of(second) == fresh_records(second)


def test_a_state_of_the_same_structure_reuses_its_pickle_and_loads_back(tmp_path):
    state_records._cache.clear()

    def make(value):
        return {"optimizer": {"state": {0: {"momentum_buffer": torch.full((4,), value)}}}, "steps": 5}

    assert describe(make(1.0)) is not None
    snapshot_state(make(1.0))
    assert len(state_records._cache) == 0  # a structure seen once
    snapshot_state(make(1.0))
    assert len(state_records._cache) == 1
    snapshot = snapshot_state(make(2.0))
    assert len(state_records._cache) == 1  # reused: same structure, other values
    data = np.empty(snapshot.nbytes, dtype=np.uint8)
    snapshot.copy_into(data)
    write_laid_out(lay_out(STATE, snapshot.layout, memoryview(data)), str(tmp_path / "s.pt"))
    loaded = torch.load(tmp_path / "s.pt", weights_only=False)
    assert torch.equal(loaded["optimizer"]["state"][0]["momentum_buffer"], torch.full((4,), 2.0))


def test_states_with_objects_are_pickled_every_time():
    class Custom:
        pass

    assert describe({"x": Custom()}) is None
    assert describe({"x": {1, 2}}) is None
    tagged = torch.zeros(2)
    tagged.note = "python state"
    assert describe({"x": tagged}) is None


def test_a_storages_byte_view_is_its_memory_and_keeps_it_alive():
    """Records are numpy views of the live storages (no copy), and a view outlives the tensor it was
    taken from: a snapshot may be copied after the caller dropped its state."""
    import gc

    tensor = torch.arange(4096, dtype=torch.float32)
    view = state_records.storage_view(tensor.untyped_storage())
    assert view.dtype == np.uint8 and view.nbytes == 4 * 4096
    assert np.shares_memory(view, tensor.numpy())
    tensor[0] = 7.0  # the view sees the storage's current bytes
    expected = tensor.numpy().tobytes()
    del tensor
    gc.collect()
    garbage = [torch.full((4096,), -1.0) for _ in range(64)]  # reuses freed memory, were it freed
    assert view.tobytes() == expected and garbage
    assert state_records.storage_view(torch.zeros(0).untyped_storage()).nbytes == 0
