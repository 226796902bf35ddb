"""The optional parts of fedckpt and the extras that install their dependencies.

The core (checkpointers, modules, ``fedckpt.save``/``load``, the CLI's ``ls``/``verify``/``status``)
needs torch, Ray, numpy, safetensors, xxhash and fsspec only. ``fedckpt.flower`` needs Flower
(``fedckpt[flower]``) and ``fedckpt bench`` needs rich (``fedckpt[bench]``): each checks on import,
so a missing dependency is one clear error instead of an ``ImportError`` deep inside.
"""

from __future__ import annotations

import importlib

from fedckpt.errors import MissingExtraError


def require(module: str, extra: str, part: str) -> None:
    """Import ``module`` (a dependency of ``part``), or raise :class:`MissingExtraError` naming
    ``pip install 'fedckpt[extra]'``. A module that is installed but fails to import raises its own
    error: only a missing ``module`` is reported as a missing extra."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] != module.split(".")[0]:
            raise  # the module is there; something it imports is not
        raise MissingExtraError(
            f"{part} needs {module}, which is not installed: pip install 'fedckpt[{extra}]'", name=module
        ) from error
