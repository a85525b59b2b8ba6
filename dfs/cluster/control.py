"""The local control socket: how tools ask a running daemon what it knows.

A unix stream socket at ``DATA_DIR/control.sock`` with mode 0600: only the
daemon's user (root) can connect, and that file mode is the whole of the
trust, so there is no cluster handshake. The framing is the wire protocol's
(``dfs.net.frames``): the client sends REQUEST ``{"m": method, "a": args}``
frames and gets one RESPONSE ``{"r": result}`` or ERROR ``{"reason", "errno"}``
with the same request id for each; frames are capped at ``CONTROL_MAX_FRAME``.
Methods come from a ``Methods`` registry and their arguments are validated as
for RPC; handlers see the peer name ``"local"``. Anything malformed closes that
connection only.

Server: ``ControlServer(path, methods).run`` (for ``nursery.start``). It binds
under a temporary name, sets mode 0600 and only then renames the socket into
place, so it is never reachable with a looser mode; a socket file left by a
daemon that died is replaced (the daemon holds the data directory lock, so no
live daemon owns it). The file is removed when the server stops.

Clients: ``request`` (blocking, for tools) and ``arequest`` (trio). Both
raise ``ControlError`` when the daemon cannot be reached or answers garbage,
and ``RemoteError`` for an ERROR answer. Paths longer than a unix socket
address allows are reached through ``/proc/self/fd``.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import trio

from dfs.errors import BUG_MARKER
from dfs.net.frames import (
    FrameBuffer,
    Message,
    MessageType,
    ProtocolError,
    decode,
    encode,
)
from dfs.net.rpc import Methods, RemoteError, dispatch, error_body, wire_errno
from dfs.net.stream import MessageStream

log = logging.getLogger("dfs.cluster.control")

SOCKET_NAME = "control.sock"
CONTROL_MAX_FRAME = 1 << 20
MAX_CLIENTS = 16
LOCAL_PEER = "local"
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)


class ControlError(Exception):
    """The daemon's control socket cannot be used (no daemon, refused, garbage)."""


def socket_path(data_dir: Path) -> Path:
    return data_dir / SOCKET_NAME


@contextmanager
def _directory(path: Path) -> Iterator[tuple[int, str]]:
    """An O_PATH descriptor of ``path``'s directory and an address for ``path`` that fits."""
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        full = str(path)
        if len(os.fsencode(full)) > _SUN_PATH_MAX:
            full = f"/proc/self/fd/{fd}/{path.name}"
        yield fd, full
    finally:
        os.close(fd)


class ControlServer:
    """Serves ``methods`` on a unix socket at ``path`` (mode 0600) until cancelled."""

    def __init__(
        self,
        path: Path,
        methods: Methods,
        *,
        max_frame: int = CONTROL_MAX_FRAME,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self.path = path
        self.methods = methods
        self.max_frame = max_frame
        self._clients = trio.CapacityLimiter(max_clients)

    async def run(self, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await self._bind(sock)
        except BaseException:
            sock.close()
            raise
        try:
            sock.listen(MAX_CLIENTS)
            listener = trio.SocketListener(sock)
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self.handle_stream, [listener])
                log.info("control socket at %s", self.path)
                task_status.started(self.path)
        finally:
            sock.close()
            with suppress(FileNotFoundError):
                os.unlink(self.path)

    async def _bind(self, sock: trio.socket.SocketType) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        with _directory(tmp) as (dirfd, address):
            for name in (tmp.name, self.path.name):
                with suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=dirfd)
            await sock.bind(address)
            try:
                os.chmod(tmp.name, 0o600, dir_fd=dirfd)
                os.replace(tmp.name, self.path.name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
            except BaseException:
                os.unlink(tmp.name, dir_fd=dirfd)
                raise

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one client until it closes; closes ``stream``; never raises but Cancelled."""
        try:
            self._clients.acquire_nowait()
        except trio.WouldBlock:
            log.warning("control: more than %d clients at once; refusing one", MAX_CLIENTS)
            await trio.aclose_forcefully(stream)
            return
        ms = MessageStream(stream, self.max_frame)
        try:
            while True:
                msg = await ms.receive()
                if msg.type is not MessageType.REQUEST:
                    raise ProtocolError(f"unexpected {msg.type.name} message")
                mtype, body = await dispatch(self.methods, LOCAL_PEER, msg.body, label="control")
                try:
                    await ms.send(mtype, msg.request_id, body)
                except (ValueError, TypeError) as exc:  # not encodable: nothing was sent
                    log.error("%s: control answer cannot be sent: %s", BUG_MARKER, exc)
                    await ms.send(
                        MessageType.ERROR, msg.request_id, error_body(errno.EIO, "internal error")
                    )
        except EOFError:
            pass
        except ProtocolError as exc:
            log.warning("control: protocol error, closing the connection: %s", exc)
        except _GONE:
            pass
        except Exception:
            log.exception("%s in a control connection", BUG_MARKER)
        finally:
            self._clients.release()
            await trio.aclose_forcefully(stream)


# --- clients ---------------------------------------------------------------------------------


def _answer(msg: Message, request_id: int, path: Path) -> Any:
    if msg.request_id != request_id:
        raise ControlError(f"{path}: answer to request {msg.request_id}, expected {request_id}")
    if msg.type is MessageType.RESPONSE:
        return msg.body["r"]
    if msg.type is MessageType.ERROR:
        raise RemoteError(wire_errno(msg.body.get("errno")), msg.body["reason"], LOCAL_PEER)
    raise ControlError(f"{path}: unexpected {msg.type.name} answer")


def request(
    path: Path,
    method: str,
    args: Mapping[str, Any] | None = None,
    *,
    timeout: float = 5.0,
    max_frame: int = CONTROL_MAX_FRAME,
) -> Any:
    """Call ``method`` on the daemon behind ``path`` (blocking) and return its result."""
    data = encode(MessageType.REQUEST, 1, {"m": method, "a": dict(args or {})})
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, _directory(path) as (_, a):
            s.settimeout(timeout)
            s.connect(a)
            s.sendall(data)
            buf = FrameBuffer(max_frame)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("timed out")
                s.settimeout(left)
                chunk = s.recv(65536)
                if not chunk:
                    raise ControlError(f"{path}: the daemon closed the connection")
                buf.feed(chunk)
                for payload in buf.frames():
                    return _answer(decode(payload, max_frame), 1, path)
    except TimeoutError:
        raise ControlError(f"{path}: no answer within {timeout:g}s") from None
    except OSError as exc:
        raise ControlError(f"{path}: {exc.strerror or exc}") from None
    except ProtocolError as exc:
        raise ControlError(f"{path}: malformed answer: {exc}") from None


async def arequest(
    path: Path,
    method: str,
    args: Mapping[str, Any] | None = None,
    *,
    timeout: float = 5.0,  # noqa: ASYNC109 - mirrors request()
    max_frame: int = CONTROL_MAX_FRAME,
) -> Any:
    """``request`` for trio callers."""
    try:
        with trio.fail_after(timeout), _directory(path) as (_, address):
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await sock.connect(address)
            except BaseException:
                sock.close()
                raise
            async with trio.SocketStream(sock) as stream:
                ms = MessageStream(stream, max_frame)
                await ms.send(MessageType.REQUEST, 1, {"m": method, "a": dict(args or {})})
                return _answer(await ms.receive(), 1, path)
    except trio.TooSlowError:
        raise ControlError(f"{path}: no answer within {timeout:g}s") from None
    except EOFError:
        raise ControlError(f"{path}: the daemon closed the connection") from None
    except (OSError, *_GONE) as exc:
        raise ControlError(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None
    except ProtocolError as exc:
        raise ControlError(f"{path}: malformed answer: {exc}") from None
