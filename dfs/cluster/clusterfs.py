"""The file system as the FUSE layer sees it on one node of a cluster: local reads, routed updates.

``NodeFs`` offers the operations mountd's handlers call. Reads (lookup,
getattr, readdir, read, xattrs, statfs) are answered from this node's replica.
Updates go to the volume's primary:

- On the primary they run in the local ``Vfs`` and return once the
  ``Replicator`` says every storage site in sync has applied them.
- On another node they are forwarded (``fs.op``: operation, arguments, the
  caller's uid/gid/umask/groups) and return the primary's answer; since the
  primary waits for every site in sync, including this one, this node's
  replica already shows the update when the call returns.

Writes need a handle on the primary: opening a file for writing on a
non-primary node opens it on the primary too (a *remote handle*), and
writes, fsync and release of that handle are forwarded. A read-only open is
local only. Kernel references (lookup counts) stay on the node whose kernel
holds them; only the primary purges unlinked inodes, once no kernel of its own
and no remote handle uses them.

A standalone node is its own primary with no sites: ``NodeFs`` then adds
nothing but a call.
"""

from __future__ import annotations

import contextvars
import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

import trio

from dfs.cluster.remote import MAX_READ, Reader, pack_attr, unpack_attr
from dfs.cluster.replication import Notifier, Replicator, invalidations
from dfs.cluster.volumes import Volume, VolumeTable
from dfs.errors import FsError, NotFound
from dfs.fs.ctx import Ctx, SetAttrs
from dfs.fs.vfs import DirEntry, FsStats, Vfs
from dfs.meta.store import ORIGIN, WriteTxn
from dfs.net.frames import Field
from dfs.net.peer import Pending
from dfs.net.rpc import Methods, PeerTimeout, PeerUnavailable
from dfs.types import ROOT_INODE, ROOT_VOLUME, Attr, FileHandle, InodeId, NodeId, VolumeId

log = logging.getLogger("dfs.cluster.fs")
T = TypeVar("T")
P = ParamSpec("P")

Post = Callable[[str, str, dict[str, Any], Callable[[Pending], None]], Any]
"""``post(node, method, args, on_done)``: send a request without waiting (``Peer.post``)."""
Forward = Callable[[str, str, list[Any], list[Any]], Awaitable[Any]]
"""``await forward(node, op, args, ctx)``: run an update on ``node`` (a volume's primary);
its result (wire form)."""

WRITE_ACCESS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC
MAX_ARGS = 8
PURGE_INTERVAL = 0.5
MAX_OFF = (1 << 63) - 1
WRITE_WINDOW = 16  # writes on a primary ahead of its slowest site in sync (see NodeFs.flush)
WRITES_IN_FLIGHT = 32  # writes a node posts to primaries without waiting for their answers
REMOTE_FH = 1 << 61  # handles on files and directories of volumes not stored here
# Small writes that continue each other are held per handle and written as one (NodeFs.write):
# up to GATHER_MAX bytes per handle, GATHER_TOTAL in all.
GATHER_MAX = 256 * 1024
GATHER_TOTAL = 16 * 1024 * 1024
HOLD_FOR = 0.05  # seconds a held write waits at most (``write_held_writes``)
# The last invalidation ticket of the forwarded update this task runs (see NodeFs._serve).
_TICKET: contextvars.ContextVar[int] = contextvars.ContextVar("dfs_inval_ticket", default=0)
PURGE_BATCH = 4096
_REFUSAL_LOG_EVERY = 10.0


def pack_ctx(ctx: Ctx) -> list[Any]:
    groups = sorted(ctx.sup_groups()) if ctx.uid != 0 and ctx.sup_groups is not None else None
    return [ctx.uid, ctx.gid, ctx.umask, groups]


def unpack_ctx(v: Any) -> Ctx:
    if not (isinstance(v, list) and len(v) == 4 and all(isinstance(x, int) for x in v[:3])):
        raise FsError(errno.EINVAL, "malformed caller context")
    groups = v[3]
    if groups is not None and not (
        isinstance(groups, list) and all(isinstance(g, int) for g in groups)
    ):
        raise FsError(errno.EINVAL, "malformed caller groups")
    frozen = frozenset(groups or ())
    return Ctx(uid=v[0], gid=v[1], umask=v[2], sup_groups=lambda: frozen)


def _setattrs_wire(ch: SetAttrs) -> list[Any]:
    return [ch.mode, ch.uid, ch.gid, ch.size, ch.atime_ns, ch.mtime_ns, ch.ctime_ns]


def _setattrs(v: Any) -> SetAttrs:
    if not (
        isinstance(v, list) and len(v) == 7 and all(x is None or isinstance(x, int) for x in v)
    ):
        raise FsError(errno.EINVAL, "malformed setattr fields")
    return SetAttrs(*v)


def _after_held_writes(
    fn: Callable[Concatenate[NodeFs, P], Awaitable[T]],
) -> Callable[Concatenate[NodeFs, P], Coroutine[Any, Any, T]]:
    """Run an operation only once every write this node holds (NodeFs.write) is written:
    whatever it reads or changes then sees them, as after a plain write."""

    @functools.wraps(fn)
    async def run(self: NodeFs, /, *args: P.args, **kwargs: P.kwargs) -> T:
        if self._gathered or self._gathering:
            await self._write_held()
        return await fn(self, *args, **kwargs)

    return run


class NodeFs:
    def __init__(
        self,
        vfs: Vfs,
        *,
        me: str = "",
        volumes: VolumeTable | None = None,
        forward: Forward | None = None,
        replicator: Replicator | None = None,
        replicators: dict[VolumeId, Replicator] | None = None,
        reader: Callable[[str], Reader] | None = None,
        current: Callable[[VolumeId], bool] | None = None,
        post: Post | None = None,
        notify: Notifier | None = None,
    ) -> None:
        self.vfs = vfs
        self.files = vfs.files
        self.me = me
        # Cluster mode: every volume this node knows, with its primary and sites. None: this
        # node orders every update itself (standalone, or the primary in core tests).
        self.volumes = volumes
        self._forward = forward
        self.repls: dict[VolumeId, Replicator] = dict(replicators or {})
        if replicator is not None:
            self.repls[replicator.vol] = replicator
        self._reader = reader
        # Whether this node's replica of a volume it stores but does not order is current
        # (it holds a read lease from the primary); None: always.
        self._current = current
        self._last_stale = -1e9
        # Writes this node sends to a primary without waiting (``write``): how many are
        # unanswered, each handle's stream, and the inodes with writes not yet flushed.
        self._post = post
        self._inflight = 0
        self._answered = trio.Event()
        self._streams: dict[int, _Stream] = {}
        self._unflushed: dict[InodeId, int] = {}
        # Small writes held per handle (``write``), how many bytes, the errors of held writes
        # that were written on behalf of another operation (reported by the handle's next
        # write, flush, fsync), and how many held writes are being written now.
        self._gathered: dict[int, _Gathered] = {}
        self._held_by_ino: dict[InodeId, int] = {}  # the one handle holding writes of a file
        self._gathered_bytes = 0
        self._gather_errors: dict[int, FsError] = {}
        self._gathering = 0
        self._gathered_out = trio.Event()
        self._held_new = trio.Event()
        # Updates this node forwarded: applied here before they return (``_applied_here``).
        self._applied = trio.Event()
        self.applied_timeout = 10.0
        self._behind: dict[VolumeId, int] = {}
        # A node alone: nothing changes its files behind its kernel's back.
        self.standalone = volumes is None and not self.repls
        self.notify = notify
        self._remote_fh: dict[int, int] = {}  # local handle on a stored file -> primary's handle
        self._rfiles: dict[int, _RemoteFile] = {}  # handles on files of volumes not stored here
        self._rdirs: dict[int, InodeId] = {}  # directory handles of volumes not stored here
        self._next_rfh = REMOTE_FH
        # Kernel references to inodes of volumes not stored here: ino -> [volume, references].
        self._remote: dict[InodeId, list[int]] = {}
        self._held: dict[int, str] = {}  # primary: handles opened for other nodes -> node
        self._unacked: dict[int, tuple[VolumeId, int]] = {}  # primary: handle -> last write
        self._last_refusal = -1e9
        self._ticket = _TICKET
        self._last_ticket = 0  # the newest invalidation batch queued for another node's update
        self._orphans: set[InodeId] = set()  # primary: purges waiting for the other nodes
        # The volume of an inode the host views show (HostViews.volume_of), if any.
        self.view_volume: Callable[[InodeId], VolumeId | None] | None = None
        vfs.meta.on_commit = self._committed
        if self.repls or volumes is not None:
            vfs.defer_purge = self._orphans.add
        if volumes is not None:
            vfs.make_replica(lambda vol: not self._mine(vol))

    # --- which volume, and who orders it ----------------------------------------------------

    def _mine(self, vol: VolumeId) -> bool:
        """This node orders the updates of ``vol`` (it is its primary)."""
        if self.volumes is None:
            return True
        v = self.volumes.get(vol)
        return v is not None and v.primary == self.me

    def stores(self, vol: VolumeId) -> bool:
        """This node holds a replica of ``vol`` (reads are local)."""
        if self.volumes is None:
            return True
        v = self.volumes.get(vol)
        return v is not None and v.stored_on(self.me) and self.vfs.meta.has_volume(vol)

    def _reads_here(self, vol: VolumeId) -> bool:
        """Reads of ``vol`` are answered from this node's replica: it stores one and can
        prove it current (it orders the volume, or holds a read lease on it)."""
        if not self.stores(vol):
            return False
        behind = self._behind.get(vol)
        if behind is not None:
            if self.vfs.meta.seq(vol) < behind:
                return False  # an update this node made is not applied here yet
            del self._behind[vol]
        return self._current is None or self._mine(vol) or self._current(vol)

    async def _current_read(
        self, vol: VolumeId, remote: Callable[[Reader], Awaitable[T]], local: Callable[[], T]
    ) -> T:
        """A read of a stored volume: local when current, else from the primary; when the
        primary cannot be reached, from this node's replica after all (it may be stale:
        docs/CONSISTENCY.md §4, "Reads")."""
        if self._reads_here(vol):
            return local()
        try:
            return await remote(self._read(vol))
        except (PeerUnavailable, PeerTimeout) as exc:
            now = trio.current_time()
            if now - self._last_stale >= _REFUSAL_LOG_EVERY:
                self._last_stale = now
                log.warning(
                    "volume %d: no read lease and the primary does not answer (%s): "
                    "reading the local replica, which may be stale",
                    vol,
                    exc,
                )
            return local()

    def _volume(self, vol: VolumeId) -> Volume:
        v = self.volumes.get(vol) if self.volumes is not None else None
        if v is None:
            raise FsError(errno.ESTALE, f"volume {vol} is not known here")
        return v

    def volume_of(self, ino: InodeId) -> VolumeId:
        if self.volumes is None:
            return ROOT_VOLUME
        r = self._remote.get(ino)
        if r is not None:
            return VolumeId(r[0])
        try:
            return self.vfs.getattr(ino).volume
        except NotFound:
            # Named through a host view (MOUNT/.../HOST/...), in a volume not stored here.
            vol = self.view_volume(ino) if self.view_volume is not None else None
            if vol is None:
                raise
            return vol

    def _handle_volume(self, fh: int) -> VolumeId:
        return self.volume_of(self.files.inode_of(fh))

    def is_remote(self, ino: InodeId) -> bool:
        """``ino`` belongs to a volume this node does not store: its attributes, names and
        contents are fetched from the volume's primary and not invalidated here, so the
        FUSE layer caches them briefly only."""
        return ino in self._remote

    # --- commit hook --------------------------------------------------------------------------

    def _committed(self, txn: WriteTxn) -> None:
        repl = self.repls.get(txn.vol) if txn.vol is not None else None
        if repl is not None:
            repl.committed(txn)
        if self.notify is not None and ORIGIN.get():
            ws = [(i, k, v) for (i, k), v in txn.ws.items()]
            lookups = self.vfs.lookups  # what this node's kernel holds; nothing else is cached
            changed = [
                c for c in invalidations(ws, txn.data) if c[1] == ROOT_INODE or c[1] in lookups
            ]
            if changed:
                ticket = self.notify.put(changed)
                self._ticket.set(ticket)
                self._last_ticket = max(self._last_ticket, ticket)

    async def _replicated(self, vol: VolumeId | None) -> None:
        """Return once every in-sync site of ``vol`` (None: of every volume ordered here)
        has applied this node's updates so far."""
        if vol is None:
            for r in list(self.repls.values()):
                await r.wait()
            return
        repl = self.repls.get(vol)
        if repl is not None:
            await repl.wait()

    async def _fwd(
        self,
        vol: VolumeId,
        op: str,
        args: list[Any],
        ctx: Ctx | None = None,
        *,
        update: bool = True,
    ) -> Any:
        if self._forward is None:
            raise FsError(errno.EROFS, f"no primary for volume {vol} is known here")
        primary = self._volume(vol).primary if self.volumes is not None else ""
        if self._inflight:
            await self._drain()  # nothing may overtake this node's posted writes
        try:
            answer = await self._forward(
                primary, op, args, pack_ctx(ctx) if ctx is not None else [0, 0, 0, None]
            )
        except PeerUnavailable as exc:
            if not update:  # a read of a volume stored elsewhere: the primary is down
                raise
            self._refused(op, exc)
            raise FsError(errno.EROFS, f"primary unreachable: {exc}") from None
        except PeerTimeout as exc:
            self._refused(op, exc)
            raise
        if not (isinstance(answer, list) and len(answer) == 2 and isinstance(answer[1], int)):
            raise FsError(errno.EIO, f"malformed {op} answer from the primary")
        result, seq = answer
        if seq:
            await self._applied_here(vol, seq)
        return result

    async def _drain(self) -> None:
        """Wait until every write this node posted has been answered."""
        while self._inflight:
            await self._answered.wait()

    async def _fresh(self, a: Attr) -> Attr:
        """``a`` from this node's replica, or the primary's when this node has posted writes
        to that file that its replica may not show before they are flushed."""
        if a.ino not in self._unflushed:
            return a
        await self._drain()
        return await self._read(a.volume).getattr(a.ino)

    async def _applied_here(self, vol: VolumeId, seq: int) -> None:
        """The primary answered without waiting for this node's replica (a storage site in
        sync: see ``_serve``): wait until it has applied ``seq`` here too, so the update is on
        every site in sync when it returns, as always. Should that take longer than the
        call deadline, reads here go to the primary until it has (``_reads_here``)."""
        meta = self.vfs.meta
        if meta.seq(vol) >= seq:
            return
        with trio.move_on_after(self.applied_timeout):
            while meta.seq(vol) < seq:
                await self._applied.wait()
        if meta.seq(vol) < seq:
            self._behind[vol] = max(self._behind.get(vol, 0), seq)
            raise FsError(errno.ETIMEDOUT, f"update {seq} of volume {vol} is not applied here yet")

    def applied(self) -> None:
        """The site applied records (ReplicaApplier calls this)."""
        self._applied.set()
        self._applied = trio.Event()

    def _refused(self, op: str, exc: Exception) -> None:
        now = trio.current_time()
        if now - self._last_refusal >= _REFUSAL_LOG_EVERY:
            self._last_refusal = now
            log.warning("%s refused: the volume's primary is unreachable (%s)", op, exc)

    def _read(self, vol: VolumeId) -> Reader:
        """Where reads of a volume not stored here go: its primary."""
        if self._reader is None:
            raise FsError(errno.ESTALE, f"volume {vol} is not stored here")
        return self._reader(self._volume(vol).primary)

    def _count_remote(self, a: Attr) -> None:
        r = self._remote.get(a.ino)
        if r is None:
            self._remote[a.ino] = [int(a.volume), 1]
        else:
            r[1] += 1

    # --- reads: this node's replica, or the primary's for volumes not stored here ----------------

    @_after_held_writes
    async def lookup(self, parent: InodeId, name: bytes) -> Attr:
        vol = self.volume_of(parent)
        if self.stores(vol):
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
            return await self._fresh(a) if self._unflushed else a
        found = await self._read(vol).lookup(parent, name)
        if found is None:
            raise NotFound()
        v = self._covering(vol, found)
        if v is not None:
            found = await self._root_attr(v)
            self._counted_attr(found)
            return found
        self._count_remote(found)
        return found

    def _covering(self, vol: VolumeId, a: Attr) -> Volume | None:
        """The volume mounted on ``a``, if it is a mount point."""
        if vol != ROOT_VOLUME or not a.is_dir or self.volumes is None:
            return None
        return self.volumes.covering(a.ino)

    async def _root_attr(self, v: Volume) -> Attr:
        if self.stores(v.vol):
            return self.vfs.getattr(v.root)
        return await self._read(v.vol).getattr(v.root)

    def _counted_attr(self, a: Attr) -> None:
        if self.stores(a.volume):
            self.vfs.remember(a.ino)
        else:
            self._count_remote(a)

    @_after_held_writes
    async def getattr(self, ino: InodeId) -> Attr:
        vol = self.volume_of(ino)
        if ino in self._unflushed:
            await self._drain()
            return await self._read(vol).getattr(ino)
        if self.stores(vol):
            return await self._current_read(
                vol, lambda r: r.getattr(ino), lambda: self.vfs.getattr(ino)
            )
        return await self._read(vol).getattr(ino)

    async def readlink(self, ino: InodeId) -> bytes:
        vol = self.volume_of(ino)
        if self.stores(vol):
            return await self._current_read(
                vol, lambda r: r.readlink(ino), lambda: self.vfs.readlink(ino)
            )
        return await self._read(vol).readlink(ino)

    def opendir(self, ino: InodeId) -> int:
        if self.stores(self.volume_of(ino)):
            return self.vfs.opendir(ino)
        return self._new_rfh(self._rdirs, ino)

    def _new_rfh(self, table: dict[int, Any], value: Any) -> int:
        fh = self._next_rfh
        self._next_rfh += 1
        table[fh] = value
        return fh

    def dir_of_handle(self, fh: int) -> InodeId:
        ino = self._rdirs.get(fh)
        return ino if ino is not None else self.vfs.dir_of_handle(fh)

    @_after_held_writes
    async def readdir(self, ino: InodeId, start: int = 0) -> Iterator[DirEntry]:
        """Entries after cookie ``start`` (a lazy iterator for a stored directory: the
        FUSE layer takes as many as fit). Mount points show their volume's root."""
        vol = self.volume_of(ino)
        entries: Iterator[DirEntry]
        if not self.stores(vol):
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
        if self._unflushed:
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
        await self._drain()
        fresh: dict[InodeId, Attr] = {}
        for ino in list(self._unflushed):
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
        if self.volumes is None:
            return {}
        out: dict[int, Volume] = {}
        for v in self.volumes.all():
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
        if self.volumes is not None and not self.stores(a.volume):
            self._count_remote(a)
        else:
            self.vfs.remember(a.ino)

    def releasedir(self, fh: int) -> None:
        if self._rdirs.pop(fh, None) is None:
            self.vfs.releasedir(fh)

    def touch_atime(self, ino: InodeId) -> None:
        if ino not in self._remote:
            self.vfs.touch_atime(ino)

    async def getxattr(self, ino: InodeId, name: bytes) -> bytes:
        vol = self.volume_of(ino)
        if self.stores(vol):
            return await self._current_read(
                vol, lambda r: r.getxattr(ino, name), lambda: self.vfs.getxattr(ino, name)
            )
        return await self._read(vol).getxattr(ino, name)

    async def listxattr(self, ino: InodeId) -> list[bytes]:
        vol = self.volume_of(ino)
        if self.stores(vol):
            return await self._current_read(
                vol, lambda r: r.listxattr(ino), lambda: self.vfs.listxattr(ino)
            )
        return await self._read(vol).listxattr(ino)

    def statfs(self) -> FsStats:
        return self.vfs.statfs()

    def forget(self, items: list[tuple[InodeId, int]]) -> None:
        local: list[tuple[InodeId, int]] = []
        for ino, n in items:
            r = self._remote.get(ino)
            if r is None:
                local.append((ino, n))
            elif r[1] <= n:
                del self._remote[ino]
                if n > r[1]:  # counted here too (the volume was stored here meanwhile)
                    local.append((ino, n - r[1]))
            else:
                r[1] -= n
        if local:
            self.vfs.forget(local)

    @_after_held_writes
    async def read(self, fh: int, off: int, size: int) -> bytes:
        rf = self._rfiles.get(fh)
        if rf is None:
            if self._current is None or self.volumes is None:
                return await self.files.read(fh, off, size)
            ino = self.files.inode_of(fh)
            vol = self.volume_of(ino)
            if ino in self._unflushed:  # this node's posted writes: the primary has them
                await self._drain()
                return await self._read(vol).read(ino, off, size)
            if self._reads_here(vol):
                return await self.files.read(fh, off, size)
            try:
                return await self._read(vol).read(ino, off, size)
            except (PeerUnavailable, PeerTimeout):
                return await self.files.read(fh, off, size)
        data = await self._fwd(rf.vol, "read", [rf.rfh, off, min(size, MAX_READ)], update=False)
        if not isinstance(data, bytes) or len(data) > size:
            raise FsError(errno.EIO, "malformed read answer from the primary")
        return data

    def inode_of(self, fh: int) -> InodeId:
        rf = self._rfiles.get(fh)
        return rf.ino if rf is not None else self.files.inode_of(fh)

    # --- updates ----------------------------------------------------------------------------

    @_after_held_writes
    async def setattr(self, ino: InodeId, ch: SetAttrs, ctx: Ctx) -> Attr:
        vol = self.volume_of(ino)
        if self._mine(vol):
            a = await self.vfs.setattr(ino, ch, ctx)
            await self._replicated(vol)
            return a
        return unpack_attr(await self._fwd(vol, "setattr", [ino, _setattrs_wire(ch)], ctx))

    @_after_held_writes
    async def mknod(self, parent: InodeId, name: bytes, mode: int, rdev: int, ctx: Ctx) -> Attr:
        vol = self.volume_of(parent)
        if self._mine(vol):
            a = self.vfs.mknod(parent, name, mode, rdev, ctx)
            await self._replicated(vol)
            return a
        return self._counted(await self._fwd(vol, "mknod", [parent, name, mode, rdev], ctx))

    @_after_held_writes
    async def mkdir(self, parent: InodeId, name: bytes, mode: int, ctx: Ctx) -> Attr:
        vol = self.volume_of(parent)
        if self._mine(vol):
            a = self.vfs.mkdir(parent, name, mode, ctx)
            await self._replicated(vol)
            return a
        return self._counted(await self._fwd(vol, "mkdir", [parent, name, mode], ctx))

    @_after_held_writes
    async def symlink(self, parent: InodeId, name: bytes, target: bytes, ctx: Ctx) -> Attr:
        vol = self.volume_of(parent)
        if self._mine(vol):
            a = self.vfs.symlink(parent, name, target, ctx)
            await self._replicated(vol)
            return a
        return self._counted(await self._fwd(vol, "symlink", [parent, name, target], ctx))

    @_after_held_writes
    async def link(self, ino: InodeId, new_parent: InodeId, new_name: bytes) -> Attr:
        vol = self.volume_of(new_parent)
        if self.volume_of(ino) != vol:
            raise FsError(errno.EXDEV, "a hard link cannot cross volumes")
        if self._mine(vol):
            a = self.vfs.link(ino, new_parent, new_name)
            await self._replicated(vol)
            return a
        return self._counted(await self._fwd(vol, "link", [ino, new_parent, new_name]))

    def _counted(self, wire: Any) -> Attr:
        a = unpack_attr(wire)
        self._counted_attr(a)
        return a

    @_after_held_writes
    async def unlink(self, parent: InodeId, name: bytes) -> None:
        vol = self.volume_of(parent)
        if self._mine(vol):
            self.vfs.unlink(parent, name)
            await self._replicated(vol)
            return
        await self._fwd(vol, "unlink", [parent, name])

    @_after_held_writes
    async def rmdir(self, parent: InodeId, name: bytes) -> None:
        vol = self.volume_of(parent)
        if self._mine(vol):
            self.vfs.rmdir(parent, name)
            await self._replicated(vol)
            return
        await self._fwd(vol, "rmdir", [parent, name])

    @_after_held_writes
    async def rename(
        self, old_parent: InodeId, old_name: bytes, new_parent: InodeId, new_name: bytes, flags: int
    ) -> None:
        vol = self.volume_of(old_parent)
        if self.volume_of(new_parent) != vol:
            raise FsError(errno.EXDEV, "a rename cannot cross volumes")
        if self._mine(vol):
            self.vfs.rename(old_parent, old_name, new_parent, new_name, flags)
            await self._replicated(vol)
            return
        await self._fwd(vol, "rename", [old_parent, old_name, new_parent, new_name, flags])

    @_after_held_writes
    async def setxattr(self, ino: InodeId, name: bytes, value: bytes, flags: int = 0) -> None:
        vol = self.volume_of(ino)
        if self._mine(vol):
            self.vfs.setxattr(ino, name, value, flags)
            await self._replicated(vol)
            return
        await self._fwd(vol, "setxattr", [ino, name, value, flags])

    @_after_held_writes
    async def removexattr(self, ino: InodeId, name: bytes) -> None:
        vol = self.volume_of(ino)
        if self._mine(vol):
            self.vfs.removexattr(ino, name)
            await self._replicated(vol)
            return
        await self._fwd(vol, "removexattr", [ino, name])

    # --- files --------------------------------------------------------------------------------

    @_after_held_writes
    async def create(
        self, parent: InodeId, name: bytes, mode: int, flags: int, ctx: Ctx
    ) -> tuple[FileHandle, Attr]:
        vol = self.volume_of(parent)
        if self._mine(vol):
            fh, a = self.vfs.create(parent, name, mode, flags, ctx)
            await self._replicated(vol)
            return fh, a
        wire = await self._fwd(vol, "create", [parent, name, mode, flags], ctx)
        if not (isinstance(wire, list) and len(wire) == 2 and isinstance(wire[0], int)):
            raise FsError(errno.EIO, "malformed create answer from the primary")
        a = self._counted(wire[1])
        if not self.stores(vol):
            return FileHandle(self._new_rfh(self._rfiles, _RemoteFile(vol, a.ino, wire[0]))), a
        fh = self.files.open(a.ino, flags, a)
        self._remote_fh[fh] = wire[0]
        return fh, a

    @_after_held_writes
    async def open(self, ino: InodeId, flags: int, ctx: Ctx) -> FileHandle:
        vol = self.volume_of(ino)
        if self._mine(vol):
            fh = await self.vfs.open(ino, flags, ctx)
            if flags & os.O_TRUNC:
                await self._replicated(vol)
            return fh
        stored = self.stores(vol)
        if stored and not flags & WRITE_ACCESS:
            return self.files.open(ino, flags)
        rfh = await self._fwd(vol, "open", [ino, flags], ctx, update=bool(flags & WRITE_ACCESS))
        if not isinstance(rfh, int):
            raise FsError(errno.EIO, "malformed open answer from the primary")
        if not stored:
            return FileHandle(self._new_rfh(self._rfiles, _RemoteFile(vol, ino, rfh)))
        try:
            fh = self.files.open(ino, flags)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._release_remote(vol, rfh)
            raise
        self._remote_fh[fh] = rfh
        return fh

    def cached(self, fh: int) -> bool:
        """The kernel may keep ``fh``'s file's pages from an earlier open (it is told of
        every change to files stored here; not of the others')."""
        return fh not in self._rfiles

    async def write(self, fh: int, off: int, data: bytes) -> int:
        """Write, or hold a small write to write it together with the ones that follow.

        Every write is acknowledged at flush (close) or fsync anyway (CONSISTENCY.md §4), so
        a node may as well send ``tar``'s 10 KiB writes of a file as one update instead of
        one each (every update costs the same CPU on the primary and on each site, and an
        inline file's update carries its whole contents). A write of less than GATHER_MAX
        is held while the next ones continue it; they are written when the handle is
        flushed, fsynced or released, when a write does not continue them, when another
        handle of the file writes (one holder per file keeps the order of its writes), and
        before any other operation of this node (``_after_held_writes``), so that what runs
        next sees them as it would see a plain write. An error writing them is reported by the
        handle's next write, flush or fsync, as for any write acknowledged before it is
        replicated. A standalone node has the kernel's writeback cache doing this already.
        """
        if self.standalone:
            return await self._write_now(fh, off, data)
        err = self._gather_errors.pop(fh, None)
        if err is not None:
            raise err
        n = len(data)
        ino = self.inode_of(fh)  # EBADF now, not later
        while True:  # until nothing held is in the way (each await lets other writes in)
            other = self._held_by_ino.get(ino)
            if other is not None and other != fh:
                # Another handle of the file holds writes: they were made first. (One
                # holder per file keeps the writes of all its handles in their order.)
                await self._write_for(other)
                continue
            g = self._gathered.get(fh)
            if g is None:
                break
            if off == g.off + len(g.buf) and len(g.buf) + n <= GATHER_MAX:
                g.buf += data
                g.when = self.vfs.clock()
                self._gathered_bytes += n
                return n
            await self._write_gathered(fh)
        if 0 < n < GATHER_MAX and self._gathered_bytes + n <= GATHER_TOTAL:
            self._gathered[fh] = _Gathered(ino, off, bytearray(data), self.vfs.clock())
            self._held_by_ino[ino] = fh
            self._gathered_bytes += n
            self._held_new.set()
            return n
        return await self._write_now(fh, off, data)

    async def _write_for(self, fh: int) -> None:
        """Write what ``fh`` holds on behalf of something else: its error is kept for it."""
        try:
            await self._write_gathered(fh)
        except FsError as exc:
            self._gather_errors.setdefault(fh, exc)

    async def write_held_writes(self) -> None:
        """Background task: write what has been held for HOLD_FOR seconds, so that a writer
        that goes quiet without closing (a log being appended) shows on the other nodes
        soon after each write, as before holding."""
        while True:
            await self._held_new.wait()
            self._held_new = trio.Event()
            await trio.sleep(HOLD_FOR)
            await self._write_held()

    async def _write_gathered(self, fh: int) -> None:
        """Write what ``fh`` holds; its error is raised."""
        g = self._gathered.pop(fh, None)
        if g is None:
            return
        if self._held_by_ino.get(g.ino) == fh:
            del self._held_by_ino[g.ino]
        self._gathered_bytes -= len(g.buf)
        self._gathering += 1
        try:
            # Already acknowledged to the writer: not given up if this request is cancelled.
            with trio.CancelScope(shield=True):
                n = await self._write_now(fh, g.off, bytes(g.buf), g.when)
            if n != len(g.buf):
                raise FsError(errno.EIO, f"short write ({n} of {len(g.buf)} bytes)")
        finally:
            self._gathering -= 1
            if not self._gathering:
                self._gathered_out.set()
                self._gathered_out = trio.Event()

    async def _write_held(self) -> None:
        """Write every held write and wait for those being written; their errors are kept
        for their handles."""
        while self._gathered:
            await self._write_for(next(iter(self._gathered)))
        while self._gathering:
            await self._gathered_out.wait()

    async def _held_of(self, fh: int) -> None:
        """Write what ``fh`` holds and raise the first error of its held writes."""
        if fh in self._gathered:
            await self._write_for(fh)
        while self._gathering:
            await self._gathered_out.wait()
        err = self._gather_errors.pop(fh, None)
        if err is not None:
            raise err

    async def _write_now(self, fh: int, off: int, data: bytes, when: int | None = None) -> int:
        rf = self._rfiles.get(fh)
        if rf is not None:
            vol, rfh, ino = rf.vol, rf.rfh, rf.ino
        else:
            ino = self.files.inode_of(fh)
            vol = self.volume_of(ino)
            if self._mine(vol):
                n = await self.files.write(fh, off, data, when)
                await self._written(fh, vol)
                return n
            got = self._remote_fh.get(fh)
            if got is None:
                raise FsError(errno.EBADF, "file not open for writing")
            rfh = got
        if self._post is not None and self._posted(fh, vol, rfh, ino, off, data):
            return len(data)
        n = await self._fwd(vol, "write", [rfh, off, data])
        if not isinstance(n, int):
            raise FsError(errno.EIO, "malformed write answer from the primary")
        return n

    def _posted(
        self, fh: int, vol: VolumeId, rfh: int, ino: InodeId, off: int, data: bytes
    ) -> bool:
        """Send a write to the primary without waiting (in order: ``fs.write``); False when
        it cannot be posted now (no connection yet, or too many in flight): then it is sent
        and waited for like any update. Its outcome is checked at flush/fsync/close, where
        an error is reported, and by the next write of the handle."""
        stream = self._streams.get(fh)
        if stream is None:
            stream = self._streams[fh] = _Stream(vol, rfh, ino)
        if stream.error is not None:
            err, stream.error = stream.error, None
            raise err
        if self._inflight >= WRITES_IN_FLIGHT:
            return False
        assert self._post is not None
        want = len(data)

        def done(p: Pending) -> None:
            self._inflight -= 1
            self._answered.set()
            self._answered = trio.Event()
            try:
                n = p.result()
                if n != want:
                    raise FsError(errno.EIO, f"short write on the primary ({n!r:.20} of {want})")
            except FsError as exc:  # RemoteError, PeerUnavailable
                if stream.error is None:
                    stream.error = FsError(exc.errno or errno.EIO, f"write failed: {exc}")

        try:
            self._post(self._volume(vol).primary, "fs.write", {"w": [rfh, off, data]}, done)
        except PeerUnavailable:
            return False
        self._inflight += 1
        if not stream.dirty:
            stream.dirty = True
            self._unflushed[ino] = self._unflushed.get(ino, 0) + 1
        return True

    async def _flush_stream(self, fh: int, op: str, args: list[Any]) -> bool:
        """flush/fsync of a handle with posted writes: forwarded (``_fwd`` waits for every
        posted write first); True if it was done here."""
        stream = self._streams.get(fh)
        if stream is None:
            return False
        try:
            await self._fwd(stream.vol, op, args)
        finally:
            self._clean(stream)
        if stream.error is not None:
            err, stream.error = stream.error, None
            raise err
        return True

    def _clean(self, stream: _Stream) -> None:
        if stream.dirty:
            stream.dirty = False
            left = self._unflushed.get(stream.ino, 0) - 1
            if left > 0:
                self._unflushed[stream.ino] = left
            else:
                self._unflushed.pop(stream.ino, None)

    async def _written(self, fh: int, vol: VolumeId) -> None:
        """A write made here, on the primary: it is acknowledged to the writer at ``flush``
        (close) or ``fsync``, not now, so that writes and their replication overlap; at most
        WRITE_WINDOW of them are ahead of the slowest site in sync."""
        repl = self.repls.get(vol)
        if repl is None:
            return
        seq = self.vfs.meta.seq(vol)
        self._unacked[fh] = (vol, seq)
        if seq > WRITE_WINDOW:
            await repl.wait(seq - WRITE_WINDOW)

    async def flush(self, fh: int) -> None:
        """close(2): the handle's writes are on every storage site in sync when it returns."""
        await self._held_of(fh)
        stream = self._streams.get(fh)
        if stream is not None and (stream.dirty or stream.error is not None):
            await self._flush_stream(fh, "flush", [stream.rfh])
            return
        pending = self._unacked.pop(fh, None)
        if pending is not None:
            repl = self.repls.get(pending[0])
            if repl is not None:
                await repl.wait(pending[1])

    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._held_of(fh)
        stream = self._streams.get(fh)
        if stream is not None:
            await self._flush_stream(fh, "fsync", [stream.rfh, datasync])
            return
        rf = self._rfiles.get(fh)
        if rf is not None:
            await self._fwd(rf.vol, "fsync", [rf.rfh, datasync])
            return
        vol = self._handle_volume(fh)
        if self._mine(vol):
            await self.files.fsync(fh, datasync)
            await self._replicated(vol)
            return
        rfh = self._remote_fh.get(fh)
        if rfh is not None:
            await self._fwd(vol, "fsync", [rfh, datasync])

    @_after_held_writes
    async def fsyncdir(self, ino: InodeId = ROOT_INODE) -> None:
        vol = self.volume_of(ino)
        if self._mine(vol):
            await self.vfs.sync()
            await self._replicated(vol)
            return
        await self._fwd(vol, "sync", [ino])

    async def release(self, fh: int) -> None:
        try:
            await self._held_of(fh)
        except FsError as exc:
            log.warning("writes of handle %d failed at release: %s", fh, exc)
        stream = self._streams.get(fh)
        if stream is not None:
            try:
                if stream.dirty or stream.error is not None:
                    await self._flush_stream(fh, "flush", [stream.rfh])
            except FsError as exc:
                log.warning("writes of handle %d failed at release: %s", fh, exc)
            finally:
                self._clean(stream)
                del self._streams[fh]
        rf = self._rfiles.pop(fh, None)
        if rf is not None:
            await self._release_remote(rf.vol, rf.rfh)
            return
        rfh = self._remote_fh.pop(fh, None)
        vol = self._handle_volume(fh) if rfh is not None else ROOT_VOLUME
        try:
            await self.flush(fh)  # written through a mapping, or closed without a flush
            await self.files.release(fh)
        finally:
            if rfh is not None:
                await self._release_remote(vol, rfh)

    async def _release_remote(self, vol: VolumeId, rfh: int) -> None:
        try:
            await self._fwd(vol, "release", [rfh])
        except FsError as exc:
            log.warning("release of handle %d on the primary failed: %s", rfh, exc)

    # --- purging what no node uses any more -----------------------------------------------------

    def holds(self, inos: list[Any]) -> list[int]:
        """Which of ``inos`` this node's kernel or open handles still use."""
        return [
            i
            for i in inos
            if isinstance(i, int) and (not self.vfs.unused(InodeId(i)) or i in self._remote)
        ]

    async def purge_orphans(self, ask: Callable[[list[int]], Awaitable[set[int]]]) -> None:
        """Primary: purge unlinked inodes once no node uses them (like a local file system
        keeps an unlinked file for as long as a process has it open). ``ask`` returns
        the inodes some in-sync site still uses; it raises if it could not ask them all.
        """
        while True:
            await trio.sleep(PURGE_INTERVAL)
            if not self._orphans:
                continue
            batch = [int(i) for i in sorted(self._orphans)[:PURGE_BATCH]]
            try:
                held = await ask(batch)
            except FsError as exc:
                log.debug("purge of %d orphans postponed: %s", len(batch), exc)
                continue
            for i in batch:
                if i in held:
                    continue
                ino = InodeId(i)
                self._orphans.discard(ino)
                if self.vfs.unused(ino):
                    self.vfs.purge_if_orphan(ino)

    # --- the primary's side of forwarded updates ----------------------------------------------

    def register(self, methods: Methods, node_id: Callable[[str], NodeId]) -> None:
        """``fs.op``: updates forwarded by other nodes, for the volumes this node orders."""

        async def op(peer: str, args: dict[str, Any]) -> Any:
            ORIGIN.set(int(node_id(peer)))
            self._ticket.set(0)
            return await self._serve(peer, args["op"], args["args"], unpack_ctx(args["ctx"]))

        methods.add(
            "fs.op",
            {
                "op": Field(str, max_len=16),
                "args": Field(list, max_len=MAX_ARGS),
                "ctx": Field(list, max_len=4),
            },
            op,
        )

        async def write(peer: str, args: dict[str, Any]) -> int:
            """A write posted by another node (``_posted``): run in arrival order, answered
            without waiting for replication (the writer's flush/fsync waits)."""
            a = args["w"]
            if not (len(a) == 3 and isinstance(a[1], int) and 0 <= a[1] <= MAX_OFF):
                raise FsError(errno.EINVAL, "malformed write")
            ORIGIN.set(int(node_id(peer)))
            self._ticket.set(0)
            fh, vol = self._held_volume(peer, a[0])
            n = await self.files.write(fh, a[1], _b(a[2]))
            await self._written(fh, vol)
            return n

        methods.add("fs.write", {"w": Field(list, max_len=3)}, write, in_order=True)

    def _own(self, peer: str, fh: Any) -> int:
        if not isinstance(fh, int) or self._held.get(fh) != peer:
            raise FsError(errno.EBADF, f"handle {fh!r:.20} is not open for {peer}")
        return fh

    async def _serve(self, peer: str, op: str, a: list[Any], ctx: Ctx) -> Any:
        try:
            vol, result = await self._execute(peer, op, a, ctx)
        except (TypeError, ValueError, IndexError) as exc:
            raise FsError(errno.EINVAL, f"malformed {op} arguments: {exc}") from None
        if op == "read":
            return [result, 0]
        if op in ("flush", "fsync") and self.notify is not None:
            # The writes it covers came as fs.write, whose invalidations nobody waited for.
            await self.notify.flush(self._last_ticket)
        # A storage site in sync that forwarded an update waits for its own replica itself
        # (it has the record streamed to it meanwhile): the answer need not wait for its
        # acknowledgement, only for every other site's.
        repl = self.repls.get(vol) if vol is not None else None
        link = repl.links.get(peer) if repl is not None else None
        skip = link is not None and link.in_sync
        seq = self.vfs.meta.seq(vol) if skip and vol is not None else 0
        if repl is not None:
            await repl.wait(seq or None, skip=peer if skip else None)
        else:
            await self._replicated(vol)
        ticket = self._ticket.get()
        if ticket and self.notify is not None:
            await self.notify.flush(ticket)
        return [result, seq]

    def _ordered_here(self, ino: Any) -> VolumeId:
        """The volume of ``ino`` (an argument of a forwarded update); EROFS unless this node
        is its primary."""
        if not isinstance(ino, int):
            raise TypeError("inode number expected")
        vol = self.vfs.getattr(InodeId(ino)).volume
        if not self._mine(vol):
            raise FsError(errno.EROFS, f"not the primary of volume {vol}")
        return vol

    def _held_volume(self, peer: str, fh: Any) -> tuple[int, VolumeId]:
        held = self._own(peer, fh)
        return held, self._handle_volume(held)

    async def _execute(self, peer: str, op: str, a: list[Any], ctx: Ctx) -> tuple[Any, Any]:
        vfs = self.vfs
        ino = InodeId
        if op in _HANDLE_OPS:
            fh, vol = self._held_volume(peer, a[0])
            if op in ("read", "write") and not (isinstance(a[1], int) and 0 <= a[1] <= MAX_OFF):
                raise FsError(errno.EINVAL, "bad file offset")
            if op == "read":
                return vol, await self.files.read(fh, a[1], min(int(a[2]), MAX_READ))
            if op == "write":
                return vol, await self.files.write(fh, a[1], _b(a[2]))
            if op == "fsync":
                await self.files.fsync(fh, bool(a[1]))
            elif op == "flush":
                await self.flush(fh)
            else:
                del self._held[fh]
                await self.files.release(fh)
            return vol, None
        if op == "sync":
            await vfs.sync()
            return None, None
        vol = self._ordered_here(a[0])
        if op == "setattr":
            return vol, pack_attr(await vfs.setattr(ino(a[0]), _setattrs(a[1]), ctx))
        if op == "mknod":
            return vol, pack_attr(vfs.mknod(ino(a[0]), _b(a[1]), a[2], a[3], ctx, count=False))
        if op == "mkdir":
            return vol, pack_attr(vfs.mkdir(ino(a[0]), _b(a[1]), a[2], ctx, count=False))
        if op == "symlink":
            return vol, pack_attr(vfs.symlink(ino(a[0]), _b(a[1]), _b(a[2]), ctx, count=False))
        if op == "link":
            if self._ordered_here(a[1]) != vol:
                raise FsError(errno.EXDEV, "a hard link cannot cross volumes")
            return vol, pack_attr(vfs.link(ino(a[0]), ino(a[1]), _b(a[2]), count=False))
        if op == "unlink":
            vfs.unlink(ino(a[0]), _b(a[1]))
            return vol, None
        if op == "rmdir":
            vfs.rmdir(ino(a[0]), _b(a[1]))
            return vol, None
        if op == "rename":
            vfs.rename(ino(a[0]), _b(a[1]), ino(a[2]), _b(a[3]), a[4])
            return vol, None
        if op == "setxattr":
            vfs.setxattr(ino(a[0]), _b(a[1]), _b(a[2]), a[3])
            return vol, None
        if op == "removexattr":
            vfs.removexattr(ino(a[0]), _b(a[1]))
            return vol, None
        if op == "create":
            flags = a[3]
            fh, attr = vfs.create(ino(a[0]), _b(a[1]), a[2], flags, ctx, count=False)
            self._held[fh] = peer
            if flags & os.O_TRUNC and attr.size:
                # The name existed (another node's kernel did not know it yet).
                attr = await vfs.setattr(attr.ino, SetAttrs(size=0), ctx)
            return vol, [fh, pack_attr(attr)]
        if op == "open":
            fh = await vfs.open(ino(a[0]), a[1], ctx)
            self._held[fh] = peer
            return vol, fh
        raise FsError(errno.ENOSYS, f"unknown operation {op!r}")

    async def release_node(self, peer: str) -> None:
        """Close every handle opened for ``peer`` (it restarted: its handles are gone)."""
        for fh in [fh for fh, p in self._held.items() if p == peer]:
            del self._held[fh]
            await self.files.release(fh)


@dataclass(frozen=True, slots=True)
class _RemoteFile:
    """A handle on a file of a volume this node does not store: its primary's handle."""

    vol: VolumeId
    ino: InodeId
    rfh: int


@dataclass(slots=True)
class _Gathered:
    """Writes of one handle held to be written as one (``NodeFs.write``)."""

    ino: InodeId
    off: int
    buf: bytearray
    when: int  # the time of the last one: the file's mtime once written


@dataclass(slots=True)
class _Stream:
    """The writes of one handle posted to the primary (``NodeFs._posted``)."""

    vol: VolumeId
    rfh: int
    ino: InodeId
    dirty: bool = False  # posted writes not flushed yet
    error: FsError | None = None  # the first that failed, reported at the next chance


_HANDLE_OPS = frozenset({"read", "write", "fsync", "flush", "release"})


def _b(v: Any) -> bytes:
    if not isinstance(v, bytes):
        raise TypeError(f"expected bytes, got {type(v).__name__}")
    return v
