"""Updates a storage site forwards to the primary: the site waits for its own replica itself.

A primary and two sites in one process; n2's NodeFs forwards to the primary's
``fs.op`` handler directly (what RPC does). The primary answers once every other
site in sync applied the update; n2 returns once its own replica has it too. If
n2's replica cannot catch up within the call's deadline, the update returns all the
same and n2 sends its reads to the primary until it has caught up — and when the
primary does not answer them, they fail rather than answer from n2's replica, which
lacks the update. A site out of sync does not wait at all: the primary answers the
update's real sequence, and the site reads (and writes) what it made through the
primary until its replica has it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from dfs.cluster.nodefs import NodeFs
from dfs.cluster.remote import LocalReader, Reader
from dfs.cluster.replication import ReplicaApplier, Replicator
from dfs.cluster.roles import VolumeRoles
from dfs.cluster.volumes import Volume, VolumeTable
from dfs.errors import FsError
from dfs.fs.ctx import ROOT_CTX
from dfs.net.rpc import Methods, PeerUnavailable
from dfs.types import ROOT_INODE, ROOT_VOLUME, NodeId
from tests.core.test_replication import Node, serve_ops
from tests.waiting import await_until


def test_a_forwarding_site_applies_the_update_before_it_returns(tmp_path: Path) -> None:
    primary = Node(tmp_path / "n1", 1)
    sites = {name: Node(tmp_path / name, i, replica=True) for i, name in ((2, "n2"), (3, "n3"))}
    gate = {"n2": trio.Event(), "n3": trio.Event()}
    acks: list[str] = []
    root = Volume(ROOT_VOLUME, "/", ROOT_INODE, "n1", ("n1", "n2", "n3"), ROOT_INODE)

    up = {"n1": True}

    def reader(node: str) -> Reader:
        return LocalReader(primary.vfs) if up["n1"] else _Down()  # type: ignore[return-value]

    methods = Methods()

    async def forward(node: str, op: str, args: list[Any], ctx: list[Any]) -> Any:
        handler = methods._methods["fs.op"].handler
        return await handler("n2", {"op": op, "args": args, "ctx": ctx})

    n2 = NodeFs(
        sites["n2"].vfs,
        VolumeRoles(
            "n2", sites["n2"].meta, VolumeTable(sites["n2"].meta, root), always_current=True
        ),
        send=forward,
        reader=reader,
        applied_timeout=5.0,
    )
    appliers = {
        name: ReplicaApplier(
            n.meta, n.data, NodeId(i), applied=n2.applied if name == "n2" else None
        )
        for i, (name, n) in enumerate(sites.items(), start=2)
    }

    async def call(site: str, method: str, args: dict[str, Any], limit: float) -> Any:
        if args["records"]:
            await gate[site].wait()
        have = await appliers[site].apply(args["vol"], args["records"])
        acks.append(site)
        return {"have": have}

    # The primary gives a site up after 3 s without an answer (its Replicator wakes the
    # updates waiting only when the slowest site in sync moves on).
    repl = Replicator(
        primary.meta, primary.data, ROOT_VOLUME, list(sites), call, call_timeout=3.0, lease=3.0
    )
    fs1 = NodeFs(primary.vfs, VolumeRoles.alone(primary.meta, repl))
    serve_ops(fs1, methods)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(repl.run)
            gate["n2"].set()
            gate["n3"].set()
            await await_until(
                "every site in sync", lambda: all(lk.in_sync for lk in repl.links.values())
            )
            a = await n2.mkdir(ROOT_INODE, b"d", 0o755, ROOT_CTX)
            for n in sites.values():  # on every site when it returns, n2 included
                assert n.vfs.peek(ROOT_INODE, b"d") is not None
            d = primary.vfs.peek(ROOT_INODE, b"d")
            assert d is not None and a.ino == d.ino

            # n2 slow: the primary does not wait for it (only for n3), n2 waits for itself.
            gate["n2"] = trio.Event()
            done = trio.Event()

            async def make() -> None:
                await n2.mkdir(ROOT_INODE, b"e", 0o755, ROOT_CTX)
                done.set()

            nursery.start_soon(make)
            await await_until("e on n3", lambda: sites["n3"].vfs.peek(ROOT_INODE, b"e") is not None)
            await trio.sleep(1)
            assert not done.is_set()  # n2 has not applied it: not returned
            gate["n2"].set()
            await done.wait()
            assert sites["n2"].vfs.peek(ROOT_INODE, b"e") is not None

            # n2 does not catch up within the deadline: the update returns all the same
            # (it was made), and n2's reads go to the primary until its replica has it.
            gate["n2"] = trio.Event()
            start = trio.current_time()
            await n2.mkdir(ROOT_INODE, b"f", 0o755, ROOT_CTX)
            assert trio.current_time() - start == pytest.approx(5.0, abs=0.1)
            assert sites["n2"].vfs.peek(ROOT_INODE, b"f") is None
            got = await n2.lookup(ROOT_INODE, b"f")  # read-your-writes: from the primary
            assert got.is_dir
            # The primary unreachable: no answer from n2's replica, which lacks f.
            up["n1"] = False
            with pytest.raises(FsError) as exc:
                await n2.lookup(ROOT_INODE, b"f")
            assert exc.value.errno == errno.EHOSTDOWN
            up["n1"] = True
            gate["n2"].set()
            await await_until("f on n2", lambda: sites["n2"].vfs.peek(ROOT_INODE, b"f") is not None)
            assert not n2.forwarder.behind(ROOT_VOLUME)
            up["n1"] = False  # caught up: stale reads are allowed again (here: current)
            assert (await n2.lookup(ROOT_INODE, b"f")).ino == got.ino
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.02))
    assert "n2" in acks and "n3" in acks


class _Down:
    """A Reader whose node does not answer."""

    def __getattr__(self, name: str) -> object:
        async def fail(*args: object) -> object:
            raise PeerUnavailable("n1: connection refused")

        return fail


def test_a_site_out_of_sync_makes_files_through_the_primary(tmp_path: Path) -> None:
    """The sim's seeds 113, 120, 149: a site out of sync forwards a create. The primary
    answers the update's real sequence (it answered 0), so the site knows its replica is
    behind: it does not wait for it, uses the new file through the primary (its fsync
    failed ENOENT: the inode was looked for in the site's replica) and answers no read
    from its replica until that has caught up."""
    primary = Node(tmp_path / "n1", 1)
    site = Node(tmp_path / "n2", 2, replica=True)
    third = Node(tmp_path / "n3", 3, replica=True)  # in sync: the majority with the primary
    root = Volume(ROOT_VOLUME, "/", ROOT_INODE, "n1", ("n1", "n2", "n3"), ROOT_INODE)
    up = {"n1": True}
    answers: list[Any] = []

    def reader(node: str) -> Reader:
        return LocalReader(primary.vfs) if up["n1"] else _Down()  # type: ignore[return-value]

    methods = Methods()

    async def forward(node: str, op: str, args: list[Any], ctx: list[Any]) -> Any:
        handler = methods._methods["fs.op"].handler
        answer = await handler("n2", {"op": op, "args": args, "ctx": ctx})
        answers.append(answer)
        return answer

    # No lease: n2 is out of sync (the primary cannot reach it to catch it up).
    n2 = NodeFs(
        site.vfs,
        VolumeRoles("n2", site.meta, VolumeTable(site.meta, root)),
        send=forward,
        reader=reader,
        applied_timeout=5.0,
    )
    applier = ReplicaApplier(site.meta, site.data, NodeId(2), applied=n2.applied)
    applier3 = ReplicaApplier(third.meta, third.data, NodeId(3))
    gate = {"open": trio.Event()}

    async def call(node: str, method: str, args: dict[str, Any], limit: float) -> Any:
        if node == "n3":
            return {"have": await applier3.apply(args["vol"], args["records"])}
        if args["records"]:
            await gate["open"].wait()
        return {"have": await applier.apply(args["vol"], args["records"])}

    repl = Replicator(
        primary.meta, primary.data, ROOT_VOLUME, ["n2", "n3"], call, call_timeout=60.0, lease=3.0
    )
    fs1 = NodeFs(primary.vfs, VolumeRoles.alone(primary.meta, repl))
    serve_ops(fs1, methods)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            # An update n2 has not got: it cannot catch up while the gate is closed.
            primary.vfs.mkdir(ROOT_INODE, b"before", 0o755, ROOT_CTX)
            nursery.start_soon(repl.run)
            fh, a = await n2.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, ROOT_CTX)
            assert not repl.links["n2"].in_sync
            assert answers[-1][1] == primary.meta.seq(ROOT_VOLUME) > 0
            assert site.vfs.peek(ROOT_INODE, b"f") is None
            assert n2.forwarder.behind(ROOT_VOLUME)
            assert await n2.write(fh, 0, b"hello") == 5
            await n2.fsync(fh, False)
            assert await n2.getattr(a.ino) == primary.vfs.getattr(a.ino)
            assert await n2.read(fh, 0, 100) == b"hello"
            assert (await n2.lookup(ROOT_INODE, b"f")).ino == a.ino
            up["n1"] = False
            for call in (lambda: n2.lookup(ROOT_INODE, b"f"), lambda: n2.read(fh, 0, 100)):
                with pytest.raises(FsError) as exc:
                    await call()
                assert exc.value.errno == errno.EHOSTDOWN
            up["n1"] = True
            await n2.release(fh)
            gate["open"].set()
            await await_until("n2 caught up", lambda: not n2.forwarder.behind(ROOT_VOLUME))
            got = site.vfs.peek(ROOT_INODE, b"f")
            assert got is not None and got.size == 5
            n2.forget([(a.ino, 2)])
            assert not n2.handles.learnt
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.02))
