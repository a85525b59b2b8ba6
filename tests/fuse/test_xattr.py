"""Extended attributes through a real mount: namespaces, create/replace flags, the errors
for missing names, small buffers and oversized names or values, and persistence."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fuse.support import check_offline, getxattr_sized, listxattr_sized, sh
from tests.mounting import Mount
from tests.waiting import next_file_time

pytestmark = pytest.mark.fuse


def errno_of(fn: Callable[[], object]) -> str:
    try:
        fn()
    except OSError as e:
        return errno.errorcode[e.errno]
    return "ok"


def roots(mnt: Path, tmp_path: Path) -> list[Path]:
    local = tmp_path / "local"
    local.mkdir()
    for r in (mnt, local):
        (r / "f").write_text("x")
        (r / "d").mkdir()
    return [mnt, local]


def test_namespaces_and_values(mnt: Path) -> None:
    f = mnt / "f"
    f.write_text("x")
    values = {
        "user.plain": b"value",
        "user.empty": b"",
        "user.binary": bytes(range(256)) * 4,
        "user.with.dots": b"1",
        "trusted.t": b"root only",
        "security.s": b"sec",
    }
    for k, v in values.items():
        os.setxattr(f, k, v)
    assert {k: os.getxattr(f, k) for k in os.listxattr(f)} == values
    os.setxattr(f, "user.plain", b"changed")
    assert os.getxattr(f, "user.plain") == b"changed"
    os.removexattr(f, "user.plain")
    assert "user.plain" not in os.listxattr(f)
    # Directories and symlinks: user.* is allowed on directories, not on symlinks (Linux).
    (mnt / "d").mkdir()
    os.setxattr(mnt / "d", "user.dir", b"1")
    assert os.getxattr(mnt / "d", "user.dir") == b"1"
    os.symlink("f", mnt / "link")
    with pytest.raises(PermissionError):
        os.setxattr(mnt / "link", "user.x", b"1", follow_symlinks=False)
    os.setxattr(mnt / "link", "trusted.on-link", b"1", follow_symlinks=False)
    assert os.listxattr(mnt / "link", follow_symlinks=False) == ["trusted.on-link"]
    assert "trusted.on-link" not in os.listxattr(mnt / "link")  # followed: the file's
    # The shell tools agree.
    sh(["setfattr", "-n", "user.shell", "-v", "from setfattr", str(f)])
    out = sh(["getfattr", "-d", "-m", "-", "--absolute-names", str(f)]).stdout
    assert 'user.shell="from setfattr"' in out and 'trusted.t="root only"' in out


def test_flags_and_errors_match_local(mnt: Path, tmp_path: Path) -> None:
    results = []
    for r in roots(mnt, tmp_path):
        f = r / "f"
        os.setxattr(f, "user.a", b"1")
        out = [
            errno_of(lambda f=f: os.setxattr(f, "user.a", b"2", os.XATTR_CREATE)),
            errno_of(lambda f=f: os.setxattr(f, "user.new", b"2", os.XATTR_REPLACE)),
            errno_of(lambda f=f: os.setxattr(f, "user.new", b"3", os.XATTR_CREATE)),
            errno_of(lambda f=f: os.setxattr(f, "user.new", b"4", os.XATTR_REPLACE)),
            os.getxattr(f, "user.new"),
            errno_of(lambda f=f: os.getxattr(f, "user.missing")),
            errno_of(lambda f=f: os.removexattr(f, "user.missing")),
            errno_of(lambda f=f: os.getxattr(f, "foo.bar")),
            errno_of(lambda f=f: os.setxattr(f, "foo.bar", b"1")),
            errno_of(lambda f=f: os.setxattr(f, "user.", b"1")),
            errno_of(lambda f=f: os.setxattr(f, "user." + "n" * 250, b"1")),  # 255 bytes
            errno_of(lambda f=f: os.setxattr(f, "user." + "n" * 251, b"1")),  # 256 bytes
            errno_of(lambda f=f: os.getxattr(f, "user." + "n" * 251)),
            errno_of(lambda f=f: os.setxattr(f, "user.big", b"v" * 65536)),
            errno_of(lambda f=f: os.setxattr(f, "user.big", b"v" * 65537)),
            errno_of(lambda f=f: os.getxattr(f / "nope", "user.a")),
            errno_of(lambda f=f: os.getxattr(f.parent / "nope", "user.a")),
        ]
        results.append(out)
    ours, local = results
    assert ours[:13] == local[:13]
    assert ours[13:] == ["ok", "E2BIG", "ENOTDIR", "ENOENT"]
    assert ours[:4] == ["EEXIST", "ENODATA", "ok", "ok"]
    assert ours[5:8] == ["ENODATA", "ENODATA", errno.errorcode[errno.EOPNOTSUPP]]
    assert ours[9] == "EINVAL"  # "user." with an empty name
    assert ours[10:12] == ["ok", "ERANGE"]
    assert len(os.getxattr(mnt / "f", "user.big")) == 65536


def test_small_buffers_give_erange(mnt: Path) -> None:
    f = mnt / "f"
    f.write_text("x")
    os.setxattr(f, "user.k", b"0123456789")
    os.setxattr(f, "user.other", b"")
    assert int.from_bytes(getxattr_sized(f, b"user.k", 0), "little") == 10  # size query
    assert getxattr_sized(f, b"user.k", 10) == b"0123456789"
    with pytest.raises(OSError) as e:
        getxattr_sized(f, b"user.k", 9)
    assert e.value.errno == errno.ERANGE
    names = b"user.k\0user.other\0"
    assert int.from_bytes(listxattr_sized(f, 0), "little") == len(names)
    assert sorted(listxattr_sized(f, len(names)).split(b"\0")) == sorted(names.split(b"\0"))
    with pytest.raises(OSError) as e:
        listxattr_sized(f, len(names) - 1)
    assert e.value.errno == errno.ERANGE
    assert getxattr_sized(f, b"user.other", 1) == b""


def test_xattrs_change_ctime_only(mnt: Path) -> None:
    f = mnt / "f"
    f.write_text("x")
    st = os.stat(f)
    next_file_time()  # else the change may fall in the same tick of the coarse clock
    os.setxattr(f, "user.k", b"v")
    st2 = os.stat(f)
    assert st2.st_ctime_ns > st.st_ctime_ns and st2.st_mtime_ns == st.st_mtime_ns
    next_file_time()
    os.removexattr(f, "user.k")
    assert os.stat(f).st_ctime_ns > st2.st_ctime_ns


def test_xattrs_survive_restart_and_follow_renames(node: Mount) -> None:
    m = node.path
    (m / "f").write_text("x")
    (m / "d").mkdir()
    big = os.urandom(65536)
    os.setxattr(m / "f", "user.big", big)
    os.setxattr(m / "f", "trusted.t", b"t")
    os.setxattr(m / "d", "user.d", b"dir")
    os.link(m / "f", m / "d" / "hard")
    os.rename(m / "f", m / "g")
    check_offline(node)
    assert os.getxattr(m / "g", "user.big") == big
    assert os.getxattr(m / "d" / "hard", "trusted.t") == b"t"
    assert os.getxattr(m / "d", "user.d") == b"dir"
    assert sorted(os.listxattr(m / "g")) == ["trusted.t", "user.big"]
    # Removing the file frees its attributes: a new file with the same name has none.
    os.unlink(m / "g")
    os.unlink(m / "d" / "hard")
    (m / "g").write_text("new")
    assert os.listxattr(m / "g") == []
    check_offline(node)


def test_many_xattrs(mnt: Path) -> None:
    f = mnt / "f"
    f.write_text("x")
    want = {f"user.attr{i:04d}": os.urandom(i % 300) for i in range(500)}
    for k, v in want.items():
        os.setxattr(f, k, v)
    assert sorted(os.listxattr(f)) == sorted(want)
    assert all(os.getxattr(f, k) == v for k, v in want.items())
    for k in list(want)[::2]:
        os.removexattr(f, k)
        del want[k]
    assert sorted(os.listxattr(f)) == sorted(want)
