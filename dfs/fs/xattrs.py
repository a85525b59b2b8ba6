"""Extended attributes: names by namespace, size limits, XATTR_CREATE/XATTR_REPLACE."""

from __future__ import annotations

import errno
import logging

from dfs.errors import (
    Exists,
    FsError,
    Invalid,
    NoData,
    NoSpace,
    NotFound,
)
from dfs.fs.base import NAME_COST, XATTR_CREATE, XATTR_NAMESPACES, XATTR_REPLACE, VfsBase
from dfs.meta import schema as S
from dfs.meta.store import Txn
from dfs.types import InodeId

log = logging.getLogger(__name__)


class Xattrs(VfsBase):
    # --- extended attributes --------------------------------------------------------------

    @staticmethod
    def _check_xattr_name(name: bytes) -> None:
        if len(name) > S.MAX_XATTR_NAME:
            raise FsError(errno.ERANGE)
        if name in XATTR_NAMESPACES:
            raise Invalid(message="empty extended attribute name")  # as Linux's handlers
        if not name.startswith(XATTR_NAMESPACES):
            raise FsError(errno.EOPNOTSUPP)

    def getxattr(self, ino: InodeId, name: bytes) -> bytes:
        self._check_xattr_name(name)
        with self.meta.read() as txn:
            v = txn.get(S.xattr_key(ino, name), db=self.meta.xattrs)
            # A miss is by far the common case (the kernel asks for security.capability
            # before every write(2)); only then does it cost a second lookup.
            if v is None:
                if txn.get(S.inode_key(ino), db=self.meta.inodes) is None:
                    raise NotFound()
                raise NoData()
            return bytes(v)

    def listxattr(self, ino: InodeId) -> list[bytes]:
        prefix = S.ino_prefix(ino)
        with self.meta.read() as txn:
            self._get(txn, ino)
            cur = txn.cursor(db=self.meta.xattrs)
            out: list[bytes] = []
            if cur.set_range(prefix):
                for key in cur.iternext(values=False):
                    if not key.startswith(prefix):
                        break
                    out.append(bytes(key[8:]))
            return out

    def setxattr(self, ino: InodeId, name: bytes, value: bytes, flags: int = 0) -> None:
        self._check_xattr_name(name)
        if len(value) > S.MAX_XATTR_VALUE:
            raise FsError(errno.E2BIG)
        self.data.require_space(len(name) + len(value) + NAME_COST)
        with self.meta.write() as txn:
            a = self._get(txn, ino)
            key = S.xattr_key(ino, name)
            old = txn.get(key, db=self.meta.xattrs)
            if flags & XATTR_CREATE and old is not None:
                raise Exists()
            if flags & XATTR_REPLACE and old is None:
                raise NoData()
            total = self._xattr_total(txn, ino) - (len(old) + len(name) if old is not None else 0)
            if total + len(name) + len(value) > S.MAX_XATTR_TOTAL:
                raise NoSpace(message="extended attribute space of this inode is full")
            txn.put(key, value, db=self.meta.xattrs)
            a.ctime_ns = self.clock()
            a.version = self.meta.log(txn, a.volume, "setxattr")
            self._put(txn, a)

    def _xattr_total(self, txn: Txn, ino: int) -> int:
        prefix = S.ino_prefix(ino)
        cur = txn.cursor(db=self.meta.xattrs)
        total = 0
        if cur.set_range(prefix):
            for key, val in cur:
                if not key.startswith(prefix):
                    break
                total += len(key) - 8 + len(val)
        return total

    def removexattr(self, ino: InodeId, name: bytes) -> None:
        self._check_xattr_name(name)
        with self.meta.write() as txn:
            a = self._get(txn, ino)
            if not txn.delete(S.xattr_key(ino, name), db=self.meta.xattrs):
                raise NoData()
            a.ctime_ns = self.clock()
            a.version = self.meta.log(txn, a.volume, "removexattr")
            self._put(txn, a)
