"""Mirror of ``fl4health.checkpointing`` (FL4Health 0.4): import its modules by their full paths."""
