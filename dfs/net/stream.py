"""Framed message I/O over a trio byte stream."""

from __future__ import annotations

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
    (pipelined requests); there is one receiving task per connection.
    """

    def __init__(self, stream: trio.abc.Stream, max_frame: int = MAX_FRAME) -> None:
        self.stream = stream
        self.max_frame = max_frame
        self._rx = FrameBuffer(max_frame)
        self._ready: list[bytes] = []
        self._send_lock = trio.Lock()

    async def send(self, mtype: MessageType, request_id: int, body: dict[str, Any]) -> None:
        data = encode(mtype, request_id, body)
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
