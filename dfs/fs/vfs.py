"""POSIX semantics over the metadata store and the data store: the file system proper.

Every namespace operation is one short lmdb write transaction that also
appends the update to the volume's journal and stamps the changed inodes with
its sequence number. Permission checks are the kernel's (``default_permissions``);
the rules the kernel leaves to file systems (name length, ENOTEMPTY, EINVAL for
a directory moved into itself, setgid inheritance, sticky-free bookkeeping of
link counts and timestamps) live here.

Lookup counts: every call that hands an inode to the kernel (lookup, create,
mkdir, mknod, symlink, link, and accepted readdir entries via ``remember``)
counts one; ``forget`` takes them back. An inode whose last name is gone is
kept (in ``orphans``) until the kernel forgets it and no handle is open, then
purged. File contents are handled by ``dfs.fs.files.FileIO``.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import msgpack
import trio

from dfs.clock import WallClock, system_time_ns
from dfs.data.store import DataStore
from dfs.errors import (
    Exists,
    FsError,
    Invalid,
    IsADir,
    NameTooLong,
    NoData,
    NoSpace,
    NotADir,
    NotEmpty,
    NotFound,
)
from dfs.fs.ctx import Ctx, SetAttrs
from dfs.fs.files import FileIO
from dfs.meta import schema as S
from dfs.meta.store import MetaStore, Txn, WriteTxn
from dfs.types import ROOT_INODE, ROOT_VOLUME, Attr, FileHandle, InodeId, VolumeId

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


class Vfs:
    def __init__(
        self,
        meta: MetaStore,
        data: DataStore,
        clock: WallClock = system_time_ns,
        *,
        replica: Callable[[VolumeId], bool] | None = None,
        defer_purge: Callable[[InodeId], None] | None = None,
    ) -> None:
        """``replica(vol)``: this node stores ``vol`` but does not order it (a storage site,
        not the primary): its replicated records change only by applying the primary's
        journal (no purges, atime or recovery writes here). ``defer_purge``: on a node that
        orders volumes other nodes use, an orphan this node no longer uses is handed over
        instead of purged (other nodes' kernels may still use it; dfs.cluster.purge)."""
        self.meta = meta
        self.data = data
        self.clock = clock
        self.lookups: dict[InodeId, int] = {}
        self.files = FileIO(meta, data, clock, self._maybe_purge, replica=replica or _never)
        self._dir_handles: dict[int, InodeId] = {}
        self._next_dir_fh = 1
        self._replica = replica or _never
        self.defer_purge = defer_purge

    def authority(self, vol: VolumeId) -> bool:
        """This node orders the updates of ``vol`` (it is no mere replica of it)."""
        return not self._replica(vol)

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

    # --- lookups and attributes ----------------------------------------------------------

    def lookup(self, parent: InodeId, name: bytes, count: bool = True) -> Attr:
        """The entry's attributes, counting one kernel reference. ENOENT if absent.

        ``count=False`` (here and in the calls that create names): the caller is
        another node, whose kernel references that node counts itself.
        """
        a = self.peek(parent, name)
        if a is None:
            raise NotFound()
        if count:
            self._count(a.ino)
        return a

    def peek(self, parent: InodeId, name: bytes) -> Attr | None:
        """Like lookup, without counting a reference; None if absent."""
        if len(name) > S.MAX_NAME:
            raise NameTooLong()
        with self.meta.read() as txn:
            if name == b"." or name == b"..":
                p = self._dir(txn, parent)
                return p if name == b"." else self._get(txn, p.parent or ROOT_INODE)
            ent = self._child(txn, parent, name)
            if ent is not None:
                return self._get(txn, ent[0])
            self._dir(txn, parent)  # ENOENT/ENOTDIR for a bad parent, as before
            return None

    def getattr(self, ino: InodeId) -> Attr:
        with self.meta.read() as txn:
            return self._get(txn, ino)

    async def setattr(self, ino: InodeId, ch: SetAttrs, ctx: Ctx) -> Attr:
        blocks = None
        old_size: int | None = None
        if ch.size is not None:
            with self.meta.read() as txn:
                old_size = self._get(txn, ino).size  # truncate may commit the new one
            await self.files.truncate(ino, ch.size)
            blocks = self.files.allocated(ino)
        now = self.clock()
        with self.meta.write() as txn:
            a = self._get(txn, ino)
            if ch.size is not None:
                if a.is_dir:
                    raise IsADir()
                if not a.is_reg:
                    raise Invalid()
                # A truncate that keeps the size changes no timestamp: POSIX says so, and
                # the kernel's writeback cache (which keeps mtime/ctime of regular files
                # itself) shows none, so storing one would make them jump at a restart.
                same_size = old_size == ch.size
                a.size = ch.size
                a.blocks = blocks if blocks is not None else a.blocks
                if ch.mtime_ns is None and not same_size:
                    a.mtime_ns = now
                if same_size and ch == SetAttrs(size=ch.size):
                    now = a.ctime_ns
            if ch.mode is not None:
                a.mode = (a.mode & ~0o7777) | (ch.mode & 0o7777)
            owner_changed = False
            if ch.uid is not None and ch.uid != a.uid:
                a.uid = ch.uid
                owner_changed = True
            if ch.gid is not None and ch.gid != a.gid:
                a.gid = ch.gid
                owner_changed = True
            if (owner_changed or ch.uid is not None or ch.gid is not None) and (
                not a.is_dir and ch.mode is None
            ):
                # chown clears set-user-ID, and set-group-ID when it is a real
                # setgid bit (group-executable), as Linux does for every caller.
                a.mode &= ~stat.S_ISUID
                if a.mode & stat.S_IXGRP:
                    a.mode &= ~stat.S_ISGID
            if ch.atime_ns is not None:
                a.atime_ns = ch.atime_ns
            if ch.mtime_ns is not None:
                a.mtime_ns = ch.mtime_ns
            a.ctime_ns = ch.ctime_ns if ch.ctime_ns is not None else now
            a.version = self.meta.log(txn, a.volume, "setattr")
            self._put(txn, a)
        return a

    def readlink(self, ino: InodeId) -> bytes:
        with self.meta.read() as txn:
            a = self._get(txn, ino)
            if not a.is_lnk:
                raise Invalid()
            target = txn.get(S.symlink_key(ino), db=self.meta.symlinks)
            if target is None:
                raise FsError(errno.EIO, f"symlink {ino:#x} has no target")
            return bytes(target)

    # --- creating names -------------------------------------------------------------------

    def _new_inode(
        self,
        txn: WriteTxn,
        parent: Attr,
        name: bytes,
        mode: int,
        ctx: Ctx,
        rdev: int = 0,
    ) -> Attr:
        check_name(name)
        if self._child(txn, parent.ino, name) is not None:
            raise Exists()
        gid = ctx.gid
        if parent.mode & stat.S_ISGID:
            gid = parent.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
            elif (
                mode & (stat.S_ISGID | stat.S_IXGRP) == (stat.S_ISGID | stat.S_IXGRP)
                and ctx.uid != 0
                and not ctx.in_group(gid)
            ):
                mode &= ~stat.S_ISGID
        now = self.clock()
        ino = self.meta.new_inode_id(txn)
        is_dir = stat.S_ISDIR(mode)
        a = Attr(
            ino,
            mode,
            ctx.uid,
            gid,
            2 if is_dir else 1,
            0,
            now,
            now,
            now,
            now,
            rdev=rdev,
            volume=parent.volume,
            parent=parent.ino if is_dir else InodeId(0),
        )
        self._add_entry(txn, parent.ino, name, ino)
        parent.mtime_ns = parent.ctime_ns = now
        if is_dir:
            parent.nlink += 1
        return a

    def _create_node(
        self,
        parent: InodeId,
        name: bytes,
        mode: int,
        ctx: Ctx,
        rdev: int = 0,
        target: bytes | None = None,
        count: bool = True,
    ) -> Attr:
        self.data.require_space(NAME_COST + len(target or b""))
        with self.meta.write() as txn:
            p = self._dir(txn, parent)
            a = self._new_inode(txn, p, name, mode, ctx, rdev)
            if target is not None:
                txn.put(S.symlink_key(a.ino), target, db=self.meta.symlinks)
                a.size = len(target)
            seq = self.meta.log(txn, p.volume, "create")
            a.version = p.version = seq
            self._put(txn, a)
            self._put(txn, p)
        if count:
            self._count(a.ino)
        return a

    def mknod(
        self, parent: InodeId, name: bytes, mode: int, rdev: int, ctx: Ctx, count: bool = True
    ) -> Attr:
        if stat.S_IFMT(mode) == 0:
            mode |= stat.S_IFREG
        if stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
            raise Invalid()
        return self._create_node(parent, name, mode & ~(ctx.umask & 0o777), ctx, rdev, count=count)

    def mkdir(self, parent: InodeId, name: bytes, mode: int, ctx: Ctx, count: bool = True) -> Attr:
        mode = (mode & 0o7777 & ~(ctx.umask & 0o777)) | stat.S_IFDIR
        return self._create_node(parent, name, mode, ctx, count=count)

    def symlink(
        self, parent: InodeId, name: bytes, target: bytes, ctx: Ctx, count: bool = True
    ) -> Attr:
        if len(target) > S.MAX_SYMLINK:
            raise NameTooLong()
        if not target:
            raise NotFound()
        return self._create_node(
            parent, name, stat.S_IFLNK | 0o777, ctx, target=target, count=count
        )

    def create(
        self, parent: InodeId, name: bytes, mode: int, flags: int, ctx: Ctx, count: bool = True
    ) -> tuple[FileHandle, Attr]:
        """Create and open a regular file (O_EXCL: EEXIST if the name exists)."""
        mode = (mode & 0o7777 & ~(ctx.umask & 0o777)) | stat.S_IFREG
        try:
            a = self._create_node(parent, name, mode, ctx, count=count)
        except Exists:
            if flags & os.O_EXCL:
                raise
            a = self.lookup(parent, name, count=count)
            if a.is_dir:
                if count:
                    self.forget([(a.ino, 1)])
                raise IsADir() from None
        return self.files.open(a.ino, flags, a), a

    async def open(self, ino: InodeId, flags: int, ctx: Ctx) -> FileHandle:
        """Open a file. The kernel leaves O_TRUNC to us (FUSE atomic_o_trunc, a libfuse3
        default): truncate, update mtime/ctime, and, as Linux does for callers without
        CAP_FSETID, clear set-user-ID, and set-group-ID if it is group-executable or the
        caller is not in the file's group."""
        fh = self.files.open(ino, flags)
        if flags & os.O_TRUNC:
            try:
                if self.files.stamp_writes:
                    now = self.clock()  # O_TRUNC updates them even if the file was empty
                    ch = SetAttrs(size=0, mtime_ns=now, ctime_ns=now)
                else:
                    # Under FUSE's writeback cache the kernel stamps the O_TRUNC itself and
                    # sends the times when they change (see FileIO.stamp_writes): keep ours.
                    a = self.getattr(ino)
                    ch = SetAttrs(size=0, mtime_ns=a.mtime_ns, ctime_ns=a.ctime_ns)
                if ctx.uid != 0:
                    a = self.getattr(ino)
                    kept = a.mode & ~stat.S_ISUID
                    if kept & stat.S_IXGRP or not ctx.in_group(a.gid):
                        kept &= ~stat.S_ISGID
                    if kept != a.mode:
                        ch.mode = kept
                await self.setattr(ino, ch, ctx)
            except BaseException:
                await self.files.release(fh)
                raise
        return fh

    def link(self, ino: InodeId, new_parent: InodeId, new_name: bytes, count: bool = True) -> Attr:
        self.data.require_space(NAME_COST)
        now = self.clock()
        with self.meta.write() as txn:
            a = self._get(txn, ino)
            if a.is_dir:
                raise FsError(errno.EPERM)
            p = self._dir(txn, new_parent)
            check_name(new_name)
            if self._child(txn, new_parent, new_name) is not None:
                raise Exists()
            if a.nlink == 0:
                raise NotFound()
            self._add_entry(txn, new_parent, new_name, ino)
            a.nlink += 1
            a.ctime_ns = now
            p.mtime_ns = p.ctime_ns = now
            seq = self.meta.log(txn, p.volume, "link")
            a.version = p.version = seq
            self._put(txn, a)
            self._put(txn, p)
        if count:
            self._count(a.ino)
        return a

    # --- removing names -------------------------------------------------------------------

    def unlink(self, parent: InodeId, name: bytes) -> None:
        self._remove(parent, name, want_dir=False)

    def rmdir(self, parent: InodeId, name: bytes) -> None:
        if name == b".":
            raise Invalid()
        if name == b"..":
            raise NotEmpty()
        self._remove(parent, name, want_dir=True)

    def _remove(self, parent: InodeId, name: bytes, *, want_dir: bool) -> None:
        now = self.clock()
        with self.meta.write() as txn:
            p = self._dir(txn, parent)
            if len(name) > S.MAX_NAME:
                raise NameTooLong()
            ent = self._child(txn, parent, name)
            if ent is None:
                raise NotFound()
            child, cookie = ent
            self._not_mount_point(txn, child)
            a = self._get(txn, child)
            if want_dir:
                if not a.is_dir:
                    raise NotADir()
                if not self._is_empty(txn, child):
                    raise NotEmpty()
                p.nlink -= 1
                a.nlink = 0
            else:
                if a.is_dir:
                    raise IsADir()
                a.nlink -= 1
            self._drop_entry(txn, parent, name, cookie)
            a.ctime_ns = now
            p.mtime_ns = p.ctime_ns = now
            seq = self.meta.log(txn, p.volume, "rmdir" if want_dir else "unlink")
            a.version = p.version = seq
            self._put(txn, p)
            self._put(txn, a)
            if a.nlink == 0:
                self._unlinked(txn, a)
        self._maybe_purge(child)

    # --- rename ---------------------------------------------------------------------------

    def rename(
        self,
        old_parent: InodeId,
        old_name: bytes,
        new_parent: InodeId,
        new_name: bytes,
        flags: int = 0,
    ) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (
            RENAME_NOREPLACE | RENAME_EXCHANGE
        ):
            raise Invalid()
        if old_name in (b".", b"..") or new_name in (b".", b".."):
            raise FsError(errno.EBUSY)
        check_name(new_name)
        now = self.clock()
        replaced: InodeId | None = None
        with self.meta.write() as txn:
            op = self._dir(txn, old_parent)
            np = op if new_parent == old_parent else self._dir(txn, new_parent)
            src = self._child(txn, old_parent, old_name)
            if src is None:
                raise NotFound()
            src_ino, src_cookie = src
            self._not_mount_point(txn, src_ino)
            a = self._get(txn, src_ino)
            dst = self._child(txn, new_parent, new_name)
            if dst is not None:
                self._not_mount_point(txn, dst[0])
            if flags & RENAME_EXCHANGE:
                if dst is None:
                    raise NotFound()
            elif dst is not None and flags & RENAME_NOREPLACE:
                raise Exists()
            if op.volume != np.volume:
                raise FsError(errno.EXDEV)
            if dst is not None and dst[0] == src_ino:
                return  # both names are links to the same inode: nothing to do
            if a.is_dir and new_parent != old_parent:
                self._check_not_ancestor(txn, src_ino, new_parent)
            b = self._get(txn, dst[0]) if dst is not None else None
            if flags & RENAME_EXCHANGE:
                assert b is not None and dst is not None
                if b.is_dir and new_parent != old_parent:
                    self._check_not_ancestor(txn, b.ino, old_parent)
                self._drop_entry(txn, old_parent, old_name, src_cookie)
                self._drop_entry(txn, new_parent, new_name, dst[1])
                self._add_entry(txn, old_parent, old_name, b.ino)
                self._add_entry(txn, new_parent, new_name, a.ino)
                if a.is_dir != b.is_dir and old_parent != new_parent:
                    delta = 1 if a.is_dir else -1
                    np.nlink += delta
                    op.nlink -= delta
                if a.is_dir:
                    a.parent = new_parent
                if b.is_dir:
                    b.parent = old_parent
                b.ctime_ns = now
            else:
                if b is not None:
                    if a.is_dir:
                        if not b.is_dir:
                            raise NotADir()
                        if not self._is_empty(txn, b.ino):
                            raise NotEmpty()
                    elif b.is_dir:
                        raise IsADir()
                    assert dst is not None
                    self._drop_entry(txn, new_parent, new_name, dst[1])
                    if b.is_dir:
                        b.nlink = 0
                        np.nlink -= 1
                    else:
                        b.nlink -= 1
                    b.ctime_ns = now
                self._drop_entry(txn, old_parent, old_name, src_cookie)
                self._add_entry(txn, new_parent, new_name, a.ino)
                if a.is_dir and old_parent != new_parent:
                    a.parent = new_parent
                    op.nlink -= 1
                    np.nlink += 1
            a.ctime_ns = now
            op.mtime_ns = op.ctime_ns = now
            np.mtime_ns = np.ctime_ns = now
            seq = self.meta.log(txn, op.volume, "rename")
            for x in (a, op, np, b):
                if x is not None:
                    x.version = seq
            self._put(txn, a)
            self._put(txn, op)
            if np is not op:
                self._put(txn, np)
            if b is not None:
                self._put(txn, b)
                if b.nlink == 0:
                    self._unlinked(txn, b)
                    replaced = b.ino
        if replaced is not None:
            self._maybe_purge(replaced)

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

    # --- directories ----------------------------------------------------------------------

    def opendir(self, ino: InodeId) -> int:
        self.getattr_dir(ino)
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self._dir_handles[fh] = ino
        return fh

    def getattr_dir(self, ino: InodeId) -> Attr:
        with self.meta.read() as txn:
            return self._dir(txn, ino)

    def releasedir(self, fh: int) -> None:
        self._dir_handles.pop(fh, None)

    def dir_of_handle(self, fh: int) -> InodeId:
        try:
            return self._dir_handles[fh]
        except KeyError:
            raise FsError(errno.EBADF) from None

    def readdir(self, ino: InodeId, start: int = 0) -> Iterator[DirEntry]:
        """Entries after cookie ``start``, in cookie order, "." and ".." first.

        Cookies are never reused, so an offset stays valid while the directory
        changes: no entry is skipped or returned twice. Reads are batches of
        short transactions; the caller may stop consuming at any point.
        """
        if start < 2:
            with self.meta.read() as txn:
                d = self._dir(txn, ino)
                dots = [DirEntry(b"..", self._get(txn, d.parent or ROOT_INODE), 2)]
            if start < 1:
                dots.insert(0, DirEntry(b".", d, 1))
            yield from dots
        pos = max(start, S.FIRST_COOKIE - 1)
        prefix = S.dirent_prefix(ino)
        while True:
            batch: list[DirEntry] = []
            with self.meta.read() as txn:
                cur = txn.cursor(db=self.meta.dirpos)
                if not cur.set_range(S.dirpos_key(ino, pos + 1)):
                    return
                for key, name in cur:
                    if not key.startswith(prefix):
                        break
                    cookie = S.read_u64(key[8:])
                    ent = self._child(txn, ino, name)
                    if ent is not None:
                        batch.append(DirEntry(bytes(name), self._get(txn, ent[0]), cookie))
                    pos = cookie
                    if len(batch) >= READDIR_BATCH:
                        break
            if not batch:
                return
            yield from batch

    def remember(self, ino: InodeId) -> None:
        """The kernel accepted an entry returned by readdir: count one reference."""
        self._count(ino)

    def touch_atime(self, ino: InodeId) -> None:
        """relatime: update atime when it is older than mtime/ctime or a day old."""
        now = self.clock()
        with self.meta.read() as txn:
            a = self._get(txn, ino)
        if not self.authority(a.volume):
            return  # atime is kept by the primary, for accesses made there
        if a.atime_ns > a.mtime_ns and a.atime_ns > a.ctime_ns and now - a.atime_ns < RELATIME_NS:
            return
        with self.meta.write() as txn:
            a = self._get(txn, ino)
            a.atime_ns = now
            self._put(txn, a)

    # --- extended attributes --------------------------------------------------------------

    @staticmethod
    def _check_xattr_name(name: bytes) -> None:
        if len(name) > S.MAX_XATTR_NAME:
            raise FsError(errno.ERANGE)
        if name in XATTR_NAMESPACES:
            raise Invalid(message="empty extended attribute name")  # as Linux's handlers
        if not name.startswith(XATTR_NAMESPACES):
            raise FsError(errno.EOPNOTSUPP)

    def getxattr(self, ino: InodeId, name: bytes) -> bytes:
        self._check_xattr_name(name)
        with self.meta.read() as txn:
            v = txn.get(S.xattr_key(ino, name), db=self.meta.xattrs)
            # A miss is by far the common case (the kernel asks for security.capability
            # before every write(2)); only then does it cost a second lookup.
            if v is None:
                if txn.get(S.inode_key(ino), db=self.meta.inodes) is None:
                    raise NotFound()
                raise NoData()
            return bytes(v)

    def listxattr(self, ino: InodeId) -> list[bytes]:
        prefix = S.ino_prefix(ino)
        with self.meta.read() as txn:
            self._get(txn, ino)
            cur = txn.cursor(db=self.meta.xattrs)
            out: list[bytes] = []
            if cur.set_range(prefix):
                for key in cur.iternext(values=False):
                    if not key.startswith(prefix):
                        break
                    out.append(bytes(key[8:]))
            return out

    def setxattr(self, ino: InodeId, name: bytes, value: bytes, flags: int = 0) -> None:
        self._check_xattr_name(name)
        if len(value) > S.MAX_XATTR_VALUE:
            raise FsError(errno.E2BIG)
        self.data.require_space(len(name) + len(value) + NAME_COST)
        with self.meta.write() as txn:
            a = self._get(txn, ino)
            key = S.xattr_key(ino, name)
            old = txn.get(key, db=self.meta.xattrs)
            if flags & XATTR_CREATE and old is not None:
                raise Exists()
            if flags & XATTR_REPLACE and old is None:
                raise NoData()
            total = self._xattr_total(txn, ino) - (len(old) + len(name) if old is not None else 0)
            if total + len(name) + len(value) > S.MAX_XATTR_TOTAL:
                raise NoSpace(message="extended attribute space of this inode is full")
            txn.put(key, value, db=self.meta.xattrs)
            a.ctime_ns = self.clock()
            a.version = self.meta.log(txn, a.volume, "setxattr")
            self._put(txn, a)

    def _xattr_total(self, txn: Txn, ino: int) -> int:
        prefix = S.ino_prefix(ino)
        cur = txn.cursor(db=self.meta.xattrs)
        total = 0
        if cur.set_range(prefix):
            for key, val in cur:
                if not key.startswith(prefix):
                    break
                total += len(key) - 8 + len(val)
        return total

    def removexattr(self, ino: InodeId, name: bytes) -> None:
        self._check_xattr_name(name)
        with self.meta.write() as txn:
            a = self._get(txn, ino)
            if not txn.delete(S.xattr_key(ino, name), db=self.meta.xattrs):
                raise NoData()
            a.ctime_ns = self.clock()
            a.version = self.meta.log(txn, a.volume, "removexattr")
            self._put(txn, a)

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
