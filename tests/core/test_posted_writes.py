"""Writes a non-primary node posts to the primary without waiting (NodeFs._posted).

n2 (a storage site) forwards to the primary's handlers in-process; its posted
writes go through an in-order queue served by one task, with a delay, like the
in-order ``fs.write`` method over one connection. Checked: write(2) returns
before the primary has the data; the writes land in order; n2 reads its own
writes before they are flushed; flush (close) returns once every site has them;
a write that fails on the primary is reported by the next flush.
"""

from __future__ import annotations

import errno
import os
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from dfs.cluster.nodefs import NodeFs
from dfs.cluster.remote import LocalReader, Reader
from dfs.cluster.replication import ReplicaApplier
from dfs.cluster.roles import VolumeRoles
from dfs.cluster.volumes import Volume, VolumeTable
from dfs.cluster.writebehind import WRITES_IN_FLIGHT
from dfs.errors import FsError
from dfs.fs.ctx import ROOT_CTX
from dfs.net.frames import Message, MessageType
from dfs.net.peer import Pending
from dfs.net.rpc import Methods
from dfs.types import ROOT_INODE, ROOT_VOLUME, NodeId
from tests.core.test_replication import Node, replicating_to, serve_ops
from tests.waiting import await_until


def test_posted_writes_are_ordered_read_back_and_flushed(tmp_path: Path) -> None:
    primary = Node(tmp_path / "n1", 1)
    site = Node(tmp_path / "n2", 2, replica=True)
    methods = Methods()
    queue: deque[tuple[dict[str, Any], Pending]] = deque()
    served: list[int] = []
    wake = {"e": trio.Event()}
    root = Volume(ROOT_VOLUME, "/", ROOT_INODE, "n1", ("n1", "n2"), ROOT_INODE)

    def reader(node: str) -> Reader:
        return LocalReader(primary.vfs)

    async def forward(node: str, op: str, args: list[Any], ctx: list[Any]) -> Any:
        return await methods._methods["fs.op"].handler("n2", {"op": op, "args": args, "ctx": ctx})

    def post(
        node: str, method: str, args: dict[str, Any], on_done: Callable[[Pending], None]
    ) -> Pending:
        assert method == "fs.write"
        p = Pending("n1", len(served) + len(queue) + 1, on_done)
        queue.append((args, p))
        wake["e"].set()
        return p

    network_up = trio.Event()

    async def serve_in_order() -> None:
        while True:
            if not queue:
                wake["e"] = trio.Event()
                await wake["e"].wait()
                continue
            args, p = queue.popleft()
            await network_up.wait()
            await trio.sleep(0.005)  # the network
            try:
                n = await methods._methods["fs.write"].handler("n2", args)
                p.answer(Message(MessageType.RESPONSE, p.rid, {"r": n}))
            except FsError as exc:
                p.answer(
                    Message(MessageType.ERROR, p.rid, {"reason": str(exc), "errno": exc.errno})
                )
            served.append(p.rid)

    n2 = NodeFs(
        site.vfs,
        VolumeRoles("n2", site.meta, VolumeTable(site.meta, root), always_current=True),
        send=forward,
        reader=reader,
        post=post,
    )
    applier = ReplicaApplier(site.meta, site.data, NodeId(2), applied=n2.applied)
    repl, gate = replicating_to(primary, applier)
    fs1 = NodeFs(primary.vfs, VolumeRoles.alone(primary.meta, repl))
    serve_ops(fs1, methods)
    chunks = [bytes([65 + i % 26]) * 1000 for i in range(WRITES_IN_FLIGHT + 8)]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(repl.run)
            nursery.start_soon(serve_in_order)
            await await_until("n2 in sync", lambda: repl.links["n2"].in_sync)
            fh, f = await n2.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, ROOT_CTX)
            # Writes with gaps between them: a small write is held on the node until one
            # that does not continue it comes (NodeFs.write), so each posts the one before.
            # None waits for the primary: they return while the network delivers nothing
            # (were one to wait, it would wait forever and the MockClock run into the limit).
            with trio.fail_after(60):
                for i, c in enumerate(chunks[: WRITES_IN_FLIGHT + 1]):
                    assert await n2.write(fh, i * 2000, c) == 1000
            assert not served
            assert primary.vfs.getattr(f.ino).size < WRITES_IN_FLIGHT * 2000
            network_up.set()
            # More than fit in flight: the next ones wait; all land in order.
            for i, c in enumerate(chunks[WRITES_IN_FLIGHT + 1 :], start=WRITES_IN_FLIGHT + 1):
                await n2.write(fh, i * 2000, c)
            await n2.write(fh, 0, b"z" * 10)  # overwrites the first chunk's start, after it
            want = b"z" * 10 + b"".join(c + bytes(1000) for c in chunks)[10:-1000]
            # n2 reads its own writes before they are flushed (from the primary).
            assert await n2.read(fh, 0, len(want) + 10) == want
            assert (await n2.getattr(f.ino)).size == len(want)
            # ... and so does its readdir, though n2's replica lags (the kernel takes the
            # sizes in readdirplus entries: a stale one would cut the file short).
            gate["open"] = trio.Event()
            await n2.write(fh, len(want), b"tail")
            want += b"tail"
            listed = {e.name: e.attr for e in await n2.readdir(ROOT_INODE)}
            assert site.vfs.getattr(f.ino).size < len(want)
            assert listed[b"f"].size == len(want)
            gate["open"].set()
            await n2.flush(fh)
            # Flushed: on every site, n2's own replica included.
            for n in (primary, site):
                assert await LocalReader(n.vfs).read(f.ino, 0, len(want) + 10) == want
            assert served == sorted(served)
            # A write the primary refuses is reported by the next flush, once.
            await n2.write(fh, (1 << 63), b"x")
            with pytest.raises(FsError) as exc:
                await n2.flush(fh)
            assert exc.value.errno == errno.EINVAL
            await n2.flush(fh)  # reported once
            await n2.release(fh)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.02))


def test_a_posted_write_without_an_answer_fails_the_fsync_within_the_deadline(
    tmp_path: Path,
) -> None:
    """A partition can hold a connection's frames without breaking it: a posted write then
    gets no answer at all. fsync waited for it without a deadline (133 s in a run of the
    seeded harness), and so did every later update of the node. Now a posted write is given
    up after ``timeouts.call``: the fsync fails with ETIMEDOUT within that time (the data
    may be lost, and the caller is told), and the node's later calls do not wait for it."""
    primary = Node(tmp_path / "n1", 1)
    site = Node(tmp_path / "n2", 2, replica=True)
    methods = Methods()
    root = Volume(ROOT_VOLUME, "/", ROOT_INODE, "n1", ("n1", "n2"), ROOT_INODE)
    held: list[Pending] = []

    async def forward(node: str, op: str, args: list[Any], ctx: list[Any]) -> Any:
        return await methods._methods["fs.op"].handler("n2", {"op": op, "args": args, "ctx": ctx})

    def post(
        node: str, method: str, args: dict[str, Any], on_done: Callable[[Pending], None]
    ) -> Pending:
        p = Pending("n1", len(held) + 1, on_done)
        held.append(p)  # the partition holds it: never delivered, never failed
        return p

    n2 = NodeFs(
        site.vfs,
        VolumeRoles("n2", site.meta, VolumeTable(site.meta, root), always_current=True),
        send=forward,
        reader=lambda node: LocalReader(primary.vfs),
        post=post,
        applied_timeout=5.0,
    )
    applier = ReplicaApplier(site.meta, site.data, NodeId(2), applied=n2.applied)
    repl, _gate = replicating_to(primary, applier)
    serve_ops(NodeFs(primary.vfs, VolumeRoles.alone(primary.meta, repl)), methods)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(repl.run)
            await await_until("n2 in sync", lambda: repl.links["n2"].in_sync)
            fh, _f = await n2.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, ROOT_CTX)
            await n2.write(fh, 0, b"x" * 1000)
            start = trio.current_time()
            with pytest.raises(FsError) as exc:
                await n2.fsync(fh, False)
            assert exc.value.errno == errno.ETIMEDOUT
            assert trio.current_time() - start <= 5.0
            assert len(held) == 1 and held[0].on_done is None  # given up
            # The node goes on: nothing waits for that write any more.
            start = trio.current_time()
            await n2.mkdir(ROOT_INODE, b"d", 0o755, ROOT_CTX)
            assert trio.current_time() - start < 5.0
            await n2.release(fh)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.02))
