"""The FUSE request handlers: unpack, one call into ``dfs.fs``, convert the result.

No policy and no storage access lives here; see ``dfs/fs/vfs.py``. Entries and
attributes carry long timeouts because every change to this node's tree passes
through this kernel, which invalidates its own caches; the cluster layer will
invalidate explicitly for changes made elsewhere.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Sequence

import pyfuse3

from dfs.cluster.applier import Inval
from dfs.cluster.nodefs import NodeFs
from dfs.cluster.views import VIEW_DIR_NAME, HostViews, is_view
from dfs.errors import FsError, NotFound
from dfs.fs.ctx import SetAttrs
from dfs.metrics import FuseMetrics
from dfs.types import InodeId, VolumeId
from mountd.fuse_convert import ctx_of, entry, fuse_errors, negative_entry

CACHE_TIMEOUT = 300.0
VIEW_TIMEOUT = 1.0  # host views are not invalidated: the kernel re-asks after this
REMOTE_TIMEOUT = 1.0  # nor are volumes this node does not store (docs/CONSISTENCY.md)
VIEW_FH = 1 << 62  # handles of files and directories opened through a host view
DOTS = (b".", b"..")


NEGATIVE_MEMORY = 1.0  # seconds a negative lookup answer counts as possibly in flight
NEGATIVES_MAX = 4096


class DfsOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = True

    def __init__(
        self,
        fs: NodeFs,
        timeout: float = CACHE_TIMEOUT,
        views: HostViews | None = None,
        metrics: FuseMetrics | None = None,
    ) -> None:
        super().__init__()
        self.fuse_metrics = metrics  # requests timed and counted by ``fuse_errors``
        self.vfs = fs
        self.timeout = timeout
        self.views = views
        self._view_fh: dict[int, InodeId] = {}
        self._next_view_fh = VIEW_FH
        # Under the writeback cache the kernel owns the size and times of regular files
        # it has cached and ignores the values we send, even after an invalidation: a
        # node whose files change elsewhere must do without it (docs/ARCHITECTURE.md).
        # The daemon builds a standalone node's Vfs for it (``Vfs(writeback_cache=True)``).
        self.enable_writeback_cache = fs.vfs.writeback_cache
        assert not (self.enable_writeback_cache and not fs.standalone), "cluster without it"
        # (parent, name) -> when this node last answered that the name does not exist.
        self._negatives: dict[tuple[int, bytes], float] = {}

    def _answered_negative(self, parent: int, name: bytes) -> None:
        now = time.monotonic()
        key = (parent, name)
        self._negatives.pop(key, None)
        self._negatives[key] = now  # newest last
        while self._negatives:
            first = next(iter(self._negatives))
            if (
                len(self._negatives) <= NEGATIVES_MAX
                and now - self._negatives[first] < NEGATIVE_MEMORY
            ):
                break
            del self._negatives[first]

    def in_flight(self, item: Inval) -> bool:
        """Whether the kernel may be making what ``item`` invalidates right now (see
        mountd.daemon.invalidate_one): an inode it holds references to, or a name this
        node answered negatively a moment ago. Called from the invalidation thread."""
        if item[0] == "e" and len(item) == 3:
            t = self._negatives.get((item[1], item[2]))
            return t is not None and time.monotonic() - t < NEGATIVE_MEMORY
        return InodeId(item[1]) in self.vfs.vfs.lookups

    # --- host views (MOUNT/.../HOST/path, dfs/cluster/views.py) --------------------------------

    def _real(self, ino: int) -> InodeId:
        """The inode an update names: a view inode stands for the same file in the tree."""
        if self.views is None or not is_view(ino):
            return InodeId(ino)
        return self.views.real(InodeId(ino))[1]

    def _timeout(self, ino: int, vol: int | None = None) -> float:
        """How long the kernel may trust what it is told of ``ino``: long for what this
        node stores (every change reaches it through this node, which invalidates); short
        for a volume stored elsewhere, like a host view."""
        if vol is not None:
            return self.timeout if self.vfs.stores(VolumeId(vol)) else REMOTE_TIMEOUT
        return REMOTE_TIMEOUT if self.vfs.is_remote(InodeId(ino)) else self.timeout

    def _new_view_fh(self, ino: InodeId) -> pyfuse3.FileHandleT:
        fh = self._next_view_fh
        self._next_view_fh += 1
        self._view_fh[fh] = ino
        return pyfuse3.FileHandleT(fh)

    def _view_ino(self, fh: int) -> InodeId:
        try:
            return self._view_fh[fh]
        except KeyError:
            raise FsError(errno.EBADF) from None

    @fuse_errors
    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if self.views is not None:
            if is_view(parent_inode):
                return entry(await self.views.lookup(InodeId(parent_inode), name), VIEW_TIMEOUT)
            if parent_inode == pyfuse3.ROOT_INODE and name == VIEW_DIR_NAME:
                return entry(self.views.dots_attr(), VIEW_TIMEOUT)
        try:
            a = await self.vfs.lookup(InodeId(parent_inode), name)
        except NotFound:
            self._answered_negative(parent_inode, name)
            return negative_entry(self._timeout(parent_inode))
        return entry(a, self._timeout(a.ino))

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        try:
            if self.views is not None and any(is_view(i) for i, _ in inode_list):
                self.views.forget([(InodeId(i), n) for i, n in inode_list if is_view(i)])
                inode_list = [(i, n) for i, n in inode_list if not is_view(i)]
            self.vfs.forget([(InodeId(i), n) for i, n in inode_list])
        except Exception:  # forget must never raise
            import logging

            logging.getLogger("dfs.fuse").exception("UNEXPECTED EXCEPTION in forget")

    @fuse_errors
    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if self.views is not None and is_view(inode):
            return entry(await self.views.getattr(InodeId(inode)), VIEW_TIMEOUT)
        return entry(await self.vfs.getattr(InodeId(inode)), self._timeout(inode))

    @fuse_errors
    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        mtime = attr.st_mtime_ns if fields.update_mtime else None
        ctime = attr.st_ctime_ns if fields.update_ctime else None
        if fields.update_size and fh is not None and mtime is None:
            # ftruncate(2) sets mtime and ctime even when the size stays (truncate(2) by
            # path does not). Without the writeback cache the kernel leaves that to us
            # (fuse's update_mtime()), and only the handle tells the two apart.
            mtime = ctime = time.time_ns()
        ch = SetAttrs(
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=mtime,
            ctime_ns=ctime,
        )
        a = await self.vfs.setattr(self._real(inode), ch, ctx_of(ctx))
        if self.views is not None and is_view(inode):
            a.ino = InodeId(inode)
            return entry(a, VIEW_TIMEOUT)
        return entry(a, self._timeout(inode))

    @fuse_errors
    async def readlink(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> bytes:
        if self.views is not None and is_view(inode):
            return await self.views.readlink(InodeId(inode))
        return await self.vfs.readlink(InodeId(inode))

    @fuse_errors
    async def mknod(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        mode: pyfuse3.ModeT,
        rdev: int,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        a = await self.vfs.mknod(self._real(parent_inode), name, mode, rdev, ctx_of(ctx))
        return entry(a, self._timeout(a.ino))

    @fuse_errors
    async def mkdir(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        mode: pyfuse3.ModeT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        a = await self.vfs.mkdir(self._real(parent_inode), name, mode, ctx_of(ctx))
        return entry(a, self._timeout(a.ino))

    @fuse_errors
    async def unlink(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        await self.vfs.unlink(self._real(parent_inode), name)

    @fuse_errors
    async def rmdir(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        await self.vfs.rmdir(self._real(parent_inode), name)

    @fuse_errors
    async def symlink(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        target: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        a = await self.vfs.symlink(self._real(parent_inode), name, target, ctx_of(ctx))
        return entry(a, self._timeout(a.ino))

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
        await self.vfs.rename(
            self._real(parent_inode_old), name_old, self._real(parent_inode_new), name_new, flags
        )

    @fuse_errors
    async def link(
        self,
        inode: pyfuse3.InodeT,
        new_parent_inode: pyfuse3.InodeT,
        new_name: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        a = await self.vfs.link(self._real(inode), self._real(new_parent_inode), new_name)
        return entry(a, self._timeout(a.ino))

    @fuse_errors
    async def open(
        self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        if self.views is not None and is_view(inode):
            if not flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
                await self.views.getattr(InodeId(inode))  # ENOENT/EHOSTDOWN now, not at read
                return pyfuse3.FileInfo(fh=self._new_view_fh(InodeId(inode)), direct_io=True)
            # A write through a view is a write to the same file in the tree.
            fh = await self.vfs.open(self._real(inode), flags, ctx_of(ctx))
            return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), direct_io=True)
        fh = await self.vfs.open(InodeId(inode), flags, ctx_of(ctx))
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), keep_cache=self.vfs.cached(fh))

    @fuse_errors
    async def create(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        mode: pyfuse3.ModeT,
        flags: pyfuse3.FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        fh, a = await self.vfs.create(self._real(parent_inode), name, mode, flags, ctx_of(ctx))
        fi = pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), keep_cache=self.vfs.cached(fh))
        return fi, entry(a, self._timeout(a.ino))

    @fuse_errors
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        if fh >= VIEW_FH:
            assert self.views is not None
            return await self.views.read(self._view_ino(fh), off, size)
        data = await self.vfs.read(fh, off, size)
        self.vfs.touch_atime(self.vfs.inode_of(fh))
        return data

    @fuse_errors
    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        return await self.vfs.write(fh, off, buf)

    @fuse_errors
    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        """close(2): in a cluster, wait until the handle's writes are replicated.

        Alone, there is nothing left to do: before FLUSH the kernel has written
        every dirty page back to us (write handlers are synchronous), write
        errors reach close(2) through the page cache, and checksums settle on
        release and fsync. Saying ENOSYS once then saves a request round trip on
        every close(2).
        """
        if self.vfs.standalone:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        if fh < VIEW_FH:
            await self.vfs.flush(fh)

    @fuse_errors
    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        if fh >= VIEW_FH:
            self._view_fh.pop(fh, None)
            return
        await self.vfs.release(fh)

    @fuse_errors
    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        if fh < VIEW_FH:
            await self.vfs.fsync(fh, datasync)

    @fuse_errors
    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        if self.views is not None and is_view(inode):
            await self.views.getattr(InodeId(inode))
            return self._new_view_fh(InodeId(inode))
        return pyfuse3.FileHandleT(self.vfs.opendir(InodeId(inode)))

    @fuse_errors
    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        if fh >= VIEW_FH:
            assert self.views is not None
            view_dir = self._view_ino(fh)
            entries = await self.views.readdir(view_dir, start_id)
            for e in entries:
                if not pyfuse3.readdir_reply(token, e.name, entry(e.attr, VIEW_TIMEOUT), e.cookie):
                    break
                if e.name not in DOTS:
                    self.views.remember(e.attr.ino)
            return
        ino = self.vfs.dir_of_handle(fh)
        for e in await self.vfs.readdir(ino, start_id):
            timeout = self._timeout(e.attr.ino, e.attr.volume)
            if not pyfuse3.readdir_reply(token, e.name, entry(e.attr, timeout), e.cookie):
                break
            if e.name not in DOTS:
                self.vfs.remember(e.attr)
        self.vfs.touch_atime(ino)

    @fuse_errors
    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        if fh >= VIEW_FH:
            self._view_fh.pop(fh, None)
            return
        self.vfs.releasedir(fh)

    @fuse_errors
    async def fsyncdir(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        if fh >= VIEW_FH:
            return
        await self.vfs.fsyncdir(self.vfs.dir_of_handle(fh))

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
        await self.vfs.setxattr(self._real(inode), name, value)

    @fuse_errors
    async def getxattr(
        self, inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> bytes:
        if self.views is not None and is_view(inode):
            return await self.views.getxattr(InodeId(inode), name)
        return await self.vfs.getxattr(InodeId(inode), name)

    @fuse_errors
    async def listxattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> Sequence[bytes]:
        if self.views is not None and is_view(inode):
            return await self.views.listxattr(InodeId(inode))
        return await self.vfs.listxattr(InodeId(inode))

    @fuse_errors
    async def removexattr(
        self, inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        await self.vfs.removexattr(self._real(inode), name)
