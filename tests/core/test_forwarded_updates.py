"""Updates a storage site forwards to the primary: the site waits for its own replica itself.

A primary and two sites in one process; n2's NodeFs forwards to the primary's
``fs.op`` handler directly (what RPC does). The primary answers once every other
site in sync applied the update; n2 returns once its own replica has it too. If
n2's replica cannot catch up within the deadline, the update fails with
ETIMEDOUT and n2 sends its reads to the primary until it has caught up.
"""

from __future__ import annotations

import errno
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
from dfs.net.rpc import Methods
from dfs.types import ROOT_INODE, ROOT_VOLUME, NodeId
from tests.core.test_replication import Node, serve_ops
from tests.waiting import await_until


def test_a_forwarding_site_applies_the_update_before_it_returns(tmp_path: Path) -> None:
    primary = Node(tmp_path / "n1", 1)
    sites = {name: Node(tmp_path / name, i, replica=True) for i, name in ((2, "n2"), (3, "n3"))}
    gate = {"n2": trio.Event(), "n3": trio.Event()}
    acks: list[str] = []
    root = Volume(ROOT_VOLUME, "/", ROOT_INODE, "n1", ("n1", "n2", "n3"), ROOT_INODE)

    def reader(node: str) -> Reader:
        return LocalReader(primary.vfs)

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

    repl = Replicator(
        primary.meta, primary.data, ROOT_VOLUME, list(sites), call, call_timeout=60.0, lease=3.0
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

            # n2 never catches up in time: ETIMEDOUT, and its reads go to the primary.
            gate["n2"] = trio.Event()
            with pytest.raises(FsError) as exc:
                await n2.mkdir(ROOT_INODE, b"f", 0o755, ROOT_CTX)
            assert exc.value.errno == errno.ETIMEDOUT
            assert sites["n2"].vfs.peek(ROOT_INODE, b"f") is None
            got = await n2.lookup(ROOT_INODE, b"f")  # read-your-writes: from the primary
            assert got.is_dir
            gate["n2"].set()
            await await_until("f on n2", lambda: sites["n2"].vfs.peek(ROOT_INODE, b"f") is not None)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.02))
    assert "n2" in acks and "n3" in acks
