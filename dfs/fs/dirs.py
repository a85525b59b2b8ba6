"""Directories: handles, readdir with stable cookies, lookup counts taken by readdir, atime."""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator

from dfs.errors import (
    FsError,
)
from dfs.fs.base import READDIR_BATCH, RELATIME_NS, DirEntry, VfsBase
from dfs.meta import schema as S
from dfs.types import ROOT_INODE, Attr, InodeId

log = logging.getLogger(__name__)


class Directories(VfsBase):
    # --- directories ----------------------------------------------------------------------

    def opendir(self, ino: InodeId) -> int:
        self.getattr_dir(ino)
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self._dir_handles[fh] = ino
        return fh

    def getattr_dir(self, ino: InodeId) -> Attr:
        with self.meta.read() as txn:
            return self._dir(txn, ino)

    def releasedir(self, fh: int) -> None:
        self._dir_handles.pop(fh, None)

    def dir_of_handle(self, fh: int) -> InodeId:
        try:
            return self._dir_handles[fh]
        except KeyError:
            raise FsError(errno.EBADF) from None

    def readdir(self, ino: InodeId, start: int = 0) -> Iterator[DirEntry]:
        """Entries after cookie ``start``, in cookie order, "." and ".." first.

        Cookies are never reused, so an offset stays valid while the directory
        changes: no entry is skipped or returned twice. Reads are batches of
        short transactions; the caller may stop consuming at any point.
        """
        if start < 2:
            with self.meta.read() as txn:
                d = self._dir(txn, ino)
                dots = [DirEntry(b"..", self._get(txn, d.parent or ROOT_INODE), 2)]
            if start < 1:
                dots.insert(0, DirEntry(b".", d, 1))
            yield from dots
        pos = max(start, S.FIRST_COOKIE - 1)
        prefix = S.dirent_prefix(ino)
        while True:
            batch: list[DirEntry] = []
            with self.meta.read() as txn:
                cur = txn.cursor(db=self.meta.dirpos)
                if not cur.set_range(S.dirpos_key(ino, pos + 1)):
                    return
                for key, name in cur:
                    if not key.startswith(prefix):
                        break
                    cookie = S.read_u64(key[8:])
                    ent = self._child(txn, ino, name)
                    if ent is not None:
                        batch.append(DirEntry(bytes(name), self._get(txn, ent[0]), cookie))
                    pos = cookie
                    if len(batch) >= READDIR_BATCH:
                        break
            if not batch:
                return
            yield from batch

    def remember(self, ino: InodeId) -> None:
        """The kernel accepted an entry returned by readdir: count one reference."""
        self._count(ino)

    def touch_atime(self, ino: InodeId) -> None:
        """relatime: update atime when it is older than mtime/ctime or a day old."""
        now = self.clock()
        with self.meta.read() as txn:
            a = self._get(txn, ino)
        if not self.authority(a.volume):
            return  # atime is kept by the primary, for accesses made there
        if a.atime_ns > a.mtime_ns and a.atime_ns > a.ctime_ns and now - a.atime_ns < RELATIME_NS:
            return
        with self.meta.write() as txn:
            a = self._get(txn, ino)
            a.atime_ns = now
            self._put(txn, a)
