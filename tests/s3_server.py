"""A real S3-protocol server on 127.0.0.1 for the tests: moto's server mode, in this process.

In-process (moto's ``ThreadedMotoServer``) so that a test can stop the server and start it again
on the same port with every object kept: the stored objects live in this process's memory.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from moto.server import ThreadedMotoServer

CREDENTIALS = {"key": "testing", "secret": "testing"}
logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_listening(port: int, up: bool, within: float = 30.0) -> None:
    """Poll the port until it accepts connections (``up``) or refuses them."""
    deadline = time.monotonic() + within
    pause = threading.Event()
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            listening = True
        except OSError:
            listening = False
        if listening == up:
            return
        pause.wait(0.05)
    raise TimeoutError(f"the S3 server on 127.0.0.1:{port} did not {'start' if up else 'stop'} within {within} s")


@dataclass
class S3Server:
    """moto's S3 server on a free loopback port."""

    port: int = field(default_factory=_free_port)
    server: ThreadedMotoServer | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def options(self, **overrides: Any) -> dict[str, Any]:
        """s3fs options for this server (``storage_options``)."""
        return {"endpoint_url": self.endpoint, **CREDENTIALS, **overrides}

    def env(self) -> dict[str, str]:
        """The same, as the standard AWS environment variables."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": CREDENTIALS["key"],
            "AWS_SECRET_ACCESS_KEY": CREDENTIALS["secret"],
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        _wait_until_listening(self.port, up=True)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
            _wait_until_listening(self.port, up=False)

    def new_bucket(self) -> str:
        import s3fs

        name = f"fedckpt-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem(**self.options()).mkdir(name)
        return name
