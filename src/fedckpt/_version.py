"""fedckpt's version: one place, read by the package, its packaging and its writers."""

__version__ = "0.1.0"
