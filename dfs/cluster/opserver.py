"""The primary's side of forwarded updates: ``fs.op`` and ``fs.write``.

Another node sends an update of a volume this node orders (``Forwarder``): the arguments are
decoded into their typed record (``dfs.cluster.fsops``; malformed ones are EINVAL before any
handler runs) and the operation's handler, found in a table by name, runs it in the local
``Vfs`` as the caller (uid, gid, groups, umask). The answer is ``[result, seq]``, sent once
every storage site in sync applied the update — except the caller itself when it is a site in
sync, which waits for its own replica (``Forwarder.applied_here``) — and once this node's
kernel dropped what the update changed (``CommitHook``). ``seq`` is the volume's sequence
after the update (0 for reads and for ``sync``): a caller that stores the volume reads it
from the primary until its replica has applied that much (``Forwarder.behind``). An exception
other than ``FsError`` inside a handler is a bug: it reaches the RPC layer, which logs it with
its traceback and answers EIO.

Handles: ``create`` and ``open`` open a handle here for the caller (``held``: handle -> node);
read, write, fsync, flush and release take it back, and only from that node. A node that
restarts says hello, and its old handles are closed (``release_node``). ``fs.write`` is a
write posted without waiting (``WriteBehind``), carried out in arrival order and answered
without waiting for replication: the writer's flush or fsync waits.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable
from typing import Any

from dfs.cluster import fsops as F
from dfs.cluster.commits import CommitHook
from dfs.cluster.handles import EPOCH_SHIFT
from dfs.cluster.remote import MAX_READ, pack_attr
from dfs.cluster.roles import VolumeRoles
from dfs.cluster.writebehind import WriteBehind
from dfs.errors import FsError
from dfs.fs.ctx import Ctx, SetAttrs
from dfs.fs.vfs import Vfs
from dfs.meta.store import ORIGIN
from dfs.net.frames import Field
from dfs.net.rpc import Methods
from dfs.types import InodeId, NodeId, VolumeId

Result = tuple[VolumeId | None, Any]
Handler = Callable[[str, Any, Ctx], Awaitable[Result]]


class OpServer:
    def __init__(
        self,
        vfs: Vfs,
        roles: VolumeRoles,
        commits: CommitHook,
        writes: WriteBehind,
        node_id: Callable[[str], NodeId],
    ) -> None:
        self.vfs = vfs
        self.files = vfs.files
        self.roles = roles
        self.commits = commits
        self.writes = writes
        self.node_id = node_id
        self.held: dict[int, str] = {}  # handles opened here for other nodes -> node
        self._handlers: dict[type[F._Args], Handler] = {
            F.Read: self._read,
            F.Write: self._write,
            F.Fsync: self._fsync,
            F.Flush: self._flush,
            F.Release: self._release,
            F.Sync: self._sync,
            F.Setattr: self._setattr,
            F.Mknod: self._mknod,
            F.Mkdir: self._mkdir,
            F.Symlink: self._symlink,
            F.Link: self._link,
            F.Unlink: self._unlink,
            F.Rmdir: self._rmdir,
            F.Rename: self._rename,
            F.Setxattr: self._setxattr,
            F.Removexattr: self._removexattr,
            F.Create: self._create,
            F.Open: self._open,
        }
        assert set(self._handlers) == set(F.OPS.values()), "every operation has a handler"

    def register(self, methods: Methods) -> None:
        methods.add(
            "fs.op",
            {
                "op": Field(str, max_len=16),
                "args": Field(list, max_len=F.MAX_ARGS),
                "ctx": Field(list, max_len=4),
            },
            self._op,
        )
        methods.add("fs.write", {"w": Field(list, max_len=3)}, self._posted, in_order=True)

    async def local(self, me: str, op: str, args: list[Any], ctx: list[Any]) -> Any:
        """An operation this node forwarded to itself: it became the primary while the call
        was on its way (``Forwarder`` asks the new primary once more)."""
        return await self._op(me, {"op": op, "args": args, "ctx": ctx}, mine=True)

    async def _op(self, peer: str, args: dict[str, Any], *, mine: bool = False) -> Any:
        """``mine``: the update comes from this node's own kernel (``local``), which must not
        be sent invalidations while it waits for the answer (as for any update made here)."""
        op = args["op"]
        a = F.decode(op, args["args"])
        ctx = F.unpack_ctx(args["ctx"])
        await self.roles.steady()  # a hand-over of a volume's primary is under way
        if not mine:
            ORIGIN.set(int(self.node_id(peer)))
        self.commits.start_request()
        vol, result = await self._handlers[type(a)](peer, a, ctx)
        if isinstance(a, F.Read):
            return [result, 0]
        notify = self.commits.notify
        if isinstance(a, F.Flush | F.Fsync) and notify is not None:
            # The writes it covers came as fs.write, whose invalidations nobody waited for.
            await notify.flush(self.commits.last_ticket)
        # The answer carries the volume's sequence after the update, so that a caller that
        # stores the volume knows when its replica has it (``Forwarder``). A storage site in
        # sync waits for its own replica itself (it has the record streamed to it
        # meanwhile): the answer need not wait for its acknowledgement, only for every other
        # site's. A site out of sync is caught up now: it is evidently reachable.
        repl = self.roles.replicator(vol) if vol is not None else None
        link = repl.links.get(peer) if repl is not None else None
        skip = link is not None and link.in_sync
        seq = self.vfs.meta.seq(vol) if vol is not None else 0
        if repl is not None:
            if link is not None and not skip:
                repl.kick(peer)
            await repl.wait(seq if skip else None, skip=peer if skip else None)
        elif vol is None:
            for r in list(self.roles.replicators.values()):
                await r.wait()
        ticket = self.commits.ticket()
        if ticket and notify is not None:
            await notify.flush(ticket)
        return [result, seq]

    async def _posted(self, peer: str, args: dict[str, Any]) -> int:
        """A write posted by another node: run in arrival order, answered without waiting for
        replication (the writer's flush/fsync waits)."""
        a = F.decode("write", args["w"])
        assert isinstance(a, F.Write)
        await self.roles.steady()
        ORIGIN.set(int(self.node_id(peer)))
        self.commits.start_request()
        fh, vol = self._handle(peer, a.fh)
        n = await self.files.write(fh, a.off, a.data)
        await self.writes.written(fh, vol)
        return n

    # --- handles ----------------------------------------------------------------------------

    def _wire(self, fh: int, vol: VolumeId) -> int:
        """The handle as another node holds it: with this primary's epoch above the bits of
        the local number, so that a handle opened on an earlier primary of the volume (which
        may have the same number here) is refused, not taken for another file."""
        return (self.roles.epoch(vol) << EPOCH_SHIFT) | fh

    def _handle(self, peer: str, wire: int) -> tuple[int, VolumeId]:
        fh = wire & ((1 << EPOCH_SHIFT) - 1)
        if self.held.get(fh) != peer:
            raise FsError(errno.EBADF, f"handle {fh} is not open for {peer}")
        vol = self.vfs.getattr(self.files.inode_of(fh)).volume
        if wire >> EPOCH_SHIFT != self.roles.epoch(vol):
            raise FsError(
                errno.EBADF,
                f"handle {fh} was opened on an earlier primary of volume {vol}: open it again",
            )
        return fh, vol

    async def _read(self, peer: str, a: F.Read, ctx: Ctx) -> Result:
        fh, vol = self._handle(peer, a.fh)
        return vol, await self.files.read(fh, a.off, min(a.size, MAX_READ))

    async def _write(self, peer: str, a: F.Write, ctx: Ctx) -> Result:
        fh, vol = self._handle(peer, a.fh)
        return vol, await self.files.write(fh, a.off, a.data)

    async def _fsync(self, peer: str, a: F.Fsync, ctx: Ctx) -> Result:
        fh, vol = self._handle(peer, a.fh)
        await self.files.fsync(fh, a.datasync)
        return vol, None

    async def _flush(self, peer: str, a: F.Flush, ctx: Ctx) -> Result:
        fh, vol = self._handle(peer, a.fh)
        await self.writes.wait_acked(fh)
        return vol, None

    async def _release(self, peer: str, a: F.Release, ctx: Ctx) -> Result:
        fh, vol = self._handle(peer, a.fh)
        del self.held[fh]
        await self.files.release(fh)
        return vol, None

    async def release_volume(self, vol: VolumeId) -> None:
        """Close every handle opened here for other nodes on files of ``vol``: this node no
        longer orders it (they open their files again on the new primary)."""
        for fh in list(self.held):
            try:
                gone = self.vfs.getattr(self.files.inode_of(fh)).volume == vol
            except FsError:
                gone = True
            if gone and self.held.pop(fh, None) is not None:
                await self.files.release(fh)

    async def release_node(self, peer: str) -> None:
        """Close every handle opened for ``peer`` (it restarted: its handles are gone)."""
        for fh in [fh for fh, p in self.held.items() if p == peer]:
            del self.held[fh]
            await self.files.release(fh)

    # --- updates ----------------------------------------------------------------------------

    def _ordered_here(self, ino: int, *, update: bool = True) -> VolumeId:
        """The volume of ``ino``; EROFS unless this node is its primary (and, for an
        ``update``, may make one now: ``VolumeRoles.admits``)."""
        vol = self.vfs.getattr(InodeId(ino)).volume
        if not (self.roles.admits(vol) if update else self.roles.orders(vol)):
            raise FsError(errno.EROFS, f"not the primary of volume {vol}")
        return vol

    async def _sync(self, peer: str, a: F.Sync, ctx: Ctx) -> Result:
        await self.vfs.sync()
        return None, None

    async def _setattr(self, peer: str, a: F.Setattr, ctx: Ctx) -> Result:
        vol = self._ordered_here(a.ino)
        attr = await self.vfs.setattr(InodeId(a.ino), F.setattrs(a.ch), ctx)
        return vol, pack_attr(attr)

    async def _mknod(self, peer: str, a: F.Mknod, ctx: Ctx) -> Result:
        vol = self._ordered_here(a.parent)
        attr = self.vfs.mknod(InodeId(a.parent), a.name, a.mode, a.rdev, ctx, count=False)
        return vol, pack_attr(attr)

    async def _mkdir(self, peer: str, a: F.Mkdir, ctx: Ctx) -> Result:
        vol = self._ordered_here(a.parent)
        return vol, pack_attr(self.vfs.mkdir(InodeId(a.parent), a.name, a.mode, ctx, count=False))

    async def _symlink(self, peer: str, a: F.Symlink, ctx: Ctx) -> Result:
        vol = self._ordered_here(a.parent)
        attr = self.vfs.symlink(InodeId(a.parent), a.name, a.target, ctx, count=False)
        return vol, pack_attr(attr)

    async def _link(self, peer: str, a: F.Link, ctx: Ctx) -> Result:
        vol = self._ordered_here(a.ino)
        if self._ordered_here(a.new_parent) != vol:
            raise FsError(errno.EXDEV, "a hard link cannot cross volumes")
        attr = self.vfs.link(InodeId(a.ino), InodeId(a.new_parent), a.new_name, count=False)
        return vol, pack_attr(attr)

    async def _unlink(self, peer: str, a: F.Unlink, ctx: Ctx) -> Result:
        vol = self._ordered_here(a.parent)
        self.vfs.unlink(InodeId(a.parent), a.name)
        return vol, None

    async def _rmdir(self, peer: str, a: F.Rmdir, ctx: Ctx) -> Result:
        vol = self._ordered_here(a.parent)
        self.vfs.rmdir(InodeId(a.parent), a.name)
        return vol, None

    async def _rename(self, peer: str, a: F.Rename, ctx: Ctx) -> Result:
        vol = self._ordered_here(a.old_parent)
        self.vfs.rename(
            InodeId(a.old_parent), a.old_name, InodeId(a.new_parent), a.new_name, a.flags
        )
        return vol, None

    async def _setxattr(self, peer: str, a: F.Setxattr, ctx: Ctx) -> Result:
        vol = self._ordered_here(a.ino)
        self.vfs.setxattr(InodeId(a.ino), a.name, a.value, a.flags)
        return vol, None

    async def _removexattr(self, peer: str, a: F.Removexattr, ctx: Ctx) -> Result:
        vol = self._ordered_here(a.ino)
        self.vfs.removexattr(InodeId(a.ino), a.name)
        return vol, None

    async def _create(self, peer: str, a: F.Create, ctx: Ctx) -> Result:
        vol = self._ordered_here(a.parent)
        fh, attr = self.vfs.create(InodeId(a.parent), a.name, a.mode, a.flags, ctx, count=False)
        self.held[fh] = peer
        if a.flags & os.O_TRUNC and attr.size:
            # The name existed (another node's kernel did not know it yet).
            attr = await self.vfs.setattr(attr.ino, SetAttrs(size=0), ctx)
        return vol, [self._wire(fh, vol), pack_attr(attr)]

    async def _open(self, peer: str, a: F.Open, ctx: Ctx) -> Result:
        write = a.flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC)
        vol = self._ordered_here(a.ino, update=bool(write))
        fh = await self.vfs.open(InodeId(a.ino), a.flags, ctx)
        self.held[fh] = peer
        return vol, self._wire(fh, vol)
