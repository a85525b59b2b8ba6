"""The RPC server: accept connections, authenticate them, serve pipelined requests.

Per connection: the handshake under a deadline, then one task reads frames
and starts a task per REQUEST (at most ``max_concurrent_per_conn`` at a
time; past that the reader stops reading, so a peer cannot queue unbounded
work) — except for methods registered ``in_order``, which the reader carries
out itself before it reads on; answers are written under the
``MessageStream`` send lock in whatever order they finish. Anything
malformed (a frame that does not decode or validate, an oversize frame, a
message type other than REQUEST, a request id already in flight), a failed
handshake or the peer going away closes that connection only, with a
warning naming the address and the reason.

A request that has been read is carried out even if its connection goes
away meanwhile (its answer is dropped): the caller saw ``PeerUnavailable``
or ``PeerTimeout``, which both mean "outcome unknown". Only stopping the
server (cancelling ``run``) cancels handlers.

Besides the cluster's nodes, a server may admit *guests*: clients that prove
the same secret under a name that is not a node's (``guests``: name -> the
methods it may call, a registry of its own). The admin tools use this
(``dfs status --config``, as ``dfs.cluster.survey.ADMIN``): they may read a
node's status and call nothing else.
"""

from __future__ import annotations

import errno
import logging
import math
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from dfs.config import ClusterConfig
from dfs.errors import BUG_MARKER
from dfs.net.frames import MAX_FRAME, Message, MessageType, ProtocolError
from dfs.net.handshake import AuthError, Session, server_handshake
from dfs.net.rpc import Methods, dispatch, error_body
from dfs.net.stream import MessageStream

log = logging.getLogger("dfs.net.server")

_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)


@dataclass(frozen=True, slots=True)
class ServerStatistics:
    connections: int  # open now, including ones in the handshake; closed ones don't count
    # even while requests read from them are still being carried out
    connections_accepted: int
    requests_in_flight: int
    requests_served: int  # answers (RESPONSE or ERROR) written to their connection
    protocol_errors: int
    auth_failures: int
    handshake_timeouts: int
    handler_errors: int  # unexpected exceptions in handlers, answered EIO


@dataclass(slots=True)
class _Counters:
    connections: int = 0
    connections_accepted: int = 0
    requests_in_flight: int = 0
    requests_served: int = 0
    protocol_errors: int = 0
    auth_failures: int = 0
    handshake_timeouts: int = 0
    handler_errors: int = 0


class _Conn:
    """Closes a connection's stream once and keeps the open-connections count right."""

    def __init__(self, stream: trio.abc.Stream, counters: _Counters) -> None:
        self.stream = stream
        self._counters = counters
        self._open = True

    async def close(self) -> None:
        if self._open:
            self._open = False
            self._counters.connections -= 1
        await trio.aclose_forcefully(self.stream)


def describe(stream: trio.abc.Stream) -> str:
    """The remote address of a socket stream, for log lines."""
    sock = getattr(stream, "socket", None)
    if sock is None:
        return type(stream).__name__
    try:
        addr = sock.getpeername()
    except OSError:
        return "unknown address"
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return str(addr)


class _RateLimitedLog:
    """Warn about a misbehaving address at most once per ``interval`` seconds per kind.

    A node with a wrong secret retries every heartbeat; its peers should say so,
    not fill their logs. Suppressed repeats are counted in the next warning.
    """

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def warn(self, where: str, fmt: str, *args: object) -> None:
        key = (where.rsplit(":", 1)[0], fmt)
        now = trio.current_time()
        last, suppressed = self._last.get(key, (-self.interval, 0))
        if now - last < self.interval:
            self._last[key] = (last, suppressed + 1)
            return
        more = f" ({suppressed} more since the last warning)" if suppressed else ""
        log.warning("rpc: %s: " + fmt + more, where, *args)
        self._last[key] = (now, 0)


class _Either:
    """The names the handshake accepts: the cluster's nodes and the guests."""

    def __init__(self, nodes: Container[str], guests: Container[str]) -> None:
        self.nodes = nodes
        self.guests = guests

    def __contains__(self, name: object) -> bool:
        return name in self.nodes or name in self.guests


class RpcServer:
    """Serves ``methods`` to authenticated nodes of one cluster (and ``guests`` their own)."""

    def __init__(
        self,
        *,
        cluster_id: str,
        node_name: str,
        secret: bytes,
        known: Container[str],
        methods: Methods,
        guests: Mapping[str, Methods] | None = None,
        handshake_timeout: float = 5.0,
        max_concurrent_per_conn: int = 64,
        max_frame: int = MAX_FRAME,
    ) -> None:
        if max_concurrent_per_conn < 1:
            raise ValueError("max_concurrent_per_conn must be at least 1")
        self.cluster_id = cluster_id
        self.node_name = node_name
        self._secret = secret
        self.methods = methods
        self.guests = dict(guests or {})
        clash = [g for g in self.guests if g in known]
        if clash:
            raise ValueError(f"guest names {clash} are node names")
        self.known: Container[str] = _Either(known, self.guests)
        self.handshake_timeout = handshake_timeout
        self.max_concurrent_per_conn = max_concurrent_per_conn
        self.max_frame = max_frame
        self._c = _Counters()
        self._noisy = _RateLimitedLog()

    @classmethod
    def from_config(
        cls, config: ClusterConfig, node_name: str, secret: bytes, methods: Methods, **kw: Any
    ) -> RpcServer:
        """A server for ``node_name`` of ``config``; the connect timeout bounds handshakes."""
        config.node(node_name)  # ConfigError if unknown
        kw.setdefault("handshake_timeout", config.timeouts.connect)
        return cls(
            cluster_id=config.id,
            node_name=node_name,
            secret=secret,
            known=frozenset(n.name for n in config.nodes),
            methods=methods,
            **kw,
        )

    def statistics(self) -> ServerStatistics:
        c = self._c
        return ServerStatistics(
            connections=c.connections,
            connections_accepted=c.connections_accepted,
            requests_in_flight=c.requests_in_flight,
            requests_served=c.requests_served,
            protocol_errors=c.protocol_errors,
            auth_failures=c.auth_failures,
            handshake_timeouts=c.handshake_timeouts,
            handler_errors=c.handler_errors,
        )

    async def run(
        self,
        listen: tuple[str, int] | Sequence[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; ``task_status.started`` gets the bound port.

        ``listen`` is ``(host, port)`` (port 0 picks a free one) or listeners
        the caller opened. Cancelling this cancels every connection and handler.
        """
        if isinstance(listen, tuple):
            host, port = listen
            listeners = await trio.open_tcp_listeners(port, host=host)
        else:
            listeners = list(listen)
        if not listeners:
            raise ValueError("no listeners")
        bound: int = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            serve = partial(trio.serve_listeners, handler_nursery=nursery)
            await nursery.start(serve, self.handle_stream, listeners)
            log.info("rpc: node %s serving on port %d", self.node_name, bound)
            task_status.started(bound)

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one connection until it ends; closes ``stream``; never raises but Cancelled.

        Public so that in-process tests can serve memory streams.
        """
        where = describe(stream)
        self._c.connections_accepted += 1
        self._c.connections += 1
        conn = _Conn(stream, self._c)
        ms = MessageStream(stream, self.max_frame)
        try:
            session = await self._handshake(ms, where)
            if session is not None:
                await self._serve(ms, conn, session, where)
        except Exception:
            log.exception("%s in the rpc connection from %s", BUG_MARKER, where)
        finally:
            await conn.close()

    async def _handshake(self, ms: MessageStream, where: str) -> Session | None:
        with trio.move_on_after(self.handshake_timeout):
            try:
                return await server_handshake(
                    ms,
                    secret=self._secret,
                    cluster=self.cluster_id,
                    node=self.node_name,
                    known=self.known,
                )
            except AuthError as exc:
                self._c.auth_failures += 1
                self._noisy.warn(where, "authentication failed: %s", exc)
            except ProtocolError as exc:
                self._c.protocol_errors += 1
                self._noisy.warn(where, "protocol error in the handshake: %s", exc)
            except EOFError:
                log.warning("rpc: %s: closed during the handshake", where)
            except _GONE as exc:
                log.warning("rpc: %s: connection lost during the handshake: %s", where, exc)
            return None
        self._c.handshake_timeouts += 1
        log.warning("rpc: %s: handshake not done within %gs", where, self.handshake_timeout)
        return None

    async def _serve(self, ms: MessageStream, conn: _Conn, session: Session, where: str) -> None:
        who = f"{session.peer} at {where}"
        log.debug("rpc: %s authenticated", who)
        methods = self.guests.get(session.peer, self.methods)
        async with trio.open_nursery() as handlers:
            await self._read_requests(ms, session.peer, who, handlers, methods)
            # Stop talking at once; handlers already started finish, their answers are dropped.
            await conn.close()

    async def _read_requests(
        self, ms: MessageStream, peer: str, who: str, handlers: trio.Nursery, methods: Methods
    ) -> None:
        in_flight: set[int] = set()
        slots = trio.Semaphore(self.max_concurrent_per_conn)
        # Requests of ``in_order`` methods run one at a time in arrival order, in one task:
        # they never hold up the others (a posted write waiting for a hand-over must not
        # keep a vote on the same connection from being read).
        lane, queued = trio.open_memory_channel[Message](math.inf)
        handlers.start_soon(self._in_order, queued, ms, peer, slots, in_flight, methods)
        try:
            while True:
                msg = await ms.receive()
                if msg.type is not MessageType.REQUEST:
                    raise ProtocolError(f"unexpected {msg.type.name} message")
                if msg.request_id in in_flight:
                    raise ProtocolError(f"request id {msg.request_id} is already in flight")
                try:
                    slots.acquire_nowait()  # the usual case: no scheduling round
                except trio.WouldBlock:
                    await slots.acquire()
                in_flight.add(msg.request_id)
                self._c.requests_in_flight += 1
                method = methods.get(msg.body["m"])
                if method is not None and method.in_order:
                    lane.send_nowait(msg)  # bounded by ``slots``
                else:
                    handlers.start_soon(self._request, ms, peer, msg, slots, in_flight, methods)
        except ProtocolError as exc:
            self._c.protocol_errors += 1
            log.warning("rpc: %s: protocol error, closing: %s", who, exc)
        except EOFError:
            log.debug("rpc: %s closed the connection", who)
        except _GONE as exc:
            log.warning("rpc: %s: connection lost: %s", who, exc)
        finally:
            lane.close()

    async def _in_order(
        self,
        queued: trio.MemoryReceiveChannel[Message],
        ms: MessageStream,
        peer: str,
        slots: trio.Semaphore,
        in_flight: set[int],
        methods: Methods,
    ) -> None:
        async with queued:
            async for msg in queued:
                await self._request(ms, peer, msg, slots, in_flight, methods)

    async def _request(
        self,
        ms: MessageStream,
        peer: str,
        msg: Message,
        slots: trio.Semaphore,
        in_flight: set[int],
        methods: Methods,
    ) -> None:
        rid = msg.request_id
        try:
            mtype, body = await self._dispatch(peer, msg.body, methods)
            try:
                await ms.send(mtype, rid, body)
            except _GONE:
                raise
            except Exception as exc:  # encoding failed: nothing was sent
                self._c.handler_errors += 1
                log.error(
                    "%s: rpc %r from %s: its result cannot be sent: %s: %s",
                    BUG_MARKER,
                    msg.body["m"],
                    peer,
                    type(exc).__name__,
                    exc,
                )
                await ms.send(MessageType.ERROR, rid, error_body(errno.EIO, "internal error"))
            self._c.requests_served += 1
        except _GONE:
            log.debug("rpc: answer to %s dropped, the connection is gone", peer)
        finally:
            in_flight.discard(rid)
            self._c.requests_in_flight -= 1
            slots.release()

    async def _dispatch(
        self, peer: str, body: dict[str, Any], methods: Methods
    ) -> tuple[MessageType, dict[str, Any]]:
        return await dispatch(methods, peer, body, label="rpc", on_bug=self._count_bug)

    def _count_bug(self) -> None:
        self._c.handler_errors += 1
