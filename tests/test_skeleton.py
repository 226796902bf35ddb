"""Skeletons reused across model instances are exactly the bytes a fresh pickle of each instance gives."""

import io
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedckpt import skeleton
from fedckpt.skeleton import _SkeletonPickler, skeleton_of
from fedckpt.snapshot import snapshot_module
from fedckpt.storage.reading import _SkeletonUnpickler


class Block(nn.Module):
    def __init__(self, width: int, scale: object, tied: bool, frozen: bool, note: object) -> None:
        super().__init__()
        self.first = nn.Linear(width, width)
        self.second = self.first if tied else nn.Linear(width, width)
        self.scale = scale
        self.note = note
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        if frozen:
            self.first.weight.requires_grad_(False)


def fresh_pickle(model: nn.Module) -> bytes:
    names = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), name)
    buffer = io.BytesIO()
    _SkeletonPickler(buffer, names, {}).dump(model)
    return buffer.getvalue()


def skeleton_bytes(model: nn.Module) -> bytes:
    names = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), name)
    return skeleton_of(model, list(model.modules()), names)[0]


# Values that compare equal but pickle differently must never share a cached skeleton.
SCALES = st.sampled_from([1, 1.0, True, 0.0, -0.0, math.inf, None, "1", b"1", (1, 2), [1, 2], (1.0, 2)])
NOTES = st.sampled_from([None, "a", ("a", "b"), [3, 4], torch.float16, {}])


@settings(max_examples=150, deadline=None)
@given(
    first=st.tuples(st.integers(1, 3), SCALES, st.booleans(), st.booleans(), NOTES, st.booleans()),
    second=st.tuples(st.integers(1, 3), SCALES, st.booleans(), st.booleans(), NOTES, st.booleans()),
)
def test_a_cached_skeleton_is_what_pickling_the_new_instance_gives(first, second):
    """Build two models (possibly of the same structure, possibly differing in one detail); the
    skeleton of the second, cached or not, is byte for byte its own fresh pickle, and loads back."""
    models = []
    for width, scale, tied, frozen, note, training in (first, second):
        model = Block(width, scale, tied, frozen, note)
        model.train(training)
        models.append(model)
    skeleton_bytes(models[0])
    assert skeleton_bytes(models[1]) == fresh_pickle(models[1])
    tensors = models[1].state_dict()
    rebuilt = _SkeletonUnpickler(io.BytesIO(skeleton_bytes(models[1])), tensors).load()
    assert type(rebuilt.scale) is type(models[1].scale) and rebuilt.training == models[1].training
    assert (rebuilt.first is rebuilt.second) == (models[1].first is models[1].second)


def test_a_new_model_of_a_known_structure_reuses_its_skeleton():
    skeleton._cache.clear()
    snapshot_module(Block(4, 1.0, False, False, None))
    assert len(skeleton._cache) == 1
    snapshot_module(Block(4, 1.0, False, False, None))  # the same structure: no new entry
    assert len(skeleton._cache) == 1
    snapshot_module(Block(4, 2.0, False, False, None))
    assert len(skeleton._cache) == 2


def test_models_with_hooks_or_objects_are_pickled_every_time():
    skeleton._cache.clear()
    hooked = Block(4, 1.0, False, False, None)
    hooked.register_forward_hook(print)
    with_object = Block(4, object(), False, False, None)
    extra = Block(4, 1.0, False, False, None)
    extra.cache = torch.ones(3)  # a tensor that is neither a parameter nor a buffer
    for model in (hooked, with_object, extra):
        snapshot_module(model)
    assert len(skeleton._cache) == 0
