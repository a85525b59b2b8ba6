"""Framed message I/O over a trio byte stream."""

from __future__ import annotations

import os
from typing import Any

import trio

from dfs.net.frames import (
    MAX_FRAME,
    FrameBuffer,
    Message,
    MessageType,
    ProtocolError,
    decode,
    encode,
)

RECEIVE_CHUNK = 256 * 1024


class MessageStream:
    """Send and receive validated messages on one connection.

    Sends are serialised by a lock so concurrent tasks can share a connection
    (pipelined requests); there is one receiving task per connection. On a
    socket, a frame is written straight away when no other send is under way
    (a non-blocking write: no scheduling round), so ``send`` may return without
    a checkpoint; what the socket does not take is sent under the lock.
    """

    def __init__(self, stream: trio.abc.Stream, max_frame: int = MAX_FRAME) -> None:
        self.stream = stream
        self.max_frame = max_frame
        self._rx = FrameBuffer(max_frame)
        self._ready: list[bytes] = []
        self._send_lock = trio.Lock()

    async def send(self, mtype: MessageType, request_id: int, body: dict[str, Any]) -> None:
        data = encode(mtype, request_id, body)
        if isinstance(self.stream, trio.SocketStream) and not self._send_lock.locked():
            fd = self.stream.socket.fileno()  # -1 once closed: never a stale number
            if fd < 0:
                raise trio.ClosedResourceError("the connection is closed")
            try:
                n = os.write(fd, data)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                raise trio.BrokenResourceError(f"send failed: {exc}") from exc
            if n == len(data):
                return
            # Taken before any checkpoint, so that no other frame gets between the parts.
            self._send_lock.acquire_nowait()
            try:
                await self.stream.send_all(memoryview(data)[n:])
            finally:
                self._send_lock.release()
            return
        async with self._send_lock:
            await self.stream.send_all(data)

    async def receive(self) -> Message:
        """The next message; ProtocolError on bad input, EOFError when the peer closed."""
        while not self._ready:
            chunk = await self.stream.receive_some(RECEIVE_CHUNK)
            if not chunk:
                if self._rx.pending:
                    raise ProtocolError("connection closed in the middle of a frame")
                raise EOFError("peer closed the connection")
            self._rx.feed(chunk)
            self._ready.extend(self._rx.frames())
        return decode(self._ready.pop(0), self.max_frame)

    async def aclose(self) -> None:
        await self.stream.aclose()
