"""Volume roots and mount points: making a volume's root directory, covering a directory."""

from __future__ import annotations

import errno
import logging

import msgpack

from dfs.errors import (
    Exists,
    FsError,
    Invalid,
    NotEmpty,
    NotFound,
)
from dfs.fs.base import VfsBase
from dfs.meta import schema as S
from dfs.meta.store import Txn
from dfs.types import ROOT_INODE, ROOT_VOLUME, Attr, InodeId, VolumeId

log = logging.getLogger(__name__)


class VolumeRoots(VfsBase):
    # --- volumes ---------------------------------------------------------------------------

    def _not_mount_point(self, txn: Txn, ino: int) -> None:
        if txn.get(S.mount_key(ino), db=self.meta.mounts) is not None:
            raise FsError(errno.EBUSY, "a volume is mounted there")

    def is_empty_dir(self, ino: InodeId) -> bool:
        with self.meta.read() as txn:
            self._dir(txn, ino)
            return self._is_empty(txn, ino)

    def mount_record(self, ino: InodeId) -> bytes | None:
        """The ``mounts`` record of directory ``ino`` (a volume covers it), or None."""
        with self.meta.read() as txn:
            return txn.get(S.mount_key(ino), db=self.meta.mounts)

    def as_stored(self, a: Attr) -> Attr | None:
        """What this node stores under the name that gave ``a``: ``a`` itself, or for a
        mount point the volume's root directory, or None when this node stores no
        replica of that volume (how per-host views show a host's tree)."""
        if not a.is_dir or a.volume != ROOT_VOLUME:
            return a
        raw = self.mount_record(a.ino)
        if raw is None:
            return a
        rec = msgpack.unpackb(raw)
        if not isinstance(rec, dict) or not isinstance(rec.get("vol"), int):
            return None
        if self.meta.seq(VolumeId(rec["vol"])) == 0 or not isinstance(rec.get("root"), int):
            return None
        try:
            return self.getattr(InodeId(rec["root"]))
        except NotFound:
            return None

    def make_volume_root(self, vol: VolumeId, path: str, template: Attr) -> Attr:
        """The new volume ``vol``'s root directory: its first update, on its primary.

        ``template`` is the directory it will cover (mode, owner and parent are
        copied, so the mount point looks like the directory it was)."""
        if self.meta.seq(vol) != 0:
            raise Exists(message=f"volume {vol} exists on this node")
        now = self.clock()
        self.meta.add_volume(vol, InodeId(0), path)
        with self.meta.write() as txn:
            ino = self.meta.new_inode_id(txn)
            a = Attr(
                ino,
                template.mode,
                template.uid,
                template.gid,
                2,
                0,
                now,
                now,
                now,
                now,
                volume=vol,
                parent=template.parent,
            )
            a.version = self.meta.log(txn, vol, "mkvol")
            self._put(txn, a)
            txn.put(
                S.volume_key(vol),
                msgpack.packb({"root": int(ino), "path": path}),
                db=self.meta.volumes,
            )
        return a

    def cover(self, parent: InodeId, name: bytes, record: bytes) -> Attr:
        """Make the empty directory ``parent/name`` of the root volume a mount point
        (``record``: its ``mounts`` value, see dfs/meta/schema.py); on the root volume's
        primary. The entry is rewritten unchanged so that every node's kernel drops
        what it cached for the name (it shows the volume's root from now on)."""
        with self.meta.write() as txn:
            self._dir(txn, parent)
            ent = self._child(txn, parent, name)
            if ent is None:
                raise NotFound()
            ino = ent[0]
            a = self._dir(txn, ino)
            if a.volume != ROOT_VOLUME:
                raise FsError(errno.EXDEV, "volumes are mounted on directories of the root volume")
            self._not_mount_point(txn, ino)
            if not self._is_empty(txn, ino):
                raise NotEmpty(message="directory not empty: volumes are made on empty ones")
            txn.put(S.mount_key(ino), record, db=self.meta.mounts)
            txn.put(S.dirent_key(parent, name), S.pack_dirent(ino, ent[1]), db=self.meta.dirents)
            a.ctime_ns = self.clock()
            a.version = self.meta.log(txn, a.volume, "mount")
            self._put(txn, a)
        return a

    def _check_not_ancestor(self, txn: Txn, moved: InodeId, new_parent: InodeId) -> None:
        """EINVAL if ``moved`` is ``new_parent`` or one of its ancestors."""
        cur = new_parent
        while True:
            if cur == moved:
                raise Invalid(message="cannot move a directory into itself")
            if cur == ROOT_INODE:
                return
            cur = self._get(txn, cur).parent
