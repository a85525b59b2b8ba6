"""The read side of ``NodeFs``: where each read of a cluster node is answered.

Reads (lookup, getattr, readdir, readlink, xattrs, read) are answered from this node's replica
when it stores the inode's volume and can prove it current — it orders the volume, or holds a
read lease, and has applied every update it made through the primary (``VolumeRoles.current``,
``Forwarder.behind``). Otherwise they go to the volume's primary (a ``Reader``), and when the
primary does not answer, to the local replica after all, which may be stale (logged;
docs/CONSISTENCY.md §4, "Reads") — but never while this node has acknowledged an update its
replica lacks (``behind``), nor from a replica that has nothing of the volume yet (a site of a
volume just created). Volumes not stored here are read from their primary; the kernel's
references to their inodes are counted here (``RemoteHandles``). Files with writes of this node
in flight (``WriteBehind.unflushed``) are read from the primary, which has them.

An inode of a stored volume that the kernel got from the primary (a lookup, readdir or update
answered there) may not be in this node's replica yet: its volume is remembered
(``RemoteHandles.learnt``) until the kernel forgets it, and its reads go to the primary until
the replica has it.

Every call is served within one deadline (``one_deadline``, ``dfs.cluster.deadline``).

Mount points of volumes show the volume's root directory (``_covering``, ``_mounts_in``).
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, Concatenate, ParamSpec, TypeVar

import trio

from dfs.cluster import fsops as F
from dfs.cluster.deadline import call_deadline
from dfs.cluster.forward import Forwarder
from dfs.cluster.handles import RemoteHandles
from dfs.cluster.remote import MAX_READ, Reader, unpack_attr
from dfs.cluster.roles import VolumeRoles
from dfs.cluster.volumes import Volume
from dfs.cluster.writebehind import WriteBehind
from dfs.errors import BlockCorrupted, FsError, NotFound
from dfs.fs.files import FileIO
from dfs.fs.vfs import DirEntry, FsStats, Vfs
from dfs.hashing import BLOCK_SIZE
from dfs.net.rpc import PeerTimeout, PeerUnavailable
from dfs.types import ROOT_VOLUME, Attr, InodeId, VolumeId

log = logging.getLogger("dfs.cluster.fs")
T = TypeVar("T")
P = ParamSpec("P")
S = TypeVar("S", bound="ReadRouting")

STALE_LOG_EVERY = 10.0


def one_deadline(
    fn: Callable[Concatenate[S, P], Awaitable[T]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
    """A client call: whatever it waits for ends within one deadline, ``timeouts.call`` from
    its start (``dfs.cluster.deadline``)."""

    @functools.wraps(fn)
    async def run(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        with call_deadline(self.call_timeout):
            await self.roles.steady()
            return await fn(self, *args, **kwargs)

    return run


def after_held_writes(
    fn: Callable[Concatenate[S, P], Awaitable[T]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
    """A client call (``one_deadline``) run only once every write this node holds
    (``WriteBehind``) is written: whatever it reads or changes then sees them, as after a
    plain write."""

    @functools.wraps(fn)
    async def run(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        with call_deadline(self.call_timeout):
            await self.roles.steady()
            if self.writes.pending():
                await self.writes.write_held()
            return await fn(self, *args, **kwargs)

    return run


class ReadRouting:
    """The reads of ``NodeFs`` (its base class; ``NodeFs.__init__`` sets the collaborators)."""

    vfs: Vfs
    files: FileIO
    roles: VolumeRoles
    handles: RemoteHandles
    forwarder: Forwarder
    writes: WriteBehind
    _reader: Callable[[str], Reader] | None
    _view_volume: Callable[[InodeId], VolumeId | None] | None
    _last_stale: float
    call_timeout: float  # the deadline of each client call (timeouts.call)
    checksum_failures: int  # blocks of this node's replica that failed their checksum
    read_repairs: int  # of those, rewritten from another replica
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
            learnt = self.handles.learnt.get(ino)
            if learnt is not None:  # from the primary; not in this replica yet
                return VolumeId(learnt)
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
        primary cannot be reached, from this node's replica after all (it may be stale), unless
        that would answer older state than this node acknowledged (``_may_be_stale``)."""
        if self._reads_here(vol):
            return local()
        try:
            return await remote(self._read(vol))
        except (PeerUnavailable, PeerTimeout) as exc:
            if not self._may_be_stale(vol):
                raise
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

    def _may_be_stale(self, vol: VolumeId) -> bool:
        """This node's replica of ``vol`` may answer a read that its primary cannot: not
        while it lacks an update this node acknowledged (``behind``), nor when it has nothing
        of the volume yet (a volume's first update makes its root directory; the root
        volume's comes with every store)."""
        if self.forwarder.behind(vol):
            return False
        return vol == ROOT_VOLUME or self.vfs.meta.seq(vol) > 0

    def _read(self, vol: VolumeId) -> Reader:
        """Where reads of ``vol`` go when not answered here: its primary."""
        if self._reader is None:
            raise FsError(errno.ESTALE, f"volume {vol} is not stored here")
        return self._reader(self.roles.primary(vol))

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

    @after_held_writes
    async def lookup(self, parent: InodeId, name: bytes) -> Attr:
        vol = self.volume_of(parent)
        if self.roles.stores(vol):
            got = await self._current_read(
                vol, lambda r: r.lookup(parent, name), lambda: self.vfs.peek(parent, name)
            )
            if got is None:
                raise NotFound()
            a = got
            v = self._covering(vol, a)
            if v is not None:
                a = await self._root_attr(v)  # the kernel gets the volume's root instead
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
            # A site that has just joined the volume may not have its root yet.
            return await self._current_read(
                v.vol, lambda r: r.getattr(v.root), lambda: self.vfs.getattr(v.root)
            )
        return await self._read(v.vol).getattr(v.root)

    def _counted_attr(self, a: Attr) -> None:
        """The kernel got ``a``: one reference, counted with this node's replica when it
        stores the volume (remembering the volume of an inode the primary told of, which the
        replica may not have yet), else with the remote handles."""
        if self.roles.stores(a.volume):
            self.vfs.remember(a.ino)
            if not self._reads_here(a.volume):
                self.handles.learnt[a.ino] = a.volume
        else:
            self.handles.count(a.ino, a.volume)

    @after_held_writes
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

    @one_deadline
    async def readlink(self, ino: InodeId) -> bytes:
        vol = self.volume_of(ino)
        if self.roles.stores(vol):
            return await self._current_read(
                vol, lambda r: r.readlink(ino), lambda: self.vfs.readlink(ino)
            )
        return await self._read(vol).readlink(ino)

    def opendir(self, ino: InodeId) -> int:
        if self.roles.stores(self.volume_of(ino)) and not self._arriving(ino):
            return self.vfs.opendir(ino)
        return self.handles.new(self.handles.dirs, ino)

    def _arriving(self, ino: InodeId) -> bool:
        """``ino`` came from the primary and is not in this node's replica yet."""
        if ino not in self.handles.learnt:
            return False
        try:
            self.vfs.getattr(ino)
        except NotFound:
            return True
        return False

    def dir_of_handle(self, fh: int) -> InodeId:
        ino = self.handles.dirs.get(fh)
        return ino if ino is not None else self.vfs.dir_of_handle(fh)

    @after_held_writes
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
        if self.roles.volumes is None:
            self.vfs.remember(a.ino)
        else:
            self._counted_attr(a)

    def releasedir(self, fh: int) -> None:
        if self.handles.dirs.pop(fh, None) is None:
            self.vfs.releasedir(fh)

    def touch_atime(self, ino: InodeId) -> None:
        if ino not in self.handles.counts and not self._arriving(ino):
            self.vfs.touch_atime(ino)

    @one_deadline
    async def getxattr(self, ino: InodeId, name: bytes) -> bytes:
        vol = self.volume_of(ino)
        if self.roles.stores(vol):
            return await self._current_read(
                vol, lambda r: r.getxattr(ino, name), lambda: self.vfs.getxattr(ino, name)
            )
        return await self._read(vol).getxattr(ino, name)

    @one_deadline
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
            learnt = self.handles.learnt
            if learnt:
                for ino, _n in local:
                    if ino not in self.vfs.lookups:
                        learnt.pop(ino, None)

    @after_held_writes
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
                return await self._read_repairing(fh, ino, vol, off, size)
            try:
                return await self._read(vol).read(ino, off, size)
            except (PeerUnavailable, PeerTimeout):
                if not self._may_be_stale(vol):
                    raise
                return await self._read_repairing(fh, ino, vol, off, size)
        data = await self.writes.on_primary(
            fh, lambda rfh: F.Read(rfh, off, min(size, MAX_READ)), update=False
        )
        if not isinstance(data, bytes) or len(data) > size:
            raise FsError(errno.EIO, "malformed read answer from the primary")
        return data

    async def _read_repairing(
        self, fh: int, ino: InodeId, vol: VolumeId, off: int, size: int
    ) -> bytes:
        """A read of this node's replica; a block whose checksum fails is fetched from
        another replica whose copy hashes to the stored digest, rewritten here, and the read
        answered with the right bytes (read repair). EIO when no replica has a good copy."""
        tried: set[int] = set()
        while True:
            try:
                return await self.files.read(fh, off, size)
            except BlockCorrupted as exc:
                self.checksum_failures += 1
                if exc.blk in tried or not await self._repair(ino, vol, exc):
                    raise
                tried.add(exc.blk)

    async def _repair(self, ino: InodeId, vol: VolumeId, bad: BlockCorrupted) -> bool:
        if self._reader is None or self.roles.volumes is None:
            return False  # a node alone has no other copy
        v = self.roles.volume(vol)
        primary = self.roles.primary(vol)
        others = [n for n in dict.fromkeys((primary, *v.sites)) if n != self.roles.me]
        for node in others:
            try:
                data = await self._reader(node).read(ino, bad.blk * BLOCK_SIZE, BLOCK_SIZE)
            except FsError as exc:
                log.info("read repair of inode %#x block %d: %s: %s", ino, bad.blk, node, exc)
                continue
            if await self.files.repair_block(ino, bad.blk, data, bad.want):
                self.read_repairs += 1
                log.warning(
                    "read repair: inode %#x block %d failed its checksum here; rewritten from "
                    "%s's copy",
                    ino,
                    bad.blk,
                    node,
                )
                return True
            log.info("read repair of inode %#x block %d: %s's copy differs too", ino, bad.blk, node)
        log.error(
            "inode %#x block %d fails its checksum here and no other replica has a good copy "
            "(asked %s); answering EIO",
            ino,
            bad.blk,
            ", ".join(others) or "none",
        )
        return False
