"""The local data store: one sparse file per regular-file inode under DIR/data.

Files are named by inode id (``data/<low byte>/<ino:016x>``), created on the
first write, and keep the holes of the file they back, so sparse files take no
space here either. Every function is synchronous and may block on the disk:
callers run the large ones with ``trio.to_thread.run_sync`` (see
``dfs/fs/vfs.py`` for which). OSErrors become FsError with the same errno;
ENOSPC stays ENOSPC so that a full disk is reported, not hidden.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from dfs.errors import FsError, NoSpace
from dfs.hashing import BLOCK_SIZE, block_digest

_OPEN_FLAGS = os.O_RDWR | os.O_CLOEXEC
DIRECT_ALIGN = 4096
DIRECT_MIN = 128 * 1024  # smaller writes go through the page cache
_bounce = threading.local()


def direct_eligible(off: int, length: int) -> bool:
    """Whether a write can bypass the page cache of the data store (O_DIRECT).

    Large aligned writes (what the kernel's writeback sends for sequential
    writes) skip our page cache: the client's page cache already holds the
    data, and allocating a second copy costs more than the disk write itself.
    """
    return length >= DIRECT_MIN and off % DIRECT_ALIGN == 0 and length % DIRECT_ALIGN == 0


def _bounce_buffer(size: int) -> mmap.mmap:
    """A page-aligned buffer per worker thread (O_DIRECT needs aligned memory)."""
    buf: mmap.mmap | None = getattr(_bounce, "buf", None)
    if buf is None or len(buf) < size:
        if buf is not None:
            buf.close()
        buf = mmap.mmap(-1, max(size, 1 << 20))
        _bounce.buf = buf
    return buf


def _fs_error(exc: OSError, what: str) -> FsError:
    if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
        return NoSpace(message=f"data store full while {what}")
    return FsError(exc.errno or errno.EIO, f"data store error while {what}: {exc}")


RESERVE_FRACTION = 0.02
RESERVE_MIN = 1 << 20
RESERVE_MAX = 256 << 20
SPACE_RECHECK = 0.5  # seconds a free-space reading is trusted while little is written


class DataStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._root_str = str(root)
        self.direct = hasattr(os, "O_DIRECT")  # cleared if the file system refuses it
        root.mkdir(parents=True, exist_ok=True)
        for i in range(256):
            (root / f"{i:02x}").mkdir(exist_ok=True)
        st = os.statvfs(root)
        total = st.f_blocks * st.f_frsize
        # Kept free for what frees space: an unlink must be able to commit on a full disk.
        self.reserve = min(max(int(total * RESERVE_FRACTION), RESERVE_MIN), RESERVE_MAX)
        self._free = 0  # free bytes at the last reading
        self._since = 0  # bytes written since that reading
        self._inflight = 0  # bytes admitted whose writes have not finished
        self._checked = -SPACE_RECHECK

    def admit(self, nbytes: int) -> None:
        """Admit a write of ``nbytes``, or ENOSPC if it would eat into the reserve.

        Called before anything that consumes space (data, new names, xattrs),
        paired with ``done(nbytes)`` once the write has finished; deletes,
        renames and attribute changes may use the reserve, so a full disk can
        always be cleaned up through the mount. Writes in flight count against
        the free space, so concurrent large writes cannot overrun the reserve.
        The free-space reading is refreshed when it is old or when the writes
        since it come near the reserve, so the common case costs no syscall.
        """
        now = time.monotonic()
        left = self._free - self._since - self._inflight - nbytes
        if now - self._checked > SPACE_RECHECK or left < 2 * self.reserve:
            st = os.statvfs(self.root)
            self._free = st.f_bavail * st.f_frsize
            self._since = 0
            self._checked = now
            left = self._free - self._inflight - nbytes
        if left < self.reserve:
            raise NoSpace(message="data disk full (the rest is reserved for deletes)")
        self._inflight += nbytes

    def done(self, nbytes: int) -> None:
        self._inflight -= nbytes
        self._since += nbytes

    def require_space(self, nbytes: int) -> None:
        """Admit a metadata-sized write that completes at once (a name, an xattr)."""
        self.admit(nbytes)
        self.done(nbytes)

    def fspath(self, ino: int) -> str:
        """The data file's path as a string (pathlib costs more than the syscall here)."""
        return f"{self._root_str}/{ino & 0xFF:02x}/{ino:016x}"

    def path(self, ino: int) -> Path:
        return self.root / f"{ino & 0xFF:02x}" / f"{ino:016x}"

    def open(self, ino: int, *, create: bool) -> int | None:
        """An fd for ino's data file; None if it has none and ``create`` is false."""
        flags = _OPEN_FLAGS | (os.O_CREAT if create else 0)
        try:
            return os.open(self.fspath(ino), flags, 0o600)
        except FileNotFoundError:
            if create:
                raise
            return None
        except OSError as exc:
            raise _fs_error(exc, f"opening data of inode {ino:#x}") from exc

    def create(self, ino: int) -> tuple[int, bool]:
        """An fd for ino's data file, creating it; and whether this call created it."""
        try:
            return os.open(self.fspath(ino), _OPEN_FLAGS | os.O_CREAT | os.O_EXCL, 0o600), True
        except FileExistsError:
            fd = self.open(ino, create=True)
            assert fd is not None
            return fd, False
        except OSError as exc:
            raise _fs_error(exc, f"creating data of inode {ino:#x}") from exc

    def open_direct(self, ino: int) -> int | None:
        """A second fd on ino's (existing) data file that bypasses the page cache, or None."""
        if not self.direct:
            return None
        try:
            return os.open(self.fspath(ino), _OPEN_FLAGS | os.O_DIRECT)
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # e.g. tmpfs: no O_DIRECT
                self.direct = False
                return None
            raise _fs_error(exc, f"opening data of inode {ino:#x}") from exc

    def create_direct(self, ino: int) -> int | None:
        """An fd on ino's data file (created if missing) that bypasses the page cache, or None
        where the file system refuses O_DIRECT."""
        if not self.direct:
            return None
        try:
            return os.open(self.fspath(ino), _OPEN_FLAGS | os.O_CREAT | os.O_DIRECT, 0o600)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                self.direct = False
                return None
            raise _fs_error(exc, f"creating data of inode {ino:#x}") from exc

    @staticmethod
    def pwrite_direct(fd: int, off: int, data: bytes | memoryview) -> None:
        """pwrite through an aligned bounce buffer; off and len(data) must be aligned."""
        n = len(data)
        buf = _bounce_buffer(n)
        buf[:n] = data
        view = memoryview(buf)[:n]
        try:
            DataStore.pwrite(fd, off, view)
        finally:
            view.release()

    @staticmethod
    def close(fd: int) -> None:
        os.close(fd)

    @staticmethod
    def pwrite(fd: int, off: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(fd, view, off)
                view = view[n:]
                off += n
        except OSError as exc:
            raise _fs_error(exc, "writing") from exc

    @staticmethod
    def pread(fd: int | None, off: int, size: int, logical_size: int) -> bytes:
        """Bytes [off, off+size) of a file of ``logical_size``, holes and tail as zeros."""
        end = min(off + size, logical_size)
        if end <= off:
            return b""
        want = end - off
        if fd is None:
            return bytes(want)
        try:
            data = os.pread(fd, want, off)
        except OSError as exc:
            raise _fs_error(exc, "reading") from exc
        if len(data) < want:
            data += bytes(want - len(data))
        return data

    @staticmethod
    def truncate(fd: int, size: int) -> None:
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            raise _fs_error(exc, "truncating") from exc

    @staticmethod
    def fsync(fd: int) -> None:
        try:
            os.fsync(fd)
        except OSError as exc:
            raise _fs_error(exc, "syncing") from exc

    @staticmethod
    def allocated_blocks(fd: int | None) -> int:
        """512-byte units allocated to the data file (what st_blocks reports)."""
        if fd is None:
            return 0
        return os.fstat(fd).st_blocks

    def remove(self, ino: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.fspath(ino))

    def exists(self, ino: int) -> bool:
        return os.path.exists(self.fspath(ino))

    def all_inodes(self) -> Iterator[int]:
        """Every inode that has a data file (for the checker)."""
        for sub in sorted(self.root.iterdir()):
            if not sub.is_dir():
                continue
            for f in sorted(sub.iterdir()):
                try:
                    yield int(f.name, 16)
                except ValueError:
                    continue

    def sync_dirs(self, ino: int) -> None:
        """fsync the directory holding ino's data file, so its creation is durable."""
        fd = os.open(self.path(ino).parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def digest_range(fd: int | None, blocks: range | list[int], logical_size: int) -> dict[int, int]:
    """xxh3 digests of the given blocks as they are on disk (blocks past EOF omitted)."""
    out: dict[int, int] = {}
    for blk in blocks:
        start = blk * BLOCK_SIZE
        if start >= logical_size:
            continue
        data = DataStore.pread(fd, start, BLOCK_SIZE, logical_size)
        out[blk] = block_digest(data)
    return out


def data_blocks(fd: int, size: int) -> set[int]:
    """Blocks before ``size`` that hold data in the file (SEEK_DATA; all of them if unsupported)."""
    nblocks = (size + BLOCK_SIZE - 1) // BLOCK_SIZE
    out: set[int] = set()
    off = 0
    try:
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            if start >= size:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            out.update(range(start // BLOCK_SIZE, (end - 1) // BLOCK_SIZE + 1))
            off = end
    except OSError:
        return set(range(nblocks))
    return out
