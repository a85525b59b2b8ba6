"""The calling side of RPC: one lazily opened, authenticated, pipelined connection per peer.

``Peer.call`` opens the connection on first use (under the connect deadline),
authenticates it (the server must prove it is the node we meant), then
reuses it: every call gets a fresh request id, its frame is written at once
(below) and it waits on a one-shot slot that a receiver task fills when the
RESPONSE or ERROR with that id arrives. Each call has a deadline
(``Timeouts.call`` by default); a call whose deadline passes is abandoned and
its late answer is dropped when it comes (and if frames are still waiting to
be sent then, the peer is not reading: the connection is dropped). When the
connection is lost, every call waiting on it fails at once with
``PeerUnavailable`` and the next call reconnects. Connect failures back off
(0.1 s doubling to 2 s, each delay less up to half of it at random, so nodes
do not retry a lost peer in step: dfs/backoff.py): while backing off a call
fails immediately, so a dead peer costs one quick failure per call, never a
hang.

Sending: a frame is written to the socket straight from the calling task
(a non-blocking write, no task switch) when nothing is queued before it;
what the socket does not take is queued, in order, for the connection's
writer task. So frames never interleave, and a call costs no scheduling
round of its own before it reaches the network (on byte streams that are not
sockets, e.g. in tests, every frame goes through the writer task).

``Peer.post`` sends a request without waiting for it: a synchronous call,
for callers that pipeline many requests (replication, posted writes); its
answer, or the loss of the connection, is handed to a callback from the
receiver task, and the caller keeps its own deadlines (a partition can hold a
connection's frames without breaking it, so an answer may never come):
``abandon`` (or ``Pending.abandon``) gives a request up.

A peer that answers an id we never asked for, sends a message type other
than RESPONSE/ERROR, or anything malformed is disconnected with a warning.

The receiver tasks run in a nursery the owner passes in (the daemon's root
nursery, or a test's); ``aclose`` ends them. All times come from trio's
clock, so tests can run on ``trio.testing.MockClock``.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from dfs.backoff import DEFAULT_JITTER, Backoff
from dfs.config import ClusterConfig, Timeouts
from dfs.errors import BUG_MARKER
from dfs.net.frames import (
    MAX_FRAME,
    Message,
    MessageType,
    Packed,
    ProtocolError,
    encode,
    encode_request,
)
from dfs.net.handshake import AuthError, client_handshake
from dfs.net.rpc import (
    MAX_METHOD_NAME,
    PeerAuthError,
    PeerTimeout,
    PeerUnavailable,
    RemoteError,
    wire_errno,
)
from dfs.net.stream import MessageStream

log = logging.getLogger("dfs.net.peer")

BACKOFF_MIN = 0.1
BACKOFF_MAX = 2.0
BACKOFF_JITTER = DEFAULT_JITTER  # peers that lost one node together do not retry in step
MAX_ABANDONED = 100_000  # late answers we are prepared to drop on one connection
MAX_BACKLOG = 4 * MAX_FRAME  # bytes queued for a peer that does not read: then drop it

Connector = Callable[[], Awaitable[trio.abc.Stream]]
"""Opens a byte stream to the peer (default: TCP to its address and port)."""

_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@dataclass(frozen=True, slots=True)
class PeerStatistics:
    connected: bool
    calls_in_flight: int
    connects: int  # successful connects (with handshake)
    connect_failures: int
    connections_lost: int
    retry_in: float  # seconds until the next connect attempt is allowed; 0 if now


class Pending:
    """Where the answer to one request lands (``Peer.post`` returns it)."""

    __slots__ = ("done", "message", "failure", "rid", "peer", "on_done", "_conn", "_give_up")

    def __init__(
        self,
        peer: str = "",
        rid: int = 0,
        on_done: Callable[[Pending], None] | None = None,
        *,
        give_up: Callable[[Pending], None] | None = None,
    ) -> None:
        """``give_up``: what ``abandon`` tells the sender (``Peer.abandon``)."""
        self.done = trio.Event()
        self.message: Message | None = None
        self.failure: str | None = None
        self.peer = peer
        self.rid = rid
        self.on_done = on_done
        self._conn: _Connection | None = None
        self._give_up = give_up

    def answer(self, msg: Message) -> None:
        self.message = msg
        self.done.set()
        if self.on_done is not None:
            self.on_done(self)

    def fail(self, reason: str) -> None:
        self.failure = reason
        self.done.set()
        if self.on_done is not None:
            self.on_done(self)

    def abandon(self) -> None:
        """Give this request up: ``on_done`` is not called for it any more, and its late
        answer is dropped (``Peer.abandon``)."""
        self.on_done = None
        if self._give_up is not None:
            self._give_up(self)

    def result(self) -> Any:
        """The answer's result; ``RemoteError`` or ``PeerUnavailable`` as ``Peer.call`` raises
        them (only once ``done``)."""
        msg = self.message
        if msg is not None:
            if msg.type is MessageType.RESPONSE:
                return msg.body["r"]
            raise RemoteError(wire_errno(msg.body.get("errno")), msg.body["reason"], self.peer)
        raise PeerUnavailable(f"node {self.peer}: {self.failure or 'no answer'}")


@dataclass(eq=False)
class _Connection:
    ms: MessageStream
    # The socket, for writes straight from the calling task; None for byte streams that
    # are not sockets. Its descriptor is looked up at each write (-1 once closed).
    sock: trio.socket.SocketType | None = None
    backlog: deque[bytes | memoryview] = field(default_factory=deque)  # for the writer task
    backlog_bytes: int = 0
    wake_writer: trio.Event = field(default_factory=trio.Event)
    pending: dict[int, Pending] = field(default_factory=dict)
    abandoned: set[int] = field(default_factory=set)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    writer_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    finished: trio.Event = field(default_factory=trio.Event)
    writer_done: trio.Event = field(default_factory=trio.Event)
    lost: str | None = None  # why it ended; None while usable


def _socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    return stream.socket if isinstance(stream, trio.SocketStream) else None


class Peer:
    """Calls methods on the node ``name``; holds at most one connection to it."""

    def __init__(
        self,
        name: str,
        address: str,
        port: int,
        *,
        secret: bytes,
        cluster_id: str,
        my_name: str,
        timeouts: Timeouts,
        nursery: trio.Nursery,
        connector: Connector | None = None,
        max_frame: int = MAX_FRAME,
        backoff_min: float = BACKOFF_MIN,
        backoff_max: float = BACKOFF_MAX,
        backoff_jitter: float = BACKOFF_JITTER,
    ) -> None:
        self.name = name
        self.address = address
        self.port = port
        self._secret = secret
        self.cluster_id = cluster_id
        self.my_name = my_name
        self.timeouts = timeouts
        self._nursery = nursery
        self._connector: Connector = connector or partial(trio.open_tcp_stream, address, port)
        self.max_frame = max_frame
        self._backoff = Backoff(backoff_min, backoff_max, backoff_jitter)
        self._conn: _Connection | None = None
        self._receivers: set[_Connection] = set()  # connections whose receiver still runs
        self._writers: set[_Connection] = set()  # connections whose writer still runs
        self._connect_lock = trio.Lock()
        self._next_id = 1  # 0 is the handshake's
        self._closed = False
        self._retry_at = float("-inf")
        self._last_failure = ""
        # While backing off, calls fail with the kind of the last failure, so that a
        # peer refusing our secret stays a PeerAuthError and is not just "unreachable".
        self._last_failure_kind: type[PeerUnavailable] = PeerUnavailable
        self._calls_in_flight = 0
        self._connects = 0
        self._connect_failures = 0
        self._connections_lost = 0

    def __repr__(self) -> str:
        return f"<Peer {self.name} {self.address}:{self.port}>"

    def statistics(self) -> PeerStatistics:
        return PeerStatistics(
            connected=self._conn is not None,
            calls_in_flight=self._calls_in_flight,
            connects=self._connects,
            connect_failures=self._connect_failures,
            connections_lost=self._connections_lost,
            retry_in=max(0.0, self._retry_at - trio.current_time()),
        )

    async def call(
        self,
        method: str,
        args: Mapping[str, Any],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - a deadline with its own meaning, below
    ) -> Any:
        """Call ``method`` on the peer and return its result.

        ``timeout`` (default ``Timeouts.call``) is not a plain cancel scope: when
        it expires the call is abandoned on its connection (its late answer is
        dropped, not treated as a protocol error) and ``PeerTimeout`` (ETIMEDOUT)
        is raised. An outer cancel scope works as usual.

        Raises ``PeerUnavailable`` (incl. ``PeerAuthError``), ``PeerTimeout``
        or ``RemoteError``; ``ValueError``/``TypeError`` for a method name or
        arguments that cannot be sent at all.
        """
        if not method or len(method) > MAX_METHOD_NAME:
            raise ValueError(f"method name {method!r}: 1..{MAX_METHOD_NAME} characters")
        rid = self._next_id
        self._next_id += 1
        data = encode(MessageType.REQUEST, rid, {"m": method, "a": dict(args)})
        limit = self.timeouts.call if timeout is None else timeout
        slot = Pending(self.name, rid)
        self._calls_in_flight += 1
        try:
            with trio.move_on_after(limit) as deadline:
                conn = await self._connection()
                # No checkpoint since _connection() returned it usable, so it still is.
                conn.pending[rid] = slot
                try:
                    self._send(conn, data)
                    await slot.done.wait()
                finally:
                    if conn.pending.pop(rid, None) is not None:
                        self._abandon(conn, rid)
                        if conn.backlog:
                            # Gave up while frames still wait to be sent: the peer is not
                            # reading, and a frame may be half written. Start afresh.
                            self._drop(conn, "a call timed out with frames not sent")
        finally:
            self._calls_in_flight -= 1
        if slot.message is None and deadline.cancelled_caught:
            raise PeerTimeout(f"node {self.name}: {method} got no answer within {limit:g}s")
        return slot.result()

    def post(
        self,
        method: str,
        args: Mapping[str, Any] | Packed,
        on_done: Callable[[Pending], None],
    ) -> Pending:
        """Send a request now and return without waiting for its answer.

        ``on_done(pending)`` is called once, from the receiver task, when the answer
        arrives or the connection is lost (``pending.result()`` then returns the result
        or raises like ``call``); it must not raise. There is no deadline here, and while a
        partition holds the connection's frames no answer comes: every caller keeps a
        deadline of its own and gives the request up with ``abandon`` (``Replicator``,
        ``WriteBehind``). Raises ``PeerUnavailable`` at once, without
        calling ``on_done``, when there is no connection (``call`` opens one).
        """
        conn = self._conn
        if conn is None or self._closed:
            raise PeerUnavailable(f"node {self.name}: not connected")
        if not method or len(method) > MAX_METHOD_NAME:
            raise ValueError(f"method name {method!r}: 1..{MAX_METHOD_NAME} characters")
        rid = self._next_id
        self._next_id += 1
        if isinstance(args, Packed):
            data = encode_request(rid, method, args)
        else:
            data = encode(MessageType.REQUEST, rid, {"m": method, "a": dict(args)})
        pending = Pending(self.name, rid, on_done, give_up=self.abandon)
        pending._conn = conn
        conn.pending[rid] = pending
        self._send(conn, data)  # a failure fails ``pending`` (and calls on_done) at once
        return pending

    def abandon(self, pending: Pending) -> None:
        """Give up on a posted request: ``on_done`` is not called for it any more."""
        pending.on_done = None
        conn = pending._conn
        if conn is not None and conn.pending.pop(pending.rid, None) is not None:
            self._abandon(conn, pending.rid)

    def _abandon(self, conn: _Connection, rid: int) -> None:
        """The caller of ``rid`` gave up; its answer may still come and is then dropped."""
        if len(conn.abandoned) >= MAX_ABANDONED:
            self._drop(conn, "too many calls without an answer")
        else:
            conn.abandoned.add(rid)

    def _send(self, conn: _Connection, data: bytes) -> None:
        """Write a frame now if nothing is queued before it; queue the rest for the writer."""
        if conn.lost is not None:
            return  # _drop failed every request waiting on it
        out: bytes | memoryview = data
        fd = conn.sock.fileno() if conn.sock is not None else -1
        if not conn.backlog and fd >= 0:
            try:
                n = os.write(fd, data)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self._drop(conn, f"send failed: {exc}")
                return
            if n == len(data):
                return
            out = memoryview(data)[n:]
        if conn.backlog_bytes + len(out) > MAX_BACKLOG:
            self._drop(conn, "the peer does not read what is sent to it")
            return
        conn.backlog.append(out)
        conn.backlog_bytes += len(out)
        conn.wake_writer.set()

    async def _write(self, conn: _Connection) -> None:
        """The connection's writer task: sends what ``_send`` queued, in order."""
        try:
            with conn.writer_scope:
                try:
                    while True:
                        await conn.wake_writer.wait()
                        conn.wake_writer = trio.Event()
                        while conn.backlog:
                            # Taken off only once sent, so that later frames queue behind it.
                            await conn.ms.stream.send_all(conn.backlog[0])
                            conn.backlog_bytes -= len(conn.backlog.popleft())
                except _GONE as exc:
                    self._drop(conn, f"send failed: {exc}")
                except Exception:
                    log.exception("%s sending to node %s", BUG_MARKER, self.name)
                    self._drop(conn, "internal error")
        finally:
            # Cancelled in the middle of a frame or not: the stream is not used any more.
            self._drop(conn, conn.lost or "closed")
            conn.backlog.clear()
            conn.backlog_bytes = 0
            self._writers.discard(conn)
            conn.writer_done.set()

    async def _connection(self) -> _Connection:
        if self._conn is not None:
            return self._conn
        async with self._connect_lock:
            if self._closed:
                raise PeerUnavailable(f"node {self.name}: closed")
            if self._conn is not None:
                return self._conn
            wait = self._retry_at - trio.current_time()
            if wait > 0:
                raise self._last_failure_kind(
                    f"node {self.name}: unreachable ({self._last_failure}); "
                    f"next attempt in {wait:.1f}s"
                )
            self._conn = await self._connect()
            return self._conn

    async def _connect(self) -> _Connection:
        try:
            with trio.fail_after(self.timeouts.connect):
                stream = await self._connector()
                try:
                    ms = MessageStream(stream, self.max_frame)
                    await client_handshake(
                        ms,
                        secret=self._secret,
                        cluster=self.cluster_id,
                        node=self.my_name,
                        expect_peer=self.name,
                    )
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
        except AuthError as exc:
            raise self._connect_failed(f"authentication failed: {exc}", PeerAuthError) from exc
        except trio.TooSlowError:
            raise self._connect_failed(
                f"no connection within {self.timeouts.connect:g}s", PeerUnavailable
            ) from None
        except (ProtocolError, EOFError, *_GONE) as exc:
            raise self._connect_failed(str(exc) or type(exc).__name__, PeerUnavailable) from exc
        if self._closed:
            await trio.aclose_forcefully(stream)
            raise PeerUnavailable(f"node {self.name}: closed")
        conn = _Connection(ms, _socket_of(stream))
        try:
            self._nursery.start_soon(self._receive, conn)
        except RuntimeError:  # the owner's nursery is closing
            await trio.aclose_forcefully(stream)
            raise PeerUnavailable(f"node {self.name}: closed") from None
        self._receivers.add(conn)
        try:
            self._nursery.start_soon(self._write, conn)
        except RuntimeError:  # closing: the receiver, cancelled with it, closes the stream
            self._drop(conn, "closed")
            raise PeerUnavailable(f"node {self.name}: closed") from None
        self._writers.add(conn)
        if self._backoff.failures:
            log.info("rpc: node %s reachable again", self.name)
        self._backoff.reset()
        self._retry_at = float("-inf")
        self._connects += 1
        return conn

    def _connect_failed(self, reason: str, kind: type[PeerUnavailable]) -> PeerUnavailable:
        self._connect_failures += 1
        self._retry_at = trio.current_time() + self._backoff.failed()
        self._last_failure = reason
        self._last_failure_kind = kind
        level = logging.WARNING if self._backoff.failures == 1 else logging.DEBUG
        log.log(level, "rpc: cannot connect to node %s at %s:%s: %s", *self._where(), reason)
        return kind(f"node {self.name}: {reason}")

    def _where(self) -> tuple[str, str, int]:
        return self.name, self.address, self.port

    async def _receive(self, conn: _Connection) -> None:
        """Route answers to their callers until the connection ends; never raises."""
        reason = "connection closed"
        try:
            with conn.scope:
                try:
                    while True:
                        self._route(conn, await conn.ms.receive())
                except ProtocolError as exc:
                    reason = f"protocol error: {exc}"
                    log.warning("rpc: node %s at %s:%s: %s; closing", *self._where(), reason)
                except EOFError:
                    reason = "connection closed by the peer"
                except _GONE as exc:
                    reason = f"connection lost: {exc}"
                except Exception:
                    reason = "internal error"
                    log.exception("%s receiving from node %s", BUG_MARKER, self.name)
        finally:
            self._drop(conn, reason)
            await trio.aclose_forcefully(conn.ms.stream)
            self._receivers.discard(conn)
            conn.finished.set()

    def _route(self, conn: _Connection, msg: Message) -> None:
        if msg.type not in (MessageType.RESPONSE, MessageType.ERROR):
            raise ProtocolError(f"unexpected {msg.type.name} message")
        slot = conn.pending.pop(msg.request_id, None)
        if slot is not None:
            slot.answer(msg)
        elif msg.request_id in conn.abandoned:
            conn.abandoned.discard(msg.request_id)  # the caller gave up; drop the late answer
        else:
            raise ProtocolError(f"answer to request {msg.request_id}, which is not pending")

    def _drop(self, conn: _Connection, reason: str) -> None:
        """Mark ``conn`` unusable, fail its waiting calls and stop its receiver."""
        if conn.lost is not None:
            return
        conn.lost = reason
        if self._conn is conn:
            self._conn = None
        if not self._closed:
            self._connections_lost += 1
            if conn.pending:
                log.warning(
                    "rpc: node %s: %s; failing %d call(s)", self.name, reason, len(conn.pending)
                )
            else:
                log.info("rpc: node %s: %s", self.name, reason)
        pending = list(conn.pending.values())
        conn.pending.clear()
        conn.abandoned.clear()
        conn.scope.cancel()
        conn.writer_scope.cancel()
        for slot in pending:
            slot.fail(reason)

    async def aclose(self) -> None:
        """Close the connection; waiting and later calls fail with ``PeerUnavailable``."""
        self.close_nowait()
        for conn in list(self._receivers):
            await conn.finished.wait()
        for conn in list(self._writers):
            await conn.writer_done.wait()

    def close_nowait(self) -> None:
        """The synchronous part of ``aclose``: fail calls, stop the receiver."""
        self._closed = True
        if self._conn is not None:
            self._drop(self._conn, "closed")


class PeerPool:
    """A ``Peer`` for every other node of a cluster configuration, keyed by node name."""

    def __init__(
        self,
        config: ClusterConfig,
        *,
        my_name: str,
        secret: bytes,
        nursery: trio.Nursery,
        connectors: Mapping[str, Connector] | None = None,
    ) -> None:
        config.node(my_name)  # ConfigError if we are not in it
        connectors = connectors or {}
        self.my_name = my_name
        self._peers = {
            n.name: Peer(
                n.name,
                n.address,
                n.port,
                secret=secret,
                cluster_id=config.id,
                my_name=my_name,
                timeouts=config.timeouts,
                nursery=nursery,
                connector=connectors.get(n.name),
            )
            for n in config.nodes
            if n.name != my_name
        }

    def peer(self, name: str) -> Peer:
        try:
            return self._peers[name]
        except KeyError:
            if name == self.my_name:
                raise KeyError(f"{name!r} is this node; call it locally") from None
            raise KeyError(f"no node named {name!r}") from None

    __getitem__ = peer

    def __iter__(self) -> Iterator[str]:
        return iter(self._peers)

    def __len__(self) -> int:
        return len(self._peers)

    async def call(
        self,
        node: str,
        method: str,
        args: Mapping[str, Any],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - as Peer.call
    ) -> Any:
        return await self.peer(node).call(method, args, timeout=timeout)

    async def aclose(self) -> None:
        for p in self._peers.values():
            p.close_nowait()
        for p in self._peers.values():
            await p.aclose()
