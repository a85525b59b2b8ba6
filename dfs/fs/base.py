"""The state every part of ``Vfs`` shares, and the helpers over one lmdb transaction.

``Vfs`` (dfs/fs/vfs.py) is made of parts, one module each: the namespace (vfs.py), volume
roots and mount points (volroots.py), directories (dirs.py), extended attributes (xattrs.py),
and reclaiming inodes (reclaim.py). Each part is a class over ``VfsBase``; ``Vfs`` joins them.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import trio

from dfs.clock import WallClock, system_time_ns
from dfs.data.store import DataStore
from dfs.errors import (
    FsError,
    Invalid,
    NameTooLong,
    NotADir,
    NotFound,
)
from dfs.fs.files import FileIO
from dfs.meta import schema as S
from dfs.meta.store import MetaStore, Txn, WriteTxn
from dfs.types import Attr, InodeId, VolumeId

log = logging.getLogger(__name__)

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = 1
XATTR_REPLACE = 2
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")
READDIR_BATCH = 128
RELATIME_NS = 24 * 3600 * 10**9
NAME_COST = 512  # metadata bytes a new name or inode may take, for the space reserve


@dataclass(frozen=True, slots=True)
class DirEntry:
    name: bytes
    attr: Attr
    cookie: int  # pass back as ``start`` to continue after this entry


@dataclass(frozen=True, slots=True)
class FsStats:
    block_size: int
    blocks: int
    blocks_free: int
    blocks_avail: int
    files: int
    files_free: int
    name_max: int


def check_name(name: bytes) -> None:
    if len(name) > S.MAX_NAME:
        raise NameTooLong()
    if not name or b"/" in name or b"\0" in name:
        raise Invalid()


class VfsBase:
    def __init__(
        self,
        meta: MetaStore,
        data: DataStore,
        clock: WallClock = system_time_ns,
        *,
        replica: Callable[[VolumeId], bool] | None = None,
        defer_purge: Callable[[InodeId], None] | None = None,
        writeback_cache: bool = False,
    ) -> None:
        """``replica(vol)``: this node stores ``vol`` but does not order it (a storage site,
        not the primary): its replicated records change only by applying the primary's
        journal (no purges, atime or recovery writes here). ``defer_purge``: on a node that
        orders volumes other nodes use, an orphan this node no longer uses is handed over
        instead of purged (other nodes' kernels may still use it; dfs.cluster.purge).
        ``writeback_cache``: the kernel caches writes and keeps the times of regular files
        (a standalone node's mount; ``FileIO.stamp_writes``)."""
        self.meta = meta
        self.data = data
        self.clock = clock
        self.lookups: dict[InodeId, int] = {}
        self.files = FileIO(
            meta,
            data,
            clock,
            self._maybe_purge,
            replica=replica or _never,
            writeback_cache=writeback_cache,
        )
        self.writeback_cache = writeback_cache
        self._dir_handles: dict[int, InodeId] = {}
        self._next_dir_fh = 1
        self._replica = replica or _never
        self.defer_purge = defer_purge

    def authority(self, vol: VolumeId) -> bool:
        """This node orders the updates of ``vol`` (it is no mere replica of it)."""
        return not self._replica(vol)

    def getattr(self, ino: InodeId) -> Attr:
        with self.meta.read() as txn:
            return self._get(txn, ino)

    def _maybe_purge(self, ino: InodeId) -> None:
        """Free ``ino`` if nothing uses it any more (``Reclaim``)."""
        raise NotImplementedError

    # --- helpers ------------------------------------------------------------------------

    def _get(self, txn: Txn, ino: int) -> Attr:
        raw = txn.get(S.inode_key(ino), db=self.meta.inodes)
        if raw is None:
            raise NotFound(message=f"no inode {ino:#x}")
        return S.unpack_inode(ino, raw)

    def _put(self, txn: WriteTxn, a: Attr) -> None:
        txn.put(S.inode_key(a.ino), S.pack_inode(a), db=self.meta.inodes)

    def _child(self, txn: Txn, parent: int, name: bytes) -> tuple[InodeId, int] | None:
        raw = txn.get(S.dirent_key(parent, name), db=self.meta.dirents)
        return None if raw is None else S.unpack_dirent(raw)

    def _dir(self, txn: Txn, ino: int) -> Attr:
        a = self._get(txn, ino)
        if not a.is_dir:
            raise NotADir()
        return a

    def _add_entry(self, txn: WriteTxn, parent: int, name: bytes, child: int) -> None:
        if txn.get(S.mount_key(parent), db=self.meta.mounts) is not None:
            # A mount point stays empty (its volume's root is shown instead): a name made in
            # it would be lost to sight. Only a node whose view of the tree is out of date
            # (it has not got the mount yet) asks for it.
            raise FsError(errno.ESTALE, "a volume is mounted on this directory")
        cookie = self.meta.new_cookie(txn)
        txn.put(S.dirent_key(parent, name), S.pack_dirent(child, cookie), db=self.meta.dirents)
        txn.put(S.dirpos_key(parent, cookie), name, db=self.meta.dirpos)

    def _drop_entry(self, txn: WriteTxn, parent: int, name: bytes, cookie: int) -> None:
        txn.delete(S.dirent_key(parent, name), db=self.meta.dirents)
        txn.delete(S.dirpos_key(parent, cookie), db=self.meta.dirpos)

    def _is_empty(self, txn: Txn, ino: int) -> bool:
        prefix = S.dirent_prefix(ino)
        cur = txn.cursor(db=self.meta.dirents)
        return not (cur.set_range(prefix) and cur.key().startswith(prefix))

    def _count(self, ino: InodeId) -> None:
        self.lookups[ino] = self.lookups.get(ino, 0) + 1

    def _unlinked(self, txn: WriteTxn, a: Attr) -> None:
        """Called when a's link count dropped to zero: keep it as an orphan until forgotten."""
        txn.put(S.orphan_key(a.ino), b"", db=self.meta.orphans)

    # --- file system ----------------------------------------------------------------------

    def statfs(self) -> FsStats:
        st = os.statvfs(self.data.root)
        with self.meta.read() as txn:
            files = int(txn.stat(self.meta.inodes)["entries"])
        free_files = max(st.f_favail, 0) * 4 if st.f_files else 1 << 32
        reserved = self.data.reserve // st.f_frsize  # like ext4's reserved blocks
        return FsStats(
            block_size=st.f_frsize,
            blocks=st.f_blocks,
            blocks_free=st.f_bfree,
            blocks_avail=max(st.f_bavail - reserved, 0),
            files=files + free_files,
            files_free=free_files,
            name_max=S.MAX_NAME,
        )

    async def sync(self) -> None:
        """Make every committed metadata transaction durable (fsyncdir, syncfs)."""
        await trio.to_thread.run_sync(self.meta.sync)

    async def sync_periodically(self, interval: float) -> None:
        """Bound what a machine crash can take from metadata to ``interval`` seconds.

        Commits don't fsync; like ext4's 5-second journal commit, this makes
        everything committed durable at a steady pace (``sync(1)`` does not
        reach a FUSE file system's own store).
        """
        while True:
            await trio.sleep(interval)
            await self.sync()


def _never(vol: VolumeId) -> bool:
    return False


def delete_inode_records(meta: MetaStore, txn: WriteTxn, ino: int) -> None:
    """Remove every record keyed by ``ino`` (not its directory entries)."""
    txn.delete(S.inode_key(ino), db=meta.inodes)
    txn.delete(S.symlink_key(ino), db=meta.symlinks)
    txn.delete(S.orphan_key(ino), db=meta.orphans)
    txn.delete(S.dirty_key(ino), db=meta.dirty)
    txn.delete(S.inline_key(ino), db=meta.inline)
    prefix = S.ino_prefix(ino)
    for db in (meta.xattrs, meta.blocks):
        txn.delete_prefix(prefix, db=db)
