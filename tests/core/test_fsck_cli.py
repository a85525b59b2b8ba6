"""``python -m dfs_tools fsck``: exit codes 0/1/4/8/2, output, and no writes without --repair."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dfs.lockfile import DataDirLock
from dfs.meta import schema as S
from tests.core.harness import Core

FSCK = [sys.executable, "-m", "dfs_tools", "fsck"]


def fsck(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FSCK, "--data", str(data_dir), *args], capture_output=True, text=True, timeout=120
    )


def snapshot(data_dir: Path) -> dict[str, str]:
    """Every file under DIR (but the lock) and a hash of its contents."""
    return {
        str(p.relative_to(data_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(data_dir.rglob("*"))
        if p.is_file() and p.name != "lock"
    }


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Path]:
    """A closed, consistent data directory with a few files."""
    c = Core(tmp_path / "node")
    c.mkdir("/d")
    c.write_file("/d/f", b"hello" * 30000)
    c.write_file("/g", b"g")
    c.symlink("/l", b"d/f")
    c.settle()
    assert c.findings() == []
    c.close()
    yield tmp_path / "node"


def corrupt(data_dir: Path) -> dict[str, int]:
    """Break a link count and flip a data byte; returns the inodes concerned."""
    c = Core(data_dir)
    f, g = c.ino("/d/f"), c.ino("/g")
    with c.meta.write() as txn:
        a = S.unpack_inode(g, txn.get(S.inode_key(g), db=c.meta.inodes))
        a.nlink = 5
        txn.put(S.inode_key(g), S.pack_inode(a), db=c.meta.inodes)
    c.close()
    path = c.data.path(f)
    raw = bytearray(path.read_bytes())
    raw[70000] ^= 0x20
    path.write_bytes(bytes(raw))
    return {"f": f, "g": g}


def test_clean_store(store: Path) -> None:
    r = fsck(store)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "clean" in r.stdout
    r = fsck(store, "--json")
    assert r.returncode == 0
    out = json.loads(r.stdout)
    assert out["findings"] == [] and out["exit_code"] == 0


def test_problems_reported_and_nothing_changed(store: Path) -> None:
    inos = corrupt(store)
    before = snapshot(store)
    r = fsck(store)
    assert r.returncode == 4, r.stdout + r.stderr
    assert f"nlink-mismatch {inos['g']:#x}: link count 5, expected 1" in r.stdout
    assert f"checksum-mismatch {inos['f']:#x}:" in r.stdout
    assert "nothing changed" in r.stdout
    r = fsck(store, "--json")
    assert r.returncode == 4
    out = json.loads(r.stdout)
    assert {(f["code"], f["ino"]) for f in out["findings"]} == {
        ("nlink-mismatch", inos["g"]),
        ("checksum-mismatch", inos["f"]),
    }
    assert snapshot(store) == before
    # --no-data skips the contents: only the link count is left
    r = fsck(store, "--no-data", "--json")
    assert [f["code"] for f in json.loads(r.stdout)["findings"]] == ["nlink-mismatch"]
    assert snapshot(store) == before


def test_repair(store: Path) -> None:
    corrupt(store)
    r = fsck(store, "--repair")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "contents unverified" in r.stdout
    assert "all repaired" in r.stdout
    r = fsck(store)
    assert r.returncode == 0, r.stdout + r.stderr
    c = Core(store)
    try:
        assert c.resolve("/g").nlink == 1
        data = c.read_file("/d/f")  # re-hashed: readable again, with the flipped byte
        assert len(data) == 150000 and data != b"hello" * 30000
    finally:
        c.close()


def test_unrepairable_problem_exits_4(store: Path) -> None:
    c = Core(store)
    with c.meta.write() as txn:
        txn.delete(S.symlink_key(c.ino("/l")), db=c.meta.symlinks)
    c.close()
    r = fsck(store, "--repair")
    assert r.returncode == 4, r.stdout + r.stderr
    assert "symlink-no-target" in r.stdout and "not repairable" in r.stdout


def test_locked_by_a_daemon(store: Path) -> None:
    lock = DataDirLock(store)
    lock.acquire()
    try:
        before = snapshot(store)
        r = fsck(store, "--repair")
        assert r.returncode == 8
        assert "in use" in r.stderr and "stop it first" in r.stderr
        assert snapshot(store) == before
    finally:
        lock.release()


def test_not_a_dfs_directory(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    r = fsck(empty)
    assert r.returncode == 8
    assert "not a dfs data directory" in r.stderr
    assert list(empty.iterdir()) == []  # not even a lock file
    r = fsck(tmp_path / "missing")
    assert r.returncode == 8


def test_wrong_format_version(store: Path) -> None:
    c = Core(store)
    with c.meta.write() as txn:
        txn.put(S.META_FORMAT, S.u32(S.FORMAT_VERSION + 1), db=c.meta.meta)
    c.close()
    r = fsck(store)
    assert r.returncode == 8
    assert "format version" in r.stderr


def test_bad_usage() -> None:
    r = subprocess.run([*FSCK], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "--data" in r.stderr
    r = subprocess.run([*FSCK, "--data", "/x", "--bogus"], capture_output=True, text=True)
    assert r.returncode == 2
