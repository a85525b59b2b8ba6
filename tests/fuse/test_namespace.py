"""Names through a real mount: mkdir/rmdir/unlink errors, rename (plain, NOREPLACE, EXCHANGE),
hard links, symlinks, special files (FIFO, socket, device), name length, stable readdir."""

from __future__ import annotations

import errno
import os
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fuse.support import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    check_offline,
    renameat2,
    sh,
)
from tests.mounting import Mount

pytestmark = pytest.mark.fuse


def errno_of(fn: Callable[[], object]) -> int:
    try:
        fn()
    except OSError as e:
        return e.errno
    return 0


def both(mnt: Path, local: Path, fn: Callable[[Path], object]) -> int:
    """Run fn on the mount and on a local directory; they must fail (or not) alike."""
    ours, theirs = errno_of(lambda: fn(mnt)), errno_of(lambda: fn(local))
    assert errno.errorcode.get(ours, ours) == errno.errorcode.get(theirs, theirs)
    return ours


def layout(root: Path) -> None:
    (root / "d" / "sub").mkdir(parents=True)
    (root / "d" / "sub" / "f").write_text("in sub\n")
    (root / "empty").mkdir()
    (root / "empty2").mkdir()
    (root / "file").write_text("file\n")
    (root / "file2").write_text("file2\n")


@pytest.fixture
def local(tmp_path: Path) -> Path:
    root = tmp_path / "local"
    root.mkdir()
    layout(root)
    return root


@pytest.fixture
def tree(mnt: Path) -> Path:
    layout(mnt)
    return mnt


def test_mkdir_rmdir_unlink_errors(tree: Path, local: Path) -> None:
    cases: list[tuple[Callable[[Path], object], int]] = [
        (lambda r: os.mkdir(r / "d"), errno.EEXIST),
        (lambda r: os.mkdir(r / "file"), errno.EEXIST),
        (lambda r: os.mkdir(r / "nope" / "x"), errno.ENOENT),
        (lambda r: os.mkdir(r / "file" / "x"), errno.ENOTDIR),
        (lambda r: os.rmdir(r / "d"), errno.ENOTEMPTY),
        (lambda r: os.rmdir(r / "file"), errno.ENOTDIR),
        (lambda r: os.rmdir(r / "nope"), errno.ENOENT),
        (lambda r: os.rmdir(f"{r}/empty/."), errno.EINVAL),  # (pathlib drops a "/.")
        (lambda r: os.unlink(r / "d"), errno.EISDIR),
        (lambda r: os.unlink(r / "nope"), errno.ENOENT),
        (lambda r: os.unlink(r / "file" / "x"), errno.ENOTDIR),
        (lambda r: open(r / "file" / "x", "w"), errno.ENOTDIR),  # noqa: SIM115
        (lambda r: os.listdir(r / "file"), errno.ENOTDIR),
        (lambda r: open(r / "d", "w"), errno.EISDIR),  # noqa: SIM115
    ]
    for fn, want in cases:
        assert both(tree, local, fn) == want
    os.rmdir(tree / "empty")
    assert not (tree / "empty").exists()
    nlink = os.stat(tree).st_nlink
    os.mkdir(tree / "new")
    assert os.stat(tree).st_nlink == nlink + 1  # the new ".."
    assert os.stat(tree / "new").st_nlink == 2
    os.mkdir(tree / "new" / "child")
    assert os.stat(tree / "new").st_nlink == 3
    os.rmdir(tree / "new" / "child")
    os.rmdir(tree / "new")
    assert os.stat(tree).st_nlink == nlink


def test_rename_cases(tree: Path, local: Path) -> None:
    cases: list[tuple[Callable[[Path], object], int]] = [
        (lambda r: os.rename(r / "file", r / "d" / "moved"), 0),
        (lambda r: os.rename(r / "d" / "moved", r / "file2"), 0),  # over a file
        (lambda r: os.rename(r / "empty2", r / "empty"), 0),  # dir over empty dir
        (lambda r: os.rename(r / "empty", r / "d"), errno.ENOTEMPTY),
        (lambda r: os.rename(r / "empty", r / "file2"), errno.ENOTDIR),
        (lambda r: os.rename(r / "file2", r / "empty"), errno.EISDIR),
        (lambda r: os.rename(r / "d", r / "d" / "sub" / "inside"), errno.EINVAL),
        (lambda r: os.rename(r / "d", r / "d" / "inside"), errno.EINVAL),
        (lambda r: os.rename(r / "nope", r / "x"), errno.ENOENT),
        (lambda r: os.rename(r / "file2", r / "nope" / "x"), errno.ENOENT),
        (lambda r: os.rename(r / "d" / "sub", r / "sub"), 0),  # dir to another parent
        (lambda r: os.rename(r / "sub", r / "sub"), 0),
        (lambda r: os.rename(r / "file2", r / "file2"), 0),
    ]
    for fn, want in cases:
        assert both(tree, local, fn) == want
    assert sorted(os.listdir(tree)) == sorted(os.listdir(local))
    assert (tree / "file2").read_text() == "file\n"
    assert (tree / "sub" / "f").read_text() == "in sub\n"
    assert os.stat(tree / "d").st_nlink == os.stat(local / "d").st_nlink == 2
    assert os.stat(tree).st_nlink == os.stat(local).st_nlink
    assert os.path.samefile(tree / "sub" / "..", tree)


def test_rename_over_hard_link_of_itself(tree: Path) -> None:
    os.link(tree / "file", tree / "alias")
    os.rename(tree / "file", tree / "alias")  # same inode: a no-op, both names stay
    assert (tree / "file").exists() and (tree / "alias").exists()
    assert os.stat(tree / "file").st_nlink == 2


def test_rename_replaced_file_open_stays_readable(tree: Path) -> None:
    with open(tree / "file2") as f:
        os.rename(tree / "file", tree / "file2")
        assert f.read() == "file2\n"
    assert (tree / "file2").read_text() == "file\n"


def test_renameat2_noreplace_and_exchange(node: Mount, tree: Path, local: Path) -> None:
    def noreplace_existing(r: Path) -> None:
        renameat2(r / "file", r / "file2", RENAME_NOREPLACE)

    assert both(tree, local, noreplace_existing) == errno.EEXIST
    assert (tree / "file2").read_text() == "file2\n"
    renameat2(tree / "file", tree / "fresh", RENAME_NOREPLACE)
    assert (tree / "fresh").read_text() == "file\n" and not (tree / "file").exists()

    ino_a, ino_b = os.stat(tree / "fresh").st_ino, os.stat(tree / "d").st_ino
    renameat2(tree / "fresh", tree / "d", RENAME_EXCHANGE)  # a file and a directory
    assert os.stat(tree / "d").st_ino == ino_a and (tree / "d").read_text() == "file\n"
    assert os.stat(tree / "fresh").st_ino == ino_b
    assert (tree / "fresh" / "sub" / "f").read_text() == "in sub\n"
    # Across directories: the directory's ".." and both parents' link counts follow.
    renameat2(tree / "fresh", tree / "empty", RENAME_EXCHANGE)
    (tree / "x").mkdir()
    renameat2(tree / "empty" / "sub", tree / "x", RENAME_EXCHANGE)
    assert os.path.samefile(tree / "x" / "..", tree)
    assert os.path.samefile(tree / "empty" / "sub" / "..", tree / "empty")
    assert (tree / "x" / "f").read_text() == "in sub\n"
    nlink = {p: os.stat(tree / p).st_nlink for p in ["", "empty", "x", "empty/sub"]}
    assert nlink == {"": 6, "empty": 3, "x": 2, "empty/sub": 2}, nlink
    renameat2(tree / "file2", tree / "x" / "f", RENAME_EXCHANGE)
    assert (tree / "file2").read_text() == "in sub\n"
    assert (tree / "x" / "f").read_text() == "file2\n"

    def exchange_missing(r: Path) -> None:
        renameat2(r / "file2", r / "missing", RENAME_EXCHANGE)

    assert both(tree, local, exchange_missing) == errno.ENOENT

    def both_flags(r: Path) -> None:
        renameat2(r / "file2", r / "d", RENAME_EXCHANGE | RENAME_NOREPLACE)

    assert both(tree, local, both_flags) == errno.EINVAL

    def exchange_into_own_subtree(r: Path) -> None:
        renameat2(r / "empty", r / "empty" / "sub", RENAME_EXCHANGE)

    assert errno_of(lambda: exchange_into_own_subtree(tree)) == errno.EINVAL
    check_offline(node)
    assert (tree / "x" / "f").read_text() == "file2\n"


def test_hard_links_across_directories(node: Mount) -> None:
    mnt = node.path
    (mnt / "a").mkdir()
    (mnt / "b" / "c").mkdir(parents=True)
    f = mnt / "a" / "f"
    f.write_text("shared\n")
    os.link(f, mnt / "b" / "g")
    os.link(mnt / "b" / "g", mnt / "b" / "c" / "h")
    for p in (f, mnt / "b" / "g", mnt / "b" / "c" / "h"):
        assert os.stat(p).st_nlink == 3
        assert os.stat(p).st_ino == os.stat(f).st_ino
    (mnt / "b" / "c" / "h").write_text("changed via h\n")
    assert f.read_text() == "changed via h\n"
    os.unlink(f)
    assert os.stat(mnt / "b" / "g").st_nlink == 2
    os.rename(mnt / "b" / "g", mnt / "a" / "g")
    assert os.stat(mnt / "a" / "g").st_nlink == 2
    with pytest.raises(FileExistsError):
        os.link(mnt / "a" / "g", mnt / "b" / "c" / "h")
    with pytest.raises(PermissionError):  # EPERM: no hard links to directories
        os.link(mnt / "b", mnt / "a" / "dirlink")
    with pytest.raises(FileNotFoundError):
        os.link(mnt / "missing", mnt / "a" / "x")
    os.symlink("g", mnt / "a" / "sym")
    os.link(mnt / "a" / "sym", mnt / "a" / "sym2", follow_symlinks=False)  # link the symlink
    assert os.lstat(mnt / "a" / "sym2").st_nlink == 2
    assert os.readlink(mnt / "a" / "sym2") == "g"
    check_offline(node)
    assert os.stat(mnt / "a" / "g").st_nlink == 2


def test_symlinks(mnt: Path, tmp_path: Path) -> None:
    os.symlink("target.txt", mnt / "rel")
    os.symlink("/etc/hostname", mnt / "abs")
    os.symlink("does/not/exist", mnt / "dangling")
    long_target = "/".join(["x" * 200] * 20)[:4095]
    os.symlink(long_target, mnt / "long")
    assert os.readlink(mnt / "long") == long_target
    assert os.lstat(mnt / "long").st_size == len(long_target.encode())
    with pytest.raises(OSError) as e:
        os.symlink("y" * 4096, mnt / "toolong")
    local = tmp_path / "toolong"
    with pytest.raises(OSError) as e_local:
        os.symlink("y" * 4096, local)
    assert e.value.errno == e_local.value.errno == errno.ENAMETOOLONG
    (mnt / "target.txt").write_text("via link\n")
    assert (mnt / "rel").read_text() == "via link\n"
    assert (mnt / "abs").read_text() == Path("/etc/hostname").read_text()
    assert not (mnt / "dangling").exists() and (mnt / "dangling").is_symlink()
    st = os.lstat(mnt / "rel")
    assert stat.S_ISLNK(st.st_mode) and st.st_size == len("target.txt")
    assert stat.S_IMODE(st.st_mode) == 0o777
    with pytest.raises(OSError) as e:
        os.readlink(mnt / "target.txt")
    assert e.value.errno == errno.EINVAL
    # Loops end in ELOOP.
    os.symlink("loop2", mnt / "loop1")
    os.symlink("loop1", mnt / "loop2")
    with pytest.raises(OSError) as e:
        (mnt / "loop1").read_text()
    assert e.value.errno == errno.ELOOP
    # Writing through a dangling symlink creates the target.
    (mnt / "dir").mkdir()
    os.symlink("../made.txt", mnt / "dir" / "maker")
    (mnt / "dir" / "maker").write_text("made\n")
    assert (mnt / "made.txt").read_text() == "made\n"
    assert sorted(os.listdir(mnt)) == sorted(
        ["rel", "abs", "dangling", "long", "target.txt", "loop1", "loop2", "dir", "made.txt"]
    )


def test_fifo(node: Mount) -> None:
    p = node.path / "fifo"
    os.mkfifo(p, 0o640)
    st = os.stat(p)
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    payload = os.urandom(300_000)  # more than a pipe buffer: the writer must block
    got: list[bytes] = []

    def reader() -> None:
        with open(p, "rb") as f:
            got.append(f.read())

    t = threading.Thread(target=reader)
    t.start()
    with open(p, "wb") as f:
        f.write(payload)
    t.join(30)
    assert got == [payload]
    assert os.stat(p).st_size == 0
    node.restart()
    assert stat.S_ISFIFO(os.stat(p).st_mode)


def test_unix_socket(mnt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(mnt)  # sun_path is short: bind a relative name
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind("sock")
        srv.listen(1)
        assert stat.S_ISSOCK(os.stat(mnt / "sock").st_mode)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as cli:
            cli.connect("sock")
            conn, _ = srv.accept()
            with conn:
                cli.sendall(b"ping")
                assert conn.recv(4) == b"ping"
    os.unlink(mnt / "sock")
    assert not (mnt / "sock").exists()
    # A datagram socket bound by path, then the name reused.
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as a:
        a.bind("dgram")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as b:
            b.sendto(b"hello", "dgram")
            assert a.recv(10) == b"hello"
    with pytest.raises(OSError) as e, socket.socket(socket.AF_UNIX) as again:
        again.bind("dgram")
    assert e.value.errno == errno.EADDRINUSE


def test_device_nodes(node: Mount) -> None:
    m = node.path
    os.mknod(m / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(m / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 200))
    os.mknod(m / "reg", stat.S_IFREG | 0o640)
    os.chmod(m / "null", 0o666)  # umask cleared the write bits of others
    for _ in range(2):
        st = os.stat(m / "null")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
        assert stat.S_IMODE(st.st_mode) == 0o666
        st = os.stat(m / "blk")
        assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(7, 200)
        st = os.stat(m / "reg")
        assert stat.S_ISREG(st.st_mode) and st.st_size == 0
        node.restart()
    out = sh(["ls", "-l", str(m / "null")]).stdout
    assert out.startswith("crw-rw-rw-") and "1, 3" in out
    # The daemon mounts with nodev: device nodes are stored, never opened through it.
    assert "nodev" in sh(["findmnt", "-no", "OPTIONS", str(m)]).stdout
    with pytest.raises(PermissionError):
        open(m / "null", "wb")  # noqa: SIM115


def test_name_length(mnt: Path, tmp_path: Path) -> None:
    ok, long = "n" * 255, "n" * 256
    (mnt / ok).write_text("255\n")
    assert (mnt / ok).read_text() == "255\n"
    assert os.listdir(mnt) == [ok]
    os.mkdir(mnt / ("d" * 255))
    os.symlink("x", mnt / ("s" * 255))
    os.rename(mnt / ok, mnt / ("r" * 255))
    for fn in (
        lambda r: open(r / long, "w"),  # noqa: SIM115
        lambda r: os.stat(r / long),
        lambda r: os.mkdir(r / long),
        lambda r: os.symlink("x", r / long),
        lambda r: os.rename(r / ("r" * 255), r / long),
        lambda r: os.link(r / ("r" * 255), r / long),
        lambda r: os.unlink(r / long),
        lambda r: os.mkfifo(r / long),
    ):
        (tmp_path / ("r" * 255)).write_text("")
        assert both(mnt, tmp_path, fn) == errno.ENAMETOOLONG
    # A multibyte name of 255 bytes is fine; 256 bytes is not.
    name = "é" * 127 + "x"  # 255 bytes in UTF-8
    (mnt / name).write_text("")
    assert name in os.listdir(mnt)
    with pytest.raises(OSError) as e:
        (mnt / (name + "y")).write_text("")
    assert e.value.errno == errno.ENAMETOOLONG


def test_odd_names(mnt: Path) -> None:
    names = [
        "with space",
        "tab\there",
        "new\nline",
        "-dash",
        ".hidden",
        "..dots",
        "ünïcödé",
        "\udcff\udcfe raw bytes",
        "*?[glob]",
        "back\\slash",
        "x" * 200,
    ]
    for n in names:
        (mnt / n).write_bytes(os.fsencode(n))
    assert sorted(os.listdir(mnt)) == sorted(names)
    for n in names:
        assert (mnt / n).read_bytes() == os.fsencode(n)
    assert not (mnt / "WITH SPACE").exists()  # names are case-sensitive


def test_readdir_stable_while_directory_changes(node: Mount) -> None:
    mnt = node.path
    d = mnt / "big"
    d.mkdir()
    names = [f"entry-{i:05d}" for i in range(2000)]
    for n in names:
        (d / n).touch()
    deleted: set[str] = set()
    created: list[str] = []
    seen: list[str] = []
    with os.scandir(d) as it:
        for i, e in enumerate(it):
            seen.append(e.name)
            if i == 300:
                # Mid-listing: delete entries already returned and some not yet returned,
                # create new ones, and rename one.
                for n in names[::7]:
                    os.unlink(d / n)
                    deleted.add(n)
                for k in range(500):
                    created.append(f"new-{k:04d}")
                    (d / created[-1]).touch()
                os.rename(d / names[1002], d / "renamed")
                deleted.add(names[1002])
            if i == 1000:
                for n in created[::3]:
                    os.unlink(d / n)
    assert len(seen) == len(set(seen)), "an entry was returned twice"
    untouched = set(names) - deleted
    missing = untouched - set(seen)
    assert not missing, f"{len(missing)} untouched entries skipped, e.g. {sorted(missing)[:5]}"
    assert set(seen) <= set(names) | set(created) | {"renamed"}
    # A fresh listing is exact.
    assert set(os.listdir(d)) == (untouched | set(created) | {"renamed"}) - set(created[::3])
    check_offline(node)


def test_readdir_via_getdents_small_buffers(mnt: Path) -> None:
    """`ls -f` and `find` list a big directory completely, with `.` and `..`."""
    d = mnt / "big"
    d.mkdir()
    want = {f"{i:04d}-{'x' * (i % 50)}" for i in range(1500)}
    for n in want:
        (d / n).touch()
    out = sh(["ls", "-a1f", str(d)]).stdout.splitlines()
    assert sorted(out) == sorted([*want, ".", ".."])
    assert set(sh(["find", str(d), "-mindepth", "1", "-printf", "%f\n"]).stdout.split()) == want
    top = sh(["ls", "-a", str(mnt)]).stdout.split()
    assert top[:2] == [".", ".."] and "big" in top
    assert os.path.samefile(d / ".", d) and os.path.samefile(d / "..", mnt)
