"""Mirror of ``fl4health.utils``: only ``snapshotter``."""
