"""The core's error vocabulary: every failure a caller may see is an FsError with an errno.

The FUSE layer turns these into ``FUSEError`` in exactly one place
(``mountd/fuse_convert.py``); tools print ``str(err)``.
"""

from __future__ import annotations

import errno as _errno
import os

# Logged with the traceback of every exception that is a bug (not an FsError): the test
# harness fails any test whose daemon log contains it.
BUG_MARKER = "UNEXPECTED EXCEPTION"


class FsError(Exception):
    """A POSIX-visible failure. ``errno`` is what the system call returns."""

    errno: int = _errno.EIO

    def __init__(self, errno: int | None = None, message: str | None = None) -> None:
        if errno is not None:
            self.errno = errno
        self.message = message or os.strerror(self.errno)
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class NotFound(FsError):
    errno = _errno.ENOENT


class Exists(FsError):
    errno = _errno.EEXIST


class NotADir(FsError):
    errno = _errno.ENOTDIR


class IsADir(FsError):
    errno = _errno.EISDIR


class NotEmpty(FsError):
    errno = _errno.ENOTEMPTY


class Invalid(FsError):
    errno = _errno.EINVAL


class NameTooLong(FsError):
    errno = _errno.ENAMETOOLONG


class NoData(FsError):
    """Missing extended attribute (ENODATA == ENOATTR on Linux)."""

    errno = _errno.ENODATA


class NoSpace(FsError):
    errno = _errno.ENOSPC


class Corrupted(FsError):
    """A block whose contents do not match its checksum; reads of it fail with EIO."""

    errno = _errno.EIO


class BlockCorrupted(Corrupted):
    """Block ``blk`` of inode ``ino`` in the data store does not hash to ``want``, its stored
    digest (a cluster node may fetch the block from another replica: read repair)."""

    def __init__(self, ino: int, blk: int, want: int) -> None:
        super().__init__(message=f"inode {ino:#x} block {blk}: checksum mismatch")
        self.ino = ino
        self.blk = blk
        self.want = want


class StoreError(Exception):
    """A data directory that cannot be used (wrong format, other cluster, locked...).

    Raised before anything is mounted; the daemon prints it and exits non-zero.
    """
