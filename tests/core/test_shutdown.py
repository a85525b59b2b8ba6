"""A primary that stops while files are open: what it commits after its trio run ended.

The daemon settles open files and purges orphans once FUSE is unmounted. A commit made when
replication no longer runs (outside trio: recovery after the run) used to be streamed to the
sites from the commit hook and crashed the daemon ("must be called from async context"); it
is journaled, and each site catches up from the journal when replication runs again.
"""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from dfs.cluster.nodefs import NodeFs
from dfs.cluster.replication import ReplicaApplier
from dfs.cluster.roles import VolumeRoles
from dfs.fs.ctx import ROOT_CTX
from dfs.types import ROOT_INODE, ROOT_VOLUME, NodeId
from tests.core.test_replication import Node, replicating_to
from tests.waiting import await_until


def test_a_commit_after_replication_stopped_is_journaled_and_caught_up(tmp_path: Path) -> None:
    primary = Node(tmp_path / "n1", 1)
    site = Node(tmp_path / "n2", 2, replica=True)
    applier = ReplicaApplier(site.meta, site.data, NodeId(2))
    repl, _gate = replicating_to(primary, applier)
    fs = NodeFs(primary.vfs, VolumeRoles.alone(primary.meta, repl))

    async def streaming() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(repl.run)
            await await_until(
                "n2 streaming", lambda: repl.links["n2"].in_sync and repl.links["n2"].streaming
            )
            await fs.mkdir(ROOT_INODE, b"before", 0o755, ROOT_CTX)
            nursery.cancel_scope.cancel()

    trio.run(streaming, clock=trio.testing.MockClock(autojump_threshold=0.02))
    assert site.vfs.peek(ROOT_INODE, b"before") is not None
    # After the run, as the daemon's recovery does: no trio, nobody to stream to.
    primary.vfs.mkdir(ROOT_INODE, b"after", 0o755, ROOT_CTX)
    assert site.vfs.peek(ROOT_INODE, b"after") is None

    async def restarted() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(repl.run)
            await await_until(
                "n2 caught up", lambda: repl.links["n2"].acked >= primary.meta.seq(ROOT_VOLUME)
            )
            nursery.cancel_scope.cancel()

    trio.run(restarted, clock=trio.testing.MockClock(autojump_threshold=0.02))
    assert site.vfs.peek(ROOT_INODE, b"after") is not None
    fs.detach()
