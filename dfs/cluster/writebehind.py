"""Write-behind on a cluster node: writes acknowledged at close/fsync, not one by one.

Every write is acknowledged to its writer at flush (close) or fsync (docs/CONSISTENCY.md §4),
so a node need not wait for each one to be replicated:

- **Held writes.** A write of less than ``GATHER_MAX`` is held while the next ones continue it,
  and the run is written as one update (``tar``'s 10 KiB writes of a file cost one replicated
  record, not one each). Held writes are written when the handle is flushed, fsynced or
  released, when a write does not continue them, when another handle of the file writes (one
  holder per file keeps the order of its writes), before any other operation of this node
  (``NodeFs`` asks ``pending``/``write_held``), and at the latest after ``HOLD_FOR`` seconds
  (``run``). An error writing them is reported by the handle's next write, flush or fsync.
- **Posted writes.** On a node that is not the primary, a write is sent to the primary without
  waiting (``fs.write``, served in arrival order) while fewer than ``WRITES_IN_FLIGHT`` are
  unanswered; its outcome is checked at flush/fsync/close and by the handle's next write. Until
  they are flushed, this node reads those files from the primary (``unflushed``), and nothing
  this node forwards overtakes them (``drain``). A posted write not answered within
  ``call_timeout`` (a partition can hold a connection's messages without breaking it) is given
  up: its handle's next write, flush, fsync or close fails with ETIMEDOUT (it may or may not
  have been made), and ``drain`` never waits longer than that, nor past the deadline of the
  call it serves (``dfs.cluster.deadline``).
- **The primary's window.** On the primary, a write returns once applied locally; at most
  ``WRITE_WINDOW`` of them run ahead of the slowest site in sync, and flush/fsync wait for the
  rest (``written``/``wait_acked``), within the call's deadline plus the sites' read lease
  (``replicated``).

A standalone node has the kernel's writeback cache doing all this already: it writes at once.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec
import trio

from dfs.cluster import fsops
from dfs.cluster.deadline import until
from dfs.cluster.forward import Forwarder
from dfs.cluster.handles import WRITE_ACCESS, RemoteHandles, handle_epoch
from dfs.cluster.roles import VolumeRoles
from dfs.errors import FsError
from dfs.fs.files import FileIO
from dfs.net.peer import Pending
from dfs.net.rpc import PeerUnavailable
from dfs.types import InodeId, VolumeId

log = logging.getLogger("dfs.cluster.fs")

Post = Callable[[str, str, dict[str, Any], Callable[[Pending], None]], Pending]
"""``post(node, method, args, on_done)``: send a request without waiting (``Peer.post``)."""

WRITE_WINDOW = 16  # writes on a primary ahead of its slowest site in sync
WRITES_IN_FLIGHT = 32  # writes a node posts to primaries without waiting for their answers
GATHER_MAX = 256 * 1024  # bytes held per handle
GATHER_TOTAL = 16 * 1024 * 1024  # bytes held in all
HOLD_FOR = 0.05  # seconds a held write waits at most


@dataclass(slots=True)
class Held:
    """Writes of one handle held to be written as one."""

    ino: InodeId
    off: int
    buf: bytearray
    when: int  # the time of the last one: the file's mtime once written


@dataclass(slots=True)
class Stream:
    """The writes of one handle posted to the primary."""

    vol: VolumeId
    rfh: int
    ino: InodeId
    dirty: bool = False  # posted writes not flushed yet
    error: FsError | None = None  # the first that failed, reported at the next chance
    # Posted writes refused because the primary changed (its handle is of an earlier
    # epoch: nothing was written): sent again, in order, on the new primary's handle.
    redo: list[tuple[int, bytes]] = field(default_factory=list)


@dataclass(slots=True)
class Posted:
    """A write posted to a primary and not answered yet."""

    stream: Stream
    deadline: float  # given up then (trio clock)


class WriteBehind:
    """See the module docstring."""

    def __init__(
        self,
        files: FileIO,
        roles: VolumeRoles,
        forwarder: Forwarder,
        handles: RemoteHandles,
        clock: Callable[[], int],
        volume_of: Callable[[InodeId], VolumeId],
        *,
        call_timeout: float,
        post: Post | None = None,
    ) -> None:
        """``call_timeout``: how long a posted write may go unanswered, and the longest any
        wait here takes (within the deadline of the client call being served)."""
        self.files = files
        self.roles = roles
        self.fwd = forwarder
        self.handles = handles
        self.clock = clock
        self.volume_of = volume_of
        self.standalone = not roles.clustered
        self.call_timeout = call_timeout
        self._post = post
        # Held writes: per handle, the one handle holding writes of each file, how many bytes,
        # the errors of held writes written on behalf of another operation, how many are
        # being written now.
        self._held: dict[int, Held] = {}
        self._holder: dict[InodeId, int] = {}
        self._held_bytes = 0
        self._errors: dict[int, FsError] = {}
        self._writing = 0
        self._written_out = trio.Event()
        self._held_new = trio.Event()
        # Posted writes: how many are unanswered, each handle's stream, the inodes with
        # writes not yet flushed.
        self._posts: dict[Pending, Posted] = {}  # unanswered, oldest first
        self._answered = trio.Event()
        self.streams: dict[int, Stream] = {}
        self.unflushed: dict[InodeId, int] = {}
        # The primary: handle -> (volume, sequence of its last write).
        self._unacked: dict[int, tuple[VolumeId, int]] = {}

    # --- what other operations wait for -------------------------------------------------------

    def pending(self) -> bool:
        """Writes are held or being written (other operations write them first)."""
        return bool(self._held or self._writing)

    async def drain(self) -> None:
        """Wait until every write this node posted has been answered or given up (see the
        module docstring); ETIMEDOUT if the call's deadline comes first (then a later call
        would overtake them)."""
        end = until(self.call_timeout)
        while self._posts:
            self._give_up_late()
            if not self._posts:
                return
            if trio.current_time() >= end:
                raise FsError(errno.ETIMEDOUT, "writes posted to the primary are not answered")
            first = next(iter(self._posts.values()))
            with trio.move_on_at(min(end, first.deadline)):
                await self._answered.wait()

    def _give_up_late(self) -> None:
        """Give up the posted writes that were not answered in time: each one's handle is
        told by its next write, flush, fsync or close."""
        now = trio.current_time()
        while self._posts:
            pending, p = next(iter(self._posts.items()))
            if p.deadline > now:
                return
            pending.abandon()
            self._forget_post(pending)
            if p.stream.error is None:
                p.stream.error = FsError(
                    errno.ETIMEDOUT,
                    f"a write got no answer from the primary within {self.call_timeout:g} s "
                    "(it may or may not have been made)",
                )

    def _forget_post(self, pending: Pending) -> None:
        """``pending`` was answered or given up: it is not in flight any more."""
        if self._posts.pop(pending, None) is not None:
            self._answered.set()
            self._answered = trio.Event()

    async def forward(
        self, vol: VolumeId, args: fsops._Args, ctx: Any = None, *, update: bool = True
    ) -> Any:
        """``Forwarder.call`` once every posted write was answered (nothing overtakes them)."""
        if self._posts:
            await self.drain()
        return await self.fwd.call(vol, args, ctx, update=update)

    # --- writing ----------------------------------------------------------------------------

    async def write(self, fh: int, off: int, data: bytes) -> int:
        """Write, or hold a small write to write it with the ones that follow."""
        if self.standalone:
            return await self.write_now(fh, off, data)
        err = self._errors.pop(fh, None)
        if err is not None:
            raise err
        n = len(data)
        ino = self._inode_of(fh)  # EBADF now, not later
        while True:  # until nothing held is in the way (each await lets other writes in)
            other = self._holder.get(ino)
            if other is not None and other != fh:
                # Another handle of the file holds writes: they were made first.
                await self._write_for(other)
                continue
            g = self._held.get(fh)
            if g is None:
                break
            if off == g.off + len(g.buf) and len(g.buf) + n <= GATHER_MAX:
                g.buf += data
                g.when = self.clock()
                self._held_bytes += n
                return n
            await self._write_held_of(fh)
        if 0 < n < GATHER_MAX and self._held_bytes + n <= GATHER_TOTAL:
            self._held[fh] = Held(ino, off, bytearray(data), self.clock())
            self._holder[ino] = fh
            self._held_bytes += n
            self._held_new.set()
            return n
        return await self.write_now(fh, off, data)

    def _inode_of(self, fh: int) -> InodeId:
        rf = self.handles.files.get(fh)
        return rf.ino if rf is not None else self.files.inode_of(fh)

    async def _write_for(self, fh: int) -> None:
        """Write what ``fh`` holds on behalf of something else: its error is kept for it."""
        try:
            await self._write_held_of(fh)
        except FsError as exc:
            self._errors.setdefault(fh, exc)

    async def run(self) -> None:
        """Background task: write what has been held for HOLD_FOR seconds, so that a writer
        that goes quiet without closing (a log being appended) shows on the other nodes soon
        after each write."""
        while True:
            await self._held_new.wait()
            self._held_new = trio.Event()
            await trio.sleep(HOLD_FOR)
            await self.write_held()

    async def _write_held_of(self, fh: int) -> None:
        """Write what ``fh`` holds; its error is raised."""
        g = self._held.pop(fh, None)
        if g is None:
            return
        if self._holder.get(g.ino) == fh:
            del self._holder[g.ino]
        self._held_bytes -= len(g.buf)
        self._writing += 1
        try:
            # Already acknowledged to the writer: not given up if this request is cancelled.
            with trio.CancelScope(shield=True):
                n = await self.write_now(fh, g.off, bytes(g.buf), g.when)
            if n != len(g.buf):
                raise FsError(errno.EIO, f"short write ({n} of {len(g.buf)} bytes)")
        finally:
            self._writing -= 1
            if not self._writing:
                self._written_out.set()
                self._written_out = trio.Event()

    async def write_held(self) -> None:
        """Write every held write and wait for those being written; their errors are kept
        for their handles."""
        while self._held:
            await self._write_for(next(iter(self._held)))
        await self._held_written()

    async def _held_written(self) -> None:
        """Wait for the held writes other tasks are writing (within the call's deadline)."""
        with trio.move_on_at(until(self.call_timeout)):
            while self._writing:
                await self._written_out.wait()
        if self._writing:
            raise FsError(errno.ETIMEDOUT, "held writes are still being written")

    async def held_of(self, fh: int) -> None:
        """Write what ``fh`` holds and raise the first error of its held writes."""
        if fh in self._held:
            await self._write_for(fh)
        await self._held_written()
        err = self._errors.pop(fh, None)
        if err is not None:
            raise err

    async def write_now(self, fh: int, off: int, data: bytes, when: int | None = None) -> int:
        await self.roles.steady()
        where = await self.primary_handle(fh)
        if where is None:
            vol = self.volume_of(self.files.inode_of(fh))
            n = await self.files.write(fh, off, data, when)
            await self.written(fh, vol)
            return n
        vol, rfh, ino = where
        if self._post is not None and self._posted(fh, vol, rfh, ino, off, data):
            return len(data)
        n = await self._write_there(fh, vol, rfh, off, data)
        if not isinstance(n, int):
            raise FsError(errno.EIO, "malformed write answer from the primary")
        return n

    async def _write_there(self, fh: int, vol: VolumeId, rfh: int, off: int, data: bytes) -> Any:
        try:
            return await self.forward(vol, fsops.Write(rfh, off, data))
        except FsError as exc:
            if exc.errno != errno.EBADF or not self._stale(vol, rfh):
                raise
        # The primary changed meanwhile: a handle of an earlier epoch wrote nothing.

        async def here() -> int:
            n = await self.files.write(fh, off, data)
            await self.written(fh, vol)
            return n

        return await self.on_primary(fh, lambda rfh: fsops.Write(rfh, off, data), here=here)

    async def on_primary(
        self,
        fh: int,
        args: Callable[[int], fsops._Args],
        *,
        update: bool = True,
        here: Callable[[], Awaitable[Any]] | None = None,
    ) -> Any:
        """Send ``args(primary's handle)`` for ``fh`` (a handle whose file's primary is another
        node) to the current primary; once more if the primary changed meanwhile. ``here()``
        does it when this node is (or became) the primary."""
        for last in (False, True):
            where = await self.primary_handle(fh)
            if where is None:
                if here is None:
                    raise FsError(errno.EAGAIN, "this node became the file's primary meanwhile")
                return await here()
            vol, rfh, _ino = where
            try:
                return await self.forward(vol, args(rfh), update=update)
            except FsError as exc:
                if last or exc.errno != errno.EBADF or not self._stale(vol, rfh):
                    raise
        raise AssertionError("unreachable")

    # --- open files follow the primary ----------------------------------------------------------

    def _stale(self, vol: VolumeId, rfh: int) -> bool:
        """``rfh`` was opened by a primary of ``vol`` of an earlier epoch than the current."""
        return handle_epoch(rfh) < self.roles.epoch(vol)

    async def primary_handle(self, fh: int) -> tuple[VolumeId, int, InodeId] | None:
        """Where the writes, flush and fsync of ``fh`` go: its volume, the primary's handle and
        the inode; None when this node orders the volume (they are made here). A handle that
        an earlier primary opened is replaced by one the current primary opens (with the
        same flags, less O_CREAT, O_EXCL and O_TRUNC): open files follow a new primary. A
        local handle not opened for writing has no primary handle: EBADF."""
        rf = self.handles.files.get(fh)
        if rf is not None:
            if self._stale(rf.vol, rf.rfh):
                rf = replace(rf, rfh=await self._reopen(rf.vol, rf.ino, rf.flags))
                self.handles.files[fh] = rf
                await self._restream(fh, rf.rfh)
            return rf.vol, rf.rfh, rf.ino
        ino = self.files.inode_of(fh)
        vol = self.volume_of(ino)
        if self.roles.admits(vol):
            if self.handles.on_primary.pop(fh, None) is not None:
                await self._restream(fh, None)  # this node is the primary now
            return None
        rfh = self.handles.on_primary.get(fh)
        if rfh is None or self._stale(vol, rfh):
            flags = self.files.handle(fh).flags
            if not flags & WRITE_ACCESS:
                raise FsError(errno.EBADF, "file not open for writing")
            rfh = self.handles.on_primary[fh] = await self._reopen(vol, ino, flags)
            await self._restream(fh, rfh)
        return vol, rfh, ino

    async def _reopen(self, vol: VolumeId, ino: InodeId, flags: int) -> int:
        flags &= ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)
        got = await self.fwd.call(vol, fsops.Open(ino, flags), update=bool(flags & WRITE_ACCESS))
        if not isinstance(got, int):
            raise FsError(errno.EIO, "malformed open answer from the primary")
        log.info(
            "inode %d: open again on %s, the primary of volume %d in epoch %d",
            ino,
            self.roles.primary(vol),
            vol,
            self.roles.epoch(vol),
        )
        return got

    async def _restream(self, fh: int, rfh: int | None) -> None:
        """``fh``'s writes go to the primary's handle ``rfh`` from now on (None: this node is
        the primary now and makes them): those posted to an earlier primary and refused are
        made again first, in order."""
        stream = self.streams.get(fh)
        if stream is None:
            return
        if self._posts:
            await self.drain()
        if rfh is not None:
            stream.rfh = rfh
        redo, stream.redo = stream.redo, []
        try:
            for off, data in redo:
                if rfh is None:
                    n = await self.files.write(fh, off, data)
                    await self.written(fh, stream.vol)
                else:
                    n = await self.fwd.call(stream.vol, fsops.Write(rfh, off, data))
                if n != len(data):
                    raise FsError(errno.EIO, f"short write on the primary ({n!r:.20})")
        except FsError as exc:
            if stream.error is None:
                stream.error = FsError(exc.errno or errno.EIO, f"write failed: {exc}")

    def _posted(
        self, fh: int, vol: VolumeId, rfh: int, ino: InodeId, off: int, data: bytes
    ) -> bool:
        """Send a write to the primary without waiting (in order: ``fs.write``); False when
        it cannot be posted now (no connection yet, or too many in flight): then it is sent
        and waited for like any update."""
        stream = self.streams.get(fh)
        if stream is None:
            stream = self.streams[fh] = Stream(vol, rfh, ino)
        if stream.error is not None:
            err, stream.error = stream.error, None
            raise err
        if len(self._posts) >= WRITES_IN_FLIGHT:
            return False
        assert self._post is not None
        want = len(data)

        def done(p: Pending) -> None:
            self._forget_post(p)
            try:
                n = p.result()
                if n != want:
                    raise FsError(errno.EIO, f"short write on the primary ({n!r:.20} of {want})")
            except FsError as exc:  # RemoteError, PeerUnavailable
                if exc.errno == errno.EBADF and self._stale(stream.vol, stream.rfh):
                    stream.redo.append((off, data))  # see ``_restream``
                elif stream.error is None:
                    stream.error = FsError(exc.errno or errno.EIO, f"write failed: {exc}")

        try:
            pending = self._post(self.roles.primary(vol), "fs.write", {"w": [rfh, off, data]}, done)
        except PeerUnavailable:
            return False
        if not pending.done.is_set():  # else it failed at once (connection lost): done ran
            self._posts[pending] = Posted(stream, trio.current_time() + self.call_timeout)
        if not stream.dirty:
            stream.dirty = True
            self.unflushed[ino] = self.unflushed.get(ino, 0) + 1
        return True

    # --- flush, fsync, release ------------------------------------------------------------------

    async def flush_stream(self, fh: int, args: fsops.Flush | fsops.Fsync) -> bool:
        """flush/fsync of a handle with posted writes: forwarded once every posted write was
        answered (to the current primary: ``primary_handle``); True if it was done here."""
        stream = self.streams.get(fh)
        if stream is None:
            return False
        try:
            if self._posts:
                await self.drain()

            async def here() -> None:  # this node became the primary: the writes were made here
                if isinstance(args, fsops.Fsync):
                    await self.files.fsync(fh, args.datasync)
                await self.wait_acked(fh)

            await self.on_primary(fh, lambda rfh: msgspec.structs.replace(args, fh=rfh), here=here)
        finally:
            self._clean(stream)
        if stream.error is not None:
            err, stream.error = stream.error, None
            raise err
        return True

    def stream_needs_flush(self, fh: int) -> Stream | None:
        stream = self.streams.get(fh)
        if stream is not None and (stream.dirty or stream.error is not None):
            return stream
        return None

    async def close_stream(self, fh: int) -> None:
        """release: flush what was posted (errors are logged: nobody can be told any more)."""
        stream = self.streams.get(fh)
        if stream is None:
            return
        try:
            if stream.dirty or stream.error is not None:
                await self.flush_stream(fh, fsops.Flush(stream.rfh))
        except FsError as exc:
            log.warning("writes of handle %d failed at release: %s", fh, exc)
        finally:
            self._clean(stream)
            del self.streams[fh]

    def _clean(self, stream: Stream) -> None:
        if stream.dirty:
            stream.dirty = False
            left = self.unflushed.get(stream.ino, 0) - 1
            if left > 0:
                self.unflushed[stream.ino] = left
            else:
                self.unflushed.pop(stream.ino, None)

    async def written(self, fh: int, vol: VolumeId) -> None:
        """A write made here, on the primary: acknowledged to the writer at flush or fsync,
        not now, so that writes and their replication overlap; at most WRITE_WINDOW of them
        are ahead of the slowest site in sync."""
        repl = self.roles.replicator(vol)
        if repl is None:
            return
        seq = self.files.meta.seq(vol)
        self._unacked[fh] = (vol, seq)
        if seq > WRITE_WINDOW:
            await self.replicated(vol, seq - WRITE_WINDOW)

    async def wait_acked(self, fh: int) -> None:
        """The primary's flush: every write of ``fh`` is on every site in sync."""
        pending = self._unacked.pop(fh, None)
        if pending is not None:
            await self.replicated(*pending)

    async def replicated(self, vol: VolumeId, seq: int | None = None) -> None:
        """On the primary of ``vol``: return once every site in sync has applied update
        ``seq`` (default: the latest). ETIMEDOUT (the update stays, and is replicated later)
        if that takes longer than the call's deadline plus the sites' read lease: a site that
        does not answer is given up after ``timeouts.call``, and an update is acknowledged
        without it only once its lease has run out (``Replicator.wait``)."""
        repl = self.roles.replicator(vol)
        if repl is None:
            return
        with trio.move_on_at(until(self.call_timeout) + repl.lease):
            await repl.wait(seq)
            return
        raise FsError(errno.ETIMEDOUT, f"volume {vol}: the storage sites did not acknowledge")
