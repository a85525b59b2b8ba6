"""``dfs fsck`` on data directories written through a real mount."""

from __future__ import annotations

import contextlib
import mmap
import os
import subprocess
import sys

import pytest

from tests.mounting import Mount

pytestmark = pytest.mark.fuse


def fsck(node: Mount, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dfs_tools", "fsck", "--data", str(node.data_dir), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def populate(mnt: os.PathLike[str]) -> None:
    subprocess.run(
        "set -e; mkdir -p a/b/c; seq 1 20000 > a/b/c/numbers; head -c 300000 /dev/urandom > bin;"
        " ln bin a/hard; ln -s a/b/c/numbers sym; mkfifo fifo; touch empty;"
        " truncate -s 5M sparse; printf end >> sparse; cp -r a a2; mv a2 moved;"
        " rm moved/hard; rm -r moved/b/c; setfattr -n user.k -v v bin || true",
        shell=True,
        cwd=mnt,
        check=True,
    )


def test_fsck_clean_after_real_mount(node: Mount) -> None:
    populate(node.path)
    held = os.open(node.path / "bin", os.O_RDONLY)
    os.unlink(node.path / "bin")  # unlinked while open: an orphan until closed
    os.close(held)
    r = fsck(node)
    assert r.returncode == 8, "fsck must refuse a directory a daemon is serving"
    assert "in use" in r.stderr
    assert node.stop_daemon() == 0
    r = node.fsck()
    assert r.returncode == 0, r.stdout + r.stderr
    node.start()
    assert (node.path / "a" / "hard").stat().st_size == 300000


def test_fsck_finds_and_repairs_damage_from_outside(node: Mount) -> None:
    data = os.urandom(200000)
    (node.path / "f").write_bytes(data)
    ino = (node.path / "f").stat().st_ino
    assert node.stop_daemon() == 0
    path = node.data_dir / "data" / f"{ino & 0xFF:02x}" / f"{ino:016x}"
    raw = bytearray(path.read_bytes())
    raw[100000] ^= 1
    path.write_bytes(bytes(raw))
    r = fsck(node)
    assert r.returncode == 4, r.stdout + r.stderr
    assert f"checksum-mismatch {ino:#x}" in r.stdout
    r = fsck(node, "--repair")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "contents unverified" in r.stdout
    assert node.fsck().returncode == 0
    node.start()
    assert (node.path / "f").read_bytes() == bytes(raw)  # readable, damage and all


def test_fsck_after_kill_with_unsettled_writes(node: Mount) -> None:
    path = node.path / "w"
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
    buf = mmap.mmap(-1, 131072)  # O_DIRECT needs an aligned buffer; past the inline limit
    try:
        buf[:] = b"z" * 131072
        os.pwrite(fd, buf, 0)  # reaches the daemon; its checksum is settled at close only
        node.kill()
    finally:
        buf.close()
        with contextlib.suppress(OSError):
            os.close(fd)
    node.stop()  # the killed daemon's mount is stale: clean it up before fsck
    r = node.fsck()
    assert r.returncode == 4, r.stdout + r.stderr
    assert "dirty-unsettled" in r.stdout
    r = node.fsck(repair=True)
    assert r.returncode == 1, r.stdout + r.stderr
    assert node.fsck().returncode == 0
    node.start()
    assert (node.path / "w").read_bytes() == b"z" * 131072
