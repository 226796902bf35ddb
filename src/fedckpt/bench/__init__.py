"""``fedckpt bench``: fedckpt beside the usual ways to save a PyTorch model, on the same model, in one run.

``cases`` builds the models, ``methods`` holds the save methods, ``measure`` times them, ``report``
prints the tables and writes the JSON, and ``runner`` ties them together (``run_bench``).

rich draws the tables and the progress display: an optional dependency, ``pip install 'fedckpt[bench]'``.
"""

from fedckpt._extras import require

require("rich", extra="bench", part="fedckpt bench")

from fedckpt.bench.runner import run_bench  # noqa: E402

__all__ = ["run_bench"]
