"""Mutual authentication with the cluster secret, before any request is served.

::

    client                                   server
    HELLO     {proto, cluster, node, nonce_c}  ->
                                             <-  CHALLENGE {proto, node, nonce_s, proof_s}
    AUTH      {proof_c}                        ->
                                             <-  WELCOME {}

    proof_s = HMAC-SHA256(secret, "dfs-server" | cluster | client | server | nonce_c | nonce_s)
    proof_c = HMAC-SHA256(secret, "dfs-client" | cluster | client | server | nonce_c | nonce_s)

Both sides prove knowledge of the secret over fresh nonces, so a recorded
exchange cannot be replayed (the other side's nonce differs every time) and a
server cannot be impersonated. A wrong protocol version, cluster id, unknown
node or bad proof ends with an ERROR frame (reason only, no detail that helps
an attacker) and ``AuthError``; the caller closes the connection and logs it.
The result carries a session key derived from both nonces, for per-frame
integrity once requests flow.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Container
from dataclasses import dataclass

from dfs.net.frames import Field, Message, MessageType, ProtocolError, register
from dfs.net.stream import MessageStream

PROTOCOL_VERSION = 1
NONCE_BYTES = 32
_NAME = Field(str, max_len=255)
_BLOB = Field(bytes, max_len=64)

register(
    MessageType.HELLO,
    {"proto": Field(int), "cluster": _NAME, "node": _NAME, "nonce": _BLOB},
)
register(
    MessageType.CHALLENGE,
    {"proto": Field(int), "node": _NAME, "nonce": _BLOB, "proof": _BLOB},
)
register(MessageType.AUTH, {"proof": _BLOB})
register(MessageType.WELCOME, {})
register(
    MessageType.ERROR, {"reason": Field(str, max_len=1024), "errno": Field(int, optional=True)}
)


class AuthError(Exception):
    """The peer could not be authenticated (or refused us); close the connection."""


@dataclass(frozen=True, slots=True)
class Session:
    peer: str
    key: bytes


def _transcript(cluster: str, client: str, server: str, nc: bytes, ns: bytes) -> bytes:
    parts = [cluster.encode(), client.encode(), server.encode(), nc, ns]
    return b"".join(len(p).to_bytes(2, "big") + p for p in parts)


def _proof(secret: bytes, role: bytes, transcript: bytes) -> bytes:
    return hmac.new(secret, role + transcript, hashlib.sha256).digest()


def _session_key(secret: bytes, transcript: bytes) -> bytes:
    return hmac.new(secret, b"dfs-session" + transcript, hashlib.sha256).digest()


async def _expect(ms: MessageStream, mtype: MessageType) -> Message:
    msg = await ms.receive()
    if msg.type == MessageType.ERROR:
        raise AuthError(f"peer refused: {msg.body['reason']}")
    if msg.type != mtype:
        raise ProtocolError(f"expected {mtype.name}, got {msg.type.name}")
    return msg


async def client_handshake(
    ms: MessageStream, *, secret: bytes, cluster: str, node: str, expect_peer: str | None = None
) -> Session:
    nc = secrets.token_bytes(NONCE_BYTES)
    await ms.send(
        MessageType.HELLO,
        0,
        {"proto": PROTOCOL_VERSION, "cluster": cluster, "node": node, "nonce": nc},
    )
    ch = await _expect(ms, MessageType.CHALLENGE)
    if ch.body["proto"] != PROTOCOL_VERSION:
        raise AuthError(f"server speaks protocol {ch.body['proto']}, we speak {PROTOCOL_VERSION}")
    server = ch.body["node"]
    if expect_peer is not None and server != expect_peer:
        raise AuthError(f"connected to node {server!r}, expected {expect_peer!r}")
    ns = ch.body["nonce"]
    if len(ns) != NONCE_BYTES:
        raise ProtocolError("bad nonce length")
    t = _transcript(cluster, node, server, nc, ns)
    if not hmac.compare_digest(ch.body["proof"], _proof(secret, b"dfs-server", t)):
        await ms.send(MessageType.ERROR, 0, {"reason": "authentication failed"})
        raise AuthError(f"node {server!r} failed to prove the cluster secret")
    await ms.send(MessageType.AUTH, 0, {"proof": _proof(secret, b"dfs-client", t)})
    await _expect(ms, MessageType.WELCOME)
    return Session(server, _session_key(secret, t))


async def server_handshake(
    ms: MessageStream, *, secret: bytes, cluster: str, node: str, known: Container[str]
) -> Session:
    hello = await _expect(ms, MessageType.HELLO)
    b = hello.body
    if b["proto"] != PROTOCOL_VERSION:
        await ms.send(MessageType.ERROR, 0, {"reason": f"protocol {PROTOCOL_VERSION} only"})
        raise AuthError(f"client speaks protocol {b['proto']}")
    if b["cluster"] != cluster:
        await ms.send(MessageType.ERROR, 0, {"reason": "wrong cluster"})
        raise AuthError(f"client of cluster {b['cluster']!r}")
    client = b["node"]
    if client not in known:
        await ms.send(MessageType.ERROR, 0, {"reason": "unknown node"})
        raise AuthError(f"unknown node {client!r}")
    nc = b["nonce"]
    if len(nc) != NONCE_BYTES:
        raise ProtocolError("bad nonce length")
    ns = secrets.token_bytes(NONCE_BYTES)
    t = _transcript(cluster, client, node, nc, ns)
    await ms.send(
        MessageType.CHALLENGE,
        0,
        {
            "proto": PROTOCOL_VERSION,
            "node": node,
            "nonce": ns,
            "proof": _proof(secret, b"dfs-server", t),
        },
    )
    auth = await _expect(ms, MessageType.AUTH)
    if not hmac.compare_digest(auth.body["proof"], _proof(secret, b"dfs-client", t)):
        await ms.send(MessageType.ERROR, 0, {"reason": "authentication failed"})
        raise AuthError(f"node {client!r} failed to prove the cluster secret")
    await ms.send(MessageType.WELCOME, 0, {})
    return Session(client, _session_key(secret, t))
