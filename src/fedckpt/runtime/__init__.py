"""The asynchronous runtime: caller-side coordinator, writer actors and their lifecycle."""
