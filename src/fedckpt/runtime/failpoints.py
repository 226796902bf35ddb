"""Named points in the save protocol where a test can stop a thread (with a barrier or an event) to
drive a race deterministically: the moment between two steps that another thread may interleave.

A point costs one dictionary lookup when nothing is set. Tests set a hook with :func:`hooked`; a
hook runs in the thread that reached the point, with the point's arguments.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

_hooks: dict[str, Callable[..., None]] = {}


def reach(name: str, **details: Any) -> None:
    """Run the hook set for ``name``, if any (the protocol's code calls this at its racing points)."""
    hook = _hooks.get(name)
    if hook is not None:
        hook(**details)


def set_hook(name: str, hook: Callable[..., None] | None) -> None:
    """Set (or, with None, clear) the hook of point ``name``."""
    if hook is None:
        _hooks.pop(name, None)
    else:
        _hooks[name] = hook


@contextlib.contextmanager
def hooked(name: str, hook: Callable[..., None]) -> Iterator[None]:
    """``hook`` runs at point ``name`` inside the block."""
    set_hook(name, hook)
    try:
        yield
    finally:
        set_hook(name, None)
