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

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from moto.server import ThreadedMotoServer
from werkzeug.serving import make_server

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
        import s3fs

        from fedckpt import _compat

        # The helpers' session, closed while fsspec's event loop runs (not by s3fs's finalizer at exit).
        _compat.close_s3_session(s3fs.S3FileSystem(**self.options()))
        if self.server is not None:
            self.server.stop()
            self.server = None
            _wait_until_listening(self.port, up=False)

    def new_bucket(self) -> str:
        import s3fs

        name = f"fedckpt-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem(**self.options()).mkdir(name)
        return name


class _ConditionIgnoringMotoServer(ThreadedMotoServer):
    """moto's server behind a filter that drops the If-Match and If-None-Match headers."""

    def _server_entry(self) -> None:
        app = DomainDispatcherApplication(create_backend_app)

        def ignoring_conditions(environ: dict[str, Any], start_response: Any) -> Any:
            environ.pop("HTTP_IF_MATCH", None)
            environ.pop("HTTP_IF_NONE_MATCH", None)
            return app(environ, start_response)

        self._server = make_server(
            self._ip_address, self._port, ignoring_conditions, True, request_handler=MotoRequestHandler
        )
        self._server_ready_event.set()
        self._server.serve_forever()


class ConditionIgnoringS3Server(S3Server):
    """An S3-compatible store that stores every write whatever its conditions say, as stores without
    conditional writes do (older MinIO, Ceph RGW and others ignore the headers)."""

    def start(self) -> None:
        self.server = _ConditionIgnoringMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        _wait_until_listening(self.port, up=True)


class AuthenticatingS3Server:
    """moto's server as its own process (``python -m moto.server``), checking every request's
    signature once a user with S3 rights exists: the server a test gives wrong credentials to."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.key: dict[str, str] = {}
        self.process: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> AuthenticatingS3Server:
        import json
        import os
        import subprocess
        import sys

        import boto3

        # Four requests go unchecked: creating the user, its rights, its key and the bucket.
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"}
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_until_listening(self.port, up=True)
        anonymous = {"endpoint_url": self.endpoint, "region_name": "us-east-1",
                     "aws_access_key_id": "setup", "aws_secret_access_key": "setup"}  # fmt: skip
        iam = boto3.client("iam", **anonymous)
        iam.create_user(UserName="trainer")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=json.dumps(policy))
        created = iam.create_access_key(UserName="trainer")["AccessKey"]
        self.key = {"key": created["AccessKeyId"], "secret": created["SecretAccessKey"]}
        boto3.client("s3", **anonymous).create_bucket(Bucket="checked")
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
