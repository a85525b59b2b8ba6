"""Ordinary shell workloads through a real mount: cp -a, mv, ln, tar, rsync, git, sqlite, editors,
find/du/ls/stat. Each copies a tree in and out and compares it with the original."""

from __future__ import annotations

import os
import random
import re
import sqlite3
import stat
import subprocess
from pathlib import Path

import pytest

from tests.fuse.support import check_offline, sh, snapshot, xattrs
from tests.mounting import Mount

pytestmark = pytest.mark.fuse


def make_tree(root: Path) -> Path:
    """A small tree with every kind of thing `cp -a` must keep: symlinks (also dangling),
    hard links, odd modes, other owners, nanosecond times, xattrs, a sparse file."""
    rng = random.Random(7)
    root.mkdir()
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "deep.txt").write_text("deep\n")
    (root / "empty").mkdir()
    (root / "sticky").mkdir()
    (root / "plain.txt").write_bytes(b"hello\n" * 1000)
    (root / "bin.dat").write_bytes(rng.randbytes(200_000))
    (root / "zero").write_bytes(b"")
    (root / "exec.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "secret").write_text("s3cr3t\n")
    (root / "setuid").write_bytes(b"\x7fELF")
    with open(root / "sparse", "wb") as f:
        f.seek(3 << 20)
        f.write(b"end")
    os.link(root / "plain.txt", root / "a" / "hard.txt")
    os.link(root / "plain.txt", root / "a" / "b" / "hard2.txt")
    os.symlink("plain.txt", root / "link-rel")
    os.symlink("../bin.dat", root / "a" / "link-up")
    os.symlink("nowhere/at/all", root / "dangling")
    os.symlink("a/b", root / "dirlink")
    os.symlink(str(root / "plain.txt"), root / "link-abs")
    os.chmod(root / "exec.sh", 0o755)
    os.chmod(root / "secret", 0o600)
    os.chmod(root / "setuid", 0o4755)
    os.chmod(root / "sticky", 0o1777)
    os.chmod(root / "empty", 0o700)
    os.chown(root / "secret", 1000, 1000)
    os.chown(root / "a" / "b", 1234, 4321)
    os.lchown(root / "link-rel", 1000, 1001)
    os.setxattr(root / "plain.txt", "user.color", b"blue")
    os.setxattr(root / "bin.dat", "user.bin", bytes(range(256)))
    os.setxattr(root / "bin.dat", "trusted.t", b"root only")
    os.setxattr(root / "a", "user.dir", b"1")
    # Times last and bottom-up, so filling directories does not touch them again.
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in sorted([*filenames, *dirnames]):
            t = rng.randrange(10**18, 1_700_000_000 * 10**9)
            os.utime(Path(dirpath, name), ns=(t - 5, t), follow_symlinks=False)
    os.utime(root, ns=(1_600_000_000_123_456_789, 1_600_000_000_987_654_321))
    return root


def test_cp_a_in_and_out(node: Mount, tmp_path: Path) -> None:
    mnt = node.path
    src = make_tree(tmp_path / "src")
    want = snapshot(src)
    sh(["cp", "-a", str(src), str(mnt / "src")])
    assert snapshot(mnt / "src") == want
    sh(["diff", "-r", "--no-dereference", str(src), str(mnt / "src")])
    st = os.stat(mnt / "src" / "plain.txt")
    assert st.st_nlink == 3
    sh(["cp", "-a", str(mnt / "src"), str(tmp_path / "back")])
    assert snapshot(tmp_path / "back") == want
    # A copy inside the mount, too.
    sh(["cp", "-a", str(mnt / "src"), str(mnt / "again")])
    assert snapshot(mnt / "again") == want
    check_offline(node)
    assert snapshot(mnt / "again") == want


def test_mv_within_mount(mnt: Path, tmp_path: Path) -> None:
    make_tree(mnt / "t")
    want = snapshot(mnt / "t" / "a")
    ino_dir = os.stat(mnt / "t" / "a").st_ino
    ino_file = os.stat(mnt / "t" / "bin.dat").st_ino
    (mnt / "other").mkdir()
    sh(["mv", str(mnt / "t" / "a"), str(mnt / "other" / "moved")])
    sh(["mv", str(mnt / "t" / "bin.dat"), str(mnt / "other")])
    assert not (mnt / "t" / "a").exists()
    assert os.stat(mnt / "other" / "moved").st_ino == ino_dir  # renamed, not copied
    assert os.stat(mnt / "other" / "bin.dat").st_ino == ino_file
    assert snapshot(mnt / "other" / "moved") == want
    # The relative link inside the moved tree now points at ../bin.dat == other/bin.dat.
    assert (mnt / "other" / "moved" / "link-up").read_bytes() == (
        mnt / "other" / "bin.dat"
    ).read_bytes()
    sh(["mv", "-T", str(mnt / "other"), str(mnt / "t" / "renamed")])
    assert sorted(os.listdir(mnt / "t" / "renamed")) == ["bin.dat", "moved"]


def test_ln_and_ln_s(mnt: Path) -> None:
    (mnt / "f").write_text("x\n")
    (mnt / "d").mkdir()
    sh(["ln", str(mnt / "f"), str(mnt / "d" / "hard")])
    sh(["ln", "-s", "../f", str(mnt / "d" / "soft")])
    sh(["ln", "-sfn", "f", str(mnt / "d" / "soft")])  # replace an existing link
    assert os.stat(mnt / "f").st_nlink == 2
    assert os.stat(mnt / "d" / "hard").st_ino == os.stat(mnt / "f").st_ino
    assert os.readlink(mnt / "d" / "soft") == "f"
    assert not (mnt / "d" / "soft").exists()  # d/f does not exist: dangling
    sh(["ln", "-sfn", "../f", str(mnt / "d" / "soft")])
    assert (mnt / "d" / "soft").read_text() == "x\n"
    out = sh(["ls", "-l", str(mnt / "d")]).stdout
    assert "soft -> ../f" in out
    p = sh(["ln", str(mnt / "d"), str(mnt / "dirlink")], check=False)
    assert p.returncode != 0 and "hard link not allowed for directory" in p.stderr


TAR = ["tar", "--format=posix", "--xattrs", "--xattrs-include=*", "--sort=name"]


def test_tar_round_trip(node: Mount, tmp_path: Path) -> None:
    mnt = node.path
    src = make_tree(tmp_path / "src")
    sh([*TAR, "-cf", str(tmp_path / "a.tar"), "-C", str(src), "."])
    (mnt / "x").mkdir()
    sh([*TAR, "-xpf", str(tmp_path / "a.tar"), "-C", str(mnt / "x")])
    assert snapshot(mnt / "x", dir_times=False) == snapshot(src, dir_times=False)
    sh([*TAR, "-cf", str(mnt / "b.tar"), "-C", str(mnt / "x"), "."])
    listing = [*TAR, "--full-time", "-tvf"]
    assert (
        sh([*listing, str(mnt / "b.tar")]).stdout == sh([*listing, str(tmp_path / "a.tar")]).stdout
    )
    # Extract the archive written in the mount back out to local disk.
    (tmp_path / "out").mkdir()
    sh([*TAR, "-xpf", str(mnt / "b.tar"), "-C", str(tmp_path / "out")])
    assert snapshot(tmp_path / "out") == snapshot(mnt / "x")
    assert xattrs(tmp_path / "out" / "bin.dat")["trusted.t"] == b"root only"
    check_offline(node)


RSYNC = ["rsync", "-aHX"]
ITEM = re.compile(r"^[<>ch.*][fdLDS][.+?cstpoguax]{9} ")  # one --itemize-changes line


def test_rsync(node: Mount, tmp_path: Path) -> None:
    mnt = node.path
    src = make_tree(tmp_path / "src")
    want = snapshot(src)
    sh([*RSYNC, f"{src}/", f"{mnt}/r/"])
    assert snapshot(mnt / "r") == want
    again = sh([*RSYNC, "--itemize-changes", "--stats", f"{src}/", f"{mnt}/r/"]).stdout
    assert "Number of regular files transferred: 0" in again
    assert [ln for ln in again.splitlines() if ITEM.match(ln)] == [], again
    # A change is picked up and only that file travels.
    (src / "a" / "b" / "deep.txt").write_text("changed\n")
    third = sh([*RSYNC, "--stats", f"{src}/", f"{mnt}/r/"]).stdout
    assert "Number of regular files transferred: 1" in third
    assert (mnt / "r" / "a" / "b" / "deep.txt").read_text() == "changed\n"
    sh([*RSYNC, f"{mnt}/r/", f"{tmp_path}/back/"])
    assert snapshot(tmp_path / "back") == snapshot(src)
    check_offline(node)


def _git_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {
        **os.environ,
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
    }


def test_git(node: Mount, tmp_path: Path) -> None:
    mnt = node.path
    env = _git_env(tmp_path)

    def git(*args: str, cwd: Path) -> str:
        p = subprocess.run(
            ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
        )
        assert p.returncode == 0, f"git {args}: {p.stdout}{p.stderr}"
        return p.stdout

    repo = mnt / "repo"
    git("init", "-q", "-b", "main", str(repo), cwd=mnt)
    rng = random.Random(1)
    for i in range(5):
        for j in range(20):
            d = repo / f"dir{j % 4}"
            d.mkdir(exist_ok=True)
            (d / f"file{j}.txt").write_text(f"commit {i} file {j}\n" * rng.randrange(1, 200))
        (repo / "bin").write_bytes(rng.randbytes(100_000))
        git("add", "-A", cwd=repo)
        git("commit", "-q", "-m", f"commit {i}", cwd=repo)
    git("mv", "dir0", "moved", cwd=repo)
    git("commit", "-q", "-m", "move", cwd=repo)
    git("gc", "-q", cwd=repo)  # packs objects: big writes, renames, fsyncs, deletes
    git("fsck", "--full", "--strict", cwd=repo)
    assert git("status", "--porcelain", cwd=repo) == ""
    assert len(git("log", "--oneline", cwd=repo).splitlines()) == 6
    git("clone", "-q", str(repo), str(mnt / "clone"), cwd=mnt)  # local clone: hard links
    git("fsck", "--full", "--strict", cwd=mnt / "clone")
    sh(["diff", "-r", "--exclude=.git", str(repo), str(mnt / "clone")])
    git("clone", "-q", str(repo), str(tmp_path / "out"), cwd=tmp_path)
    git("fsck", "--full", cwd=tmp_path / "out")
    assert git("rev-parse", "HEAD", cwd=tmp_path / "out") == git("rev-parse", "HEAD", cwd=repo)
    assert git("status", "--porcelain", cwd=mnt / "clone") == ""
    check_offline(node)
    git("fsck", "--full", "--strict", cwd=repo)
    assert git("status", "--porcelain", cwd=repo) == ""


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_sqlite(node: Mount, journal: str) -> None:
    path = node.path / "db" / "test.sqlite"
    path.parent.mkdir()
    db = sqlite3.connect(path)
    db.execute(f"pragma journal_mode={journal}")
    db.execute("create table t (id integer primary key, k text unique, v blob)")
    rng = random.Random(3)
    for batch in range(20):
        with db:
            db.executemany(
                "insert into t (k, v) values (?, ?)",
                [(f"k{batch}-{i}", rng.randbytes(rng.randrange(10, 2000))) for i in range(250)],
            )
    with db:
        db.execute("delete from t where id % 3 = 0")
        db.execute("update t set v = zeroblob(100) where id % 7 = 0")
    assert db.execute("pragma integrity_check").fetchone() == ("ok",)
    count = db.execute("select count(*) from t").fetchone()[0]
    assert count == 5000 - 5000 // 3
    db.execute("vacuum")
    db.close()
    db = sqlite3.connect(path)
    assert db.execute("pragma integrity_check").fetchone() == ("ok",)
    assert db.execute("select count(*) from t").fetchone()[0] == count
    db.close()
    check_offline(node)
    db = sqlite3.connect(path)
    assert db.execute("pragma integrity_check").fetchone() == ("ok",)
    assert db.execute("select count(*) from t").fetchone()[0] == count
    db.close()


def test_editor_save_and_sed_i(mnt: Path) -> None:
    f = mnt / "doc.txt"
    f.write_text("version 1\nfoo\n")
    os.chmod(f, 0o640)
    old_ino = os.stat(f).st_ino
    reader = open(f)  # noqa: SIM115 - kept open across the save
    try:
        tmp = mnt / ".doc.txt.swp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.write(fd, b"version 2\nfoo foo\n")
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp, f)
        assert f.read_text() == "version 2\nfoo foo\n"
        assert os.stat(f).st_ino != old_ino
        assert reader.read() == "version 1\nfoo\n"  # the old inode lives on while open
    finally:
        reader.close()
    assert sorted(os.listdir(mnt)) == ["doc.txt"]
    sh(["sed", "-i", "s/foo/bar/g", str(f)])
    assert f.read_text() == "version 2\nbar bar\n"
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o640
    sh(["sed", "-i.bak", "1d", str(f)])
    assert f.read_text() == "bar bar\n"
    assert (mnt / "doc.txt.bak").read_text() == "version 2\nbar bar\n"


def test_find_du_ls_stat(mnt: Path, tmp_path: Path) -> None:
    make_tree(mnt / "t")
    make_tree(tmp_path / "t")
    for args in (
        ["-type", "f"],
        ["-type", "l"],
        ["-type", "d"],
        ["-name", "*.txt"],
        ["-links", "3"],
        ["-perm", "-4000"],
        ["-user", "1000"],
        ["-empty"],
        ["-newer", "t/bin.dat"],
        ["-size", "+100k"],
    ):
        here = sh(["find", "t", *args], cwd=mnt).stdout.splitlines()
        there = sh(["find", "t", *args], cwd=tmp_path).stdout.splitlines()
        assert sorted(here) == sorted(there), args
    # A sparse file: big apparent size, little usage.
    with open(mnt / "sparse1g", "wb") as f:
        f.seek(1 << 30)
        f.write(b"x")
    apparent = int(sh(["du", "-k", "--apparent-size", str(mnt / "sparse1g")]).stdout.split()[0])
    used = int(sh(["du", "-k", str(mnt / "sparse1g")]).stdout.split()[0])
    assert apparent == (1 << 20) + 1
    assert used <= 1024
    (mnt / "full").write_bytes(b"y" * (1 << 20))
    assert int(sh(["du", "-k", str(mnt / "full")]).stdout.split()[0]) >= 1024
    # ls -l and stat agree with the local copy for everything but directory sizes.
    fmt = "%n %F %a %h %s %u %g %Y"
    ours = sh(["stat", "-c", fmt, "t/plain.txt", "t/secret", "t/link-rel", "t/setuid"], cwd=mnt)
    local = sh(
        ["stat", "-c", fmt, "t/plain.txt", "t/secret", "t/link-rel", "t/setuid"], cwd=tmp_path
    )
    assert ours.stdout == local.stdout
    ls = sh(["ls", "-ln", "--time-style=+%s", str(mnt / "t")]).stdout
    local_ls = sh(["ls", "-ln", "--time-style=+%s", str(tmp_path / "t")]).stdout

    def entries(out: str) -> list[str]:
        return [ln for ln in out.splitlines() if ln[0] in "-l" and "link-abs" not in ln]

    assert entries(ls) == entries(local_ls)
