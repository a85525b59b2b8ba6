"""create/mkdir/mknod/link/unlink/rmdir: names, errors and link counts on the core."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from dfs.errors import FsError
from dfs.types import ROOT_INODE
from tests.core.harness import Core


def err(exc: pytest.ExceptionInfo[FsError]) -> int:
    return exc.value.errno


def test_mkdir_create_and_link_counts(core: Core) -> None:
    root0 = core.vfs.getattr(ROOT_INODE).nlink
    d = core.mkdir("/d")
    assert d.is_dir and d.nlink == 2 and d.parent == ROOT_INODE
    assert core.vfs.getattr(ROOT_INODE).nlink == root0 + 1
    core.mkdir("/d/sub1")
    core.mkdir("/d/sub2")
    fh, f = core.create("/d/file")
    core.release(fh)
    assert core.vfs.getattr(d.ino).nlink == 4  # files do not count
    assert f.nlink == 1 and stat.S_ISREG(f.mode) and f.size == 0
    assert core.names("/d") == ["file", "sub1", "sub2"]
    assert core.vfs.lookup(d.ino, b"..").ino == ROOT_INODE
    assert core.vfs.lookup(d.ino, b".").ino == d.ino


def test_modes_respect_umask(core: Core) -> None:
    d = core.mkdir("/d", 0o777)
    assert stat.S_IMODE(d.mode) == 0o755
    fh, f = core.create("/f")
    core.release(fh)
    assert stat.S_IMODE(f.mode) == 0o644


def test_hard_links(core: Core) -> None:
    core.write_file("/a", b"data")
    core.mkdir("/d")
    b = core.link("/a", "/d/b")
    assert b.nlink == 2
    assert core.ino("/a") == core.ino("/d/b")
    core.unlink("/a")
    assert core.resolve("/d/b").nlink == 1
    assert core.read_file("/d/b") == b"data"


def test_link_errors(core: Core) -> None:
    core.mkdir("/d")
    core.write_file("/f", b"")
    with pytest.raises(FsError) as e:
        core.link("/d", "/d2")
    assert err(e) == errno.EPERM
    with pytest.raises(FsError) as e:
        core.link("/f", "/d")
    assert err(e) == errno.EEXIST
    with pytest.raises(FsError) as e:
        core.vfs.link(core.ino("/f"), core.ino("/f"), b"x")
    assert err(e) == errno.ENOTDIR


def test_create_existing(core: Core) -> None:
    core.write_file("/f", b"abc")
    with pytest.raises(FsError) as e:
        core.create("/f", os.O_RDWR | os.O_CREAT | os.O_EXCL)
    assert err(e) == errno.EEXIST
    fh, a = core.create("/f")  # without O_EXCL: opens the existing file
    core.release(fh)
    assert a.ino == core.ino("/f") and a.size == 3
    core.mkdir("/d")
    with pytest.raises(FsError) as e:
        core.create("/d")
    assert err(e) == errno.EISDIR
    with pytest.raises(FsError) as e:
        core.mkdir("/f")
    assert err(e) == errno.EEXIST


def test_unlink_and_rmdir_errors(core: Core) -> None:
    core.mkdir("/d")
    core.write_file("/d/f", b"")
    with pytest.raises(FsError) as e:
        core.rmdir("/d")
    assert err(e) == errno.ENOTEMPTY
    with pytest.raises(FsError) as e:
        core.rmdir("/d/f")
    assert err(e) == errno.ENOTDIR
    with pytest.raises(FsError) as e:
        core.unlink("/d")
    assert err(e) == errno.EISDIR
    with pytest.raises(FsError) as e:
        core.unlink("/d/nope")
    assert err(e) == errno.ENOENT
    with pytest.raises(FsError) as e:
        core.vfs.rmdir(core.ino("/d"), b".")
    assert err(e) == errno.EINVAL
    with pytest.raises(FsError) as e:
        core.vfs.rmdir(core.ino("/d"), b"..")
    assert err(e) == errno.ENOTEMPTY
    core.unlink("/d/f")
    root_links = core.vfs.getattr(ROOT_INODE).nlink
    core.rmdir("/d")
    assert core.vfs.getattr(ROOT_INODE).nlink == root_links - 1
    assert core.names() == []


def test_lookup_errors(core: Core) -> None:
    core.write_file("/f", b"")
    with pytest.raises(FsError) as e:
        core.vfs.lookup(ROOT_INODE, b"missing")
    assert err(e) == errno.ENOENT
    with pytest.raises(FsError) as e:
        core.vfs.lookup(core.ino("/f"), b"x")
    assert err(e) == errno.ENOTDIR


@pytest.mark.parametrize("op", ["create", "mkdir", "symlink", "mknod", "lookup", "unlink", "link"])
def test_name_too_long(core: Core, op: str) -> None:
    long = b"x" * 256
    core.write_file("/f", b"")
    calls = {
        "create": lambda: core.vfs.create(ROOT_INODE, long, 0o644, os.O_RDWR, core.ctx),
        "mkdir": lambda: core.vfs.mkdir(ROOT_INODE, long, 0o755, core.ctx),
        "symlink": lambda: core.vfs.symlink(ROOT_INODE, long, b"t", core.ctx),
        "mknod": lambda: core.vfs.mknod(ROOT_INODE, long, stat.S_IFIFO | 0o644, 0, core.ctx),
        "lookup": lambda: core.vfs.lookup(ROOT_INODE, long),
        "unlink": lambda: core.vfs.unlink(ROOT_INODE, long),
        "link": lambda: core.vfs.link(core.ino("/f"), ROOT_INODE, long),
    }
    with pytest.raises(FsError) as e:
        calls[op]()
    assert err(e) == errno.ENAMETOOLONG
    # 255 bytes is fine
    core.vfs.mkdir(ROOT_INODE, b"y" * 255, 0o755, core.ctx)


def test_mknod_fifo(core: Core) -> None:
    a = core.vfs.mknod(ROOT_INODE, b"p", stat.S_IFIFO | 0o600, 0, core.ctx)
    assert stat.S_ISFIFO(a.mode) and a.nlink == 1
    core.link("/p", "/q")
    core.unlink("/p")
    assert core.resolve("/q").nlink == 1


def test_unlink_while_open_then_forget_purges(core: Core) -> None:
    fh, a = core.create("/f")
    core.write(fh, 0, b"still here" * 10000)
    core.fsync(fh)
    core.unlink("/f")
    assert core.names() == []
    assert core.vfs.getattr(a.ino).nlink == 0
    # still readable and writable through the open handle
    assert core.read(fh, 0, 10) == b"still here"
    core.write(fh, 0, b"STILL")
    assert core.data.exists(a.ino)
    core.release(fh)
    assert core.vfs.getattr(a.ino).nlink == 0  # the kernel still knows it (lookup count)
    core.vfs.forget([(a.ino, core.vfs.lookups[a.ino])])
    with pytest.raises(FsError):
        core.vfs.getattr(a.ino)
    assert not core.data.exists(a.ino)


def test_unlink_last_name_not_open_purges_on_forget(core: Core) -> None:
    a = core.write_file("/f", b"x" * 100)
    core.link("/f", "/g")
    core.unlink("/f")
    core.vfs.forget([(a.ino, core.vfs.lookups[a.ino])])
    assert core.read_file("/g") == b"x" * 100  # one name left: not purged
    core.unlink("/g")
    assert not core.data.exists(a.ino)  # no lookups left, nothing open: purged at once


def test_rmdir_while_referenced(core: Core) -> None:
    d = core.mkdir("/d")
    core.rmdir("/d")
    assert core.vfs.getattr(d.ino).nlink == 0
    core.vfs.forget([(d.ino, core.vfs.lookups[d.ino])])
    with pytest.raises(FsError):
        core.vfs.getattr(d.ino)
