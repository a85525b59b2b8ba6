"""Primary-site replication without FUSE or sockets: three nodes' stores in one process.

The primary's ``NodeFs`` and ``Replicator`` run against two ``ReplicaApplier``
sites through an in-process ``call`` that can make a site unreachable, on
trio's MockClock (so lease waits take no real time). Checked: every update
has been applied by every site in sync when it returns; a site that drops
out delays updates by at most its lease, misses nothing, and catches up;
at the end every replicated database is byte-for-byte equal on all three
nodes, and so are the files' contents.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
import trio.testing

from dfs.cluster.clusterfs import NodeFs
from dfs.cluster.replication import ReplicaApplier, Replicator
from dfs.data.store import DataStore
from dfs.fs.ctx import ROOT_CTX
from dfs.fs.vfs import Vfs
from dfs.meta import schema as S
from dfs.meta.store import MetaStore
from dfs.net.rpc import PeerUnavailable
from dfs.types import ROOT_INODE, ROOT_VOLUME, InodeId, NodeId

LEASE = 3.0


class Node:
    def __init__(self, root: Path, node_id: int) -> None:
        self.meta = MetaStore.open(root / "meta", cluster_id="c", node_id=NodeId(node_id))
        self.data = DataStore(root / "data")
        self.vfs = Vfs(self.meta, self.data)


def replicated(meta: MetaStore) -> list[tuple[str, list[tuple[bytes, bytes]]]]:
    out = []
    with meta.read() as txn:
        for i in S.REPLICATED:
            name = S.DB_NAMES[i]
            out.append((name, [(bytes(k), bytes(v)) for k, v in txn.cursor(db=meta.dbs[name])]))
    return out


async def until(cond: Callable[[], bool], limit: float = 30.0) -> None:
    for _ in range(int(limit / 0.05)):
        if cond():
            return
        await trio.sleep(0.05)
    raise AssertionError("condition not reached")


def test_updates_wait_for_sites_and_a_dropped_site_catches_up(tmp_path: Path) -> None:
    primary = Node(tmp_path / "n1", 1)
    sites = {name: Node(tmp_path / name, i) for i, name in ((2, "n2"), (3, "n3"))}
    appliers = {
        name: ReplicaApplier(n.meta, n.data, NodeId(i))
        for i, (name, n) in enumerate(sites.items(), start=2)
    }
    for n in sites.values():
        n.vfs.make_replica()
    down: set[str] = set()
    calls: list[str] = []

    async def call(site: str, method: str, args: dict[str, Any], limit: float) -> Any:
        calls.append(site)
        await trio.sleep(0.001)  # a network hop
        if site in down:
            raise PeerUnavailable(f"{site} is down")
        assert method == "repl.apply"
        return {"have": await appliers[site].apply(args["vol"], args["records"])}

    repl = Replicator(
        primary.meta, primary.data, ROOT_VOLUME, sites, call, call_timeout=5.0, lease=LEASE
    )
    fs = NodeFs(primary.vfs, replicator=repl)
    big = os.urandom(300_000)
    files: list[InodeId] = []

    def in_sync_everywhere() -> None:
        want = primary.meta.seq(ROOT_VOLUME)
        for name, n in sites.items():
            if name not in down:
                assert n.meta.seq(ROOT_VOLUME) == want, name

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(repl.run)
            await until(lambda: all(link.in_sync for link in repl.links.values()))
            d = await fs.mkdir(ROOT_INODE, b"d", 0o755, ROOT_CTX)
            in_sync_everywhere()
            fh, f = await fs.create(d.ino, b"f", 0o644, os.O_RDWR, ROOT_CTX)
            files.append(f.ino)
            await fs.write(fh, 0, big)
            in_sync_everywhere()
            await fs.setxattr(f.ino, b"user.k", b"v")
            await fs.rename(d.ino, b"f", ROOT_INODE, b"g", 0)
            in_sync_everywhere()
            # n3 holds a lease, then dies: the next update waits for the lease, no longer.
            assert repl.grant("n3")
            down.add("n3")
            start = trio.current_time()
            await fs.write(fh, 1000, b"x" * 5000)
            waited = trio.current_time() - start
            assert LEASE - 0.1 <= waited <= LEASE + 1.0, waited
            assert not repl.grant("n3")
            start = trio.current_time()
            for i in range(20):
                await fs.mkdir(d.ino, b"sub%d" % i, 0o700, ROOT_CTX)
            await fs.unlink(ROOT_INODE, b"g")  # open: an orphan, purged later
            assert trio.current_time() - start < 1.0, "updates kept waiting for a dead site"
            in_sync_everywhere()
            await fs.release(fh)
            # n3 comes back: it catches up from the journal and is in sync again.
            down.clear()
            repl.kick("n3")
            await until(lambda: repl.links["n3"].in_sync)
            in_sync_everywhere()
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    want = replicated(primary.meta)
    for name, n in sites.items():
        assert replicated(n.meta) == want, name
    expect = big[:1000] + b"x" * 5000 + big[6000:]
    for name, n in [("n1", primary), *sites.items()]:
        assert n.data.path(files[0]).read_bytes() == expect, name
    ino = primary.vfs.peek(ROOT_INODE, b"d")
    assert ino is not None
    for name, n in [("n1", primary), *sites.items()]:
        a = n.vfs.peek(ino.ino, b"sub19")
        assert a is not None and a.mode & 0o777 == 0o700, name
