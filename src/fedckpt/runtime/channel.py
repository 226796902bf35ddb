"""The node-local control channel: a Unix socket from a caller process to a writer on its node.

A Ray actor call costs about 0.9 ms on a quiet 2-core machine and several times that on busy
cores; a Unix-socket round trip costs about 15 us. So a caller whose writer runs on its own node
sends each save as one message on this channel and waits for one reply, and the writer pushes a
``SaveDone`` notice on the same connection when the save left its memory. Ray calls remain for
callers on other nodes, and for everything that is not on the save path.

Frames are a 4-byte length and a pickle. The socket lives in Linux's abstract namespace (no file
to clean up: it goes away with the writer process), and the writer accepts only processes of its
own user (``SO_PEERCRED``), the same trust as its Ray calls.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import pickle
import select
import socket
import struct
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fedckpt.runtime.messages import Reply, SaveDone

HEADER = struct.Struct("<I")
RECEIVE_BYTES = 1 << 16
_CREDENTIALS = struct.Struct("3i")  # pid, uid, gid


class ChannelClosed(ConnectionError):
    """The writer at the other end went away (it died, or Ray restarted it)."""


def channel_supported() -> bool:
    """Abstract Unix sockets and peer credentials are Linux features."""
    return sys.platform.startswith("linux")


def new_address(prefix: str) -> str:
    return f"\0fedckpt/{prefix}/{uuid.uuid4().hex}"


def encode(message: Any) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(body)) + body


def peer_uid(sock: socket.socket) -> int:
    return _CREDENTIALS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size))[1]


class ChannelClient:
    """The caller's end: calls answered by call id, and ``SaveDone`` notices handed to ``on_done``.

    Thread-safe. Whichever thread waits reads the socket and hands other threads' replies over;
    notices are dispatched outside the client's lock. Nothing reads the socket while no thread
    waits: notices queue up in it until the next call, so a finished save wakes no thread.
    """

    def __init__(self, address: str, on_done: Callable[[list[SaveDone]], None], timeout: float = 10.0) -> None:
        self.address = address
        self._on_done = on_done
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(address)
            self.sock.settimeout(None)
            if peer_uid(self.sock) != os.getuid():
                raise ConnectionRefusedError(f"the process listening at {address!r} runs as another user")
        except OSError as error:
            self.sock.close()
            raise ChannelClosed(f"cannot reach the writer's channel: {error}") from error
        self._poller = select.poll()
        self._poller.register(self.sock.fileno(), select.POLLIN)
        self._send_lock = threading.Lock()
        self._state = threading.Condition()
        self._reading = False
        self._replies: dict[int, Any] = {}
        self._buffer = bytearray()
        self._ids = itertools.count(1)
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def post(self, message: Any) -> None:
        """Send a message that is not answered."""
        self._send_frame(encode(message))

    def send(self, make_message: Callable[[int], Any]) -> int:
        """Send ``make_message(call_id)``; returns the call id to wait for with :meth:`reply`."""
        call_id = next(self._ids)
        self._send_frame(encode(make_message(call_id)))
        return call_id

    def _send_frame(self, frame: bytes) -> None:
        with self._send_lock:
            if self.closed:
                raise ChannelClosed("the channel is closed")
            try:
                self.sock.sendall(frame)
            except OSError as error:
                self._close()
                raise ChannelClosed(f"the writer went away: {error}") from error

    def reply(self, call_id: int, timeout: float | None = None) -> Any:
        """Wait for the reply to ``call_id`` (``TimeoutError`` after ``timeout`` seconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._read_until(lambda: call_id in self._replies, deadline, once=False)
        with self._state:
            return self._replies.pop(call_id)

    def call(self, make_message: Callable[[int], Any], timeout: float | None = None) -> Any:
        return self.reply(self.send(make_message), timeout)

    def pump(self, timeout: float = 0.0) -> None:
        """Take in what arrived; block up to ``timeout`` for the first frame. Returns at once if
        another thread is reading (it dispatches what arrives)."""
        self._read_until(lambda: False, time.monotonic() + timeout, once=True)

    def close(self) -> None:
        with self._state:
            self._close()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()

    def _read_until(self, done: Callable[[], bool], deadline: float | None, once: bool) -> None:
        with self._state:
            while not done():
                if self.closed:
                    raise ChannelClosed("the writer went away")
                if not self._reading:
                    self._reading = True
                    break
                if once:
                    return
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("no reply from the writer in time")
                self._state.wait(left)
            else:
                return
        try:
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                frames = self._receive(left)
                with self._state:
                    notices = [frame for frame in frames if isinstance(frame, SaveDone)]
                    self._replies.update((f.call_id, f.value) for f in frames if isinstance(f, Reply))
                    finished = done()
                    self._state.notify_all()
                if notices:
                    self._on_done(notices)
                if finished or (once and (frames or left == 0.0)):
                    return
                if not frames and left == 0.0:
                    break
        except OSError as error:
            with self._state:
                self._close()
            raise ChannelClosed(f"the writer went away: {error}") from error
        finally:
            with self._state:
                self._reading = False
                self._state.notify_all()
        raise TimeoutError("no reply from the writer in time")

    def _receive(self, timeout: float | None) -> list[Any]:
        """The frames complete after one receive (none if ``timeout`` passed first). The socket
        itself stays blocking: another thread may be sending on it meanwhile."""
        if timeout is not None and not self._poller.poll(timeout * 1000):
            return []
        chunk = self.sock.recv(RECEIVE_BYTES)
        if not chunk:
            raise ConnectionResetError("end of stream")
        self._buffer += chunk
        frames = []
        while len(self._buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buffer)
            if len(self._buffer) < HEADER.size + length:
                break
            with memoryview(self._buffer) as view:
                frames.append(pickle.loads(view[HEADER.size : HEADER.size + length]))
            del self._buffer[: HEADER.size + length]
        return frames


class ServerConnection(asyncio.Protocol):
    """The writer's end of one caller's connection.

    A protocol rather than a stream reader: each frame is handled in the callback that received
    it, with no task switch.
    """

    open_connections: set[ServerConnection] = set()  # of this process

    def __init__(self, handle: Handler) -> None:
        self._handle = handle
        self._transport: Any = None  # an asyncio transport (or uvloop's, which Ray uses)
        self._buffer = bytearray()
        self._tasks: set[asyncio.Task] = set()

    def connection_made(self, transport: Any) -> None:
        sock = transport.get_extra_info("socket")
        if sock is None or peer_uid(sock) != os.getuid():
            transport.close()
            return
        self._transport = transport
        ServerConnection.open_connections.add(self)

    def receiving(self) -> bool:
        """Whether part of a frame arrived and the rest has not been read yet."""
        return bool(self._buffer)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buffer)
            if len(self._buffer) < HEADER.size + length:
                return
            with memoryview(self._buffer) as view:
                message = pickle.loads(view[HEADER.size : HEADER.size + length])
            del self._buffer[: HEADER.size + length]
            pending = self._handle(message, self)
            if pending is not None:  # a long wait runs as its own task: later frames go on
                task = asyncio.ensure_future(pending)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        ServerConnection.open_connections.discard(self)

    def send(self, message: Any) -> None:
        """Queue a frame (replies and notices are small; the transport buffers them)."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(encode(message))


Handler = Callable[[Any, ServerConnection], Awaitable[None] | None]


async def serve(address: str, handle: Handler) -> asyncio.AbstractServer:
    """Serve the channel at ``address`` on the running event loop.

    ``handle(message, connection)`` runs for each frame in arrival order; a coroutine it returns
    runs as its own task, so a long wait never holds up the connection's next frames.
    """
    loop = asyncio.get_running_loop()
    return await loop.create_unix_server(lambda: ServerConnection(handle), path=address)
