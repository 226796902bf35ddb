"""Persisting to S3: fedckpt beside a plain s3fs put of the same bytes, on a moto S3 server on 127.0.0.1.

    .venv/bin/python benchmarks/s3_bench.py                      # fp32-100mb and fp32-1gb, medians of 3
    .venv/bin/python benchmarks/s3_bench.py --cases fp32-100mb --repeats 5

Starts moto's S3 server (``python -m moto.server``, needs ``pip install -e '.[test]'``) in its own
process on a free loopback port, makes a bucket, and runs ``fedckpt bench --storage s3://...``
with the server's endpoint and credentials in the standard AWS environment variables. For a real
store, run ``fedckpt bench --storage s3://your-bucket/prefix`` directly.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time

import s3fs


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_listening(port: int, within: float = 30.0) -> None:
    deadline, pause = time.monotonic() + within, threading.Event()
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            pause.wait(0.05)
    raise TimeoutError(f"moto did not start on 127.0.0.1:{port}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["fp32-100mb", "fp32-1gb"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the samples to this file")
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until_listening(port)
        env = {
            **os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_ADDRESS": "local",
        }  # fmt: skip
        s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], key="bench", secret="bench").mkdir("bench")
        command = [sys.executable, "-m", "fedckpt.cli", "bench", "--storage", "s3://bench/run", "--cases", *args.cases,
                   "--repeats", str(args.repeats)]  # fmt: skip
        if args.json:
            command += ["--json", args.json]
        return subprocess.run(command, env=env).returncode
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    sys.exit(main())
