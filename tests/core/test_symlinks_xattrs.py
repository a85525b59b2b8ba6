"""Symlinks and extended attributes on the core."""

from __future__ import annotations

import errno

import pytest

from dfs.errors import FsError
from dfs.fs.vfs import XATTR_CREATE, XATTR_REPLACE
from dfs.meta import schema as S
from tests.core.harness import Core


def errno_of(fn: object, *args: object) -> int:
    with pytest.raises(FsError) as e:
        fn(*args)  # type: ignore[operator]
    return e.value.errno


def test_symlink(core: Core) -> None:
    a = core.symlink("/l", b"some/where")
    assert a.is_lnk and a.size == len(b"some/where") and a.nlink == 1
    assert core.vfs.readlink(a.ino) == b"some/where"
    core.link("/l", "/l2")
    core.unlink("/l")
    assert core.vfs.readlink(core.ino("/l2")) == b"some/where"


def test_symlink_limits(core: Core) -> None:
    root = core.ino("/")
    long = b"t" * S.MAX_SYMLINK
    assert core.vfs.readlink(core.symlink("/max", long).ino) == long
    assert errno_of(core.vfs.symlink, root, b"x", long + b"t", core.ctx) == errno.ENAMETOOLONG
    assert errno_of(core.vfs.symlink, root, b"y", b"", core.ctx) == errno.ENOENT
    core.write_file("/f", b"")
    assert errno_of(core.vfs.readlink, core.ino("/f")) == errno.EINVAL


def test_xattrs(core: Core) -> None:
    ino = core.write_file("/f", b"").ino
    v = core.vfs
    assert v.listxattr(ino) == []
    v.setxattr(ino, b"user.a", b"1")
    v.setxattr(ino, b"user.b", b"")
    assert v.getxattr(ino, b"user.a") == b"1"
    assert v.getxattr(ino, b"user.b") == b""
    assert sorted(v.listxattr(ino)) == [b"user.a", b"user.b"]
    v.setxattr(ino, b"user.a", b"2", XATTR_REPLACE)
    assert v.getxattr(ino, b"user.a") == b"2"
    assert errno_of(v.setxattr, ino, b"user.a", b"3", XATTR_CREATE) == errno.EEXIST
    assert errno_of(v.setxattr, ino, b"user.c", b"3", XATTR_REPLACE) == errno.ENODATA
    assert errno_of(v.getxattr, ino, b"user.c") == errno.ENODATA
    v.removexattr(ino, b"user.a")
    assert errno_of(v.removexattr, ino, b"user.a") == errno.ENODATA
    assert v.listxattr(ino) == [b"user.b"]


def test_xattr_limits(core: Core) -> None:
    ino = core.mkdir("/d").ino
    v = core.vfs
    v.setxattr(ino, b"user.big", b"v" * S.MAX_XATTR_VALUE)
    assert errno_of(v.setxattr, ino, b"user.big2", b"v" * (S.MAX_XATTR_VALUE + 1)) == errno.E2BIG
    assert errno_of(v.setxattr, ino, b"user." + b"n" * 251, b"") == errno.ERANGE
    assert errno_of(v.setxattr, ino, b"other.x", b"") == errno.EOPNOTSUPP
    assert errno_of(v.setxattr, ino, b"user.", b"") == errno.EINVAL  # as on ext4


def test_xattrs_go_with_the_inode(core: Core) -> None:
    a = core.write_file("/f", b"")
    core.vfs.setxattr(a.ino, b"user.k", b"v")
    core.link("/f", "/g")
    assert core.vfs.getxattr(core.ino("/g"), b"user.k") == b"v"
    core.unlink("/f")
    core.unlink("/g")
    core.vfs.forget([(a.ino, core.vfs.lookups[a.ino])])
    assert errno_of(core.vfs.listxattr, a.ino) == errno.ENOENT
    # the purge left no xattr records behind: the checker at teardown proves it
