"""rename(2) on the core: plain, replacing, RENAME_NOREPLACE, RENAME_EXCHANGE, and every error."""

from __future__ import annotations

import errno

import pytest

from dfs.errors import FsError
from dfs.fs.vfs import RENAME_EXCHANGE, RENAME_NOREPLACE
from dfs.types import ROOT_INODE
from tests.core.harness import Core


def errno_of(fn: object, *args: object) -> int:
    with pytest.raises(FsError) as e:
        fn(*args)  # type: ignore[operator]
    return e.value.errno


def test_rename_file_within_and_across_dirs(core: Core) -> None:
    a = core.write_file("/a", b"A")
    core.mkdir("/d")
    core.rename("/a", "/b")
    assert core.names() == ["b", "d"]
    core.rename("/b", "/d/c")
    assert core.names("/d") == ["c"]
    assert core.ino("/d/c") == a.ino
    assert core.read_file("/d/c") == b"A"


def test_rename_dir_moves_parent_and_link_counts(core: Core) -> None:
    core.mkdir("/x")
    core.mkdir("/y")
    s = core.mkdir("/x/s")
    core.mkdir("/x/s/t")
    core.rename("/x/s", "/y/s2")
    assert core.resolve("/x").nlink == 2
    assert core.resolve("/y").nlink == 3
    assert core.vfs.getattr(s.ino).parent == core.ino("/y")
    assert core.vfs.lookup(s.ino, b"..").ino == core.ino("/y")
    assert core.names("/y/s2") == ["t"]


def test_rename_replaces_file_and_old_target_is_orphaned(core: Core) -> None:
    core.write_file("/a", b"new")
    old = core.write_file("/b", b"old")
    core.rename("/a", "/b")
    assert core.names() == ["b"]
    assert core.read_file("/b") == b"new"
    assert core.vfs.getattr(old.ino).nlink == 0  # still referenced by the kernel
    core.vfs.forget([(old.ino, core.vfs.lookups[old.ino])])
    assert not core.data.exists(old.ino)


def test_rename_replaces_empty_dir(core: Core) -> None:
    core.mkdir("/a")
    core.mkdir("/a/inner")
    core.mkdir("/b")
    root_links = core.vfs.getattr(ROOT_INODE).nlink
    core.rename("/a", "/b")
    assert core.names() == ["b"]
    assert core.names("/b") == ["inner"]
    assert core.vfs.getattr(ROOT_INODE).nlink == root_links - 1


def test_rename_errors(core: Core) -> None:
    core.mkdir("/d")
    core.mkdir("/d/sub")
    core.write_file("/d/sub/f", b"")
    core.mkdir("/e")
    core.write_file("/f", b"")
    core.write_file("/g", b"")
    # a directory into its own subtree
    assert errno_of(core.rename, "/d", "/d/sub/x") == errno.EINVAL
    assert errno_of(core.rename, "/d", "/d/x") == errno.EINVAL
    # a directory over a non-empty directory, over a file; a file over a directory
    assert errno_of(core.rename, "/e", "/d") == errno.ENOTEMPTY
    assert errno_of(core.rename, "/e", "/f") == errno.ENOTDIR
    assert errno_of(core.rename, "/f", "/e") == errno.EISDIR
    # missing source, missing target directory, target directory that is a file
    assert errno_of(core.rename, "/nope", "/x") == errno.ENOENT
    assert errno_of(core.vfs.rename, ROOT_INODE, b"f", core.ino("/f"), b"x") == errno.ENOTDIR
    # NOREPLACE onto an existing name; EXCHANGE with a missing one; both flags; unknown flags
    assert errno_of(core.rename, "/f", "/g", RENAME_NOREPLACE) == errno.EEXIST
    assert errno_of(core.rename, "/f", "/none", RENAME_EXCHANGE) == errno.ENOENT
    assert errno_of(core.rename, "/f", "/g", RENAME_NOREPLACE | RENAME_EXCHANGE) == errno.EINVAL
    assert errno_of(core.rename, "/f", "/g", 8) == errno.EINVAL
    # names that are too long, "." and ".."
    long = b"n" * 256
    assert errno_of(core.vfs.rename, ROOT_INODE, b"f", ROOT_INODE, long) == errno.ENAMETOOLONG
    assert errno_of(core.vfs.rename, ROOT_INODE, b".", ROOT_INODE, b"x") == errno.EBUSY
    # nothing moved
    assert core.names() == ["d", "e", "f", "g"]
    assert core.names("/d/sub") == ["f"]


def test_rename_noreplace_to_free_name(core: Core) -> None:
    core.write_file("/f", b"x")
    core.rename("/f", "/g", RENAME_NOREPLACE)
    assert core.names() == ["g"]


def test_rename_onto_another_link_of_itself_is_a_no_op(core: Core) -> None:
    core.write_file("/f", b"x")
    core.link("/f", "/g")
    core.rename("/f", "/g")
    assert core.names() == ["f", "g"]
    assert core.resolve("/f").nlink == 2


def test_exchange_files(core: Core) -> None:
    a = core.write_file("/a", b"A")
    core.mkdir("/d")
    b = core.write_file("/d/b", b"B")
    core.rename("/a", "/d/b", RENAME_EXCHANGE)
    assert core.ino("/a") == b.ino
    assert core.ino("/d/b") == a.ino
    assert core.read_file("/a") == b"B"


def test_exchange_dir_and_file_across_dirs(core: Core) -> None:
    core.mkdir("/p")
    core.mkdir("/q")
    dd = core.mkdir("/p/dir")
    core.mkdir("/p/dir/inner")
    core.write_file("/q/file", b"F")
    core.rename("/p/dir", "/q/file", RENAME_EXCHANGE)
    assert core.names("/p") == ["dir"] and core.names("/q") == ["file"]
    assert core.ino("/q/file") == dd.ino
    assert core.read_file("/p/dir") == b"F"
    assert core.resolve("/p").nlink == 2
    assert core.resolve("/q").nlink == 3
    assert core.vfs.getattr(dd.ino).parent == core.ino("/q")
    assert core.names("/q/file") == ["inner"]


def test_exchange_dirs_in_each_other_is_einval(core: Core) -> None:
    core.mkdir("/a")
    core.mkdir("/a/b")
    assert errno_of(core.rename, "/a", "/a/b", RENAME_EXCHANGE) == errno.EINVAL
    assert errno_of(core.rename, "/a/b", "/a", RENAME_EXCHANGE) == errno.EINVAL


def test_exchange_two_dirs(core: Core) -> None:
    core.mkdir("/a")
    core.mkdir("/a/x")
    core.mkdir("/b")
    core.write_file("/b/y", b"")
    core.rename("/a", "/b", RENAME_EXCHANGE)
    assert core.names("/a") == ["y"] and core.names("/b") == ["x"]


def test_readdir_after_rename_shows_each_name_once(core: Core) -> None:
    for i in range(20):
        core.write_file(f"/f{i}", b"")
    for i in range(0, 20, 2):
        core.rename(f"/f{i}", f"/g{i}")
    names = core.names()
    assert len(names) == len(set(names)) == 20
