"""The FUSE request handlers: unpack, one call into ``dfs.fs``, convert the result.

No policy and no storage access lives here; see ``dfs/fs/vfs.py``. Entries and
attributes carry long timeouts because every change to this node's tree passes
through this kernel, which invalidates its own caches; the cluster layer will
invalidate explicitly for changes made elsewhere.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence

import pyfuse3

from dfs.errors import NotFound
from dfs.fs.ctx import SetAttrs
from dfs.fs.vfs import Vfs
from dfs.types import InodeId
from mountd.fuse_convert import ctx_of, entry, fuse_errors, negative_entry

CACHE_TIMEOUT = 300.0
DOTS = (b".", b"..")


class DfsOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = True

    def __init__(self, vfs: Vfs, timeout: float = CACHE_TIMEOUT) -> None:
        super().__init__()
        self.vfs = vfs
        self.timeout = timeout
        vfs.files.stamp_writes = not self.enable_writeback_cache

    @fuse_errors
    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        try:
            a = self.vfs.lookup(InodeId(parent_inode), name)
        except NotFound:
            return negative_entry(self.timeout)
        return entry(a, self.timeout)

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        try:
            self.vfs.forget([(InodeId(i), n) for i, n in inode_list])
        except Exception:  # forget must never raise
            import logging

            logging.getLogger("dfs.fuse").exception("UNEXPECTED EXCEPTION in forget")

    @fuse_errors
    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return entry(self.vfs.getattr(InodeId(inode)), self.timeout)

    @fuse_errors
    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        ch = SetAttrs(
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            ctime_ns=attr.st_ctime_ns if fields.update_ctime else None,
        )
        a = await self.vfs.setattr(InodeId(inode), ch, ctx_of(ctx))
        return entry(a, self.timeout)

    @fuse_errors
    async def readlink(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> bytes:
        return self.vfs.readlink(InodeId(inode))

    @fuse_errors
    async def mknod(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        mode: pyfuse3.ModeT,
        rdev: int,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        a = self.vfs.mknod(InodeId(parent_inode), name, mode, rdev, ctx_of(ctx))
        return entry(a, self.timeout)

    @fuse_errors
    async def mkdir(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        mode: pyfuse3.ModeT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        return entry(self.vfs.mkdir(InodeId(parent_inode), name, mode, ctx_of(ctx)), self.timeout)

    @fuse_errors
    async def unlink(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        self.vfs.unlink(InodeId(parent_inode), name)

    @fuse_errors
    async def rmdir(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        self.vfs.rmdir(InodeId(parent_inode), name)

    @fuse_errors
    async def symlink(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        target: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        a = self.vfs.symlink(InodeId(parent_inode), name, target, ctx_of(ctx))
        return entry(a, self.timeout)

    @fuse_errors
    async def rename(
        self,
        parent_inode_old: pyfuse3.InodeT,
        name_old: bytes,
        parent_inode_new: pyfuse3.InodeT,
        name_new: bytes,
        flags: pyfuse3.FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        self.vfs.rename(
            InodeId(parent_inode_old), name_old, InodeId(parent_inode_new), name_new, flags
        )

    @fuse_errors
    async def link(
        self,
        inode: pyfuse3.InodeT,
        new_parent_inode: pyfuse3.InodeT,
        new_name: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        a = self.vfs.link(InodeId(inode), InodeId(new_parent_inode), new_name)
        return entry(a, self.timeout)

    @fuse_errors
    async def open(
        self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        fh = await self.vfs.open(InodeId(inode), flags, ctx_of(ctx))
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), keep_cache=True)

    @fuse_errors
    async def create(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        mode: pyfuse3.ModeT,
        flags: pyfuse3.FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        fh, a = self.vfs.create(InodeId(parent_inode), name, mode, flags, ctx_of(ctx))
        fi = pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), keep_cache=True)
        return fi, entry(a, self.timeout)

    @fuse_errors
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        data = await self.vfs.files.read(fh, off, size)
        self.vfs.touch_atime(self.vfs.files.inode_of(fh))
        return data

    @fuse_errors
    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        return await self.vfs.files.write(fh, off, buf)

    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        """Tell the kernel to stop sending FLUSH: there is nothing left for it to do.

        Before FLUSH the kernel has already written every dirty page back to
        us (write handlers are synchronous), and write errors reach close(2)
        through the page cache. Checksums settle on release and fsync. Saying
        ENOSYS once saves a request round trip on every close(2).
        """
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @fuse_errors
    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        await self.vfs.files.release(fh)

    @fuse_errors
    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        await self.vfs.files.fsync(fh, datasync)

    @fuse_errors
    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        return pyfuse3.FileHandleT(self.vfs.opendir(InodeId(inode)))

    @fuse_errors
    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        ino = self.vfs.dir_of_handle(fh)
        for e in self.vfs.readdir(ino, start_id):
            if not pyfuse3.readdir_reply(token, e.name, entry(e.attr, self.timeout), e.cookie):
                break
            if e.name not in DOTS:
                self.vfs.remember(e.attr.ino)
        self.vfs.touch_atime(ino)

    @fuse_errors
    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        self.vfs.releasedir(fh)

    @fuse_errors
    async def fsyncdir(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        await self.vfs.sync()

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = self.vfs.statfs()
        d = pyfuse3.StatvfsData()
        d.f_bsize = s.block_size
        d.f_frsize = s.block_size
        d.f_blocks = s.blocks
        d.f_bfree = s.blocks_free
        d.f_bavail = s.blocks_avail
        d.f_files = s.files
        d.f_ffree = s.files_free
        d.f_favail = s.files_free
        d.f_namemax = s.name_max
        return d

    @fuse_errors
    async def setxattr(
        self, inode: pyfuse3.InodeT, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        self.vfs.setxattr(InodeId(inode), name, value)

    @fuse_errors
    async def getxattr(
        self, inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> bytes:
        return self.vfs.getxattr(InodeId(inode), name)

    @fuse_errors
    async def listxattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> Sequence[bytes]:
        return self.vfs.listxattr(InodeId(inode))

    @fuse_errors
    async def removexattr(
        self, inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        self.vfs.removexattr(InodeId(inode), name)
