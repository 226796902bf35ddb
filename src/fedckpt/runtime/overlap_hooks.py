"""Overlap mode for GPU saves: only in-place mutations wait for a save's copy.

In the default mode the caller's CUDA stream waits for each save's copy right away (the GPU orders
it; the CPU never waits), so the next forward pass starts once the copy is done. In overlap mode the
stream does not wait: the copy runs beside the next forward and backward, and only what changes the
saved tensors in place waits for it, on the GPU too:

- every optimizer's ``step`` (torch's global optimizer step pre-hook, installed once per process);
- ``load_state_dict`` into a module saved in overlap mode (a pre-hook on that module);
- ``fedckpt.wait_staged()``, which also blocks the CPU until the copies completed and the saves were sent.

Anything else that changes a saved tensor in place while its copy runs must call
``fedckpt.wait_staged()`` first: the copy would take the new values. In particular a forward pass in
training mode updates BatchNorm's running statistics in place; with such buffers, use the default mode
or call ``fedckpt.wait_staged()`` before that forward pass.

A module's hook is taken off while the module is snapshot and put back after, so that no checkpoint
holds it: a model's pickled structure would otherwise carry a reference to fedckpt.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from fedckpt.runtime import cuda

_optimizer_hook: RemovableHandle | None = None
_module_hooks: weakref.WeakKeyDictionary[nn.Module, RemovableHandle] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def before_optimizer_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    """torch's global optimizer step pre-hook: the step runs after the copies in flight (GPU side)."""
    cuda.order_after_pending_copies()


def before_load_state_dict(module: nn.Module, *args: Any) -> None:
    """A saved module's ``load_state_dict`` pre-hook: the loading copies run after the copies in flight."""
    cuda.order_after_pending_copies()


def install(module: nn.Module | None = None) -> None:
    """Install the optimizer step pre-hook (once per process) and ``module``'s ``load_state_dict``
    pre-hook (once per module)."""
    global _optimizer_hook
    with _lock:
        if _optimizer_hook is None:
            _optimizer_hook = register_optimizer_step_pre_hook(before_optimizer_step)
        if module is not None and module not in _module_hooks:
            _module_hooks[module] = module.register_load_state_dict_pre_hook(before_load_state_dict)


@contextlib.contextmanager
def unhooked(module: nn.Module) -> Iterator[None]:
    """``module`` without fedckpt's hook while it is snapshot; hooked after (also the first time)."""
    with _lock:
        handle = _module_hooks.pop(module, None)
    if handle is not None:
        handle.remove()
    try:
        yield
    finally:
        install(module)


def remove_all() -> None:
    """Remove every hook this module installed (``fedckpt.shutdown()``, ``fedckpt.init()``)."""
    global _optimizer_hook
    with _lock:
        handles = list(_module_hooks.values())
        _module_hooks.clear()
        if _optimizer_hook is not None:
            handles.append(_optimizer_hook)
            _optimizer_hook = None
    for handle in handles:
        handle.remove()


def installed(module: nn.Module | None = None) -> bool:
    """Whether the optimizer hook (and ``module``'s hook, if given) is installed."""
    with _lock:
        return _optimizer_hook is not None and (module is None or module in _module_hooks)
