"""Remote reads of a replica (dfs/cluster/remote.py) and per-host views (dfs/cluster/views.py).

Two node cores on real lmdb stores in tmp_path ("a" and "b", different
contents), their ``r.*`` methods served by real ``RpcServer``s over in-memory
streams (the whole wire path: frames, handshake, schemas, msgpack), read
through ``RemoteReader``/``LocalReader`` and ``HostViews``; the answers are
compared with what each ``Vfs`` says locally.
"""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from dfs.cluster import views as V
from dfs.cluster.remote import (
    MAX_READ,
    LocalReader,
    Reader,
    RemoteReader,
    is_stored_inode,
    pack_attr,
    register_read_methods,
    unpack_attr,
)
from dfs.cluster.views import DOTS_INODE, VIEW_DIR_NAME, HostViews, is_view
from dfs.config import Timeouts
from dfs.errors import FsError
from dfs.fs.vfs import DirEntry
from dfs.meta import schema as S
from dfs.net.peer import Connector, Peer
from dfs.net.rpc import Methods
from dfs.net.server import RpcServer
from dfs.types import ROOT_INODE, Attr, InodeId, NodeId, make_inode_id
from tests.core.harness import Core
from tests.unit.test_rpc import trio_test

SECRET = b"v" * 32
CLUSTER = "views"
TIMEOUTS = Timeouts(connect=1.0, call=2.0, heartbeat=1.0)
BIG = bytes(range(256)) * 1200  # 300 KiB: data file, several blocks, threaded reads
PATHS = ["/", "/docs", "/docs/a.txt", "/docs/sub", "/docs/sub/deep", "/big", "/ln", "/empty"]


CONTENTS = {"a": b"hello from a\n", "b": b"b has another a.txt\n"}


def fill_a(c: Core) -> None:
    c.mkdir("/docs")
    c.write_file("/docs/a.txt", CONTENTS["a"])
    c.mkdir("/docs/sub")
    c.mkdir("/docs/sub/deep")
    for i in range(9):
        c.write_file(f"/docs/sub/f{i}", f"file {i}\n".encode())
    c.write_file("/big", BIG)
    c.symlink("/ln", b"docs/a.txt")
    c.write_file("/empty", b"")
    c.vfs.setxattr(c.ino("/docs/a.txt"), b"user.colour", b"blue")
    c.vfs.setxattr(c.ino("/docs/a.txt"), b"user.shape", b"\x00round")


def fill_b(c: Core) -> None:
    c.mkdir("/docs")  # the same inode numbers as a's /docs and /docs/a.txt
    c.write_file("/docs/a.txt", CONTENTS["b"])
    c.write_file("/only-on-b", b"b's own file\n")


@pytest.fixture
def cores(tmp_path: Path) -> Iterator[dict[str, Core]]:
    out = {"a": Core(tmp_path / "a"), "b": Core(tmp_path / "b")}
    try:
        fill_a(out["a"])
        fill_b(out["b"])
        for c in out.values():
            c.settle()  # as if the kernel had let go: no references, no handles
        yield out
        for c in out.values():
            assert not c.findings()
    finally:
        for c in out.values():
            c.close()


def served(core: Core, name: str) -> RpcServer:
    methods = Methods()
    register_read_methods(methods, core.vfs)
    return RpcServer(
        cluster_id=CLUSTER,
        node_name=name,
        secret=SECRET,
        known={"me", "a", "b"},
        methods=methods,
    )


def memory_connector(nursery: trio.Nursery, server: RpcServer) -> Connector:
    async def connect() -> trio.abc.Stream:
        client, server_side = trio.testing.memory_stream_pair()
        nursery.start_soon(server.handle_stream, server_side)
        return client

    return connect


def peer(nursery: trio.Nursery, name: str, connector: Connector) -> Peer:
    return Peer(
        name,
        "memory",
        0,
        secret=SECRET,
        cluster_id=CLUSTER,
        my_name="me",
        timeouts=TIMEOUTS,
        nursery=nursery,
        connector=connector,
    )


@asynccontextmanager
async def network(
    cores: dict[str, Core], readdir_limit: int = 256
) -> AsyncIterator[tuple[dict[str, Peer], dict[str, RemoteReader], dict[str, RpcServer]]]:
    async with trio.open_nursery() as nursery:
        servers = {n: served(c, n) for n, c in cores.items()}
        peers = {n: peer(nursery, n, memory_connector(nursery, s)) for n, s in servers.items()}
        readers = {n: RemoteReader(p, readdir_limit=readdir_limit) for n, p in peers.items()}
        yield peers, readers, servers
        for s in servers.values():
            assert s.statistics().handler_errors == 0
        nursery.cancel_scope.cancel()


async def errno_of(coro: Awaitable[Any]) -> int:
    with pytest.raises(FsError) as info:
        await coro
    return info.value.errno


async def listing(r: Reader, ino: InodeId) -> list[DirEntry]:
    out: list[DirEntry] = []
    start = 0
    while batch := await r.readdir(ino, start):
        out += batch
        start = batch[-1].cookie
    return out


def journal_state(c: Core) -> tuple[int, int]:
    with c.meta.read() as txn:
        seq = txn.get(S.seq_key(1), db=c.meta.meta)
        return S.read_u64(seq) if seq else 0, int(txn.stat(c.meta.journal)["entries"])


# --- RemoteReader and LocalReader against the Vfs ----------------------------------------------


@trio_test()
async def test_readers_answer_what_the_store_has(cores: dict[str, Core]) -> None:
    a = cores["a"]
    before = journal_state(a)
    async with network(cores, readdir_limit=2) as (_, readers, _):
        for r in (readers["a"], LocalReader(a.vfs, readdir_limit=3)):
            for path in PATHS:
                want = a.resolve(path)
                assert await r.getattr(want.ino) == want
                head, _, name = path.rstrip("/").rpartition("/")
                if name:
                    assert await r.lookup(a.ino(head), name.encode()) == want
            docs = a.ino("/docs")
            assert await r.lookup(docs, b"missing") is None
            assert await r.lookup(docs, b".") == a.resolve("/docs")
            assert await r.lookup(docs, b"..") == a.resolve("/")
            for path in ("/", "/docs", "/docs/sub"):
                assert await listing(r, a.ino(path)) == list(a.vfs.readdir(a.ino(path)))
            big = a.ino("/big")
            assert await r.read(big, 0, len(BIG) + 10) == BIG
            assert await r.read(big, 65530, 70000) == BIG[65530 : 65530 + 70000]
            assert await r.read(big, len(BIG) + 5, 10) == b""
            assert await r.read(a.ino("/empty"), 0, 10) == b""
            assert await r.read(a.ino("/docs/a.txt"), 6, 4) == b"from"
            assert await r.readlink(a.ino("/ln")) == b"docs/a.txt"
            txt = a.ino("/docs/a.txt")
            assert await r.getxattr(txt, b"user.shape") == b"\x00round"
            assert sorted(await r.listxattr(txt)) == [b"user.colour", b"user.shape"]
            assert await r.listxattr(big) == []
            # errors travel as errno
            assert await errno_of(r.getattr(make_inode_id(a.meta.identity.node_id, 999))) == (
                errno.ENOENT
            )
            assert await errno_of(r.lookup(txt, b"x")) == errno.ENOTDIR
            assert await errno_of(r.lookup(docs, b"n" * 256)) == errno.ENAMETOOLONG
            assert await errno_of(r.read(docs, 0, 10)) == errno.EISDIR
            assert await errno_of(r.read(a.ino("/ln"), 0, 10)) == errno.ELOOP
            assert await errno_of(r.readlink(txt)) == errno.EINVAL
            assert await errno_of(r.readdir(txt)) == errno.ENOTDIR
            assert await errno_of(r.getxattr(txt, b"user.nope")) == errno.ENODATA
            assert await errno_of(r.getxattr(txt, b"user." + b"x" * 300)) == errno.ERANGE
            assert await errno_of(r.getxattr(txt, b"other.x")) == errno.EOPNOTSUPP
    # Reading changed nothing: no journal record, no kernel reference, no open handle.
    assert journal_state(a) == before
    assert a.vfs.lookups == {}
    assert not a.vfs.files._handles


@trio_test()
async def test_reads_larger_than_one_call_are_split(cores: dict[str, Core]) -> None:
    a = cores["a"]
    size = MAX_READ + 100_000
    fh, attr = a.vfs.create(ROOT_INODE, b"huge", 0o644, os.O_RDWR, a.ctx)
    await a.vfs.files.write(fh, 0, b"h" * size)
    await a.vfs.files.release(fh)
    async with network(cores) as (_, readers, servers):
        served_before = servers["a"].statistics().requests_served
        got = await readers["a"].read(attr.ino, 0, size + 1)
        assert got == b"h" * size
        assert servers["a"].statistics().requests_served - served_before == 2


@trio_test()
async def test_schema_refuses_oversize_and_ill_typed_arguments(cores: dict[str, Core]) -> None:
    ino = int(cores["a"].ino("/docs/a.txt"))
    bad: list[tuple[str, dict[str, Any]]] = [
        ("r.lookup", {"parent": 1, "name": b"n" * 256}),
        ("r.lookup", {"parent": 1, "name": "a string"}),
        ("r.lookup", {"parent": -1, "name": b"docs"}),
        ("r.lookup", {"parent": True, "name": b"docs"}),
        ("r.lookup", {"parent": 1}),
        ("r.getattr", {"ino": 1, "extra": 1}),
        ("r.getattr", {"ino": 0}),
        ("r.getattr", {"ino": b"1"}),
        ("r.readdir", {"ino": 1, "start": 0, "limit": 1025}),
        ("r.readdir", {"ino": 1, "start": 0, "limit": 0}),
        ("r.readdir", {"ino": 1, "start": -1, "limit": 10}),
        ("r.read", {"ino": ino, "off": 0, "size": MAX_READ + 1}),
        ("r.read", {"ino": ino, "off": -1, "size": 10}),
        ("r.read", {"ino": ino, "off": 0, "size": 1.5}),
        ("r.getxattr", {"ino": ino, "name": b"user." + b"x" * 251}),
        ("r.listxattr", {"ino": [ino]}),
    ]
    async with network(cores) as (peers, _, _):
        for method, args in bad:
            with pytest.raises(FsError) as info:
                await peers["a"].call(method, args)
            assert info.value.errno == errno.EINVAL, (method, args)
        # the largest allowed values pass
        assert await peers["a"].call("r.read", {"ino": ino, "off": 0, "size": MAX_READ}) == (
            b"hello from a\n"
        )
        got = await peers["a"].call("r.readdir", {"ino": 1, "start": 0, "limit": 1024})
        assert len(got) == len(list(cores["a"].vfs.readdir(ROOT_INODE)))


@trio_test()
async def test_reading_an_unlinked_file_never_purges_it(cores: dict[str, Core]) -> None:
    a = cores["a"]
    fh, attr = a.vfs.create(ROOT_INODE, b"gone", 0o644, os.O_RDWR, a.ctx)
    await a.vfs.files.write(fh, 0, b"still here")
    await a.vfs.files.release(fh)
    a.vfs.forget([(attr.ino, 1)])
    ino = attr.ino
    a.vfs.lookup(ROOT_INODE, b"gone")  # the kernel holds it
    a.vfs.unlink(ROOT_INODE, b"gone")
    async with network(cores) as (_, readers, _):
        assert await readers["a"].read(ino, 0, 100) == b"still here"
        assert a.vfs.getattr(ino).nlink == 0
        # As on a replica, where an orphan is the primary's and no kernel here holds it:
        # the last release would purge it, so the read is refused and the inode stays.
        a.vfs.lookups.pop(ino)
        assert await errno_of(readers["a"].read(ino, 0, 100)) == errno.ENOENT
        assert a.vfs.getattr(ino).nlink == 0
    a.vfs.forget([(ino, 1)])  # purges it
    assert await errno_of(LocalReader(a.vfs).read(ino, 0, 1)) == errno.ENOENT


class Canned:
    """A peer that answers every call with one canned value."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer

    async def call(self, method: str, args: Any, *, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        await trio.lowlevel.checkpoint()
        return self.answer


@trio_test()
async def test_ill_formed_answers_are_eio() -> None:
    root = Attr(ROOT_INODE, 0o40755, 0, 0, 2, 0, 1, 2, 3, 4)
    good = pack_attr(root)
    assert unpack_attr(good) == root
    for junk in (
        None,
        [],
        [1],
        [1, b"short"],
        ["1", good[1]],
        [0, good[1]],
        [5, good[1]],  # a view-range number, not a stored inode
        [1 << 64, good[1]],
        [1, good[1].decode("latin-1")],
    ):
        with pytest.raises(FsError) as info:
            unpack_attr(junk)
        assert info.value.errno == errno.EIO
    top = ROOT_INODE
    calls: list[tuple[Any, Callable[[RemoteReader], Awaitable[Any]]]] = [
        ([2, good[1]], lambda r: r.getattr(ROOT_INODE)),  # another inode than asked
        ({"x": 1}, lambda r: r.lookup(ROOT_INODE, b"x")),
        ("text", lambda r: r.read(ROOT_INODE, 0, 4)),
        (b"toolong", lambda r: r.read(ROOT_INODE, 0, 4)),
        (b"", lambda r: r.readlink(ROOT_INODE)),
        (b"x" * (S.MAX_XATTR_VALUE + 1), lambda r: r.getxattr(ROOT_INODE, b"user.x")),
        ([b"user.a", "user.b"], lambda r: r.listxattr(ROOT_INODE)),
        ("not a list", lambda r: r.readdir(ROOT_INODE)),
        ([[b"a", good]], lambda r: r.readdir(ROOT_INODE)),
        ([[b"a/b", good, 3]], lambda r: r.readdir(ROOT_INODE)),
        ([[b"a", good, 4], [b"b", good, 4]], lambda r: r.readdir(ROOT_INODE)),  # no progress
        ([[b"a", good, 5]], lambda r: r.readdir(ROOT_INODE, 5)),
        ([[b"a", good, 3]] * 3, lambda r: RemoteReader(r.peer, readdir_limit=2).readdir(top)),
    ]
    for answer, op in calls:
        reader = RemoteReader(Canned(answer))
        with pytest.raises(FsError) as info:
            await op(reader)
        assert info.value.errno == errno.EIO, answer


@trio_test()
async def test_remote_read_while_a_local_writer_is_unsettled_writes_nothing(
    cores: dict[str, Core],
) -> None:
    a = cores["a"]
    fh = a.vfs.files.open(a.ino("/big"), os.O_RDWR)
    await a.vfs.files.write(fh, 10, b"partial block")
    before = journal_state(a)
    try:
        async with network(cores) as (_, readers, _):
            assert await readers["a"].read(a.ino("/big"), 10, 13) == b"partial block"
        assert journal_state(a) == before
    finally:
        await a.vfs.files.release(fh)


# --- HostViews ---------------------------------------------------------------------------------


def local_and_remote(cores: dict[str, Core], readers: dict[str, RemoteReader]) -> HostViews:
    """This node is "a" (read locally); "b" is read over RPC."""
    root = cores["a"].vfs.getattr(ROOT_INODE)
    return HostViews(
        {"a": LocalReader(cores["a"].vfs), "b": readers["b"]}, root=lambda: replace(root)
    )


async def walk(views: HostViews, host: str, path: str) -> Attr:
    a = await views.lookup(DOTS_INODE, host.encode())
    for part in path.strip("/").split("/"):
        if part:
            a = await views.lookup(a.ino, part.encode())
    return a


@trio_test()
async def test_dots_lists_the_hosts(cores: dict[str, Core]) -> None:
    async with network(cores) as (_, readers, _):
        views = local_and_remote(cores, readers)
        assert VIEW_DIR_NAME == b"..."
        dots = views.dots_attr()
        assert (dots.ino, dots.mode, dots.uid, dots.gid) == (DOTS_INODE, 0o40555, 0, 0)
        assert await views.getattr(DOTS_INODE) == dots
        ents = await views.readdir(DOTS_INODE)
        assert [e.name for e in ents] == [b".", b"..", b"a", b"b"]
        assert [e.cookie for e in ents] == [1, 2, 3, 4]
        assert ents[1].attr == cores["a"].vfs.getattr(ROOT_INODE)
        for e in ents[2:]:
            host = e.name.decode()
            want = replace(cores[host].vfs.getattr(ROOT_INODE), ino=views.host_inode(host))
            assert e.attr == want
            assert await views.lookup(DOTS_INODE, e.name) == want
            assert await views.getattr(e.attr.ino) == want
            assert views.real(e.attr.ino) == (host, ROOT_INODE)
        # resuming after each cookie
        for i, e in enumerate(ents):
            assert await views.readdir(DOTS_INODE, e.cookie) == ents[i + 1 :]
        assert await errno_of(views.lookup(DOTS_INODE, b"c")) == errno.ENOENT
        assert await views.lookup(DOTS_INODE, b".") == dots
        assert await errno_of(views.read(DOTS_INODE, 0, 1)) == errno.EISDIR
        assert await errno_of(views.getxattr(DOTS_INODE, b"user.x")) == errno.ENODATA
        assert await views.listxattr(DOTS_INODE) == []
        with pytest.raises(FsError) as info:
            views.real(DOTS_INODE)
        assert info.value.errno == errno.EPERM


@trio_test()
async def test_views_map_inodes_consistently(cores: dict[str, Core]) -> None:
    async with network(cores, readdir_limit=2) as (_, readers, _):
        views = local_and_remote(cores, readers)
        for host in ("a", "b"):
            c = cores[host]
            v = await walk(views, host, "/docs/a.txt")
            want = c.resolve("/docs/a.txt")
            assert is_view(v.ino) and not is_stored_inode(v.ino)
            assert v == replace(want, ino=v.ino)  # everything but the number is the host's
            assert views.real(v.ino) == (host, want.ino)
            assert (await walk(views, host, "/docs/a.txt")).ino == v.ino
            assert await views.getattr(v.ino) == v
            assert await views.read(v.ino, 0, 100) == CONTENTS[host]
            docs = await walk(views, host, "/docs")
            listed = {e.name: e.attr for e in await listing(views, docs.ino)}
            assert listed[b"a.txt"] == v
            assert listed[b"."] == docs
            assert listed[b".."].ino == views.host_inode(host)
            assert (await views.lookup(docs.ino, b"..")).ino == views.host_inode(host)
            assert await views.lookup(views.host_inode(host), b"..") == views.dots_attr()
        # "a" and "b" allocated the same real inode numbers; the views tell them apart
        a_txt, b_txt = await walk(views, "a", "/docs/a.txt"), await walk(views, "b", "/docs/a.txt")
        assert cores["a"].ino("/docs/a.txt") == cores["b"].ino("/docs/a.txt")
        assert a_txt.ino != b_txt.ino
        # contents, links and xattrs of host a through the view
        big = await walk(views, "a", "/big")
        assert await views.read(big.ino, 0, len(BIG)) == BIG
        ln = await walk(views, "a", "/ln")
        assert await views.readlink(ln.ino) == b"docs/a.txt"
        assert await views.getxattr(a_txt.ino, b"user.colour") == b"blue"
        assert sorted(await views.listxattr(a_txt.ino)) == [b"user.colour", b"user.shape"]
        assert await errno_of(walk(views, "b", "/big")) == errno.ENOENT
        assert (await walk(views, "b", "/only-on-b")).size == len(b"b's own file\n")


@trio_test()
async def test_view_readdir_resumes_from_any_cookie(cores: dict[str, Core]) -> None:
    async with network(cores, readdir_limit=3) as (_, readers, _):
        views = local_and_remote(cores, readers)
        for host in ("a", "b"):
            sub = await walk(views, host, "/docs/sub" if host == "a" else "/")
            real_dir = views.real(sub.ino)[1]
            want = list(cores[host].vfs.readdir(real_dir))
            got = await listing(views, sub.ino)
            assert [(e.name, e.cookie) for e in got] == [(e.name, e.cookie) for e in want]
            for e_got, e_want in zip(got, want, strict=True):
                if e_got.name == b".." and e_want.attr.ino == ROOT_INODE:
                    assert e_got.attr == views.dots_attr()  # the host directory's parent
                    continue
                assert views.real(e_got.attr.ino) == (host, e_want.attr.ino)
                assert e_got.attr == replace(e_want.attr, ino=e_got.attr.ino)
            for i, e in enumerate(want):
                rest: list[DirEntry] = []
                start = e.cookie
                while batch := await views.readdir(sub.ino, start):
                    rest += batch
                    start = batch[-1].cookie
                assert [x.name for x in rest] == [x.name for x in want[i + 1 :]]


@trio_test()
async def test_forget_and_unaccepted_readdir_entries_bound_the_table(
    cores: dict[str, Core], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(V, "MAX_UNCONFIRMED", 4)
    async with network(cores) as (_, readers, _):
        views = local_and_remote(cores, readers)
        docs = await walk(views, "a", "/docs")  # maps /docs
        txt = await views.lookup(docs.ino, b"a.txt")
        await views.lookup(docs.ino, b"a.txt")
        assert views.statistics().mapped == 2
        views.forget([(txt.ino, 1)])
        assert views.real(txt.ino)[0] == "a"  # one reference left
        views.forget([(txt.ino, 1)])
        with pytest.raises(FsError) as info:
            views.real(txt.ino)
        assert info.value.errno == errno.ESTALE
        assert views.statistics().mapped == 1
        assert await errno_of(views.getattr(txt.ino)) == errno.ESTALE
        # looked up again: a new number, the old one never comes back
        again = await views.lookup(docs.ino, b"a.txt")
        assert again.ino != txt.ino
        views.forget([(again.ino, 1)])

        # 9 files + deep, none accepted by the kernel: at most MAX_UNCONFIRMED stay mapped
        sub = await views.lookup(docs.ino, b"sub")
        ents = await listing(views, sub.ino)
        assert len(ents) == 12
        st = views.statistics()
        assert st.unconfirmed <= 4 and st.mapped <= 2 + 4
        # entries the kernel accepted stay until forgotten
        batch = await views.readdir(sub.ino, 2)
        for e in batch:
            views.remember(e.attr.ino)
        assert views.statistics().unconfirmed == 0
        await listing(views, docs.ino)  # pushes other entries through the FIFO
        for e in batch:
            assert views.real(e.attr.ino)[0] == "a"
        views.forget([(e.attr.ino, 1) for e in batch])
        views.forget([(sub.ino, 1), (docs.ino, 1)])
        assert views.statistics().mapped == views.statistics().unconfirmed <= 4
        # host directories and ... are not in the table; forgetting them is harmless
        views.forget([(DOTS_INODE, 5), (views.host_inode("a"), 1), (InodeId(1 << 40), 1)])
        assert await views.getattr(views.host_inode("a")) == replace(
            cores["a"].vfs.getattr(ROOT_INODE), ino=views.host_inode("a")
        )


@trio_test(mock_clock=True)
async def test_an_unreachable_host_is_listed_and_fails_within_the_deadline(
    cores: dict[str, Core],
) -> None:
    async def hang() -> trio.abc.Stream:
        await trio.sleep_forever()
        raise AssertionError

    async def refuse() -> trio.abc.Stream:
        raise OSError(errno.ECONNREFUSED, "connection refused")

    async with network(cores) as (_, readers, _), trio.open_nursery() as nursery:
        hosts: dict[str, Reader] = {
            "a": readers["a"],
            "down": RemoteReader(peer(nursery, "down", refuse)),
            "silent": RemoteReader(peer(nursery, "silent", hang)),
        }
        views = HostViews(hosts)
        t0 = trio.current_time()
        ents = await views.readdir(DOTS_INODE)
        assert [e.name for e in ents] == [b".", b"a", b"down", b"silent"]
        # one deadline for all hosts, not one per host
        assert trio.current_time() - t0 <= TIMEOUTS.call
        for name in (b"down", b"silent"):
            d = await views.lookup(DOTS_INODE, name)
            assert d.ino == views.host_inode(name.decode())
            assert (d.mode, d.uid, d.gid) == (0o40555, 0, 0)
            for op in (
                views.lookup(d.ino, b"docs"),
                views.readdir(d.ino),
                views.read(d.ino, 0, 10),
                views.listxattr(d.ino),
            ):
                t0 = trio.current_time()
                assert await errno_of(op) in (errno.EHOSTDOWN, errno.ETIMEDOUT)
                assert trio.current_time() - t0 <= TIMEOUTS.call
        assert (await walk(views, "a", "/docs/a.txt")).size == 13
        nursery.cancel_scope.cancel()


def test_view_inodes_cannot_be_real_inodes() -> None:
    assert not is_view(ROOT_INODE) and not is_view(0)
    assert is_view(DOTS_INODE) and is_view((1 << 48) - 1)
    for node in (1, 0x7FFF, 0x8000, 0xFFFF):
        for counter in (1, 2, (1 << 48) - 1):
            ino = make_inode_id(NodeId(node), counter)
            assert not is_view(ino) and is_stored_inode(ino)
    with pytest.raises(ValueError):
        make_inode_id(NodeId(0), 5)
    with pytest.raises(ValueError):
        HostViews({"a/b": LocalReader.__new__(LocalReader)})
    with pytest.raises(ValueError):
        HostViews({"...": LocalReader.__new__(LocalReader)})


@trio_test()
async def test_a_host_without_the_root_volume_shows_its_volumes_at_their_paths(
    cores: dict[str, Core],
) -> None:
    """``stored``: host b keeps no root replica, only a volume mounted at /x/y/docs (here b's
    /docs directory): its view is synthetic directories down to that volume's root."""
    docs = InodeId(cores["b"].ino("/docs"))
    async with network(cores) as (_, readers, _):
        views = HostViews(
            {"a": LocalReader(cores["a"].vfs), "b": readers["b"]},
            stored=lambda h: None if h == "a" else [("/x/y/docs", docs)],
        )
        host = views.host_inode("b")
        assert [e.name for e in await listing(views, host)] == [b".", b"..", b"x"]
        x = await walk(views, "b", "/x")
        y = await walk(views, "b", "/x/y")
        for d in (x, y, await views.getattr(host)):
            assert (d.mode, d.uid, d.gid, d.nlink) == (0o40555, 0, 0, 2)
        assert [(e.name, e.attr.ino) for e in await listing(views, x.ino)] == [
            (b".", x.ino),
            (b"..", host),
            (b"y", y.ino),
        ]
        ents = await listing(views, y.ino)
        assert [e.name for e in ents] == [b".", b"..", b"docs"]
        assert ents[1].attr.ino == x.ino
        for i, e in enumerate(ents):  # resuming after each cookie
            assert [f.name for f in await views.readdir(y.ino, e.cookie)] == [
                f.name for f in ents[i + 1 :]
            ]
        got = await walk(views, "b", "/x/y/docs/a.txt")
        assert await views.read(got.ino, 0, 100) == CONTENTS["b"]
        d = await walk(views, "b", "/x/y/docs")
        assert views.real(d.ino) == ("b", docs)  # a write there goes to the volume
        assert views.volume_of(docs) == cores["b"].vfs.getattr(docs).volume
        assert views.volume_of(InodeId(docs + 12345)) is None
        for bad in (views.lookup(host, b"docs"), views.lookup(x.ino, b"z")):
            assert await errno_of(bad) == errno.ENOENT
        assert await errno_of(views.read(x.ino, 0, 1)) == errno.EISDIR
        assert await errno_of(views.readlink(x.ino)) == errno.EINVAL
        assert await errno_of(views.getxattr(x.ino, b"user.k")) == errno.ENODATA
        assert await views.listxattr(x.ino) == []
        for synthetic in (x, y):
            with pytest.raises(FsError) as info:
                views.real(synthetic.ino)
            assert info.value.errno == errno.EPERM
        assert views.real(host) == ("b", ROOT_INODE)  # writes there go to the tree's root
        # Host a stores the root volume: its view is its store, as before.
        assert b"docs" in [e.name for e in await listing(views, views.host_inode("a"))]
