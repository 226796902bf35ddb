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
import contextlib
import itertools
import logging
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

log = logging.getLogger("fedckpt")

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

    def __init__(
        self,
        address: str,
        on_done: Callable[[list[SaveDone]], None],
        timeout: float = 10.0,
        epoch: int | None = None,
    ) -> None:
        self.address = address
        self.epoch = epoch  # the incarnation of the writer at the other end
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
        self.read_until(lambda: call_id in self._replies, deadline)
        with self._state:
            return self._replies.pop(call_id)

    def call(self, make_message: Callable[[int], Any], timeout: float | None = None) -> Any:
        return self.reply(self.send(make_message), timeout)

    def pump(self) -> None:
        """Take in what arrived, without waiting. Returns at once if another thread is reading
        (it hands on what arrives); ``ChannelClosed`` if the writer went away."""
        with self._state:
            if self.closed:
                raise ChannelClosed("the writer went away")
            if self._reading:
                return
            self._reading = True
        try:
            while self._take_in(0.0):
                pass
        finally:
            self._done_reading()

    def read_until(self, done: Callable[[], bool], deadline: float | None = None) -> None:
        """Read frames, handing notices on, until ``done()`` holds (checked after each frame, and
        whenever another thread that was reading hands over). ``TimeoutError`` once ``deadline``
        (``time.monotonic``) passed; ``ChannelClosed`` if the writer went away."""
        while True:
            with self._state:
                while True:
                    if done():
                        return
                    if self.closed:
                        raise ChannelClosed("the writer went away")
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError("no answer from the writer in time")
                    if not self._reading:
                        break
                    self._state.wait(left)
                self._reading = True
            try:
                self._take_in(left)
            finally:
                self._done_reading()

    def _take_in(self, timeout: float | None) -> bool:
        """One receive (waiting up to ``timeout``): replies kept, notices handed on. Whether anything came."""
        try:
            frames = self._receive(timeout)
        except OSError as error:
            with self._state:
                self._close()
            raise ChannelClosed(f"the writer went away: {error}") from error
        if not frames:
            return False
        notices = [frame for frame in frames if isinstance(frame, SaveDone)]
        with self._state:
            self._replies.update((f.call_id, f.value) for f in frames if isinstance(f, Reply))
        if notices:
            self._on_done(notices)
        return True

    def _done_reading(self) -> None:
        with self._state:
            self._reading = False
            self._state.notify_all()

    def close(self) -> None:
        with self._state:
            self._close()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()

    def _receive(self, timeout: float | None) -> list[Any]:
        """The frames complete after one receive (none if ``timeout`` passed first). The socket
        itself stays blocking: another thread may be sending on it meanwhile."""
        if timeout is not None and not self._poller.poll(timeout * 1000):
            return []
        chunk = self.sock.recv(RECEIVE_BYTES)  # at least one byte is there (or the end of the stream)
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


class ServerConnection:
    """The writer's end of one caller's connection: a non-blocking socket read by the event loop
    as frames arrive, and on demand (:meth:`ChannelServer.drain`)."""

    def __init__(self, sock: socket.socket, server: ChannelServer) -> None:
        self.sock = sock
        self._server = server
        self._buffer = bytearray()
        self._outgoing = bytearray()
        self._reading = False
        self.closed = False

    def read_available(self) -> None:
        """Read and handle every frame the socket holds now (never blocks)."""
        if self._reading or self.closed:  # a handler drained the channels while this one reads
            return
        self._reading = True
        try:
            while True:
                try:
                    chunk = self.sock.recv(RECEIVE_BYTES)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    chunk = b""
                if not chunk:
                    self.close()
                    return
                self._buffer += chunk
                self._handle_frames()
        finally:
            self._reading = False

    def _handle_frames(self) -> None:
        while len(self._buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buffer)
            if len(self._buffer) < HEADER.size + length:
                return
            with memoryview(self._buffer) as view:
                message = pickle.loads(view[HEADER.size : HEADER.size + length])
            del self._buffer[: HEADER.size + length]
            self._server.dispatch(message, self)

    def send(self, message: Any) -> None:
        """Send a frame now, or as soon as the socket takes it (a caller that does not read
        notices for a while fills its socket: they wait here)."""
        if self.closed:
            return
        self._outgoing += encode(message)
        self._flush_outgoing()

    def _flush_outgoing(self) -> None:
        loop = self._server.loop
        try:
            while self._outgoing:
                sent = self.sock.send(self._outgoing)
                del self._outgoing[:sent]
        except (BlockingIOError, InterruptedError):
            loop.add_writer(self.sock.fileno(), self._flush_outgoing)
            return
        except OSError:
            self.close()
            return
        with contextlib.suppress(Exception):
            loop.remove_writer(self.sock.fileno())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        loop = self._server.loop
        with contextlib.suppress(Exception):
            loop.remove_reader(self.sock.fileno())
            loop.remove_writer(self.sock.fileno())
        self.sock.close()
        self._server.connections.discard(self)


Handler = Callable[[Any, ServerConnection], Awaitable[None] | None]


class ChannelServer:
    """The writer's side of the channel: accepts callers of its own user on the running event loop.

    ``handle(message, connection)`` runs for each frame in arrival order; a coroutine it returns runs
    as its own task, so a long wait never holds up the connection's next frames. :meth:`drain` reads
    what every connection holds at once: a save whose call returned in any process of the node was
    written into its socket before, so a flush that drains first sees it (no event-loop turns to count).
    """

    def __init__(self, address: str, handle: Handler) -> None:
        self.address = address
        self._handle = handle
        self.connections: set[ServerConnection] = set()
        self._tasks: set[asyncio.Task] = set()
        self.loop = asyncio.get_running_loop()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(address)
            self._sock.listen(1024)
            self._sock.setblocking(False)
        except OSError:
            self._sock.close()
            raise
        self.loop.add_reader(self._sock.fileno(), self._accept)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                log.warning("fedckpt: the channel at %r cannot accept: %s", self.address, error)
                return
            try:
                if peer_uid(sock) != os.getuid():
                    sock.close()
                    continue
            except OSError:
                sock.close()
                continue
            sock.setblocking(False)
            connection = ServerConnection(sock, self)
            self.connections.add(connection)
            self.loop.add_reader(sock.fileno(), connection.read_available)
            connection.read_available()

    def dispatch(self, message: Any, connection: ServerConnection) -> None:
        pending = self._handle(message, connection)
        if pending is not None:
            task = asyncio.ensure_future(pending)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def drain(self) -> None:
        """Handle every frame that reached any connection so far."""
        for connection in list(self.connections):
            connection.read_available()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self._sock.fileno())
        self._sock.close()
        for connection in list(self.connections):
            connection.close()
