"""File contents: open handles, read/write/truncate/flush/fsync, and block checksums.

Checksums (``dfs/hashing.py``) are settled lazily. A write that covers whole
blocks hashes them from the buffer it already holds ("pending"); a write that
covers part of a block marks it "dirty". Settling (release, fsync,
truncate) re-reads dirty blocks from disk, stores every new digest in lmdb and
clears the inode's ``dirty`` intent record. That record is committed before
the first unsettled write reaches the data file, so after ``kill -9`` start-up
recovery knows exactly which files to re-checksum from their contents.

Reads verify every block that has a settled digest and is not being
rewritten; a mismatch is logged and answered with EIO, never with bad data.

Large transfers (>= THREAD_MIN bytes) and every fsync run in a worker thread
so one big request does not stall the event loop; small ones run inline,
because a page-cache pread/pwrite of a few KiB costs less than the hop.
Writes and settles of one inode are serialised by a per-inode trio lock.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from dfs.clock import WallClock
from dfs.data.store import DataStore, digest_range, direct_eligible
from dfs.errors import BlockCorrupted, FsError, IsADir
from dfs.fs.blocks import (
    inline_blocks,
    rewrite_block,
    verify_inline,
    write_and_digest,
)
from dfs.fs.recovery import rechecksum
from dfs.hashing import BLOCK_SIZE, block_digest, blocks_spanning
from dfs.meta import schema as S
from dfs.meta.store import MetaStore, Txn
from dfs.types import Attr, FileHandle, InodeId, VolumeId

log = logging.getLogger(__name__)

THREAD_MIN = 256 * 1024
_io_limiter: trio.CapacityLimiter | None = None


def _never(vol: VolumeId) -> bool:
    return False


def io_limiter() -> trio.CapacityLimiter:
    """Worker threads for disk I/O (created lazily: it needs a running trio loop)."""
    global _io_limiter
    if _io_limiter is None:
        _io_limiter = trio.CapacityLimiter(8)
    return _io_limiter


class _locked:  # noqa: N801 - used like a function: ``async with _locked(lock):``
    """Hold a trio.Lock without a scheduler round trip when it is free.

    ``trio.Lock`` checkpoints twice even when uncontended; on the write and
    release paths that costs more than the work itself.
    """

    __slots__ = ("lock",)

    def __init__(self, lock: trio.Lock) -> None:
        self.lock = lock

    async def __aenter__(self) -> None:
        try:
            self.lock.acquire_nowait()
        except trio.WouldBlock:
            await self.lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.lock.release()


@dataclass(eq=False)
class OpenInode:
    """State shared by every handle open on one inode."""

    ino: InodeId
    fd: int | None = None
    dfd: int | None = None  # O_DIRECT fd for large aligned writes (see DataStore)
    opens: int = 0
    lock: trio.Lock = field(default_factory=trio.Lock)
    dirty: set[int] = field(default_factory=set)
    pending: dict[int, int] = field(default_factory=dict)
    intent: bool = False  # the lmdb ``dirty`` record exists
    written: bool = False  # data changed since the last settle
    new_file: bool = False  # the data file was created and its directory not yet synced


@dataclass(eq=False)
class Handle:
    inode: OpenInode
    flags: int


class FileIO:
    def __init__(
        self,
        meta: MetaStore,
        data: DataStore,
        clock: WallClock,
        on_closed: Callable[[InodeId], None],
        *,
        replica: Callable[[VolumeId], bool] | None = None,
        writeback_cache: bool = False,
    ) -> None:
        self.meta = meta
        self.data = data
        self.clock = clock
        self._on_closed = on_closed
        # Whether a write sets mtime/ctime. Not under FUSE's writeback cache: the kernel
        # keeps those times of regular files itself and sends them with setattr when it
        # changes them; stamping here too would store times nobody saw (the kernel skips
        # an update within one clock tick), which show up after a restart.
        self.stamp_writes = not writeback_cache
        # A storage site's replica: blocks of a file with a ``dirty`` record may be newer
        # than their digests (the primary's settle record follows), and recovery writes
        # only per-node records.
        self.replica: Callable[[VolumeId], bool] = replica or _never
        self._inodes: dict[InodeId, OpenInode] = {}
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1

    # --- handles --------------------------------------------------------------------------

    def open(self, ino: InodeId, flags: int, attr: Attr | None = None) -> FileHandle:
        """A handle on ``ino``; ``attr`` saves a lookup when the caller just had it."""
        a = attr
        if a is None:
            with self.meta.read() as txn:
                raw = txn.get(S.inode_key(ino), db=self.meta.inodes)
            if raw is None:
                raise FsError(errno.ENOENT)
            a = S.unpack_inode(ino, raw)
        if a.is_dir:
            raise IsADir()
        if not a.is_reg:
            # The kernel follows symlinks and handles FIFOs, sockets and devices itself;
            # only regular files have contents here.
            raise FsError(errno.ELOOP if a.is_lnk else errno.ENXIO)
        st = self._inodes.get(ino)
        if st is None:
            st = self._inodes[ino] = OpenInode(ino)
        st.opens += 1
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = Handle(st, flags)
        return FileHandle(fh)

    def handle(self, fh: int) -> Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise FsError(errno.EBADF) from None

    def is_open(self, ino: InodeId) -> bool:
        return ino in self._inodes

    def open_count(self) -> int:
        """How many handles are open."""
        return len(self._handles)

    def inode_of(self, fh: int) -> InodeId:
        return self.handle(fh).inode.ino

    async def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is None:
            return
        st = h.inode
        try:
            if h.flags & os.O_ACCMODE != os.O_RDONLY or st.opens == 1:
                # A reader's close settles nothing while a writer keeps the file open.
                await self.settle(st)
        finally:
            self._unpin(st)

    def _pin(self, fh: int) -> OpenInode:
        """The open inode of ``fh``, kept open (with its descriptors) until ``_unpin``, even if
        the handle is released meanwhile: a release that overlaps an operation of the same
        handle (a peer's handles closed when it restarts, ``OpServer.release_node``) must not
        close a descriptor a worker thread is using."""
        st = self.handle(fh).inode
        st.opens += 1
        return st

    def _unpin(self, st: OpenInode) -> None:
        """One user of ``st`` (a handle, or an operation by inode such as a truncate) is
        done; the last one closes its descriptors."""
        st.opens -= 1
        if st.opens == 0:
            if st.fd is not None:
                self.data.close(st.fd)
                st.fd = None
            if st.dfd is not None:
                self.data.close(st.dfd)
                st.dfd = None
            del self._inodes[st.ino]
            self._on_closed(st.ino)

    # --- data -----------------------------------------------------------------------------

    def _attr(self, txn: Txn, ino: int) -> Attr:
        raw = txn.get(S.inode_key(ino), db=self.meta.inodes)
        if raw is None:
            raise FsError(errno.ENOENT)
        return S.unpack_inode(ino, raw)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        st = self._pin(fh)
        try:
            return await self._read(st, off, size)
        finally:
            self._unpin(st)

    async def _read(self, st: OpenInode, off: int, size: int) -> bytes:
        with self.meta.read() as txn:
            a = self._attr(txn, st.ino)
            end = min(off + size, a.size)
            if end <= off:
                return b""
            inl = txn.get(S.inline_key(st.ino), db=self.meta.inline)
            if inl is not None:
                verify_inline(st.ino, inl, txn.get(S.block_key(st.ino, 0), db=self.meta.blocks))
                return inl[off:end] + bytes(max(0, end - max(off, len(inl))))
            blocks = blocks_spanning(off, end - off)
            digests: dict[int, int] = {}
            cur = txn.cursor(db=self.meta.blocks)
            if (
                self.replica(a.volume)
                and txn.get(S.dirty_key(st.ino), db=self.meta.dirty) is not None
            ):
                pass  # being written on the primary: digests follow
            elif cur.set_range(S.block_key(st.ino, blocks.start)):
                for key, raw in cur:
                    ino, blk = S.block_of_key(key)
                    if ino != st.ino or blk >= blocks.stop:
                        break
                    if blk not in st.dirty and blk not in st.pending:
                        digests[blk] = S.unpack_digest(raw)
        if st.fd is None:
            st.fd = self.data.open(st.ino, create=False)
        fd, size_now = st.fd, a.size
        if not digests:
            if end - off >= THREAD_MIN:
                return await trio.to_thread.run_sync(
                    DataStore.pread, fd, off, end - off, size_now, limiter=io_limiter()
                )
            return DataStore.pread(fd, off, end - off, size_now)
        first = blocks.start * BLOCK_SIZE
        span = blocks.stop * BLOCK_SIZE - first
        if span >= THREAD_MIN:
            raw_data = await trio.to_thread.run_sync(
                DataStore.pread, fd, first, span, size_now, limiter=io_limiter()
            )
        else:
            raw_data = DataStore.pread(fd, first, span, size_now)
        mv = memoryview(raw_data)
        for blk, want in digests.items():
            piece = mv[(blk - blocks.start) * BLOCK_SIZE : (blk - blocks.start + 1) * BLOCK_SIZE]
            got = block_digest(piece)
            if got != want:
                log.error(
                    "checksum mismatch: inode %#x block %d (stored %016x, read %016x); "
                    "answering EIO",
                    st.ino,
                    blk,
                    want,
                    got,
                )
                raise BlockCorrupted(st.ino, blk, want)
        return raw_data[off - first : end - first]

    async def write(self, fh: int, off: int, data: bytes, when: int | None = None) -> int:
        """Write ``data`` at ``off``; ``when``: the time to stamp (default: now), for a
        write that was made earlier and held (see NodeFs.write)."""
        n = len(data)
        if n == 0:
            self.handle(fh)  # EBADF all the same
            return 0
        st = self._pin(fh)
        try:
            self.data.admit(n)  # ENOSPC before anything changes
            try:
                return await self._write(st, off, data, when)
            finally:
                self.data.done(n)
        finally:
            self._unpin(st)

    async def _write(self, st: OpenInode, off: int, data: bytes, when: int | None) -> int:
        n = len(data)
        async with _locked(st.lock):
            if st.fd is None:
                if off + n <= S.INLINE_MAX and self._write_inline(st.ino, off, data, when):
                    return n
                st.fd = self._to_data_file(st)
            if not st.intent:
                # Committed before the data file changes: a daemon killed between the
                # pwrite and a later commit would leave old checksums over new data.
                with self.meta.write() as txn:
                    txn.put(S.dirty_key(st.ino), b"", db=self.meta.dirty)
                st.intent = True
            fd = st.fd
            direct = False
            if direct_eligible(off, n) and self.data.direct:
                if st.dfd is None:
                    st.dfd = self.data.open_direct(st.ino)
                if st.dfd is not None:
                    fd, direct = st.dfd, True
            if n >= THREAD_MIN or direct:
                full, partial = await trio.to_thread.run_sync(
                    write_and_digest, fd, off, data, direct, limiter=io_limiter()
                )
            else:
                full, partial = write_and_digest(fd, off, data)
            for blk, d in full.items():
                st.pending[blk] = d
                st.dirty.discard(blk)
            for blk in partial:
                st.pending.pop(blk, None)
                st.dirty.add(blk)
            st.written = True
            now = self.clock() if when is None else when
            with self.meta.write() as txn:
                a = self._attr(txn, st.ino)
                if off + n > a.size:
                    a.size = off + n
                if self.stamp_writes:
                    a.mtime_ns = a.ctime_ns = now
                a.version = self.meta.log(txn, a.volume, "write")
                txn.put(S.inode_key(st.ino), S.pack_inode(a), db=self.meta.inodes)
                txn.data_op("w", st.ino, off, data)
        return n

    # --- inline files (see dfs/meta/schema.py) ---------------------------------------------

    def _write_inline(self, ino: InodeId, off: int, data: bytes, when: int | None) -> bool:
        """Write into an inline (or empty) file in one transaction; False if it has a data file."""
        now = self.clock() if when is None else when
        with self.meta.write() as txn:
            a = self._attr(txn, ino)
            key = S.inline_key(ino)
            inl = txn.get(key, db=self.meta.inline)
            if inl is None and (a.size > 0 or self.data.exists(ino)):
                return False
            buf = bytearray(inl or b"")
            if off > len(buf):
                buf.extend(bytes(off - len(buf)))
            buf[off : off + len(data)] = data
            txn.put(key, buf, db=self.meta.inline)
            txn.put(S.block_key(ino, 0), S.pack_digest(block_digest(buf)), db=self.meta.blocks)
            a.size = len(buf)
            a.blocks = inline_blocks(buf)
            if self.stamp_writes:
                a.mtime_ns = a.ctime_ns = now
            a.version = self.meta.log(txn, a.volume, "write")
            txn.put(S.inode_key(ino), S.pack_inode(a), db=self.meta.inodes)
        return True

    def _to_data_file(self, st: OpenInode) -> int:
        """Open (creating) ino's data file, moving inline contents into it first.

        The ``dirty`` record is committed before the data file is written and
        the inline record deleted after it, so a daemon killed in between
        leaves an inline file (which wins) plus a leftover that recovery removes.
        """
        ino = st.ino
        with self.meta.read() as txn:
            inl = txn.get(S.inline_key(ino), db=self.meta.inline)
        if inl is not None and not st.intent:
            with self.meta.write() as txn:
                txn.put(S.dirty_key(ino), b"", db=self.meta.dirty)
            st.intent = True
        fd, st.new_file = self.data.create(ino)
        if inl is not None:
            try:
                DataStore.pwrite(fd, 0, inl)
                with self.meta.write() as txn:
                    txn.delete(S.inline_key(ino), db=self.meta.inline)
                    txn.data_op("w", ino, 0, inl)
            except BaseException:
                self.data.close(fd)
                raise
        return fd

    async def fsync(self, fh: int, datasync: bool) -> None:
        st = self._pin(fh)
        try:
            await self.settle(st)
            if st.fd is not None:
                await trio.to_thread.run_sync(DataStore.fsync, st.fd, limiter=io_limiter())
            if st.new_file:
                # The data file's name must be durable too, not only its contents.
                await trio.to_thread.run_sync(self.data.sync_dirs, st.ino, limiter=io_limiter())
                st.new_file = False
        finally:
            self._unpin(st)
        await trio.to_thread.run_sync(self.meta.sync, limiter=io_limiter())

    async def settle(self, st: OpenInode) -> None:
        """Store the digests of everything written so far and clear the dirty intent."""
        if not st.written and not st.intent:
            return
        async with _locked(st.lock):
            self._settle_locked(st)

    def _settle_locked(self, st: OpenInode) -> None:
        with self.meta.read() as txn:
            size = self._attr(txn, st.ino).size
        fresh = digest_range(st.fd, sorted(st.dirty), size) if st.dirty else {}
        fresh.update({b: d for b, d in st.pending.items() if b * BLOCK_SIZE < size})
        blocks = self.data.allocated_blocks(st.fd)
        with self.meta.write() as txn:
            a = self._attr(txn, st.ino)
            for blk, d in fresh.items():
                txn.put(S.block_key(st.ino, blk), S.pack_digest(d), db=self.meta.blocks)
            txn.delete(S.dirty_key(st.ino), db=self.meta.dirty)
            if a.blocks != blocks:
                a.blocks = blocks
                txn.put(S.inode_key(st.ino), S.pack_inode(a), db=self.meta.inodes)
        st.dirty.clear()
        st.pending.clear()
        st.intent = False
        st.written = False

    # --- truncate -------------------------------------------------------------------------

    async def truncate(self, ino: InodeId, size: int) -> None:
        """Cut or extend ino's data to ``size`` and fix the checksums it affects.

        Extending only adds a hole (no data, no digest). Shrinking drops the
        digests of blocks past the end and re-hashes the new last block.
        """
        if size < 0:
            raise FsError(errno.EINVAL)
        with self.meta.read() as txn:
            if not self._attr(txn, ino).is_reg:
                return
        st = self._inodes.get(ino)
        if st is not None:
            # Pinned like a handle: the release of the file's last handle (which the kernel
            # sends after close(2) returned, so it overlaps a truncate by name) must not close
            # the descriptor while it is being cut in a worker thread.
            st.opens += 1
            try:
                async with _locked(st.lock):
                    if st.fd is None and self._truncate_inline(ino, size):
                        return
                    if st.fd is None and size > S.INLINE_MAX:
                        st.fd = self._to_data_file(st)
                    if st.fd is None:  # open, not yet read or written: the data file counts
                        st.fd = self.data.open(ino, create=False)
                    self._settle_locked(st)
                    await self._truncate_fd(ino, st.fd, size)
            finally:
                self._unpin(st)
            return
        if self._truncate_inline(ino, size):
            return
        if size > S.INLINE_MAX:
            tmp = OpenInode(ino)
            fd: int | None = self._to_data_file(tmp)
            if tmp.intent:
                with self.meta.write() as txn:
                    txn.delete(S.dirty_key(ino), db=self.meta.dirty)
        else:
            fd = self.data.open(ino, create=False)
        try:
            await self._truncate_fd(ino, fd, size)
        finally:
            if fd is not None:
                self.data.close(fd)

    def _truncate_inline(self, ino: InodeId, size: int) -> bool:
        """Resize an inline or empty file that stays within INLINE_MAX; False otherwise."""
        if size > S.INLINE_MAX:
            return False
        with self.meta.write() as txn:
            a = self._attr(txn, ino)
            if not a.is_reg:
                return False
            key = S.inline_key(ino)
            inl = txn.get(key, db=self.meta.inline)
            if inl is None and (a.size > 0 or self.data.exists(ino)):
                return False
            buf = (inl or b"")[:size]
            if len(buf) < size:
                buf += bytes(size - len(buf))
            if size == 0:
                txn.delete(key, db=self.meta.inline)
                txn.delete(S.block_key(ino, 0), db=self.meta.blocks)
            else:
                txn.put(key, buf, db=self.meta.inline)
                txn.put(S.block_key(ino, 0), S.pack_digest(block_digest(buf)), db=self.meta.blocks)
        return True

    async def _truncate_fd(self, ino: InodeId, fd: int | None, size: int) -> None:
        """Shrinking commits the new size and checksums (with a dirty intent) before it
        cuts the data file: a daemon killed in between leaves the new state, whose data
        file start-up recovery cuts, never checksums of data that is gone."""
        with self.meta.read() as txn:
            a = self._attr(txn, ino)
        if not a.is_reg:
            return
        if size >= a.size:
            # Extending adds a hole: reads past the data file's end are zeros, so the data
            # file is not grown (it would outrun a size commit that fails or never comes);
            # bytes past the old end (from a write whose commit failed) must not show.
            if fd is not None and os.fstat(fd).st_size > a.size:
                await trio.to_thread.run_sync(DataStore.truncate, fd, a.size, limiter=io_limiter())
            return
        keep = (size + BLOCK_SIZE - 1) // BLOCK_SIZE
        last = size // BLOCK_SIZE if size % BLOCK_SIZE else None
        # the new last block as it will read: pread stops at the logical size
        fresh = digest_range(fd, [last], size) if last is not None else {}
        with self.meta.write() as txn:
            a = self._attr(txn, ino)
            a.size = size
            txn.put(S.inode_key(ino), S.pack_inode(a), db=self.meta.inodes)
            if fd is not None:
                txn.put(S.dirty_key(ino), b"", db=self.meta.dirty)
            txn.delete_prefix(S.ino_prefix(ino), db=self.meta.blocks, start=S.block_key(ino, keep))
            for blk, d in fresh.items():
                if txn.get(S.block_key(ino, blk), db=self.meta.blocks) is not None:
                    txn.put(S.block_key(ino, blk), S.pack_digest(d), db=self.meta.blocks)
            if fd is not None:
                txn.data_op("t", ino, size)
        if fd is not None:
            await trio.to_thread.run_sync(DataStore.truncate, fd, size, limiter=io_limiter())
            with self.meta.write() as txn:
                txn.delete(S.dirty_key(ino), db=self.meta.dirty)

    async def settle_volume(self, vol: VolumeId) -> None:
        """Settle every open file of ``vol`` that was written: its primary hands it over, and
        the digests must be in its journal before it steps down (its successor cannot know
        which blocks its writes left unsettled)."""
        for st in list(self._inodes.values()):
            if not st.written and not st.intent:
                continue
            with self.meta.read() as txn:
                raw = txn.get(S.inode_key(st.ino), db=self.meta.inodes)
            if raw is not None and S.unpack_inode(st.ino, raw).volume == vol:
                await self.settle(st)

    def settle_all(self) -> None:
        """At shutdown: settle every open inode whose release the kernel never sent."""
        for st in list(self._inodes.values()):
            if not st.written and not st.intent:
                continue
            try:
                self._settle_locked(st)
            except FsError as exc:
                log.warning("could not settle inode %#x at shutdown: %s", st.ino, exc)

    def allocated(self, ino: InodeId) -> int:
        with self.meta.read() as txn:
            inl = txn.get(S.inline_key(ino), db=self.meta.inline)
        if inl is not None:
            return inline_blocks(inl)
        st = self._inodes.get(ino)
        if st is not None and st.fd is not None:
            return self.data.allocated_blocks(st.fd)
        fd = self.data.open(ino, create=False)
        try:
            return self.data.allocated_blocks(fd)
        finally:
            if fd is not None:
                self.data.close(fd)

    # --- read repair ----------------------------------------------------------------------

    async def repair_block(self, ino: InodeId, blk: int, data: bytes, want: int) -> bool:
        """Rewrite block ``blk`` of ``ino`` with ``data`` (the block as another replica holds
        it, up to the end of the file) if it hashes to ``want`` and the stored digest is still
        ``want``; True if it was rewritten (and is on disk)."""
        if block_digest(data) != want or len(data) > BLOCK_SIZE:
            return False
        st = self._inodes.get(ino)
        if st is not None:
            st.opens += 1  # pinned like a handle (see ``truncate``)
            try:
                async with _locked(st.lock):
                    return await rewrite_block(
                        self.meta, self.data, ino, blk, data, want, io_limiter()
                    )
            finally:
                self._unpin(st)
        return await rewrite_block(self.meta, self.data, ino, blk, data, want, io_limiter())

    # --- recovery -------------------------------------------------------------------------

    def rechecksum(self, ino: InodeId) -> None:
        """Recompute every digest of ino from its contents (after an unclean stop)."""
        rechecksum(self.meta, self.data, ino, self.replica)
