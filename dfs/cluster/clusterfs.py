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
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import trio

from dfs.cluster.remote import pack_attr, unpack_attr
from dfs.cluster.replication import Notifier, Replicator, invalidations
from dfs.errors import FsError
from dfs.fs.ctx import Ctx, SetAttrs
from dfs.fs.vfs import DirEntry, FsStats, Vfs
from dfs.meta.store import ORIGIN, WriteTxn
from dfs.net.frames import Field
from dfs.net.rpc import Methods, PeerTimeout, PeerUnavailable
from dfs.types import Attr, FileHandle, InodeId, NodeId

log = logging.getLogger("dfs.cluster.fs")

Forward = Callable[[str, list[Any], list[Any]], Awaitable[Any]]
"""``await forward(op, args, ctx)``: run an update on the primary; its result (wire form)."""

WRITE_ACCESS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC
MAX_ARGS = 8
PURGE_INTERVAL = 0.5
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


class NodeFs:
    def __init__(
        self,
        vfs: Vfs,
        *,
        forward: Forward | None = None,
        replicator: Replicator | None = None,
        notify: Notifier | None = None,
    ) -> None:
        self.vfs = vfs
        self.files = vfs.files
        self._forward = forward
        self.is_primary = forward is None
        self.repl = replicator
        # A node alone: nothing changes its files behind its kernel's back.
        self.standalone = forward is None and replicator is None
        self.notify = notify
        self._remote_fh: dict[int, int] = {}  # non-primary: local handle -> primary's handle
        self._held: dict[int, str] = {}  # primary: handles opened for other nodes -> node
        self._last_refusal = -1e9
        self._ticket = _TICKET
        self._orphans: set[InodeId] = set()  # primary: purges waiting for the other nodes
        if self.is_primary:
            vfs.meta.on_commit = self._committed
            if replicator is not None:
                vfs.defer_purge = self._orphans.add
        else:
            vfs.make_replica()

    # --- commit hook (primary) -------------------------------------------------------------

    def _committed(self, txn: WriteTxn) -> None:
        if self.repl is not None:
            self.repl.committed(txn)
        if self.notify is not None and ORIGIN.get():
            ws = [(i, k, v) for (i, k), v in txn.ws.items()]
            changed = invalidations(ws, txn.data)
            if changed:
                self._ticket.set(self.notify.put(changed))

    async def _replicated(self) -> None:
        if self.repl is not None:
            await self.repl.wait()

    async def _fwd(self, op: str, args: list[Any], ctx: Ctx | None = None) -> Any:
        assert self._forward is not None
        try:
            return await self._forward(
                op, args, pack_ctx(ctx) if ctx is not None else [0, 0, 0, None]
            )
        except PeerUnavailable as exc:
            self._refused(op, exc)
            raise FsError(errno.EROFS, f"primary unreachable: {exc}") from None
        except PeerTimeout as exc:
            self._refused(op, exc)
            raise

    def _refused(self, op: str, exc: Exception) -> None:
        now = trio.current_time()
        if now - self._last_refusal >= _REFUSAL_LOG_EVERY:
            self._last_refusal = now
            log.warning("%s refused: the volume's primary is unreachable (%s)", op, exc)

    # --- reads: this node's replica ---------------------------------------------------------

    def lookup(self, parent: InodeId, name: bytes) -> Attr:
        return self.vfs.lookup(parent, name)

    def getattr(self, ino: InodeId) -> Attr:
        return self.vfs.getattr(ino)

    def readlink(self, ino: InodeId) -> bytes:
        return self.vfs.readlink(ino)

    def opendir(self, ino: InodeId) -> int:
        return self.vfs.opendir(ino)

    def dir_of_handle(self, fh: int) -> InodeId:
        return self.vfs.dir_of_handle(fh)

    def readdir(self, ino: InodeId, start: int = 0) -> Iterator[DirEntry]:
        return self.vfs.readdir(ino, start)

    def remember(self, ino: InodeId) -> None:
        self.vfs.remember(ino)

    def releasedir(self, fh: int) -> None:
        self.vfs.releasedir(fh)

    def touch_atime(self, ino: InodeId) -> None:
        self.vfs.touch_atime(ino)

    def getxattr(self, ino: InodeId, name: bytes) -> bytes:
        return self.vfs.getxattr(ino, name)

    def listxattr(self, ino: InodeId) -> list[bytes]:
        return self.vfs.listxattr(ino)

    def statfs(self) -> FsStats:
        return self.vfs.statfs()

    def forget(self, items: list[tuple[InodeId, int]]) -> None:
        self.vfs.forget(items)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.files.read(fh, off, size)

    def inode_of(self, fh: int) -> InodeId:
        return self.files.inode_of(fh)

    # --- updates ----------------------------------------------------------------------------

    async def setattr(self, ino: InodeId, ch: SetAttrs, ctx: Ctx) -> Attr:
        if self.is_primary:
            a = await self.vfs.setattr(ino, ch, ctx)
            await self._replicated()
            return a
        return unpack_attr(await self._fwd("setattr", [ino, _setattrs_wire(ch)], ctx))

    async def mknod(self, parent: InodeId, name: bytes, mode: int, rdev: int, ctx: Ctx) -> Attr:
        if self.is_primary:
            a = self.vfs.mknod(parent, name, mode, rdev, ctx)
            await self._replicated()
            return a
        return self._counted(await self._fwd("mknod", [parent, name, mode, rdev], ctx))

    async def mkdir(self, parent: InodeId, name: bytes, mode: int, ctx: Ctx) -> Attr:
        if self.is_primary:
            a = self.vfs.mkdir(parent, name, mode, ctx)
            await self._replicated()
            return a
        return self._counted(await self._fwd("mkdir", [parent, name, mode], ctx))

    async def symlink(self, parent: InodeId, name: bytes, target: bytes, ctx: Ctx) -> Attr:
        if self.is_primary:
            a = self.vfs.symlink(parent, name, target, ctx)
            await self._replicated()
            return a
        return self._counted(await self._fwd("symlink", [parent, name, target], ctx))

    async def link(self, ino: InodeId, new_parent: InodeId, new_name: bytes) -> Attr:
        if self.is_primary:
            a = self.vfs.link(ino, new_parent, new_name)
            await self._replicated()
            return a
        return self._counted(await self._fwd("link", [ino, new_parent, new_name]))

    def _counted(self, wire: Any) -> Attr:
        a = unpack_attr(wire)
        self.vfs.remember(a.ino)
        return a

    async def unlink(self, parent: InodeId, name: bytes) -> None:
        if self.is_primary:
            self.vfs.unlink(parent, name)
            await self._replicated()
            return
        await self._fwd("unlink", [parent, name])

    async def rmdir(self, parent: InodeId, name: bytes) -> None:
        if self.is_primary:
            self.vfs.rmdir(parent, name)
            await self._replicated()
            return
        await self._fwd("rmdir", [parent, name])

    async def rename(
        self, old_parent: InodeId, old_name: bytes, new_parent: InodeId, new_name: bytes, flags: int
    ) -> None:
        if self.is_primary:
            self.vfs.rename(old_parent, old_name, new_parent, new_name, flags)
            await self._replicated()
            return
        await self._fwd("rename", [old_parent, old_name, new_parent, new_name, flags])

    async def setxattr(self, ino: InodeId, name: bytes, value: bytes, flags: int = 0) -> None:
        if self.is_primary:
            self.vfs.setxattr(ino, name, value, flags)
            await self._replicated()
            return
        await self._fwd("setxattr", [ino, name, value, flags])

    async def removexattr(self, ino: InodeId, name: bytes) -> None:
        if self.is_primary:
            self.vfs.removexattr(ino, name)
            await self._replicated()
            return
        await self._fwd("removexattr", [ino, name])

    # --- files --------------------------------------------------------------------------------

    async def create(
        self, parent: InodeId, name: bytes, mode: int, flags: int, ctx: Ctx
    ) -> tuple[FileHandle, Attr]:
        if self.is_primary:
            fh, a = self.vfs.create(parent, name, mode, flags, ctx)
            await self._replicated()
            return fh, a
        wire = await self._fwd("create", [parent, name, mode, flags], ctx)
        if not (isinstance(wire, list) and len(wire) == 2 and isinstance(wire[0], int)):
            raise FsError(errno.EIO, "malformed create answer from the primary")
        a = self._counted(wire[1])
        fh = self.files.open(a.ino, flags, a)
        self._remote_fh[fh] = wire[0]
        return fh, a

    async def open(self, ino: InodeId, flags: int, ctx: Ctx) -> FileHandle:
        if self.is_primary:
            fh = await self.vfs.open(ino, flags, ctx)
            if flags & os.O_TRUNC:
                await self._replicated()
            return fh
        if not flags & WRITE_ACCESS:
            return self.files.open(ino, flags)
        rfh = await self._fwd("open", [ino, flags], ctx)
        if not isinstance(rfh, int):
            raise FsError(errno.EIO, "malformed open answer from the primary")
        try:
            fh = self.files.open(ino, flags)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._release_remote(rfh)
            raise
        self._remote_fh[fh] = rfh
        return fh

    async def write(self, fh: int, off: int, data: bytes) -> int:
        if self.is_primary:
            n = await self.files.write(fh, off, data)
            await self._replicated()
            return n
        rfh = self._remote_fh.get(fh)
        if rfh is None:
            self.files.handle(fh)  # EBADF for a handle that does not exist
            raise FsError(errno.EBADF, "file not open for writing")
        n = await self._fwd("write", [rfh, off, data])
        if not isinstance(n, int):
            raise FsError(errno.EIO, "malformed write answer from the primary")
        return n

    async def fsync(self, fh: int, datasync: bool) -> None:
        if self.is_primary:
            await self.files.fsync(fh, datasync)
            await self._replicated()
            return
        rfh = self._remote_fh.get(fh)
        if rfh is not None:
            await self._fwd("fsync", [rfh, datasync])

    async def fsyncdir(self) -> None:
        if self.is_primary:
            await self.vfs.sync()
            await self._replicated()
            return
        await self._fwd("sync", [])

    async def release(self, fh: int) -> None:
        rfh = self._remote_fh.pop(fh, None)
        try:
            await self.files.release(fh)
        finally:
            if rfh is not None:
                await self._release_remote(rfh)

    async def _release_remote(self, rfh: int) -> None:
        try:
            await self._fwd("release", [rfh])
        except FsError as exc:
            log.warning("release of handle %d on the primary failed: %s", rfh, exc)

    # --- purging what no node uses any more -----------------------------------------------------

    def holds(self, inos: list[Any]) -> list[int]:
        """Which of ``inos`` this node's kernel or open handles still use."""
        return [i for i in inos if isinstance(i, int) and not self.vfs.unused(InodeId(i))]

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
        """``fs.op``: updates forwarded by other nodes (primary only)."""

        async def op(peer: str, args: dict[str, Any]) -> Any:
            if not self.is_primary:
                raise FsError(errno.EROFS, "not the primary of this volume")
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

    def _own(self, peer: str, fh: Any) -> int:
        if not isinstance(fh, int) or self._held.get(fh) != peer:
            raise FsError(errno.EBADF, f"handle {fh!r:.20} is not open for {peer}")
        return fh

    async def _serve(self, peer: str, op: str, a: list[Any], ctx: Ctx) -> Any:
        try:
            result = await self._execute(peer, op, a, ctx)
        except (TypeError, ValueError, IndexError) as exc:
            raise FsError(errno.EINVAL, f"malformed {op} arguments: {exc}") from None
        await self._replicated()
        ticket = self._ticket.get()
        if ticket and self.notify is not None:
            await self.notify.flush(ticket)
        return result

    async def _execute(self, peer: str, op: str, a: list[Any], ctx: Ctx) -> Any:
        vfs = self.vfs
        ino = InodeId
        if op == "setattr":
            return pack_attr(await vfs.setattr(ino(a[0]), _setattrs(a[1]), ctx))
        if op == "mknod":
            return pack_attr(vfs.mknod(ino(a[0]), _b(a[1]), a[2], a[3], ctx, count=False))
        if op == "mkdir":
            return pack_attr(vfs.mkdir(ino(a[0]), _b(a[1]), a[2], ctx, count=False))
        if op == "symlink":
            return pack_attr(vfs.symlink(ino(a[0]), _b(a[1]), _b(a[2]), ctx, count=False))
        if op == "link":
            return pack_attr(vfs.link(ino(a[0]), ino(a[1]), _b(a[2]), count=False))
        if op == "unlink":
            return vfs.unlink(ino(a[0]), _b(a[1]))
        if op == "rmdir":
            return vfs.rmdir(ino(a[0]), _b(a[1]))
        if op == "rename":
            return vfs.rename(ino(a[0]), _b(a[1]), ino(a[2]), _b(a[3]), a[4])
        if op == "setxattr":
            return vfs.setxattr(ino(a[0]), _b(a[1]), _b(a[2]), a[3])
        if op == "removexattr":
            return vfs.removexattr(ino(a[0]), _b(a[1]))
        if op == "create":
            flags = a[3]
            fh, attr = vfs.create(ino(a[0]), _b(a[1]), a[2], flags, ctx, count=False)
            self._held[fh] = peer
            if flags & os.O_TRUNC and attr.size:
                # The name existed (another node's kernel did not know it yet).
                attr = await vfs.setattr(attr.ino, SetAttrs(size=0), ctx)
            return [fh, pack_attr(attr)]
        if op == "open":
            fh = await vfs.open(ino(a[0]), a[1], ctx)
            self._held[fh] = peer
            return fh
        if op == "write":
            return await self.files.write(self._own(peer, a[0]), a[1], _b(a[2]))
        if op == "fsync":
            return await self.files.fsync(self._own(peer, a[0]), bool(a[1]))
        if op == "release":
            held = self._own(peer, a[0])
            del self._held[held]
            return await self.files.release(held)
        if op == "sync":
            return await vfs.sync()
        raise FsError(errno.ENOSYS, f"unknown operation {op!r}")

    async def release_node(self, peer: str) -> None:
        """Close every handle opened for ``peer`` (it restarted: its handles are gone)."""
        for fh in [fh for fh, p in self._held.items() if p == peer]:
            del self._held[fh]
            await self.files.release(fh)


def _b(v: Any) -> bytes:
    if not isinstance(v, bytes):
        raise TypeError(f"expected bytes, got {type(v).__name__}")
    return v
