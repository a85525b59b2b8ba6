"""The file system as the FUSE layer sees it on one node of a cluster: local reads, routed updates.

``NodeFs`` offers the operations mountd's handlers call, and routes each one by asking
``VolumeRoles`` about the inode's volume:

- **Reads** (lookup, getattr, readdir, read, xattrs) are answered from this node's replica
  when it stores the volume and can prove it current (it orders the volume, or holds a read
  lease); otherwise from the primary (``Reader``) — and from the local replica after all when
  the primary does not answer (it may be stale: docs/CONSISTENCY.md §4, "Reads"). Volumes not
  stored here are read from their primary, with remote handles (``RemoteHandles``).
- **Updates** run in the local ``Vfs`` on the volume's primary and return once every storage
  site in sync applied them (``Replicator.wait``); on any other node they are forwarded
  (``Forwarder``, served by the primary's ``OpServer``).
- **Writes** go through ``WriteBehind``: held and posted, acknowledged at close or fsync.
- **Deadlines.** Every call ends within ``timeouts.call`` of its start, whatever it waits for
  (``dfs.cluster.deadline``); on the primary, waiting for the sites may take a read lease
  longer (``WriteBehind.replicated``). A call cut short fails with ETIMEDOUT; an update it
  carried may still have been made (and a failed flush or fsync says that writes may be lost).

Kernel references (lookup counts) stay on the node whose kernel holds them. A standalone
node is its own primary with no sites: ``NodeFs`` then adds nothing but a call.

Where the cluster's other jobs live: ``reads`` (the read side, NodeFs's base class),
``roles`` (who orders what, epochs, leases),
``forward`` and ``opserver`` (the two ends of ``fs.op``), ``writebehind``, ``commits`` (what
follows each commit), ``purge`` (orphans), ``service`` (wiring a node into every volume).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from dfs.cluster import fsops as F
from dfs.cluster.commits import CommitHook
from dfs.cluster.deadline import fresh_deadline
from dfs.cluster.forward import Forwarder, Send
from dfs.cluster.handles import WRITE_ACCESS, RemoteFile, RemoteHandles, handle_epoch
from dfs.cluster.reads import ReadRouting, after_held_writes, one_deadline
from dfs.cluster.remote import Reader, unpack_attr
from dfs.cluster.replication import Notifier
from dfs.cluster.roles import VolumeRoles
from dfs.cluster.writebehind import Post, WriteBehind
from dfs.errors import FsError
from dfs.fs.ctx import Ctx, SetAttrs
from dfs.fs.vfs import Vfs
from dfs.types import ROOT_INODE, ROOT_VOLUME, Attr, FileHandle, InodeId, VolumeId

log = logging.getLogger("dfs.cluster.fs")
T = TypeVar("T")


class NodeFs(ReadRouting):
    """See the module docstring."""

    def __init__(
        self,
        vfs: Vfs,
        roles: VolumeRoles,
        *,
        send: Send | None = None,
        reader: Callable[[str], Reader] | None = None,
        post: Post | None = None,
        notify: Notifier | None = None,
        view_volume: Callable[[InodeId], VolumeId | None] | None = None,
        applied_timeout: float = 10.0,
    ) -> None:
        """``send``: forwards an operation to a primary; ``reader(node)``: reads of another
        node's replica; ``post``: sends a write without waiting; ``notify``: drops what this
        node's kernel caches; ``view_volume``: the volume of an inode named through a host
        view (MOUNT/.../HOST), if any; ``applied_timeout`` (``timeouts.call``): the deadline
        of each call, and so the longest a forwarded update waits for the primary and then for
        this node's replica to apply it."""
        self.vfs = vfs
        self.files = vfs.files
        self.roles = roles
        self.standalone = not roles.clustered
        self.call_timeout = applied_timeout
        self.handles = RemoteHandles()
        self.forwarder = Forwarder(roles, vfs.meta, send, call_timeout=applied_timeout)
        self.writes = WriteBehind(
            vfs.files,
            roles,
            self.forwarder,
            self.handles,
            lambda: vfs.clock(),
            self.volume_of,
            call_timeout=applied_timeout,
            post=post if not self.standalone else None,
        )
        self.commits = CommitHook(roles, vfs.lookups, notify)
        self._reader = reader
        self._view_volume = view_volume
        self._last_stale = -1e9
        self.checksum_failures = 0
        self.read_repairs = 0
        self._unsubscribe = vfs.meta.subscribe(self.commits)

    def detach(self) -> None:
        """Stop following commits (at shutdown: later ones are only journaled)."""
        self._unsubscribe()

    def applied(self) -> None:
        """This node's replica applied records (``ReplicaApplier`` calls this)."""
        self.forwarder.applied()

    def open_files(self) -> dict[str, int]:
        """Open handles: ``local`` on files stored here (this kernel's, and those held for
        other nodes' writes on a primary), ``remote`` on files read from their primary."""
        return {"local": self.files.open_count(), "remote": len(self.handles.files)}

    # --- updates: here on the primary, else forwarded -------------------------------------------

    async def _replicated(self, vol: VolumeId) -> None:
        """Return once every site in sync of ``vol`` (ordered here) applied this node's updates
        (within the call's deadline plus a lease: ``WriteBehind.replicated``)."""
        await self.writes.replicated(vol)

    async def _fwd(
        self, vol: VolumeId, args: F._Args, ctx: Ctx | None = None, *, update: bool = True
    ) -> Any:
        return await self.writes.forward(vol, args, ctx, update=update)

    async def _update(
        self,
        vol: VolumeId,
        here: Callable[[], T],
        there: F._Args,
        ctx: Ctx | None,
        answer: Callable[[Any], T],
    ) -> T:
        """An update of ``vol``: ``here()`` on its primary (returns once replicated), else
        ``there`` forwarded to the primary and its answer read with ``answer``."""
        if self.roles.admits(vol):
            result = here()
            await self._replicated(vol)
            return result
        return answer(await self._fwd(vol, there, ctx))

    # --- updates ----------------------------------------------------------------------------

    @after_held_writes
    async def setattr(self, ino: InodeId, ch: SetAttrs, ctx: Ctx) -> Attr:
        vol = self.volume_of(ino)
        if self.roles.admits(vol):
            a = await self.vfs.setattr(ino, ch, ctx)
            await self._replicated(vol)
            return a
        return unpack_attr(await self._fwd(vol, F.Setattr(ino, F.setattrs_wire(ch)), ctx))

    @after_held_writes
    async def mknod(self, parent: InodeId, name: bytes, mode: int, rdev: int, ctx: Ctx) -> Attr:
        return await self._update(
            self.volume_of(parent),
            lambda: self.vfs.mknod(parent, name, mode, rdev, ctx),
            F.Mknod(parent, name, mode, rdev),
            ctx,
            self._counted,
        )

    @after_held_writes
    async def mkdir(self, parent: InodeId, name: bytes, mode: int, ctx: Ctx) -> Attr:
        return await self._update(
            self.volume_of(parent),
            lambda: self.vfs.mkdir(parent, name, mode, ctx),
            F.Mkdir(parent, name, mode),
            ctx,
            self._counted,
        )

    @after_held_writes
    async def symlink(self, parent: InodeId, name: bytes, target: bytes, ctx: Ctx) -> Attr:
        return await self._update(
            self.volume_of(parent),
            lambda: self.vfs.symlink(parent, name, target, ctx),
            F.Symlink(parent, name, target),
            ctx,
            self._counted,
        )

    @after_held_writes
    async def link(self, ino: InodeId, new_parent: InodeId, new_name: bytes) -> Attr:
        vol = self.volume_of(new_parent)
        if self.volume_of(ino) != vol:
            raise FsError(errno.EXDEV, "a hard link cannot cross volumes")
        return await self._update(
            vol,
            lambda: self.vfs.link(ino, new_parent, new_name),
            F.Link(ino, new_parent, new_name),
            None,
            self._counted,
        )

    @after_held_writes
    async def unlink(self, parent: InodeId, name: bytes) -> None:
        await self._update(
            self.volume_of(parent),
            lambda: self.vfs.unlink(parent, name),
            F.Unlink(parent, name),
            None,
            _nothing,
        )

    @after_held_writes
    async def rmdir(self, parent: InodeId, name: bytes) -> None:
        await self._update(
            self.volume_of(parent),
            lambda: self.vfs.rmdir(parent, name),
            F.Rmdir(parent, name),
            None,
            _nothing,
        )

    @after_held_writes
    async def rename(
        self, old_parent: InodeId, old_name: bytes, new_parent: InodeId, new_name: bytes, flags: int
    ) -> None:
        vol = self.volume_of(old_parent)
        if self.volume_of(new_parent) != vol:
            raise FsError(errno.EXDEV, "a rename cannot cross volumes")
        await self._update(
            vol,
            lambda: self.vfs.rename(old_parent, old_name, new_parent, new_name, flags),
            F.Rename(old_parent, old_name, new_parent, new_name, flags),
            None,
            _nothing,
        )

    @after_held_writes
    async def setxattr(self, ino: InodeId, name: bytes, value: bytes, flags: int = 0) -> None:
        await self._update(
            self.volume_of(ino),
            lambda: self.vfs.setxattr(ino, name, value, flags),
            F.Setxattr(ino, name, value, flags),
            None,
            _nothing,
        )

    @after_held_writes
    async def removexattr(self, ino: InodeId, name: bytes) -> None:
        await self._update(
            self.volume_of(ino),
            lambda: self.vfs.removexattr(ino, name),
            F.Removexattr(ino, name),
            None,
            _nothing,
        )

    # --- files --------------------------------------------------------------------------------

    @after_held_writes
    async def create(
        self, parent: InodeId, name: bytes, mode: int, flags: int, ctx: Ctx
    ) -> tuple[FileHandle, Attr]:
        vol = self.volume_of(parent)
        if self.roles.admits(vol):
            fh, a = self.vfs.create(parent, name, mode, flags, ctx)
            await self._replicated(vol)
            return fh, a
        wire = await self._fwd(vol, F.Create(parent, name, mode, flags), ctx)
        if not (isinstance(wire, list) and len(wire) == 2 and isinstance(wire[0], int)):
            raise FsError(errno.EIO, "malformed create answer from the primary")
        a = self._counted(wire[1])
        if not self.roles.stores(vol):
            rf = RemoteFile(vol, a.ino, wire[0], flags)
            return FileHandle(self.handles.new(self.handles.files, rf)), a
        fh = self.files.open(a.ino, flags, a)
        self.handles.on_primary[fh] = wire[0]
        return fh, a

    @after_held_writes
    async def open(self, ino: InodeId, flags: int, ctx: Ctx) -> FileHandle:
        vol = self.volume_of(ino)
        if self.roles.admits(vol) if flags & WRITE_ACCESS else self.roles.orders(vol):
            fh = await self.vfs.open(ino, flags, ctx)
            if flags & os.O_TRUNC:
                await self._replicated(vol)
            return fh
        stored = self.roles.stores(vol)
        if stored and not flags & WRITE_ACCESS:
            return self.files.open(ino, flags, await self._arriving_attr(vol, ino))
        rfh = await self._fwd(vol, F.Open(ino, flags), ctx, update=bool(flags & WRITE_ACCESS))
        if not isinstance(rfh, int):
            raise FsError(errno.EIO, "malformed open answer from the primary")
        if not stored:
            rf = RemoteFile(vol, ino, rfh, flags)
            return FileHandle(self.handles.new(self.handles.files, rf))
        try:
            fh = self.files.open(ino, flags, await self._arriving_attr(vol, ino))
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._release_remote(vol, rfh)
            raise
        self.handles.on_primary[fh] = rfh
        return fh

    async def _arriving_attr(self, vol: VolumeId, ino: InodeId) -> Attr | None:
        """The primary's attributes of ``ino`` when this node's replica does not have it yet
        (a handle on it is opened here all the same: its reads go to the primary until the
        replica has it), else None."""
        if not self._arriving(ino):
            return None
        return await self._read(vol).getattr(ino)

    def cached(self, fh: int) -> bool:
        """The kernel may keep ``fh``'s file's pages from an earlier open (it is told of
        every change to files stored here; not of the others')."""
        return fh not in self.handles.files

    def inode_of(self, fh: int) -> InodeId:
        rf = self.handles.files.get(fh)
        return rf.ino if rf is not None else self.files.inode_of(fh)

    @one_deadline
    async def write(self, fh: int, off: int, data: bytes) -> int:
        """Write (held, posted or applied here: ``WriteBehind``); acknowledged at flush or
        fsync."""
        return await self.writes.write(fh, off, data)

    @one_deadline
    async def flush(self, fh: int) -> None:
        """close(2): the handle's writes are on every storage site in sync when it returns."""
        await self.writes.held_of(fh)
        stream = self.writes.stream_needs_flush(fh)
        if stream is not None:
            await self.writes.flush_stream(fh, F.Flush(stream.rfh))
            return
        await self.writes.wait_acked(fh)

    @one_deadline
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.writes.held_of(fh)
        stream = self.writes.streams.get(fh)
        if stream is not None:
            await self.writes.flush_stream(fh, F.Fsync(stream.rfh, datasync))
            return
        if fh not in self.handles.files:
            vol = self._handle_volume(fh)

            async def here() -> None:  # not an update: it fails if its writes reach no majority
                await self.files.fsync(fh, datasync)
                await self._replicated(vol)

            if self.roles.orders(vol):
                await here()
                return
            if fh not in self.handles.on_primary and not self._writable(fh):
                return  # opened here read-only: nothing of it to sync
            await self.writes.on_primary(fh, lambda rfh: F.Fsync(rfh, datasync), here=here)
            return
        await self.writes.on_primary(fh, lambda rfh: F.Fsync(rfh, datasync))

    def _writable(self, fh: int) -> bool:
        return bool(self.files.handle(fh).flags & WRITE_ACCESS)

    @after_held_writes
    async def fsyncdir(self, ino: InodeId = ROOT_INODE) -> None:
        vol = self.volume_of(ino)
        if self.roles.orders(vol):
            await self.vfs.sync()
            await self._replicated(vol)
            return
        await self._fwd(vol, F.Sync(ino))

    @one_deadline
    async def release(self, fh: int) -> None:
        """The kernel closed ``fh`` for good (no system call waits for this): what it holds or
        posted is written and flushed (a failure is logged: nobody can be told any more), then
        the handle is closed here, and on the primary with a deadline of its own (else the
        primary would keep it open)."""
        try:
            await self.writes.held_of(fh)
        except FsError as exc:
            log.warning("writes of handle %d failed at release: %s", fh, exc)
        await self.writes.close_stream(fh)
        rf = self.handles.files.pop(fh, None)
        if rf is not None:
            await self._release_remote(rf.vol, rf.rfh)
            return
        rfh = self.handles.on_primary.pop(fh, None)
        vol = self._handle_volume(fh) if rfh is not None else ROOT_VOLUME
        try:
            try:
                await self.flush(fh)  # written through a mapping, or closed without a flush
            except FsError as exc:
                log.warning("writes of handle %d failed at release: %s", fh, exc)
            await self.files.release(fh)
        finally:
            if rfh is not None:
                await self._release_remote(vol, rfh)

    async def _release_remote(self, vol: VolumeId, rfh: int) -> None:
        if handle_epoch(rfh) < self.roles.epoch(vol):
            return  # opened by an earlier primary, which closed it when it stepped down
        try:
            with fresh_deadline(self.call_timeout):
                await self._fwd(vol, F.Release(rfh))
        except FsError as exc:
            log.warning("release of handle %d on the primary failed: %s", rfh, exc)

    # --- what this node still uses ------------------------------------------------------------

    def holds(self, inos: list[Any]) -> list[int]:
        """Which of ``inos`` this node's kernel or open handles still use (``repl.holds``)."""
        return [
            i
            for i in inos
            if isinstance(i, int) and (not self.vfs.unused(InodeId(i)) or i in self.handles.counts)
        ]


def _nothing(answer: Any) -> None:
    return None
