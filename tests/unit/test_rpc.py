"""Node-to-node RPC: round trips, pipelining, errors, deadlines, reconnects, hostile peers.

Real loopback TCP (127.0.0.1, port 0) where the transport matters; memory
streams on ``MockClock`` where time does (timeouts, backoff), so nothing here
waits for real seconds.
"""

from __future__ import annotations

import errno
import functools
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.lowlevel
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from dfs.config import Timeouts, parse
from dfs.errors import BUG_MARKER, FsError
from dfs.net.frames import HEADER, MAX_FRAME, Field, MessageType, encode
from dfs.net.handshake import client_handshake, server_handshake
from dfs.net.peer import Connector, Peer, PeerPool
from dfs.net.rpc import (
    Methods,
    PeerAuthError,
    PeerTimeout,
    PeerUnavailable,
    RemoteError,
    RpcError,
)
from dfs.net.server import RpcServer
from dfs.net.stream import MessageStream
from tests.waiting import DEADLINE, await_until

SECRET = b"s" * 32
CLUSTER = "c1"
KNOWN = frozenset({"n1", "n2", "n3"})
FAST = Timeouts(connect=2.0, call=5.0, heartbeat=1.0)


def trio_test(*, mock_clock: bool = False) -> Callable[[Callable[..., Awaitable[None]]], Any]:
    """Run an async test in trio, on an autojumping MockClock if asked."""

    def deco(fn: Callable[..., Awaitable[None]]) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> None:
            clock = trio.testing.MockClock(autojump_threshold=0) if mock_clock else None
            trio.run(functools.partial(fn, *args, **kwargs), clock=clock)

        return wrapper

    return deco


# --- a small service and a harness around it ---------------------------------------------------


@dataclass
class Service:
    """The methods under test, with a record of what the handlers saw."""

    calls: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    active: int = 0
    peak: int = 0
    finished: list[str] = field(default_factory=list)
    gate: trio.Event = field(default_factory=trio.Event)

    def methods(self) -> Methods:
        m = Methods()

        async def add(peer: str, a: dict[str, Any]) -> int:
            self.calls.append(("add", peer, a))
            return int(a["a"] + a["b"])

        async def echo(peer: str, a: dict[str, Any]) -> Any:
            return a["x"]

        async def whoami(peer: str, a: dict[str, Any]) -> str:
            return peer

        async def fail(peer: str, a: dict[str, Any]) -> None:
            raise FsError(a["errno"], f"failed with {a['errno']}")

        async def boom(peer: str, a: dict[str, Any]) -> None:
            raise RuntimeError("a bug in a handler")

        async def unsendable(peer: str, a: dict[str, Any]) -> object:
            return object()

        async def sleep(peer: str, a: dict[str, Any]) -> str:
            await trio.sleep(a["s"])
            self.finished.append(a["tag"])
            return "slept"

        async def block(peer: str, a: dict[str, Any]) -> None:
            await trio.sleep_forever()

        async def double(peer: str, a: dict[str, Any]) -> int:
            self.active += 1
            self.peak = max(self.peak, self.active)
            await trio.sleep(0.005)
            self.active -= 1
            return int(a["x"]) * 2

        m.add("add", {"a": Field(int), "b": Field(int)}, add)
        m.add("echo", {"x": Field(object)}, echo)
        m.add("whoami", {}, whoami)
        m.add("fail", {"errno": Field(int)}, fail)
        m.add("boom", {}, boom)
        m.add("unsendable", {}, unsendable)
        m.add("sleep", {"s": Field(float), "tag": Field(str, optional=True)}, sleep)
        m.add("block", {}, block)

        async def ordered(peer: str, a: dict[str, Any]) -> int:
            if a["x"] == 0:
                await self.gate.wait()  # the first waits until the test opens the gate
            self.finished.append(f"ordered-{a['x']}")
            return int(a["x"])

        m.add("double", {"x": Field(int)}, double)
        m.add("ordered", {"x": Field(int)}, ordered, in_order=True)
        return m


def make_server(service: Service, **kw: Any) -> RpcServer:
    kw.setdefault("secret", SECRET)
    kw.setdefault("cluster_id", CLUSTER)
    return RpcServer(node_name="n2", known=KNOWN, methods=service.methods(), **kw)


@dataclass
class Net:
    """One server (node n2) on loopback TCP, and peers (node n1) calling it."""

    nursery: trio.Nursery
    service: Service
    server: RpcServer
    port: int = 0
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    async def start(self, port: int = 0) -> None:
        self.scope = trio.CancelScope()
        scope = self.scope

        async def runner(*, task_status: trio.TaskStatus[int]) -> None:
            with scope:
                await self.server.run(("127.0.0.1", port), task_status=task_status)

        self.port = await self.nursery.start(runner)

    def stop(self) -> None:
        self.scope.cancel()

    def peer(self, **kw: Any) -> Peer:
        kw.setdefault("secret", SECRET)
        kw.setdefault("cluster_id", CLUSTER)
        kw.setdefault("timeouts", FAST)
        kw.setdefault("my_name", "n1")
        return Peer("n2", "127.0.0.1", self.port, nursery=self.nursery, **kw)


@asynccontextmanager
async def tcp_net(**server_kw: Any) -> AsyncIterator[Net]:
    async with trio.open_nursery() as nursery:
        service = Service()
        net = Net(nursery, service, make_server(service, **server_kw))
        await net.start()
        yield net
        nursery.cancel_scope.cancel()


def memory_connector(nursery: trio.Nursery, server: RpcServer) -> Connector:
    """Connections to ``server`` over in-process memory streams (for MockClock tests)."""

    async def connect() -> trio.abc.Stream:
        client, server_side = trio.testing.memory_stream_pair()
        nursery.start_soon(server.handle_stream, server_side)
        return client

    return connect


def memory_peer(nursery: trio.Nursery, connector: Connector, **kw: Any) -> Peer:
    kw.setdefault("timeouts", FAST)
    return Peer(
        "n2",
        "memory",
        0,
        secret=SECRET,
        cluster_id=CLUSTER,
        my_name="n1",
        nursery=nursery,
        connector=connector,
        **kw,
    )


async def wait_closed(stream: trio.abc.Stream) -> None:
    """Read until the other side closes (EOF, or a reset when it dropped unread data)."""
    with trio.fail_after(DEADLINE):
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# --- round trips and pipelining ----------------------------------------------------------------


@trio_test()
async def test_round_trip_over_loopback_tcp() -> None:
    value = {"k": [1, -2, b"\x00bytes", "text", None, True, 1.5, {"n": []}]}
    async with tcp_net() as net:
        peer = net.peer()
        assert await peer.call("add", {"a": 2, "b": 3}) == 5
        assert await peer.call("echo", {"x": value}) == value
        assert await peer.call("whoami", {}) == "n1"  # handlers see the authenticated name
        assert peer.statistics().connects == 1
        assert net.service.calls == [("add", "n1", {"a": 2, "b": 3})]
        await peer.aclose()
        st = net.server.statistics()
        assert (st.connections_accepted, st.requests_served) == (1, 3)
        assert (st.protocol_errors, st.auth_failures, st.handler_errors) == (0, 0, 0)


@trio_test()
async def test_200_pipelined_calls_share_one_connection() -> None:
    results: dict[int, int] = {}
    async with tcp_net(max_concurrent_per_conn=16) as net:
        peer = net.peer()

        async def one(i: int) -> None:
            results[i] = await peer.call("double", {"x": i})

        async with trio.open_nursery() as n:
            for i in range(200):
                n.start_soon(one, i)
        assert results == {i: 2 * i for i in range(200)}
        assert net.server.statistics().connections_accepted == 1
        assert peer.statistics().connects == 1
        # Really pipelined, and bounded by the per-connection limit.
        assert 1 < net.service.peak <= 16
        await peer.aclose()


@trio_test()
async def test_in_order_requests_keep_their_order_and_hold_up_no_other_request() -> None:
    """A method declared ``in_order`` (replication, posted writes) runs its requests one at a
    time in arrival order; one of them waiting (a posted write held by a hand-over) must not
    keep the connection's other requests (a vote) from being served."""
    async with tcp_net() as net:
        peer = net.peer()
        got: list[int] = []

        async def ordered(x: int) -> None:
            got.append(await peer.call("ordered", {"x": x}))

        async with trio.open_nursery() as n:
            for x in range(5):
                n.start_soon(ordered, x)
                await trio.sleep(0.01)  # sent in this order
            with trio.fail_after(DEADLINE):
                assert await peer.call("add", {"a": 1, "b": 2}) == 3  # not held up
            assert got == [] and net.service.finished == []
            net.service.gate.set()
        assert sorted(got) == [0, 1, 2, 3, 4]
        assert net.service.finished == [f"ordered-{x}" for x in range(5)]
        await peer.aclose()


# --- errors travel as errno --------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOENT, errno.EEXIST, errno.EXDEV, errno.ENOTEMPTY])
@trio_test()
async def test_handler_fs_error_becomes_remote_error_with_same_errno(code: int) -> None:
    async with tcp_net() as net:
        peer = net.peer()
        with pytest.raises(RemoteError) as info:
            await peer.call("fail", {"errno": code})
        assert info.value.errno == code and isinstance(info.value, FsError)
        assert info.value.reason == f"failed with {code}" and info.value.peer == "n2"
        assert await peer.call("add", {"a": 1, "b": 1}) == 2  # same connection, still fine
        assert peer.statistics().connects == 1
        await peer.aclose()


@trio_test()
async def test_unknown_method_is_enosys() -> None:
    async with tcp_net() as net:
        peer = net.peer()
        with pytest.raises(RemoteError) as info:
            await peer.call("no_such_method", {})
        assert info.value.errno == errno.ENOSYS
        assert "no_such_method" in info.value.reason
        await peer.aclose()


@pytest.mark.parametrize(
    "args",
    [
        {"a": "1", "b": 2},  # wrong type
        {"a": True, "b": 2},  # a bool is not an int
        {"a": 1},  # missing field
        {"a": 1, "b": 2, "c": 3},  # unexpected field
    ],
)
@trio_test()
async def test_invalid_args_are_einval_and_never_reach_the_handler(args: dict[str, Any]) -> None:
    async with tcp_net() as net:
        peer = net.peer()
        with pytest.raises(RemoteError) as info:
            await peer.call("add", args)
        assert info.value.errno == errno.EINVAL
        assert net.service.calls == []
        await peer.aclose()


@trio_test()
async def test_unexpected_handler_exception_is_eio_and_the_server_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with tcp_net() as net:
        peer = net.peer()
        for method in ("boom", "unsendable"):
            with pytest.raises(RemoteError) as info:
                await peer.call(method, {})
            assert info.value.errno == errno.EIO
            assert "a bug" not in info.value.reason  # no internals leak to the caller
        assert await peer.call("add", {"a": 20, "b": 22}) == 42
        assert peer.statistics().connects == 1
        assert net.server.statistics().handler_errors == 2
        await peer.aclose()
    bugs = [r for r in caplog.records if BUG_MARKER in r.getMessage()]
    assert len(bugs) == 2
    assert bugs[0].exc_info is not None and "a bug in a handler" in caplog.text


# --- deadlines ---------------------------------------------------------------------------------


@trio_test(mock_clock=True)
async def test_timeout_abandons_the_call_and_the_connection_stays_usable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = Service()
    server = make_server(service)
    async with trio.open_nursery() as n:
        peer = memory_peer(n, memory_connector(n, server))
        t0 = trio.current_time()
        with pytest.raises(PeerTimeout) as info:
            await peer.call("sleep", {"s": 10.0, "tag": "late"}, timeout=1.0)
        assert trio.current_time() - t0 == pytest.approx(1.0)
        assert info.value.errno == errno.ETIMEDOUT
        await trio.sleep(20)  # the late answer arrives and is dropped quietly
        assert service.finished == ["late"]
        assert await peer.call("add", {"a": 1, "b": 2}) == 3
        # The default deadline is Timeouts.call.
        t0 = trio.current_time()
        with pytest.raises(PeerTimeout):
            await peer.call("block", {})
        assert trio.current_time() - t0 == pytest.approx(FAST.call)
        st = peer.statistics()
        assert (st.connects, st.connections_lost, st.calls_in_flight) == (1, 0, 0)
        assert server.statistics().protocol_errors == 0
        await peer.aclose()
        n.cancel_scope.cancel()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@trio_test(mock_clock=True)
async def test_a_request_that_was_read_is_carried_out_after_the_caller_left() -> None:
    service = Service()
    server = make_server(service)
    async with trio.open_nursery() as n:
        peer = memory_peer(n, memory_connector(n, server))
        with pytest.raises(PeerTimeout):
            await peer.call("sleep", {"s": 5.0, "tag": "done"}, timeout=1.0)
        await peer.aclose()
        await trio.sleep(10)
        assert service.finished == ["done"]
        assert server.statistics().connections == 0


@trio_test()
async def test_server_stopped_mid_call_fails_every_pending_call_promptly() -> None:
    async with tcp_net() as net:
        peer = net.peer(timeouts=Timeouts(connect=2.0, call=3600.0))
        failures: list[RpcError] = []

        async def blocked() -> None:
            try:
                await peer.call("block", {})
            except RpcError as exc:
                failures.append(exc)

        # Failed by the stop (PeerUnavailable, EHOSTDOWN), not by the call timeout.
        async with trio.open_nursery() as n:
            for _ in range(3):
                n.start_soon(blocked)
            await await_until(
                "3 requests in flight",
                lambda: net.server.statistics().requests_in_flight,
                ok=(3).__eq__,
            )
            net.stop()
        assert len(failures) == 3
        assert all(type(f) is PeerUnavailable for f in failures), failures
        assert failures[0].errno == errno.EHOSTDOWN
        # Nobody listens any more: the next call fails fast too.
        with pytest.raises(PeerUnavailable):
            await peer.call("add", {"a": 1, "b": 1})
        await peer.aclose()


@trio_test()
async def test_reconnects_after_the_server_restarts_on_the_same_port() -> None:
    async with tcp_net() as net:
        peer = net.peer()
        assert await peer.call("add", {"a": 1, "b": 1}) == 2
        net.stop()
        await await_until(
            "the peer to see the server gone", lambda: not peer.statistics().connected
        )
        await net.start(port=net.port)
        assert await peer.call("add", {"a": 2, "b": 2}) == 4
        st = peer.statistics()
        assert (st.connects, st.connections_lost, st.connect_failures) == (2, 1, 0)
        await peer.aclose()


@trio_test()
async def test_closed_port_fails_fast_and_backs_off() -> None:
    async with trio.open_nursery() as n:
        peer = Peer(
            "n2",
            "127.0.0.1",
            closed_port(),
            secret=SECRET,
            cluster_id=CLUSTER,
            my_name="n1",
            timeouts=Timeouts(connect=10.0, call=30.0),
            nursery=n,
        )
        t0 = trio.current_time()
        with pytest.raises(PeerUnavailable):
            await peer.call("add", {"a": 1, "b": 1})
        with pytest.raises(PeerUnavailable, match="next attempt"):
            await peer.call("add", {"a": 1, "b": 1})  # backing off: not even tried
        assert trio.current_time() - t0 < 2
        st = peer.statistics()
        assert st.connect_failures == 1 and 0 < st.retry_in <= 0.1
        await trio.sleep(st.retry_in + 0.01)
        with pytest.raises(PeerUnavailable):
            await peer.call("add", {"a": 1, "b": 1})
        st = peer.statistics()
        assert st.connect_failures == 2 and 0 < st.retry_in <= 0.2
        await peer.aclose()


@trio_test(mock_clock=True)
async def test_backoff_doubles_to_its_cap_and_resets_on_success() -> None:
    server = make_server(Service())
    attempts: list[float] = []
    up = False

    async with trio.open_nursery() as n:
        real = memory_connector(n, server)

        async def connector() -> trio.abc.Stream:
            attempts.append(trio.current_time())
            if not up:
                raise OSError(errno.ECONNREFUSED, "refused")
            return await real()

        peer = memory_peer(n, connector, backoff_jitter=0)
        start = trio.current_time()
        while trio.current_time() - start < 10:  # a caller retrying every 10 ms
            with pytest.raises(PeerUnavailable):
                await peer.call("add", {"a": 1, "b": 1})
            await trio.sleep(0.01)
        gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
        expected = [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
        assert gaps[:7] == pytest.approx(expected, abs=0.011)
        assert len(attempts) < 12  # a thousand calls, a handful of connect attempts
        up = True
        await trio.sleep(2)
        assert await peer.call("add", {"a": 1, "b": 1}) == 2
        st = peer.statistics()
        assert (st.connects, st.retry_in) == (1, 0)
        await peer.aclose()
        n.cancel_scope.cancel()


@trio_test(mock_clock=True)
async def test_peers_that_lose_a_node_together_retry_it_at_different_times() -> None:
    attempts: dict[int, list[float]] = {0: [], 1: [], 2: []}

    async with trio.open_nursery() as n:

        def refusing(i: int) -> Connector:
            async def connector() -> trio.abc.Stream:
                attempts[i].append(trio.current_time())
                raise OSError(errno.ECONNREFUSED, "refused")

            return connector

        peers = [memory_peer(n, refusing(i)) for i in attempts]
        start = trio.current_time()
        while trio.current_time() - start < 10:  # callers on three nodes, every 10 ms
            for peer in peers:
                with pytest.raises(PeerUnavailable):
                    await peer.call("add", {"a": 1, "b": 1})
            await trio.sleep(0.01)
        for tries in attempts.values():
            gaps = [b - a for a, b in zip(tries, tries[1:], strict=False)]
            ceilings = [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
            for gap, top in zip(gaps, ceilings, strict=False):  # half to all of each delay
                assert top / 2 - 0.011 <= gap <= top + 0.011
            assert len(tries) < 20
        # All three started together; after that, each keeps its own times.
        assert len({tuple(tries[:6]) for tries in attempts.values()}) == 3
        for peer in peers:
            await peer.aclose()
        n.cancel_scope.cancel()


@trio_test(mock_clock=True)
async def test_close_fails_pending_and_later_calls() -> None:
    async with trio.open_nursery() as n:
        peer = memory_peer(n, memory_connector(n, make_server(Service())))
        failures: list[RpcError] = []

        async def blocked() -> None:
            try:
                await peer.call("block", {})
            except RpcError as exc:
                failures.append(exc)

        n.start_soon(blocked)
        await trio.sleep(1)
        await peer.aclose()
        await trio.lowlevel.checkpoint()
        assert [type(f) for f in failures] == [PeerUnavailable]
        with pytest.raises(PeerUnavailable, match="closed"):
            await peer.call("add", {"a": 1, "b": 1})
        n.cancel_scope.cancel()


# --- authentication ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer_kw", "match"),
    [
        ({"secret": b"x" * 32}, "failed to prove"),
        ({"cluster_id": "other"}, "wrong cluster"),
    ],
)
@trio_test()
async def test_refused_handshake_is_peer_auth_error_and_counted(
    peer_kw: dict[str, Any], match: str
) -> None:
    async with tcp_net() as net:
        peer = net.peer(**peer_kw)
        with pytest.raises(PeerAuthError, match=match) as info:
            await peer.call("add", {"a": 1, "b": 1})
        assert isinstance(info.value, PeerUnavailable)
        await await_until(
            "net.server.statistics().connections == 0",
            lambda: net.server.statistics().connections == 0,
        )
        assert net.server.statistics().auth_failures == 1
        assert net.service.calls == []
        await peer.aclose()


@trio_test()
async def test_server_with_wrong_secret_is_refused_by_the_client() -> None:
    async with tcp_net(secret=b"y" * 32) as net:
        peer = net.peer()
        with pytest.raises(PeerAuthError, match="failed to prove"):
            await peer.call("add", {"a": 1, "b": 1})
        await await_until(
            "net.server.statistics().connections == 0",
            lambda: net.server.statistics().connections == 0,
        )
        assert net.server.statistics().auth_failures == 1
        await peer.aclose()


@trio_test()
async def test_client_refuses_a_server_that_is_not_the_expected_node() -> None:
    async with tcp_net() as net:
        peer = Peer(
            "n3",  # but n2 answers on that port
            "127.0.0.1",
            net.port,
            secret=SECRET,
            cluster_id=CLUSTER,
            my_name="n1",
            timeouts=FAST,
            nursery=net.nursery,
        )
        with pytest.raises(PeerAuthError, match="expected 'n3'"):
            await peer.call("add", {"a": 1, "b": 1})
        await peer.aclose()


@trio_test(mock_clock=True)
async def test_silent_client_is_dropped_after_the_handshake_timeout() -> None:
    server = make_server(Service(), handshake_timeout=3.0)
    client, server_side = trio.testing.memory_stream_pair()
    t0 = trio.current_time()
    await server.handle_stream(server_side)
    assert trio.current_time() - t0 == pytest.approx(3.0)
    assert server.statistics().handshake_timeouts == 1
    await client.aclose()


# --- hostile input -----------------------------------------------------------------------------


async def authenticated_raw(port: int) -> MessageStream:
    ms = MessageStream(await trio.open_tcp_stream("127.0.0.1", port))
    await client_handshake(ms, secret=SECRET, cluster=CLUSTER, node="n1", expect_peer="n2")
    return ms


def raw_frame(payload: object) -> bytes:
    data: bytes = msgpack.packb(payload, use_bin_type=True)
    return HEADER.pack(len(data)) + data


HOSTILE = {
    "http before the handshake": (False, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    "oversize frame before the handshake": (False, HEADER.pack(MAX_FRAME + 1)),
    "request before the handshake": (False, encode(MessageType.REQUEST, 1, {"m": "add", "a": {}})),
    "garbage after the handshake": (True, HEADER.pack(5) + b"\xc1\xc1\xc1\xc1\xc1"),
    "oversize frame after the handshake": (True, HEADER.pack(MAX_FRAME + 1) + b"x" * 1000),
    "unknown message type": (True, raw_frame([99, 1, {}])),
    "response sent to the server": (True, encode(MessageType.RESPONSE, 1, {"r": 1})),
    "handshake message after the handshake": (True, encode(MessageType.WELCOME, 1, {})),
    "request body not a map": (True, raw_frame([int(MessageType.REQUEST), 1, [1, 2]])),
    "args not a map": (True, raw_frame([int(MessageType.REQUEST), 1, {"m": "add", "a": 1}])),
    "method name too long": (True, encode(MessageType.REQUEST, 1, {"m": "x" * 65, "a": {}})),
    "request id in flight twice": (
        True,
        encode(MessageType.REQUEST, 7, {"m": "block", "a": {}}) * 2,
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
@trio_test()
async def test_hostile_connection_is_closed_while_a_good_client_keeps_working(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    authenticate, junk = HOSTILE[case]
    async with tcp_net() as net:
        good = net.peer()
        assert await good.call("add", {"a": 1, "b": 1}) == 2
        if authenticate:
            ms = await authenticated_raw(net.port)
            stream = ms.stream
        else:
            stream = await trio.open_tcp_stream("127.0.0.1", net.port)
        await stream.send_all(junk)
        await wait_closed(stream)
        await stream.aclose()
        assert await good.call("add", {"a": 2, "b": 2}) == 4
        assert good.statistics().connects == 1  # the good connection was never disturbed
        await await_until(
            "net.server.statistics().connections == 1",
            lambda: net.server.statistics().connections == 1,
        )
        st = net.server.statistics()
        assert st.protocol_errors == 1 and st.connections_accepted == 2
        assert [c[2] for c in net.service.calls] == [{"a": 1, "b": 1}, {"a": 2, "b": 2}]
        await good.aclose()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("protocol error" in w and "127.0.0.1:" in w for w in warnings), warnings
    assert BUG_MARKER not in caplog.text


async def _answers_unknown_id(ms: MessageStream) -> None:
    msg = await ms.receive()
    await ms.send(MessageType.RESPONSE, msg.request_id + 1000, {"r": 1})


async def _sends_a_request(ms: MessageStream) -> None:
    await ms.receive()
    await ms.send(MessageType.REQUEST, 1, {"m": "add", "a": {}})


async def _sends_garbage(ms: MessageStream) -> None:
    await ms.receive()
    await ms.stream.send_all(HEADER.pack(3) + b"\xc1\xc1\xc1")


@pytest.mark.parametrize("behaviour", [_answers_unknown_id, _sends_a_request, _sends_garbage])
@trio_test(mock_clock=True)
async def test_client_disconnects_a_server_that_misbehaves(
    behaviour: Callable[[MessageStream], Awaitable[None]], caplog: pytest.LogCaptureFixture
) -> None:
    async def fake_server(stream: trio.abc.Stream) -> None:
        ms = MessageStream(stream)
        await server_handshake(ms, secret=SECRET, cluster=CLUSTER, node="n2", known=KNOWN)
        await behaviour(ms)
        await trio.sleep_forever()

    async with trio.open_nursery() as n:

        async def connect() -> trio.abc.Stream:
            client, server_side = trio.testing.memory_stream_pair()
            n.start_soon(fake_server, server_side)
            return client

        peer = memory_peer(n, connect)
        with pytest.raises(PeerUnavailable, match="protocol error"):
            await peer.call("add", {"a": 1, "b": 1})
        assert peer.statistics().connections_lost == 1
        await peer.aclose()
        n.cancel_scope.cancel()
    assert any("protocol error" in r.getMessage() for r in caplog.records)


class _ListHandler(logging.Handler):
    def __init__(self, sink: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record)


def _fuzz_server_with(chunks: list[bytes]) -> None:
    """Handshake properly, send ``chunks``, hang up; then a good client must be served."""
    records: list[logging.LogRecord] = []
    handler = _ListHandler(records)
    logger = logging.getLogger("dfs.net.server")
    logger.addHandler(handler)

    async def main() -> None:
        service = Service()
        server = make_server(service)
        async with trio.open_nursery() as n:
            client, server_side = trio.testing.memory_stream_pair()
            n.start_soon(server.handle_stream, server_side)
            ms = MessageStream(client)
            await client_handshake(ms, secret=SECRET, cluster=CLUSTER, node="n1")
            try:
                for c in chunks:
                    await client.send_all(c)
            except trio.BrokenResourceError:
                pass  # the server already hung up on us
            await client.aclose()
            await await_until(
                "0 connections on the server",
                lambda: server.statistics().connections,
                ok=(0).__eq__,
            )
            peer = memory_peer(n, memory_connector(n, server))
            assert await peer.call("add", {"a": 3, "b": 4}) == 7
            await peer.aclose()
            n.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if r.levelno >= logging.ERROR]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=4))
def test_fuzz_random_bytes_after_the_handshake_never_crash_the_server(chunks: list[bytes]) -> None:
    _fuzz_server_with(chunks)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.binary(max_size=20)
    | st.text(max_size=20)
    | st.floats(allow_nan=False),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
request_bodies = st.fixed_dictionaries(
    {"m": st.sampled_from(["add", "echo", "fail", "nope", "whoami"]), "a": msgpack_values}
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 12), st.integers(0, 2**32), request_bodies | msgpack_values),
        min_size=1,
        max_size=6,
    )
)
def test_fuzz_wellformed_frames_after_the_handshake_never_crash_the_server(
    frames: list[tuple[int, int, Any]],
) -> None:
    _fuzz_server_with([raw_frame(list(f)) for f in frames])


# --- the pool ----------------------------------------------------------------------------------


@trio_test()
async def test_peer_pool_reaches_every_other_node_of_the_configuration(tmp_path: Path) -> None:
    listeners = {name: await trio.open_tcp_listeners(0, host="127.0.0.1") for name in KNOWN}
    raw = {
        "cluster": {"name": "t", "id": CLUSTER, "secret_file": "secret"},
        "nodes": [
            {"name": name, "address": "127.0.0.1", "port": ls[0].socket.getsockname()[1], "id": i}
            for i, (name, ls) in enumerate(sorted(listeners.items()), start=1)
        ],
    }
    config = parse(raw, base=tmp_path)
    async with trio.open_nursery() as n:
        for name in ("n2", "n3"):
            server = RpcServer.from_config(config, name, SECRET, methods_naming(name))
            await n.start(server.run, listeners[name])
        pool = PeerPool(config, my_name="n1", secret=SECRET, nursery=n)
        assert sorted(pool) == ["n2", "n3"] and len(pool) == 2
        assert await pool.call("n2", "whoami", {}) == ["n2", "n1"]
        assert await pool["n3"].call("whoami", {}) == ["n3", "n1"]
        with pytest.raises(KeyError, match="this node"):
            pool.peer("n1")
        with pytest.raises(KeyError, match="no node"):
            pool.peer("n9")
        await pool.aclose()
        with pytest.raises(PeerUnavailable, match="closed"):
            await pool.call("n2", "whoami", {})
        n.cancel_scope.cancel()
    for ls in listeners.values():
        for listener in ls:
            await listener.aclose()


def methods_naming(node: str) -> Methods:
    m = Methods()

    async def whoami(peer: str, a: dict[str, Any]) -> list[str]:
        return [node, peer]

    m.add("whoami", {}, whoami)
    return m


def test_methods_registry_refuses_duplicates_and_bad_names() -> None:
    m = Methods()

    @m.method("ping", {})
    async def ping(peer: str, a: dict[str, Any]) -> None:
        return None

    assert "ping" in m and list(m) == ["ping"] and len(m) == 1
    with pytest.raises(ValueError, match="already"):
        m.add("ping", {}, ping)
    with pytest.raises(ValueError):
        m.add("x" * 65, {}, ping)


@trio_test(mock_clock=True)
async def test_arguments_that_cannot_be_sent_are_a_programming_error() -> None:
    async with trio.open_nursery() as n:
        peer = memory_peer(n, memory_connector(n, make_server(Service())))
        with pytest.raises(TypeError):
            await peer.call("echo", {"x": object()})
        with pytest.raises(ValueError):
            await peer.call("x" * 65, {})
        with pytest.raises(ValueError, match="frame limit"):
            await peer.call("echo", {"x": b"x" * (MAX_FRAME + 1)})
        assert await peer.call("add", {"a": 1, "b": 1}) == 2
        await peer.aclose()
        n.cancel_scope.cancel()


def test_refusals_of_one_address_are_logged_at_a_bounded_rate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from dfs.net.server import _RateLimitedLog

    async def main() -> None:
        noisy = _RateLimitedLog(interval=60)
        for _ in range(10):
            noisy.warn("10.0.0.1:5000", "authentication failed: %s", "x")
            await trio.sleep(1)
        noisy.warn("10.0.0.2:5000", "authentication failed: %s", "x")  # another address
        await trio.sleep(60)
        noisy.warn("10.0.0.1:6000", "authentication failed: %s", "x")  # same host, new port

    with caplog.at_level(logging.WARNING, logger="dfs.net.server"):
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "9 more since the last warning" in lines[2]


@trio_test()
async def test_a_guest_proves_the_secret_and_may_call_only_its_own_methods() -> None:
    guest = Methods()

    async def hello(peer: str, a: dict[str, Any]) -> str:
        return f"hello {peer}"

    guest.add("hello", {}, hello)
    async with tcp_net(guests={"@tool": guest}) as net:
        tool = net.peer(my_name="@tool")
        assert await tool.call("hello", {}) == "hello @tool"
        with pytest.raises(RemoteError) as e:  # a node's method: not for guests
            await tool.call("add", {"a": 1, "b": 1})
        assert e.value.errno == errno.ENOSYS
        assert net.service.calls == []
        node = net.peer()
        assert await node.call("add", {"a": 1, "b": 1}) == 2  # nodes keep theirs
        with pytest.raises(RemoteError):
            await node.call("hello", {})
        stranger = net.peer(my_name="@other")  # a name that is neither node nor guest
        with pytest.raises(PeerAuthError, match="unknown node"):
            await stranger.call("hello", {})
        for p in (tool, node, stranger):
            await p.aclose()


def test_a_guest_may_not_bear_a_node_name() -> None:
    with pytest.raises(ValueError, match="node names"):
        make_server(Service(), guests={"n1": Methods()})
