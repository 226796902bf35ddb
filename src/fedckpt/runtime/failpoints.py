"""Named points in the save protocol where a test can stop a thread (with a barrier or an event) to
drive a race deterministically: the moment between two steps that another thread may interleave.

A point costs one dictionary lookup when nothing is set. Tests set a hook with :func:`hooked`; a
hook runs in the thread that reached the point, with the point's arguments. In a writer's event loop
(:func:`reach_async`) a hook may return an awaitable, which the loop awaits: a test can hold a writer's
writes without stopping the writer (:func:`hold_in_actor`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import threading
from collections.abc import Callable, Iterator
from typing import Any

_hooks: dict[str, Callable[..., None]] = {}


def reach(name: str, **details: Any) -> None:
    """Run the hook set for ``name``, if any (the protocol's code calls this at its racing points)."""
    hook = _hooks.get(name)
    if hook is not None:
        hook(**details)


async def reach_async(name: str, **details: Any) -> None:
    """:func:`reach` for a point in an event loop: an awaitable the hook returns is awaited."""
    hook = _hooks.get(name)
    if hook is not None:
        result = hook(**details)
        if inspect.isawaitable(result):
            await result


def hold_in_actor(_actor: Any, name: str) -> None:
    """Every later arrival at point ``name`` in this process waits until the process ends. Run in a
    writer through Ray's ``handle.__ray_call__.remote(hold_in_actor, name)``: a test that kills the
    writer (or its node) then knows the saves it was sent are still unwritten."""
    set_hook(name, _wait_for_good)


def meet_in_actor(_actor: Any, name: str, rendezvous: Any, passes: int = 0) -> None:
    """:func:`hold_in_actor` for a point reached in a thread (a writer's I/O thread): the first
    ``passes`` arrivals go on; the next calls ``rendezvous.arrive`` (an actor method), so a test
    knows the point is reached, and waits until the process ends."""
    arrivals = itertools.count()

    def meet(**_details: Any) -> None:
        if next(arrivals) >= passes:
            import ray

            ray.get(rendezvous.arrive.remote())
            threading.Event().wait()

    set_hook(name, meet)


_releases: dict[str, threading.Event] = {}


def hold_key_in_actor(_actor: Any, name: str, key: str) -> None:
    """Arrivals at point ``name`` (in a writer's event loop) for ``key`` wait until
    :func:`release_in_actor`; those for other keys go on. Run as :func:`hold_in_actor` is."""
    release = _releases[name] = threading.Event()

    async def hold(**details: Any) -> None:
        if details.get("key") == key:
            await asyncio.to_thread(release.wait)

    set_hook(name, hold)


def release_in_actor(_actor: Any, name: str) -> None:
    """End :func:`hold_key_in_actor`'s hold of point ``name``."""
    set_hook(name, None)
    _releases.pop(name).set()


async def _wait_for_good(**_details: Any) -> None:
    await asyncio.Event().wait()


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
