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

from dfs.errors import (
    Exists,
    FsError,
    Invalid,
    IsADir,
    NameTooLong,
    NotADir,
    NotEmpty,
    NotFound,
)
from dfs.fs.base import (
    NAME_COST,
    READDIR_BATCH,
    RELATIME_NS,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    XATTR_CREATE,
    XATTR_NAMESPACES,
    XATTR_REPLACE,
    DirEntry,
    FsStats,
    VfsBase,
    check_name,
    delete_inode_records,
)
from dfs.fs.ctx import Ctx, SetAttrs
from dfs.fs.dirs import Directories
from dfs.fs.reclaim import Reclaim
from dfs.fs.volroots import VolumeRoots
from dfs.fs.xattrs import Xattrs
from dfs.meta import schema as S
from dfs.meta.store import WriteTxn
from dfs.types import ROOT_INODE, Attr, FileHandle, InodeId

__all__ = [
    "NAME_COST",
    "READDIR_BATCH",
    "RELATIME_NS",
    "RENAME_EXCHANGE",
    "RENAME_NOREPLACE",
    "XATTR_CREATE",
    "XATTR_NAMESPACES",
    "XATTR_REPLACE",
    "DirEntry",
    "FsStats",
    "Vfs",
    "VfsBase",
    "check_name",
    "delete_inode_records",
]

log = logging.getLogger(__name__)


class Vfs(VolumeRoots, Directories, Xattrs, Reclaim, VfsBase):
    """POSIX semantics over the stores: the namespace here, the other parts in their modules."""

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
