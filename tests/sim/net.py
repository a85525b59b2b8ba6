"""A simulated network between in-process dfs nodes, on trio's clock, driven by a seeded rng.

What ``ClusterService`` uses of ``ClusterNode`` is its ``methods``, ``control_methods``,
``add_status`` and ``pool.peer(name)`` (``call`` and ``post``, as ``dfs.net.peer.Peer``).
``SimPeer`` offers those over this network instead of TCP; the requests are run by the target's
real ``Methods`` through ``dfs.net.rpc.dispatch`` (schema checks, errno answers, bug logging),
with arguments and answers round-tripped through msgpack as on the wire.

The faults model what TCP connections between processes can do, and no more (anything else
would find bugs the real transport cannot cause):

- **delay**: every message takes a seeded time; messages of one connection arrive in the order
  sent (TCP), except requests of methods that are not ``in_order``, which the server runs in
  tasks of their own anyway: those may overtake each other (**reorder**).
- **drop**: a connection is reset at a random message: that message and everything in flight on
  it is lost, every pending request fails at once (``PeerUnavailable``), the next call
  reconnects — what ``Peer`` does when its connection is lost.
- **partition**: messages between the two sides are held (TCP retransmits) until the network
  heals, or the connection breaks (seeded, per connection); new connections cannot be made.
  Callers time out meanwhile (``PeerTimeout``, as ``Peer.call`` at its deadline).
- **duplicate**: requests of methods declared idempotent by the protocol (``IDEMPOTENT``) are
  delivered twice with some probability (as a caller that retries after a lost answer does);
  the second answer is ignored.
- **crash**: a node's connections break and the handlers it was running are cancelled (its
  ``scope``).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio

from dfs.cluster import remote
from dfs.net.frames import Message, MessageType, Packed
from dfs.net.peer import Pending
from dfs.net.rpc import Methods, PeerTimeout, PeerUnavailable, dispatch

# Methods whose repetition the protocol allows (reads, leases, applying records the site
# already has): the only ones this network duplicates. Not repl.hello: it closes the handles
# the caller held open on the primary, so a late copy would close newer ones (a copy TCP never
# delivers).
IDEMPOTENT = frozenset(
    {"repl.apply", "repl.lease", "repl.holds", "vol.list", "ping"}
    | {remote.LOOKUP, remote.GETATTR, remote.READDIR, remote.READ, remote.READLINK}
    | {remote.GETXATTR, remote.LISTXATTR}
)


@dataclass
class Faults:
    """Probabilities and delays of one schedule (all from the seed)."""

    delay: float = 0.002  # mean one-way delay, seconds
    reset: float = 0.0  # per message: the connection is reset
    reorder: float = 0.0  # per request of a method that is not in_order: no FIFO
    duplicate: float = 0.0  # per request of an IDEMPOTENT method
    break_on_partition: float = 0.5  # per connection cut by a partition
    liar: str | None = None  # a broken node: acknowledges repl.apply without applying


def _wire(obj: Any) -> Any:
    """What the other side decodes from ``obj``."""
    return msgpack.unpackb(msgpack.packb(obj, use_bin_type=True), raw=False, use_list=True)


@dataclass(eq=False)
class _Conn:
    src: str
    dst: str
    pending: dict[int, Pending] = field(default_factory=dict)
    broken: bool = False
    last_arrival: float = 0.0  # FIFO: no message of this connection arrives before this
    order: trio.Lock = field(default_factory=trio.Lock)  # in_order requests, one at a time


class SimNet:
    """The network: nodes' methods and scopes, partitions, faults, statistics."""

    def __init__(self, rng: random.Random, faults: Faults) -> None:
        self.rng = rng
        self.faults = faults
        self.methods: dict[str, Methods] = {}
        self.nurseries: dict[str, trio.Nursery] = {}  # a node's running process
        self.groups: list[frozenset[str]] | None = None  # partition: who can reach whom
        self.healed = trio.Event()
        self.healed.set()
        self.conns: dict[_Conn, None] = {}  # ordered: faults are drawn per connection
        self.stats: dict[str, int] = {
            "sent": 0,
            "resets": 0,
            "duplicates": 0,
            "held": 0,
            "refused": 0,
        }
        self._rids = itertools.count(1)

    # --- topology -------------------------------------------------------------------------

    def up(self, name: str) -> bool:
        return name in self.nurseries

    def reachable(self, a: str, b: str) -> bool:
        if self.groups is None:
            return True
        return any(a in g and b in g for g in self.groups)

    def partition(self, groups: list[frozenset[str]]) -> None:
        self.groups = groups
        self.healed = trio.Event()
        for c in list(self.conns):
            if (
                not self.reachable(c.src, c.dst)
                and self.rng.random() < self.faults.break_on_partition
            ):
                self.break_conn(c, "connection timed out (partition)")

    def heal(self) -> None:
        self.groups = None
        self.healed.set()

    def crashed(self, name: str) -> None:
        """``name``'s process died: its connections break (its scope is cancelled by the
        caller)."""
        self.nurseries.pop(name, None)
        for c in list(self.conns):
            if name in (c.src, c.dst):
                self.break_conn(c, f"connection reset ({name} died)")

    def break_conn(self, c: _Conn, why: str) -> None:
        if c.broken:
            return
        c.broken = True
        self.conns.pop(c, None)
        for p in list(c.pending.values()):
            p.fail(why)
        c.pending.clear()

    # --- messages -------------------------------------------------------------------------

    def _delay(self) -> float:
        return self.rng.expovariate(1.0 / self.faults.delay)

    async def _travel(self, c: _Conn, fifo: bool) -> bool:
        """A message crosses ``c``: False if it is lost with the connection."""
        arrive = trio.current_time() + self._delay()
        if fifo:
            arrive = max(arrive, c.last_arrival)
            c.last_arrival = arrive
        await trio.sleep_until(arrive)
        while not c.broken and not self.reachable(c.src, c.dst):
            self.stats["held"] += 1
            await self.healed.wait()
        return not c.broken

    def send(
        self,
        c: _Conn,
        method: str,
        args: Any,
        on_done: Callable[[Pending], None] | None,
        give_up: Callable[[Pending], None] | None = None,
    ) -> Pending:
        rid = next(self._rids)
        p = Pending(c.dst, rid, on_done, give_up=give_up)
        c.pending[rid] = p
        self.stats["sent"] += 1
        if self.rng.random() < self.faults.reset:
            self.stats["resets"] += 1
            self.break_conn(c, "connection reset by peer")
            return p
        target = self.methods.get(c.dst)
        in_order = target is not None and (m := target.get(method)) is not None and m.in_order
        fifo = in_order or self.rng.random() >= self.faults.reorder
        body = {"m": method, "a": _wire(args)}
        nursery = self.nurseries.get(c.dst)
        if nursery is None:
            self.break_conn(c, "connection refused")
            return p
        copies = 1
        # Drawn for every request, so the stream of draws does not depend on IDEMPOTENT.
        duplicate = self.rng.random() < self.faults.duplicate
        if method in IDEMPOTENT and duplicate:
            self.stats["duplicates"] += 1
            copies = 2
        for _ in range(copies):
            nursery.start_soon(self._serve, c, rid, body, fifo, in_order)
        return p

    async def _serve(
        self, c: _Conn, rid: int, body: dict[str, Any], fifo: bool, in_order: bool
    ) -> None:
        """Runs in the target's scope: deliver, run the method, send the answer back."""
        if not await self._travel(c, fifo):
            return
        methods = self.methods[c.dst]
        records = body["a"].get("records") if body["m"] == "repl.apply" else None
        if c.dst == self.faults.liar and records:
            # The harness's own check: a site that loses what it acknowledges.
            kind, answer = MessageType.RESPONSE, {"r": {"have": records[-1][0]}}
        elif in_order:
            async with c.order:
                kind, answer = await dispatch(methods, c.src, body, label="sim")
        else:
            kind, answer = await dispatch(methods, c.src, body, label="sim")
        answer = _wire(answer)
        if not await self._travel(c, True):
            return
        p = c.pending.pop(rid, None)
        if p is not None:
            p.answer(Message(MessageType(kind), rid, answer))


class SimPeer:
    """``Peer`` over ``SimNet``: one connection at a time from ``src`` to ``dst``."""

    def __init__(self, net: SimNet, src: str, dst: str, connect_timeout: float) -> None:
        self.net = net
        self.src = src
        self.name = dst
        self.connect_timeout = connect_timeout
        self._conn: _Conn | None = None

    def _live(self) -> _Conn | None:
        c = self._conn
        return c if c is not None and not c.broken else None

    async def _connection(self) -> _Conn:
        c = self._live()
        if c is not None:
            return c
        net = self.net
        with trio.move_on_after(self.connect_timeout):
            await trio.sleep(2 * net._delay())  # the handshake
            while not net.reachable(self.src, self.name):
                await net.healed.wait()
            if not net.up(self.name):
                net.stats["refused"] += 1
                raise PeerUnavailable(f"node {self.name}: connection refused")
            c = self._conn = _Conn(self.src, self.name, last_arrival=trio.current_time())
            net.conns[c] = None
            return c
        raise PeerUnavailable(f"node {self.name}: connect timed out")

    async def call(
        self,
        method: str,
        args: Mapping[str, Any] | Packed,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - as Peer.call
    ) -> Any:
        limit = 5.0 if timeout is None else timeout
        with trio.move_on_after(limit):
            c = await self._connection()
            p = self.net.send(c, method, _args(args), None)
            await p.done.wait()
            return p.result()
        raise PeerTimeout(f"node {self.name}: {method} timed out after {limit:g} s")

    def post(
        self, method: str, args: Mapping[str, Any] | Packed, on_done: Callable[[Pending], None]
    ) -> Pending:
        c = self._live()
        if c is None:
            raise PeerUnavailable(f"node {self.name}: not connected")
        return self.net.send(c, method, _args(args), on_done, self.abandon)

    def abandon(self, pending: Pending) -> None:
        pending.on_done = None
        c = self._conn
        if c is not None:
            c.pending.pop(pending.rid, None)


def _args(args: Mapping[str, Any] | Packed) -> Any:
    if isinstance(args, Packed):
        return msgpack.unpackb(args.data, raw=False, use_list=True)
    return dict(args)


class SimPool:
    """``PeerPool`` of one node over ``SimNet``."""

    def __init__(self, net: SimNet, me: str, connect_timeout: float) -> None:
        self.net = net
        self.me = me
        self.connect_timeout = connect_timeout
        self.peers: dict[str, SimPeer] = {}

    def peer(self, name: str) -> SimPeer:
        if name == self.me:  # as ``dfs.net.peer.PeerPool.peer``
            raise KeyError(f"{name!r} is this node; call it locally")
        p = self.peers.get(name)
        if p is None:
            p = self.peers[name] = SimPeer(self.net, self.me, name, self.connect_timeout)
        return p


class SimClusterNode:
    """What ``ClusterService`` uses of ``dfs.cluster.node.ClusterNode``."""

    def __init__(self, net: SimNet, me: str, connect_timeout: float) -> None:
        self.methods = Methods()
        self.control_methods = Methods()
        self.pool: SimPool | None = SimPool(net, me, connect_timeout)
        self.sections: dict[str, Callable[[], dict[str, Any]]] = {}

    def add_status(self, name: str, section: Callable[[], dict[str, Any]]) -> None:
        self.sections[name] = section
