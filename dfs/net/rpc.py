"""Node-to-node RPC: the method registry, the request/response schemas and the caller's errors.

A call is one REQUEST frame ``{"m": method, "a": args}`` answered by one
RESPONSE ``{"r": result}`` or one ERROR ``{"reason": str, "errno": int}`` with
the same request id; many calls may be in flight on one connection. The
server side is ``dfs.net.server.RpcServer``, the calling side
``dfs.net.peer.Peer``/``PeerPool``; docs/PROTOCOL.md is the wire description.

Errors a caller sees are ``FsError`` subclasses, so the errno boundary in
mountd maps them without knowing about the network: ``RemoteError`` carries
the errno the remote handler raised, ``PeerUnavailable`` (EHOSTDOWN) means
no answer can come (connect failed, connection lost, peer closed),
``PeerTimeout`` (ETIMEDOUT) means the call's deadline passed first, in which
case the remote side may or may not have carried it out.
"""

from __future__ import annotations

import errno as _errno
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from dfs.errors import BUG_MARKER, FsError
from dfs.net import handshake as _handshake  # noqa: F401 - registers the ERROR schema
from dfs.net.frames import Field, MessageType, ProtocolError, Schema, register, validate_fields

log = logging.getLogger(__name__)

MAX_METHOD_NAME = 64
MAX_REASON = 1024  # the ERROR schema's limit on "reason"
MAX_ERRNO = 4095  # Linux errnos are 1..4095; anything else is a malformed answer

register(MessageType.REQUEST, {"m": Field(str, max_len=MAX_METHOD_NAME), "a": Field(dict)})
register(MessageType.RESPONSE, {"r": Field(object)})

Handler = Callable[[str, dict[str, Any]], Awaitable[Any]]
"""``async def handler(peer_name, args) -> result``; ``result`` is any msgpack value."""


class RpcError(FsError):
    """Base of the errors ``Peer.call`` raises (besides programming errors)."""


class PeerUnavailable(RpcError):
    """No answer can come: the peer could not be reached or the connection was lost."""

    errno = _errno.EHOSTDOWN

    def __init__(self, message: str) -> None:
        super().__init__(None, message)


class PeerAuthError(PeerUnavailable):
    """The handshake failed: wrong secret, wrong cluster, unknown node or protocol version."""


class PeerTimeout(RpcError):
    """The call's deadline passed; the remote side may still carry the request out."""

    errno = _errno.ETIMEDOUT

    def __init__(self, message: str) -> None:
        super().__init__(None, message)


class RemoteError(RpcError):
    """The remote handler failed with ``errno``; ``reason`` is its message."""

    def __init__(self, errno: int, reason: str, peer: str | None = None) -> None:
        super().__init__(errno, reason)
        self.reason = reason
        self.peer = peer


def wire_errno(value: object) -> int:
    """An errno that is safe to pass on: a positive Linux errno, else EIO."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_ERRNO:
        return value
    return _errno.EIO


def error_body(errno: int, reason: str) -> dict[str, Any]:
    return {"reason": reason[:MAX_REASON], "errno": wire_errno(errno)}


@dataclass(frozen=True, slots=True)
class Method:
    name: str
    schema: Schema
    handler: Handler
    # Run one at a time in arrival order (by one task per connection, not a task each): for
    # frequent requests of one sender that are carried out in order anyway (replication,
    # posted writes). Requests of other methods on that connection do not wait for them.
    in_order: bool = False


class Methods:
    """The methods a server offers: name -> (args schema, handler).

    The args map of a request is checked against the schema (exact keys,
    types, sizes; ``frames.validate_fields``) before the handler sees it.
    Nested containers are only checked for their outer type: a handler must
    treat their contents as untrusted.
    """

    def __init__(self) -> None:
        self._methods: dict[str, Method] = {}

    def add(self, name: str, schema: Schema, handler: Handler, *, in_order: bool = False) -> None:
        if not name or len(name) > MAX_METHOD_NAME:
            raise ValueError(f"method name {name!r}: 1..{MAX_METHOD_NAME} characters")
        if name in self._methods:
            raise ValueError(f"method {name!r} is already registered")
        self._methods[name] = Method(name, dict(schema), handler, in_order)

    def method(self, name: str, schema: Schema) -> Callable[[Handler], Handler]:
        """Decorator form of ``add``."""

        def deco(handler: Handler) -> Handler:
            self.add(name, schema, handler)
            return handler

        return deco

    def get(self, name: str) -> Method | None:
        return self._methods.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._methods

    def __iter__(self) -> Iterator[str]:
        return iter(self._methods)

    def __len__(self) -> int:
        return len(self._methods)


async def dispatch(
    methods: Methods,
    peer: str,
    body: dict[str, Any],
    *,
    label: str = "rpc",
    on_bug: Callable[[], None] | None = None,
) -> tuple[MessageType, dict[str, Any]]:
    """Run one request against ``methods``: (RESPONSE or ERROR, body); raises only Cancelled.

    Unknown methods answer ENOSYS, arguments that fail the method's schema EINVAL
    (the handler never sees them), an FsError its errno; anything else is a bug:
    logged with its traceback and answered EIO.
    """
    name: str = body["m"]
    method = methods.get(name)
    if method is None:
        return MessageType.ERROR, error_body(_errno.ENOSYS, f"unknown method {name!r}")
    try:
        args = validate_fields(name, method.schema, body["a"])
    except ProtocolError as exc:
        return MessageType.ERROR, error_body(_errno.EINVAL, f"invalid arguments: {exc}")
    try:
        result = await method.handler(peer, args)
    except FsError as exc:
        return MessageType.ERROR, error_body(exc.errno, str(exc))
    except Exception:
        if on_bug is not None:
            on_bug()
        log.exception(
            "%s in %s method %r called by %s; answering EIO", BUG_MARKER, label, name, peer
        )
        return MessageType.ERROR, error_body(_errno.EIO, "internal error")
    return MessageType.RESPONSE, {"r": result}
