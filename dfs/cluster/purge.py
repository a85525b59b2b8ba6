"""Purging unlinked inodes once no node of the cluster uses them.

A local file system keeps an unlinked file for as long as a process has it open; on a cluster
the process may be on another node. So the primary of a volume does not purge an orphan its
own kernel let go of (``Vfs(defer_purge=...)`` hands it here); every ``PURGE_INTERVAL`` it asks
the sites in sync which of the waiting orphans their kernels or open handles still use
(``repl.holds``) and purges the others. If a site cannot answer, the purge waits for the next
round: an orphan is never purged while a node might use it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from dfs.errors import FsError
from dfs.fs.vfs import Vfs
from dfs.types import InodeId

log = logging.getLogger("dfs.cluster.purge")

PURGE_INTERVAL = 0.5
PURGE_BATCH = 4096

Ask = Callable[[list[int]], Awaitable[set[int]]]
"""``await ask(inos)``: the inodes of ``inos`` some site in sync still uses; raises FsError if
one of them could not say."""


class OrphanPurge:
    def __init__(self) -> None:
        self.waiting: set[InodeId] = set()

    def defer(self, ino: InodeId) -> None:
        """``Vfs(defer_purge=...)``: this node no longer uses ``ino``; the others may."""
        self.waiting.add(ino)

    async def run(self, vfs: Vfs, ask: Ask) -> None:
        while True:
            await trio.sleep(PURGE_INTERVAL)
            if not self.waiting:
                continue
            batch = [int(i) for i in sorted(self.waiting)[:PURGE_BATCH]]
            try:
                held = await ask(batch)
            except FsError as exc:
                log.debug("purge of %d orphans postponed: %s", len(batch), exc)
                continue
            for i in batch:
                if i in held:
                    continue
                ino = InodeId(i)
                self.waiting.discard(ino)
                if vfs.unused(ino):
                    try:
                        vfs.purge_if_orphan(ino)
                    except FsError as exc:  # not the primary any more: the new one purges it
                        log.info("purge of orphan %#x left to the primary: %s", ino, exc)
