"""Wrap ``ray.shutdown`` so that it flushes first, in every process that imports fedckpt, without
importing Ray where it is never used (``fedckpt ls`` and ``verify`` run where no cluster is).

If Ray is already imported, the wrapper goes in now; otherwise it goes in the moment Ray's own
import finishes (a finder on ``sys.meta_path`` that steps aside after that one import).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any


def install() -> None:
    """Wrap ``ray.shutdown`` now if Ray is imported, else as soon as it is."""
    if "ray" in sys.modules:
        _wrap()
    elif not any(isinstance(finder, _WrapRayOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _WrapRayOnImport())


def _wrap() -> None:
    from fedckpt.runtime import ray_session  # wraps ray.shutdown when imported

    ray_session.before_shutdown = _flush_pending_saves


def _flush_pending_saves() -> BaseException | None:
    """Every process's saves, from any process that calls ``ray.shutdown()`` (a Flower driver that
    never saved itself too); the failure to raise once Ray is down."""
    from fedckpt.runtime import lifecycle

    return lifecycle.flush_before_ray_shutdown()


class _WrapRayOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> Any:
        if fullname != "ray":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        run_module = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run_module(module)
            _wrap()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec
