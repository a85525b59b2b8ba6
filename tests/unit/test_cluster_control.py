"""The local control socket: mode 0600, framed requests without a handshake, hostile input."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from dfs.cluster.control import (
    SOCKET_NAME,
    ControlError,
    ControlServer,
    arequest,
    request,
    socket_path,
)
from dfs.errors import FsError
from dfs.net.frames import HEADER, Field, MessageType, encode
from dfs.net.rpc import Methods, RemoteError
from dfs.net.stream import MessageStream
from tests.waiting import DEADLINE


def methods() -> Methods:
    m = Methods()

    async def status(peer: str, a: dict[str, Any]) -> dict[str, Any]:
        return {"peer": peer, "node": "n1", "peers": [{"name": "n2", "state": "reachable"}]}

    async def add(peer: str, a: dict[str, Any]) -> int:
        return int(a["a"] + a["b"])

    async def fail(peer: str, a: dict[str, Any]) -> None:
        raise FsError(errno.EROFS, "read-only for now")

    async def boom(peer: str, a: dict[str, Any]) -> None:
        raise RuntimeError("a bug in a control handler")

    async def unsendable(peer: str, a: dict[str, Any]) -> object:
        return object()

    m.add("status", {}, status)
    m.add("add", {"a": Field(int), "b": Field(int)}, add)
    m.add("fail", {}, fail)
    m.add("boom", {}, boom)
    m.add("unsendable", {}, unsendable)
    return m


@asynccontextmanager
async def serving(path: Path) -> AsyncIterator[ControlServer]:
    server = ControlServer(path, methods())
    async with trio.open_nursery() as nursery:
        assert await nursery.start(server.run) == path
        yield server
        nursery.cancel_scope.cancel()


async def raw_connect(path: Path) -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(str(path))
    return trio.SocketStream(sock)


def test_status_round_trip_and_mode(tmp_path: Path) -> None:
    path = socket_path(tmp_path)
    assert path.name == SOCKET_NAME

    async def main() -> None:
        async with serving(path):
            st = os.stat(path)
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
            assert os.listdir(tmp_path) == [SOCKET_NAME]  # no temporary left
            result = await arequest(path, "status")
            assert result["peer"] == "local" and result["node"] == "n1"
            # The blocking client, as tools use it.
            sync = await trio.to_thread.run_sync(request, path, "status")
            assert sync == result
            assert await trio.to_thread.run_sync(request, path, "add", {"a": 2, "b": 40}) == 42
        assert not path.exists()  # removed when the server stops

    trio.run(main)


def test_errors_travel_as_errnos(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / SOCKET_NAME

    async def main() -> None:
        async with serving(path):
            cases: list[tuple[str, dict[str, Any], int]] = [
                ("nope", {}, errno.ENOSYS),
                ("add", {"a": 1}, errno.EINVAL),
                ("add", {"a": 1, "b": "x"}, errno.EINVAL),
                ("fail", {}, errno.EROFS),
                ("boom", {}, errno.EIO),
                ("unsendable", {}, errno.EIO),
            ]
            for method, args, code in cases:
                with pytest.raises(RemoteError) as info:
                    await arequest(path, method, args)
                assert info.value.errno == code, method
            assert await arequest(path, "status")  # still serving

    with caplog.at_level(logging.WARNING):
        trio.run(main)
    bugs = [r for r in caplog.records if "UNEXPECTED EXCEPTION" in r.getMessage()]
    assert len(bugs) == 2


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        HEADER.pack(64 << 20),  # oversize
        encode(MessageType.RESPONSE, 1, {"r": 1}),  # not a request
        encode(MessageType.HELLO, 0, {"proto": 1, "cluster": "c", "node": "n", "nonce": b"x"}),
        HEADER.pack(3) + b"\xc1\xc1\xc1",  # not msgpack
    ],
)
def test_garbage_closes_only_that_connection(
    tmp_path: Path, garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / SOCKET_NAME

    async def main() -> None:
        async with serving(path):
            other = MessageStream(await raw_connect(path))
            bad = await raw_connect(path)
            await bad.send_all(garbage)
            with trio.fail_after(DEADLINE):
                assert await bad.receive_some(100) == b""  # closed by the server
            await bad.aclose()
            # Another client, connected all along, is unaffected; so are new ones.
            await other.send(MessageType.REQUEST, 7, {"m": "add", "a": {"a": 1, "b": 1}})
            msg = await other.receive()
            assert msg.type is MessageType.RESPONSE and msg.request_id == 7 and msg.body["r"] == 2
            await other.aclose()
            assert (await arequest(path, "status"))["node"] == "n1"

    with caplog.at_level(logging.WARNING):
        trio.run(main)
    assert not [r for r in caplog.records if "UNEXPECTED EXCEPTION" in r.getMessage()]


def test_many_requests_on_one_connection(tmp_path: Path) -> None:
    path = tmp_path / SOCKET_NAME

    async def main() -> None:
        async with serving(path):
            ms = MessageStream(await raw_connect(path))
            for i in range(1, 50):
                await ms.send(MessageType.REQUEST, i, {"m": "add", "a": {"a": i, "b": 1}})
                msg = await ms.receive()
                assert (msg.request_id, msg.body["r"]) == (i, i + 1)
            await ms.aclose()

    trio.run(main)


def test_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / SOCKET_NAME
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(str(path))  # bound, never listening: what a killed daemon leaves
    old.close()
    with pytest.raises(ControlError):
        request(path, "status", timeout=2)

    async def main() -> None:
        async with serving(path):
            assert (await arequest(path, "status"))["node"] == "n1"

    trio.run(main)


def test_a_path_longer_than_a_socket_address(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / SOCKET_NAME
    assert len(str(path)) > 108

    async def main() -> None:
        async with serving(path):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            assert (await arequest(path, "status"))["node"] == "n1"
            assert (await trio.to_thread.run_sync(request, path, "status"))["node"] == "n1"
        assert not path.exists()

    trio.run(main)


def test_no_daemon_is_a_control_error(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="No such file"):
        request(tmp_path / SOCKET_NAME, "status")
    with pytest.raises(ControlError, match="No such file"):
        request(tmp_path / "missing-dir" / SOCKET_NAME, "status")
    (tmp_path / "plain").write_text("not a socket")
    with pytest.raises(ControlError):
        request(tmp_path / "plain", "status")

    async def main() -> None:
        with pytest.raises(ControlError, match="No such file"):
            await arequest(tmp_path / SOCKET_NAME, "status")

    trio.run(main)


def test_a_silent_daemon_times_out(tmp_path: Path) -> None:
    path = tmp_path / SOCKET_NAME
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)  # accepts (in the backlog) but never answers
    try:
        with pytest.raises(ControlError, match="no answer within"):
            request(path, "status", timeout=0.3)

        async def main() -> None:
            with pytest.raises(ControlError, match="no answer within"):
                await arequest(path, "status", timeout=0.3)

        trio.run(main)
    finally:
        listener.close()
