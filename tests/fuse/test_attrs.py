"""Attributes through a real mount: chmod/chown (and their set-ID rules), utimens (UTIME_NOW,
UTIME_OMIT, touch), nanosecond times, and which operations change mtime/ctime of which inode,
each compared with the same sequence on a local directory."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fuse.support import UTIME_NOW, UTIME_OMIT, sh, utimensat
from tests.mounting import Mount
from tests.waiting import next_file_time

pytestmark = pytest.mark.fuse


def in_both(mnt: Path, tmp_path: Path) -> tuple[Path, Path]:
    local = tmp_path / "local"
    local.mkdir()
    return mnt, local


def test_chmod_and_chown_match_local(mnt: Path, tmp_path: Path) -> None:
    results: dict[str, list[object]] = {}
    for root in in_both(mnt, tmp_path):
        out: list[object] = []
        f, d, link = root / "f", root / "d", root / "link"
        f.write_text("x")
        d.mkdir()
        os.symlink("f", link)
        for mode in (0o7777, 0o4755, 0o2755, 0o1777, 0o644, 0o000, 0o2644):
            os.chmod(f, mode)
            os.chmod(d, mode)
            out.append((oct(os.stat(f).st_mode), oct(os.stat(d).st_mode)))
        os.chmod(link, 0o600)  # follows the link
        out.append((oct(os.stat(f).st_mode), oct(os.lstat(link).st_mode)))
        os.chown(f, 1000, 2000)
        os.chown(d, 3000, -1)
        os.lchown(link, 4000, 5000)
        for p in (f, d, link):
            st = os.lstat(p)
            out.append((p.name, st.st_uid, st.st_gid))
        os.mkdir(root / "all", 0o7777)  # mkdir ignores set-ID bits (umask 022 applies)
        os.mkdir(root / "sticky", 0o1777)
        out.append((oct(os.stat(root / "all").st_mode), oct(os.stat(root / "sticky").st_mode)))
        results[str(root == mnt)] = out
    assert results["True"] == results["False"]


@pytest.mark.parametrize("mode", [0o6755, 0o4755, 0o2755, 0o2745, 0o6644, 0o2644, 0o1755])
def test_chown_clears_set_id_bits_like_linux(mnt: Path, tmp_path: Path, mode: int) -> None:
    got: list[list[str]] = []
    for root in in_both(mnt, tmp_path):
        out = []
        for i, (uid, gid) in enumerate([(1000, -1), (-1, 1000), (0, 0), (-1, -1), (1000, 1000)]):
            f = root / f"f{i}"
            f.write_text("x")
            os.chmod(f, mode)
            os.chown(f, uid, gid)
            out.append(oct(os.stat(f).st_mode))
        d = root / "dir"
        d.mkdir()
        os.chmod(d, mode)
        os.chown(d, 1000, 1000)
        out.append(oct(os.stat(d).st_mode))
        got.append(out)
    assert got[0] == got[1]


def test_nanosecond_times_preserved(node: Mount) -> None:
    p = node.path / "f"
    p.write_text("x")
    cases = [
        (1_234_567_890_123_456_789, 1_500_000_000_000_000_001),
        (0, 999_999_999),
        (-1_000_000_001, -86_400_000_000_007),  # before 1970
        (4_102_444_800_000_000_000, 4_102_444_800_999_999_999),  # 2100
    ]
    for atime, mtime in cases:
        os.utime(p, ns=(atime, mtime))
        st = os.stat(p)
        assert (st.st_atime_ns, st.st_mtime_ns) == (atime, mtime)
    os.symlink("f", node.path / "link")
    os.utime(node.path / "link", ns=(111, 222_333_444_555), follow_symlinks=False)
    os.utime(node.path / "f", ns=(1, 2))
    node.restart()
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1, 2)
    lst = os.lstat(node.path / "link")
    assert (lst.st_atime_ns, lst.st_mtime_ns) == (111, 222_333_444_555)


def test_utimensat_now_and_omit(mnt: Path, tmp_path: Path) -> None:
    """Which of atime/mtime/ctime each utimensat form changes, compared with Linux."""
    forms: list[tuple[tuple[int, int], tuple[int, int]]] = [
        ((5, UTIME_OMIT), (6, 600)),
        ((7, 700), (0, UTIME_OMIT)),
        ((0, UTIME_NOW), (0, UTIME_OMIT)),
        ((0, UTIME_OMIT), (0, UTIME_NOW)),
        ((0, UTIME_NOW), (0, UTIME_NOW)),
        ((0, UTIME_OMIT), (0, UTIME_OMIT)),
        ((8, 800), (9, 900)),
    ]
    got: list[list[object]] = []
    for root in in_both(mnt, tmp_path):
        p = root / "f"
        p.write_text("x")
        os.utime(p, ns=(1_000_000_000, 2_000_000_000))
        out: list[object] = []
        for atime, mtime in forms:
            before = os.stat(p)
            next_file_time()
            t0 = time.time_ns()
            utimensat(p, atime, mtime)
            st = os.stat(p)
            row: list[object] = []
            for field, spec in (("atime", atime), ("mtime", mtime)):
                v = getattr(st, f"st_{field}_ns")
                if spec[1] == UTIME_NOW:
                    row.append(
                        (field, "now", v >= t0 - 10**7 and v != getattr(before, f"st_{field}_ns"))
                    )
                elif spec[1] == UTIME_OMIT:
                    row.append((field, "kept", v == getattr(before, f"st_{field}_ns")))
                else:
                    row.append((field, v))
            row.append(("ctime changed", st.st_ctime_ns > before.st_ctime_ns))
            out.append(row)
        got.append(out)
    assert got[0] == got[1]
    assert all(v is True for row in got[0] for item in row for v in item[2:] if len(item) == 3)


def test_touch(mnt: Path, tmp_path: Path) -> None:
    got: list[list[object]] = []
    for root in in_both(mnt, tmp_path):
        p = root / "f"
        out: list[object] = []
        sh(["touch", "-d", "2001-02-03 04:05:06.123456789 UTC", str(p)])  # creates it
        st = os.stat(p)
        out.append((st.st_atime_ns, st.st_mtime_ns, st.st_size))
        next_file_time()
        sh(["touch", "-m", "-d", "@1000000000.5", str(p)])
        st2 = os.stat(p)
        out.append(
            (st2.st_atime_ns == st.st_atime_ns, st2.st_mtime_ns, st2.st_ctime_ns > st.st_ctime_ns)
        )
        next_file_time()
        sh(["touch", "-a", str(p)])
        st3 = os.stat(p)
        out.append(
            (
                st3.st_atime_ns > st2.st_atime_ns,
                st3.st_mtime_ns == st2.st_mtime_ns,
                st3.st_ctime_ns > st2.st_ctime_ns,
            )
        )
        next_file_time()
        sh(["touch", "-m", str(p)])
        st4 = os.stat(p)
        out.append((st4.st_atime_ns == st3.st_atime_ns, st4.st_mtime_ns > st3.st_mtime_ns))
        sh(["touch", "-r", "/etc/hostname", str(p)])
        ref = os.stat("/etc/hostname")
        st5 = os.stat(p)
        out.append((st5.st_mtime_ns == ref.st_mtime_ns, st5.st_atime_ns == ref.st_atime_ns))
        sh(["touch", "-d", "@42", str(root / "missing")])
        out.append(os.stat(root / "missing").st_mtime_ns)
        got.append(out)
    assert got[0] == got[1]
    assert got[0][0] == (981173106123456789, 981173106123456789, 0)


# --- which timestamps an operation changes ------------------------------------------------


def _setup(root: Path) -> None:
    (root / "A" / "dir").mkdir(parents=True)
    (root / "B").mkdir()
    (root / "A" / "f").write_text("f\n")
    (root / "A" / "g").write_text("g\n")


def _write(p: Path) -> Callable[[Path], object]:
    def go(root: Path) -> None:
        with open(root / p, "a") as f:
            f.write("more\n")

    return go


STEPS: list[tuple[str, Callable[[Path], object]]] = [
    ("write", _write(Path("A/f"))),
    ("read", lambda r: (r / "A" / "f").read_text()),
    ("chmod", lambda r: os.chmod(r / "A" / "f", 0o600)),
    ("chown", lambda r: os.chown(r / "A" / "f", 1000, 1000)),
    ("chmod same mode", lambda r: os.chmod(r / "A" / "f", 0o600)),
    ("rename across dirs", lambda r: os.rename(r / "A" / "f", r / "B" / "f2")),
    ("rename in dir", lambda r: os.rename(r / "B" / "f2", r / "B" / "f3")),
    ("link", lambda r: os.link(r / "B" / "f3", r / "A" / "h")),
    ("unlink one of two links", lambda r: os.unlink(r / "A" / "h")),
    ("create", lambda r: (r / "A" / "new").write_text("")),
    ("mkdir", lambda r: os.mkdir(r / "A" / "sub")),
    ("rmdir", lambda r: os.rmdir(r / "A" / "sub")),
    ("symlink", lambda r: os.symlink("g", r / "A" / "sl")),
    ("mkfifo", lambda r: os.mkfifo(r / "A" / "fifo")),
    ("setxattr", lambda r: os.setxattr(r / "A" / "g", "user.k", b"v")),
    ("removexattr", lambda r: os.removexattr(r / "A" / "g", "user.k")),
    ("truncate", lambda r: os.truncate(r / "A" / "g", 1)),
    ("truncate same size", lambda r: os.truncate(r / "A" / "g", 1)),
    ("utime", lambda r: os.utime(r / "A" / "g", ns=(5, 6))),
    ("rename dir across", lambda r: os.rename(r / "A" / "dir", r / "B" / "dir")),
    ("rename over file", lambda r: os.rename(r / "B" / "f3", r / "A" / "g")),
    ("unlink last link", lambda r: os.unlink(r / "A" / "g")),
    ("rename dir in dir", lambda r: os.rename(r / "B" / "dir", r / "B" / "dir2")),
]
WATCH = {"A": "A", "B": "B", "f": "A/f", "g": "A/g", "dir": "A/dir"}


def _trace(root: Path) -> list[tuple[str, list[str]]]:
    """Run STEPS on a fresh tree; per step, which of the watched inodes' mtime/ctime moved."""
    _setup(root)
    fds = {k: os.open(root / p, os.O_PATH | os.O_NOFOLLOW) for k, p in WATCH.items()}
    out: list[tuple[str, list[str]]] = []
    try:
        for name, step in STEPS:
            before = {k: os.fstat(fd) for k, fd in fds.items()}
            next_file_time()
            step(root)
            changed = []
            for k, fd in fds.items():
                st = os.fstat(fd)
                for field in ("mtime", "ctime"):
                    if getattr(st, f"st_{field}_ns") != getattr(before[k], f"st_{field}_ns"):
                        changed.append(f"{k}.{field}")
            out.append((name, changed))
    finally:
        for fd in fds.values():
            os.close(fd)
    return out


def test_which_timestamps_change_matches_local(mnt: Path, tmp_path: Path) -> None:
    local = tmp_path / "local"
    local.mkdir()
    ours, theirs = dict(_trace(mnt)), dict(_trace(local))
    # truncate(2) to the current size: ext4 stamps mtime/ctime anyway, POSIX only "if the
    # file size is changed", and FUSE's writeback cache (which keeps the times of regular
    # files in the kernel) follows POSIX. dfs stores what the kernel shows.
    assert ours.pop("truncate same size") == []
    theirs.pop("truncate same size")
    assert ours == theirs
    # Spot checks that the comparison above is not vacuous.
    d = ours
    assert d["write"] == ["f.mtime", "f.ctime"]
    assert d["chmod"] == ["f.ctime"]
    assert d["read"] == []
    assert set(d["rename across dirs"]) == {"A.mtime", "A.ctime", "B.mtime", "B.ctime", "f.ctime"}


def test_timestamps_survive_restart(node: Mount) -> None:
    """The times stat shows are the stored ones: a restart (or the kernel forgetting the
    inode) does not move them. Writes within one kernel clock tick used to leave the
    daemon's own, later, write time on disk."""
    _setup(node.path)
    _write(Path("A/f"))(node.path)
    os.chmod(node.path / "A" / "g", 0o640)
    paths = ["A", "B", "A/f", "A/g", "A/dir"]
    for i in range(20):
        (node.path / f"n{i}").write_text("new\n")
        _write(Path(f"n{i}"))(node.path)
        paths.append(f"n{i}")
    (node.path / "t").write_text("abc")
    os.truncate(node.path / "t", 3)
    paths.append("t")
    before = {p: os.lstat(node.path / p) for p in paths}
    node.restart()
    for p, st in before.items():
        now = os.lstat(node.path / p)
        assert (now.st_mtime_ns, now.st_ctime_ns) == (st.st_mtime_ns, st.st_ctime_ns), p
