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

Kernel references (lookup counts) stay on the node whose kernel holds them. A standalone
node is its own primary with no sites: ``NodeFs`` then adds nothing but a call.

Where the cluster's other jobs live: ``dfs.cluster.roles`` (who orders what, epochs, leases),
``forward`` and ``opserver`` (the two ends of ``fs.op``), ``writebehind``, ``commits`` (what
follows each commit), ``purge`` (orphans), ``service`` (wiring a node into every volume).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, Concatenate, ParamSpec, TypeVar

import trio

from dfs.cluster import fsops as F
from dfs.cluster.commits import CommitHook
from dfs.cluster.forward import Forwarder, Send
from dfs.cluster.handles import RemoteFile, RemoteHandles
from dfs.cluster.remote import MAX_READ, Reader, unpack_attr
from dfs.cluster.replication import Notifier
from dfs.cluster.roles import VolumeRoles
from dfs.cluster.volumes import Volume
from dfs.cluster.writebehind import Post, WriteBehind
from dfs.errors import FsError, NotFound
from dfs.fs.ctx import Ctx, SetAttrs
from dfs.fs.vfs import DirEntry, FsStats, Vfs
from dfs.net.rpc import PeerTimeout, PeerUnavailable
from dfs.types import ROOT_INODE, ROOT_VOLUME, Attr, FileHandle, InodeId, VolumeId

log = logging.getLogger("dfs.cluster.fs")
T = TypeVar("T")
P = ParamSpec("P")

WRITE_ACCESS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC
STALE_LOG_EVERY = 10.0


def _after_held_writes(
    fn: Callable[Concatenate[NodeFs, P], Awaitable[T]],
) -> Callable[Concatenate[NodeFs, P], Coroutine[Any, Any, T]]:
    """Run an operation only once every write this node holds (``WriteBehind``) is written:
    whatever it reads or changes then sees them, as after a plain write."""

    @functools.wraps(fn)
    async def run(self: NodeFs, /, *args: P.args, **kwargs: P.kwargs) -> T:
        if self.writes.pending():
            await self.writes.write_held()
        return await fn(self, *args, **kwargs)

    return run


class NodeFs:
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
        view (MOUNT/.../HOST), if any."""
        self.vfs = vfs
        self.files = vfs.files
        self.roles = roles
        self.standalone = not roles.clustered
        self.handles = RemoteHandles()
        self.forwarder = Forwarder(roles, vfs.meta, send, applied_timeout=applied_timeout)
        self.writes = WriteBehind(
            vfs.files,
            roles,
            self.forwarder,
            self.handles,
            lambda: vfs.clock(),
            self.volume_of,
            post=post if not self.standalone else None,
        )
        self.commits = CommitHook(roles, vfs.lookups, notify)
        self._reader = reader
        self._view_volume = view_volume
        self._last_stale = -1e9
        self._unsubscribe = vfs.meta.subscribe(self.commits)

    def detach(self) -> None:
        """Stop following commits (at shutdown: later ones are only journaled)."""
        self._unsubscribe()

    def applied(self) -> None:
        """This node's replica applied records (``ReplicaApplier`` calls this)."""
        self.forwarder.applied()

    # --- which volume, and where its reads go --------------------------------------------------

    def volume_of(self, ino: InodeId) -> VolumeId:
        if self.roles.volumes is None:
            return ROOT_VOLUME
        r = self.handles.counts.get(ino)
        if r is not None:
            return VolumeId(r[0])
        try:
            return self.vfs.getattr(ino).volume
        except NotFound:
            # Named through a host view (MOUNT/.../HOST/...), in a volume not stored here.
            vol = self._view_volume(ino) if self._view_volume is not None else None
            if vol is None:
                raise
            return vol

    def stores(self, vol: VolumeId) -> bool:
        return self.roles.stores(vol)

    def _handle_volume(self, fh: int) -> VolumeId:
        return self.volume_of(self.files.inode_of(fh))

    def is_remote(self, ino: InodeId) -> bool:
        """``ino`` belongs to a volume this node does not store: its attributes, names and
        contents are fetched from the volume's primary and not invalidated here, so the
        FUSE layer caches them briefly only."""
        return ino in self.handles.counts

    def _reads_here(self, vol: VolumeId) -> bool:
        """Reads of ``vol`` are answered from this node's replica: it stores one, can prove it
        current, and has applied every update this node made through the primary."""
        if not self.roles.stores(vol) or self.forwarder.behind(vol):
            return False
        return self.roles.current(vol)

    async def _current_read(
        self, vol: VolumeId, remote: Callable[[Reader], Awaitable[T]], local: Callable[[], T]
    ) -> T:
        """A read of a stored volume: local when current, else from the primary; when the
        primary cannot be reached, from this node's replica after all (it may be stale)."""
        if self._reads_here(vol):
            return local()
        try:
            return await remote(self._read(vol))
        except (PeerUnavailable, PeerTimeout) as exc:
            now = trio.current_time()
            if now - self._last_stale >= STALE_LOG_EVERY:
                self._last_stale = now
                log.warning(
                    "volume %d: no read lease and the primary does not answer (%s): "
                    "reading the local replica, which may be stale",
                    vol,
                    exc,
                )
            return local()

    def _read(self, vol: VolumeId) -> Reader:
        """Where reads of ``vol`` go when not answered here: its primary."""
        if self._reader is None:
            raise FsError(errno.ESTALE, f"volume {vol} is not stored here")
        return self._reader(self.roles.primary(vol))

    # --- updates: here on the primary, else forwarded -------------------------------------------

    async def _replicated(self, vol: VolumeId) -> None:
        """Return once every site in sync of ``vol`` (ordered here) applied this node's updates."""
        repl = self.roles.replicator(vol)
        if repl is not None:
            await repl.wait()

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
        if self.roles.orders(vol):
            result = here()
            await self._replicated(vol)
            return result
        return answer(await self._fwd(vol, there, ctx))

    async def _fresh(self, a: Attr) -> Attr:
        """``a`` from this node's replica, or the primary's when this node has posted writes
        to that file that its replica may not show before they are flushed."""
        if a.ino not in self.writes.unflushed:
            return a
        await self.writes.drain()
        return await self._read(a.volume).getattr(a.ino)

    def _counted(self, wire: Any) -> Attr:
        a = unpack_attr(wire)
        self._counted_attr(a)
        return a

    # --- reads: this node's replica, or the primary's for volumes not stored here ----------------

    @_after_held_writes
    async def lookup(self, parent: InodeId, name: bytes) -> Attr:
        vol = self.volume_of(parent)
        if self.roles.stores(vol):
            if self._reads_here(vol):
                a = self.vfs.lookup(parent, name)
            else:
                got = await self._current_read(
                    vol, lambda r: r.lookup(parent, name), lambda: self.vfs.peek(parent, name)
                )
                if got is None:
                    raise NotFound()
                a = got
                self.vfs.remember(a.ino)  # stored here: this node's kernel references
            v = self._covering(vol, a)
            if v is not None:
                self.vfs.forget([(a.ino, 1)])  # the kernel gets the volume's root instead
                a = await self._root_attr(v)
                self._counted_attr(a)
            return await self._fresh(a) if self.writes.unflushed else a
        found = await self._read(vol).lookup(parent, name)
        if found is None:
            raise NotFound()
        v = self._covering(vol, found)
        if v is not None:
            found = await self._root_attr(v)
            self._counted_attr(found)
            return found
        self.handles.count(found.ino, found.volume)
        return found

    def _covering(self, vol: VolumeId, a: Attr) -> Volume | None:
        """The volume mounted on ``a``, if it is a mount point."""
        if vol != ROOT_VOLUME or not a.is_dir or self.roles.volumes is None:
            return None
        return self.roles.volumes.covering(a.ino)

    async def _root_attr(self, v: Volume) -> Attr:
        if self.roles.stores(v.vol):
            return self.vfs.getattr(v.root)
        return await self._read(v.vol).getattr(v.root)

    def _counted_attr(self, a: Attr) -> None:
        if self.roles.stores(a.volume):
            self.vfs.remember(a.ino)
        else:
            self.handles.count(a.ino, a.volume)

    @_after_held_writes
    async def getattr(self, ino: InodeId) -> Attr:
        vol = self.volume_of(ino)
        if ino in self.writes.unflushed:
            await self.writes.drain()
            return await self._read(vol).getattr(ino)
        if self.roles.stores(vol):
            return await self._current_read(
                vol, lambda r: r.getattr(ino), lambda: self.vfs.getattr(ino)
            )
        return await self._read(vol).getattr(ino)

    async def readlink(self, ino: InodeId) -> bytes:
        vol = self.volume_of(ino)
        if self.roles.stores(vol):
            return await self._current_read(
                vol, lambda r: r.readlink(ino), lambda: self.vfs.readlink(ino)
            )
        return await self._read(vol).readlink(ino)

    def opendir(self, ino: InodeId) -> int:
        if self.roles.stores(self.volume_of(ino)):
            return self.vfs.opendir(ino)
        return self.handles.new(self.handles.dirs, ino)

    def dir_of_handle(self, fh: int) -> InodeId:
        ino = self.handles.dirs.get(fh)
        return ino if ino is not None else self.vfs.dir_of_handle(fh)

    @_after_held_writes
    async def readdir(self, ino: InodeId, start: int = 0) -> Iterator[DirEntry]:
        """Entries after cookie ``start`` (a lazy iterator for a stored directory: the
        FUSE layer takes as many as fit). Mount points show their volume's root."""
        vol = self.volume_of(ino)
        entries: Iterator[DirEntry]
        if not self.roles.stores(vol):
            entries = iter(await self._read(vol).readdir(ino, start))
        elif self._reads_here(vol):
            entries = self.vfs.readdir(ino, start)
        else:
            got = await self._current_read(
                vol,
                lambda r: r.readdir(ino, start),
                lambda: list(self.vfs.readdir(ino, start)),
            )
            entries = iter(got)
        if self.writes.unflushed:
            entries = await self._fresh_entries(entries)
        covers = self._mounts_in(ino) if vol == ROOT_VOLUME else {}
        if not covers:
            return entries
        roots: dict[int, Attr] = {}
        for mdir, v in covers.items():
            try:
                roots[mdir] = await self._root_attr(v)
            except FsError:
                # Its primary does not answer: show the name, as a directory of root's
                # (a lookup or stat reports the error).
                roots[mdir] = Attr(v.root, 0o40755, 0, 0, 2, 0, 0, 0, 0, 0, volume=v.vol)
        return (
            DirEntry(e.name, roots[e.attr.ino], e.cookie) if e.attr.ino in roots else e
            for e in entries
        )

    async def _fresh_entries(self, entries: Iterator[DirEntry]) -> Iterator[DirEntry]:
        """``entries`` with the primary's attributes for files with writes of this node in
        flight: readdirplus attributes are taken by the kernel like a getattr's, and a size
        from before those writes would cut the file short in its cache (see ``_fresh``)."""
        await self.writes.drain()
        fresh: dict[InodeId, Attr] = {}
        for ino in list(self.writes.unflushed):
            try:
                fresh[ino] = await self._read(self.volume_of(ino)).getattr(ino)
            except FsError:
                continue  # gone: its entry is stale anyway
        return (
            DirEntry(e.name, fresh[e.attr.ino], e.cookie)
            if e.attr.ino in fresh and e.name not in (b".", b"..")
            else e
            for e in entries
        )

    def _mounts_in(self, ino: InodeId) -> dict[int, Volume]:
        if self.roles.volumes is None:
            return {}
        out: dict[int, Volume] = {}
        for v in self.roles.volumes.all():
            if v.vol == ROOT_VOLUME:
                continue
            parent = v.mount_parent
            if not parent:  # a record from before mount parents were kept
                try:
                    parent = self.vfs.getattr(v.mount_dir).parent
                except FsError:
                    continue
            if parent == ino:
                out[int(v.mount_dir)] = v
        return out

    def remember(self, a: Attr) -> None:
        """The kernel accepted ``a`` from readdir: one reference."""
        if self.roles.volumes is not None and not self.roles.stores(a.volume):
            self.handles.count(a.ino, a.volume)
        else:
            self.vfs.remember(a.ino)

    def releasedir(self, fh: int) -> None:
        if self.handles.dirs.pop(fh, None) is None:
            self.vfs.releasedir(fh)

    def touch_atime(self, ino: InodeId) -> None:
        if ino not in self.handles.counts:
            self.vfs.touch_atime(ino)

    async def getxattr(self, ino: InodeId, name: bytes) -> bytes:
        vol = self.volume_of(ino)
        if self.roles.stores(vol):
            return await self._current_read(
                vol, lambda r: r.getxattr(ino, name), lambda: self.vfs.getxattr(ino, name)
            )
        return await self._read(vol).getxattr(ino, name)

    async def listxattr(self, ino: InodeId) -> list[bytes]:
        vol = self.volume_of(ino)
        if self.roles.stores(vol):
            return await self._current_read(
                vol, lambda r: r.listxattr(ino), lambda: self.vfs.listxattr(ino)
            )
        return await self._read(vol).listxattr(ino)

    def statfs(self) -> FsStats:
        return self.vfs.statfs()

    def forget(self, items: list[tuple[InodeId, int]]) -> None:
        local = self.handles.forget(items)
        if local:
            self.vfs.forget(local)

    @_after_held_writes
    async def read(self, fh: int, off: int, size: int) -> bytes:
        rf = self.handles.files.get(fh)
        if rf is None:
            if not self.roles.clustered:
                return await self.files.read(fh, off, size)
            ino = self.files.inode_of(fh)
            vol = self.volume_of(ino)
            if ino in self.writes.unflushed:  # this node's posted writes: the primary has them
                await self.writes.drain()
                return await self._read(vol).read(ino, off, size)
            if self._reads_here(vol):
                return await self.files.read(fh, off, size)
            try:
                return await self._read(vol).read(ino, off, size)
            except (PeerUnavailable, PeerTimeout):
                return await self.files.read(fh, off, size)
        data = await self._fwd(rf.vol, F.Read(rf.rfh, off, min(size, MAX_READ)), update=False)
        if not isinstance(data, bytes) or len(data) > size:
            raise FsError(errno.EIO, "malformed read answer from the primary")
        return data

    # --- updates ----------------------------------------------------------------------------

    @_after_held_writes
    async def setattr(self, ino: InodeId, ch: SetAttrs, ctx: Ctx) -> Attr:
        vol = self.volume_of(ino)
        if self.roles.orders(vol):
            a = await self.vfs.setattr(ino, ch, ctx)
            await self._replicated(vol)
            return a
        return unpack_attr(await self._fwd(vol, F.Setattr(ino, F.setattrs_wire(ch)), ctx))

    @_after_held_writes
    async def mknod(self, parent: InodeId, name: bytes, mode: int, rdev: int, ctx: Ctx) -> Attr:
        return await self._update(
            self.volume_of(parent),
            lambda: self.vfs.mknod(parent, name, mode, rdev, ctx),
            F.Mknod(parent, name, mode, rdev),
            ctx,
            self._counted,
        )

    @_after_held_writes
    async def mkdir(self, parent: InodeId, name: bytes, mode: int, ctx: Ctx) -> Attr:
        return await self._update(
            self.volume_of(parent),
            lambda: self.vfs.mkdir(parent, name, mode, ctx),
            F.Mkdir(parent, name, mode),
            ctx,
            self._counted,
        )

    @_after_held_writes
    async def symlink(self, parent: InodeId, name: bytes, target: bytes, ctx: Ctx) -> Attr:
        return await self._update(
            self.volume_of(parent),
            lambda: self.vfs.symlink(parent, name, target, ctx),
            F.Symlink(parent, name, target),
            ctx,
            self._counted,
        )

    @_after_held_writes
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

    @_after_held_writes
    async def unlink(self, parent: InodeId, name: bytes) -> None:
        await self._update(
            self.volume_of(parent),
            lambda: self.vfs.unlink(parent, name),
            F.Unlink(parent, name),
            None,
            _nothing,
        )

    @_after_held_writes
    async def rmdir(self, parent: InodeId, name: bytes) -> None:
        await self._update(
            self.volume_of(parent),
            lambda: self.vfs.rmdir(parent, name),
            F.Rmdir(parent, name),
            None,
            _nothing,
        )

    @_after_held_writes
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

    @_after_held_writes
    async def setxattr(self, ino: InodeId, name: bytes, value: bytes, flags: int = 0) -> None:
        await self._update(
            self.volume_of(ino),
            lambda: self.vfs.setxattr(ino, name, value, flags),
            F.Setxattr(ino, name, value, flags),
            None,
            _nothing,
        )

    @_after_held_writes
    async def removexattr(self, ino: InodeId, name: bytes) -> None:
        await self._update(
            self.volume_of(ino),
            lambda: self.vfs.removexattr(ino, name),
            F.Removexattr(ino, name),
            None,
            _nothing,
        )

    # --- files --------------------------------------------------------------------------------

    @_after_held_writes
    async def create(
        self, parent: InodeId, name: bytes, mode: int, flags: int, ctx: Ctx
    ) -> tuple[FileHandle, Attr]:
        vol = self.volume_of(parent)
        if self.roles.orders(vol):
            fh, a = self.vfs.create(parent, name, mode, flags, ctx)
            await self._replicated(vol)
            return fh, a
        wire = await self._fwd(vol, F.Create(parent, name, mode, flags), ctx)
        if not (isinstance(wire, list) and len(wire) == 2 and isinstance(wire[0], int)):
            raise FsError(errno.EIO, "malformed create answer from the primary")
        a = self._counted(wire[1])
        if not self.roles.stores(vol):
            rf = RemoteFile(vol, a.ino, wire[0])
            return FileHandle(self.handles.new(self.handles.files, rf)), a
        fh = self.files.open(a.ino, flags, a)
        self.handles.on_primary[fh] = wire[0]
        return fh, a

    @_after_held_writes
    async def open(self, ino: InodeId, flags: int, ctx: Ctx) -> FileHandle:
        vol = self.volume_of(ino)
        if self.roles.orders(vol):
            fh = await self.vfs.open(ino, flags, ctx)
            if flags & os.O_TRUNC:
                await self._replicated(vol)
            return fh
        stored = self.roles.stores(vol)
        if stored and not flags & WRITE_ACCESS:
            return self.files.open(ino, flags)
        rfh = await self._fwd(vol, F.Open(ino, flags), ctx, update=bool(flags & WRITE_ACCESS))
        if not isinstance(rfh, int):
            raise FsError(errno.EIO, "malformed open answer from the primary")
        if not stored:
            rf = RemoteFile(vol, ino, rfh)
            return FileHandle(self.handles.new(self.handles.files, rf))
        try:
            fh = self.files.open(ino, flags)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._release_remote(vol, rfh)
            raise
        self.handles.on_primary[fh] = rfh
        return fh

    def cached(self, fh: int) -> bool:
        """The kernel may keep ``fh``'s file's pages from an earlier open (it is told of
        every change to files stored here; not of the others')."""
        return fh not in self.handles.files

    def inode_of(self, fh: int) -> InodeId:
        rf = self.handles.files.get(fh)
        return rf.ino if rf is not None else self.files.inode_of(fh)

    async def write(self, fh: int, off: int, data: bytes) -> int:
        """Write (held, posted or applied here: ``WriteBehind``); acknowledged at flush or
        fsync."""
        return await self.writes.write(fh, off, data)

    async def flush(self, fh: int) -> None:
        """close(2): the handle's writes are on every storage site in sync when it returns."""
        await self.writes.held_of(fh)
        stream = self.writes.stream_needs_flush(fh)
        if stream is not None:
            await self.writes.flush_stream(fh, F.Flush(stream.rfh))
            return
        await self.writes.wait_acked(fh)

    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.writes.held_of(fh)
        stream = self.writes.streams.get(fh)
        if stream is not None:
            await self.writes.flush_stream(fh, F.Fsync(stream.rfh, datasync))
            return
        rf = self.handles.files.get(fh)
        if rf is not None:
            await self._fwd(rf.vol, F.Fsync(rf.rfh, datasync))
            return
        vol = self._handle_volume(fh)
        if self.roles.orders(vol):
            await self.files.fsync(fh, datasync)
            await self._replicated(vol)
            return
        rfh = self.handles.on_primary.get(fh)
        if rfh is not None:
            await self._fwd(vol, F.Fsync(rfh, datasync))

    @_after_held_writes
    async def fsyncdir(self, ino: InodeId = ROOT_INODE) -> None:
        vol = self.volume_of(ino)
        if self.roles.orders(vol):
            await self.vfs.sync()
            await self._replicated(vol)
            return
        await self._fwd(vol, F.Sync(ino))

    async def release(self, fh: int) -> None:
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
            await self.flush(fh)  # written through a mapping, or closed without a flush
            await self.files.release(fh)
        finally:
            if rfh is not None:
                await self._release_remote(vol, rfh)

    async def _release_remote(self, vol: VolumeId, rfh: int) -> None:
        try:
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
