"""Forgetting and purging inodes, and recovery after an unclean stop."""

from __future__ import annotations

import logging

from dfs.fs.base import VfsBase, delete_inode_records
from dfs.meta import schema as S
from dfs.types import ROOT_VOLUME, InodeId, VolumeId

log = logging.getLogger(__name__)


class Reclaim(VfsBase):
    # --- forgetting and purging -----------------------------------------------------------

    def forget(self, items: list[tuple[InodeId, int]]) -> None:
        for ino, n in items:
            left = self.lookups.get(ino, 0) - n
            if left > 0:
                self.lookups[ino] = left
                continue
            self.lookups.pop(ino, None)
            self._maybe_purge(ino)

    def _maybe_purge(self, ino: InodeId) -> None:
        """Free an inode once it has no name, no kernel reference and no open handle.

        Only the node that owns the volume's updates purges (``authority``): on a
        replica the purge arrives with the primary's records."""
        if ino in self.lookups or self.files.is_open(ino):
            return
        with self.meta.read() as txn:
            if txn.get(S.orphan_key(ino), db=self.meta.orphans) is None:
                return
            raw = txn.get(S.inode_key(ino), db=self.meta.inodes)
        if raw is not None and not self.authority(S.unpack_inode(ino, raw).volume):
            return
        if self.defer_purge is not None:
            self.defer_purge(ino)
            return
        self.purge(ino)

    def _volume_of(self, ino: InodeId) -> VolumeId:
        with self.meta.read() as txn:
            raw = txn.get(S.inode_key(ino), db=self.meta.inodes)
        return ROOT_VOLUME if raw is None else S.unpack_inode(ino, raw).volume

    def unused(self, ino: InodeId) -> bool:
        """No kernel reference and no open handle on this node."""
        return ino not in self.lookups and not self.files.is_open(ino)

    def purge_if_orphan(self, ino: InodeId) -> None:
        with self.meta.read() as txn:
            if txn.get(S.orphan_key(ino), db=self.meta.orphans) is None:
                return
        self.purge(ino)

    def purge(self, ino: InodeId) -> None:
        with self.meta.write() as txn:
            raw = txn.get(S.inode_key(ino), db=self.meta.inodes)
            inline = txn.get(S.inline_key(ino), db=self.meta.inline) is not None
            delete_inode_records(self.meta, txn, ino)
            # Only regular files that outgrew the inline limit have a data file to remove.
            has_data = raw is None or (S.unpack_inode(ino, raw).is_reg and not inline)
            if has_data:
                txn.data_op("rm", ino)
        if has_data:
            self.data.remove(ino)

    def recover(self) -> tuple[int, int]:
        """Start-up recovery: reclaim orphans of a dead daemon and settle unsettled checksums.

        Returns (orphans purged, files re-checksummed).
        """
        with self.meta.read() as txn:
            orphans = [
                InodeId(S.read_u64(k))
                for k in txn.cursor(db=self.meta.orphans).iternext(values=False)
            ]
            dirty = [
                InodeId(S.read_u64(k))
                for k in txn.cursor(db=self.meta.dirty).iternext(values=False)
            ]
        # The primary of each volume purges its orphans; on a replica its records say so.
        orphans = [i for i in orphans if self.authority(self._volume_of(i))]
        for ino in orphans:
            self.purge(ino)
        resettled = 0
        for ino in dirty:
            if ino not in orphans:
                self.files.rechecksum(ino)
                resettled += 1
        return len(orphans), resettled
