"""Mutual authentication: success, wrong secret either way, wrong cluster, replay, garbage."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from dfs.net.frames import HEADER, MessageType, ProtocolError
from dfs.net.handshake import AuthError, Session, client_handshake, server_handshake
from dfs.net.stream import MessageStream
from tests.waiting import DEADLINE

SECRET = b"s" * 32
KNOWN = {"n1", "n2"}


async def pair(
    client: Callable[[MessageStream], Awaitable[Any]],
    server: Callable[[MessageStream], Awaitable[Any]],
) -> tuple[Any, Any]:
    a, b = trio.testing.memory_stream_pair()
    results: dict[str, Any] = {}

    async def run(name: str, fn: Callable[[MessageStream], Awaitable[Any]], s: Any) -> None:
        ms = MessageStream(s)
        try:
            results[name] = await fn(ms)
        except Exception as exc:  # noqa: BLE001 - collected and asserted on
            results[name] = exc
        finally:
            await ms.aclose()

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as n:
            n.start_soon(run, "c", client, a)
            n.start_soon(run, "s", server, b)
    return results["c"], results["s"]


def cli(secret: bytes = SECRET, cluster: str = "c1", node: str = "n1", **kw: Any) -> Any:
    return lambda ms: client_handshake(ms, secret=secret, cluster=cluster, node=node, **kw)


def srv(secret: bytes = SECRET, cluster: str = "c1", node: str = "n2") -> Any:
    return lambda ms: server_handshake(ms, secret=secret, cluster=cluster, node=node, known=KNOWN)


def test_success_gives_both_sides_the_same_session_key() -> None:
    c, s = trio.run(pair, cli(), srv())
    assert isinstance(c, Session) and isinstance(s, Session)
    assert (c.peer, s.peer) == ("n2", "n1")
    assert c.key == s.key and len(c.key) == 32


def test_each_session_has_a_fresh_key() -> None:
    c1, _ = trio.run(pair, cli(), srv())
    c2, _ = trio.run(pair, cli(), srv())
    assert c1.key != c2.key


@pytest.mark.parametrize(
    ("client", "server", "client_err", "server_err"),
    [
        # A wrong secret on either side: the client checks the server's proof first.
        (cli(secret=b"x" * 32), srv(), "failed to prove", "refused: authentication failed"),
        (cli(), srv(secret=b"x" * 32), "failed to prove", "refused: authentication failed"),
        (cli(cluster="other"), srv(), "wrong cluster", "cluster 'other'"),
        (cli(node="n9"), srv(), "unknown node", "unknown node 'n9'"),
        (cli(expect_peer="n3"), srv(), "expected 'n3'", "closed"),
    ],
)
def test_refusals(client: Any, server: Any, client_err: str, server_err: str) -> None:
    c, s = trio.run(pair, client, server)
    assert isinstance(c, AuthError | EOFError | ProtocolError), c
    assert client_err in str(c)
    assert isinstance(s, AuthError | EOFError | ProtocolError), s
    assert server_err in str(s) or isinstance(s, EOFError)


def test_replayed_auth_is_refused() -> None:
    recorded: list[bytes] = []

    async def recording_client(ms: MessageStream) -> Session:
        real_send = ms.send

        async def send(mtype: MessageType, rid: int, body: dict[str, Any]) -> None:
            if mtype == MessageType.AUTH:
                recorded.append(body["proof"])
            await real_send(mtype, rid, body)

        ms.send = send  # type: ignore[method-assign]
        return await client_handshake(ms, secret=SECRET, cluster="c1", node="n1")

    trio.run(pair, recording_client, srv())
    assert recorded

    async def replaying_attacker(ms: MessageStream) -> None:
        # Knows no secret: replays the earlier HELLO-shaped message and recorded proof.
        await ms.send(
            MessageType.HELLO, 0, {"proto": 1, "cluster": "c1", "node": "n1", "nonce": b"n" * 32}
        )
        await ms.receive()  # CHALLENGE with a fresh nonce
        await ms.send(MessageType.AUTH, 0, {"proof": recorded[0]})
        await ms.receive()

    c, s = trio.run(pair, replaying_attacker, srv())
    assert isinstance(s, AuthError) and "failed to prove" in str(s)


@pytest.mark.parametrize(
    "junk",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        HEADER.pack(1 << 30),
        HEADER.pack(5) + b"\xc1\xc1\xc1\xc1\xc1",
        b"\x00",
    ],
)
def test_garbage_ends_the_handshake_cleanly(junk: bytes) -> None:
    async def garbage(ms: MessageStream) -> None:
        await ms.stream.send_all(junk)

    _, s = trio.run(pair, garbage, srv())
    assert isinstance(s, ProtocolError | EOFError), s


def test_request_before_handshake_is_refused() -> None:
    async def eager(ms: MessageStream) -> None:
        await ms.send(MessageType.PING, 1, {})

    from dfs.net.frames import register

    register(MessageType.PING, {})
    _, s = trio.run(pair, eager, srv())
    assert isinstance(s, ProtocolError) and "expected HELLO" in str(s)
