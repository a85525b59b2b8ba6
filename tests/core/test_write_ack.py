"""Writes on a primary are acknowledged at close (flush) or fsync, not at write(2).

One primary and one site in one process (as tests/core/test_replication.py),
with a gate in front of the site: while it is closed nothing the primary sends
is applied. Checked: a write returns before the site has it; at most
WRITE_WINDOW writes run ahead; flush and fsync return only once the site
applied every write of the handle; a metadata update waits for the writes
before it.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio
import trio.testing

from dfs.cluster.nodefs import NodeFs
from dfs.cluster.replication import ReplicaApplier
from dfs.cluster.roles import VolumeRoles
from dfs.cluster.writebehind import WRITE_WINDOW
from dfs.fs.ctx import ROOT_CTX
from dfs.types import ROOT_INODE, ROOT_VOLUME, NodeId
from tests.core.test_replication import Node, replicating_to
from tests.waiting import await_until


def test_writes_overlap_replication_and_close_waits_for_it(tmp_path: Path) -> None:
    primary = Node(tmp_path / "n1", 1)
    site = Node(tmp_path / "n2", 2, replica=True)
    repl, gate = replicating_to(primary, ReplicaApplier(site.meta, site.data, NodeId(2)))
    fs = NodeFs(primary.vfs, VolumeRoles.alone(primary.meta, repl))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(repl.run)
            gate["open"].set()
            await await_until("n2 in sync", lambda: repl.links["n2"].in_sync)
            fh, f = await fs.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, ROOT_CTX)
            applied = site.meta.seq(ROOT_VOLUME)
            assert applied == primary.meta.seq(ROOT_VOLUME)  # metadata: at once

            gate["open"] = trio.Event()  # the site stops applying
            # Writes with gaps between them: a small write is held on the node until one
            # that does not continue it comes (NodeFs.write), so each of these writes the
            # one before; the last one stays held.
            stride, n = 4096, 2048
            for i in range(WRITE_WINDOW + 1):
                with trio.fail_after(1):  # returns without the site
                    await fs.write(fh, i * stride, b"w" * n)
            assert site.meta.seq(ROOT_VOLUME) == applied
            # One more is too far ahead: it waits for the site.
            blocked = trio.Event()

            async def one_more() -> None:
                await fs.write(fh, (WRITE_WINDOW + 1) * stride, b"w" * n)
                blocked.set()

            nursery.start_soon(one_more)
            await trio.sleep(5)
            assert not blocked.is_set()
            gate["open"].set()
            with trio.fail_after(10):
                await blocked.wait()
            size = (WRITE_WINDOW + 1) * stride + n

            # close(2) waits until the site has every write of the handle.
            gate["open"] = trio.Event()
            with trio.fail_after(1):
                await fs.write(fh, size, b"z" * 100)
            size += 100
            flushed = trio.Event()

            async def close() -> None:
                await fs.flush(fh)
                flushed.set()

            nursery.start_soon(close)
            await trio.sleep(5)
            assert not flushed.is_set()
            assert site.vfs.getattr(f.ino).size < size
            gate["open"].set()
            with trio.fail_after(10):
                await flushed.wait()
            assert site.meta.seq(ROOT_VOLUME) == primary.meta.seq(ROOT_VOLUME)
            assert site.vfs.getattr(f.ino).size == size

            # fsync waits as well, and a metadata update waits for the writes before it.
            gate["open"] = trio.Event()
            await fs.write(fh, size, b"x")
            synced = trio.Event()

            async def fsync() -> None:
                await fs.fsync(fh, False)
                synced.set()

            nursery.start_soon(fsync)
            await trio.sleep(5)
            assert not synced.is_set()
            gate["open"].set()
            await synced.wait()  # (fsync runs in a thread: no fail_after on a MockClock)
            await fs.write(fh, size + 1, b"y")
            await fs.setxattr(f.ino, b"user.k", b"v")
            assert site.vfs.getattr(f.ino).size == size + 2
            await fs.release(fh)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
