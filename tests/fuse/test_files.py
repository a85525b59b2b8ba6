"""File contents through a real mount: open flags, offsets, holes, truncation, mmap, fsync,
open-unlinked files, big files, statfs, and data surviving a restart."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.fuse.support import check_offline, sh
from tests.mounting import Mount
from tests.waiting import next_file_time

pytestmark = pytest.mark.fuse

GiB = 1 << 30


def test_o_excl(mnt: Path) -> None:
    p = mnt / "f"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.close(fd)
    with pytest.raises(FileExistsError):
        os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    (mnt / "d").mkdir()
    with pytest.raises(FileExistsError):
        os.open(mnt / "d", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.symlink("nowhere", mnt / "dangling")
    with pytest.raises(FileExistsError):  # O_EXCL does not follow a symlink
        os.open(mnt / "dangling", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    assert not (mnt / "nowhere").exists()
    fd = os.open(mnt / "dangling", os.O_WRONLY | os.O_CREAT, 0o644)  # without: it creates
    os.close(fd)
    assert (mnt / "nowhere").is_file()
    with pytest.raises(IsADirectoryError):
        os.open(mnt / "d", os.O_WRONLY | os.O_CREAT, 0o644)


def test_o_trunc(node: Mount) -> None:
    p = node.path / "f"
    p.write_bytes(b"x" * 100_000)
    mtime = os.stat(p).st_mtime_ns
    fd = os.open(p, os.O_RDWR | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        assert os.read(fd, 10) == b""
        os.write(fd, b"abc")
    finally:
        os.close(fd)
    assert p.read_bytes() == b"abc"
    assert os.stat(p).st_mtime_ns > mtime
    with open(p, "w") as f:  # O_CREAT|O_TRUNC on an existing file, shorter contents
        f.write("ab")
    node.restart()  # the daemon itself must have truncated, not just the page cache
    assert p.read_bytes() == b"ab"
    assert os.stat(p).st_size == 2
    # O_TRUNC of an empty file still updates mtime and ctime, as on Linux.
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    st = os.stat(p)
    next_file_time()
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert os.stat(p).st_mtime_ns > st.st_mtime_ns
    assert os.stat(p).st_ctime_ns > st.st_ctime_ns
    node.restart()
    assert p.read_bytes() == b""


def test_o_append_two_writers(mnt: Path) -> None:
    p = mnt / "log"
    p.write_bytes(b"start\n")
    a = os.open(p, os.O_WRONLY | os.O_APPEND)
    b = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        os.lseek(a, 0, os.SEEK_SET)  # O_APPEND ignores the offset
        for i in range(200):
            os.write(a if i % 2 else b, f"line {i:03d} from {'a' if i % 2 else 'b'}\n".encode())
        os.pwrite(a, b"pwrite ignores offset with O_APPEND on Linux\n", 0)
    finally:
        os.close(a)
        os.close(b)
    lines = p.read_text().splitlines()
    assert lines[0] == "start"
    assert lines[1:201] == [f"line {i:03d} from {'a' if i % 2 else 'b'}" for i in range(200)]
    assert lines[201:] == ["pwrite ignores offset with O_APPEND on Linux"]


def test_o_append_concurrent_processes(mnt: Path) -> None:
    """Two processes appending whole records at once: none lost, none torn."""
    p = mnt / "log"
    p.write_bytes(b"")
    code = (
        "import os, sys\n"
        "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)\n"
        "for i in range(300):\n"
        "    os.write(fd, (sys.argv[2] * 999 + '\\n').encode())\n"
        "os.close(fd)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(p), who]) for who in "ab"]
    assert [pr.wait(60) for pr in procs] == [0, 0]
    lines = p.read_bytes().split(b"\n")
    assert lines[-1] == b""
    assert sorted(set(lines[:-1])) == [b"a" * 999, b"b" * 999]
    assert len(lines) - 1 == 600


def test_random_offsets_match_a_model(mnt: Path, tmp_path: Path) -> None:
    rng = random.Random(11)
    ours = os.open(mnt / "f", os.O_RDWR | os.O_CREAT, 0o644)
    local = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for _ in range(300):
            off = rng.choice([0, rng.randrange(0, 1 << 20), rng.randrange(0, 4 << 20)])
            off -= off % rng.choice([1, 4096, 65536])
            data = rng.randbytes(rng.choice([1, 7, 4096, 65535, 65536, 65537, 200_000]))
            assert os.pwrite(ours, data, off) == os.pwrite(local, data, off)
            roff = rng.randrange(0, os.fstat(local).st_size + 10)
            n = rng.randrange(0, 300_000)
            assert os.pread(ours, n, roff) == os.pread(local, n, roff)
            if rng.random() < 0.05:
                os.fsync(ours)
        assert os.fstat(ours).st_size == os.fstat(local).st_size
    finally:
        os.close(ours)
        os.close(local)
    assert (
        hashlib.sha256((mnt / "f").read_bytes()).digest()
        == hashlib.sha256((tmp_path / "f").read_bytes()).digest()
    )


def test_sparse_file(node: Mount) -> None:
    p = node.path / "sparse"
    with open(p, "wb") as f:
        f.write(b"head")
        f.seek(100 << 20)
        f.write(b"tail")
        f.seek(200 << 20)
        f.truncate()
    st = os.stat(p)
    assert st.st_size == 200 << 20
    assert st.st_blocks * 512 < 1 << 20  # holes take no space
    with open(p, "rb") as f:
        assert f.read(4) == b"head"
        assert f.read(1 << 20) == bytes(1 << 20)
        f.seek((100 << 20) - 10)
        assert f.read(20) == bytes(10) + b"tail" + bytes(6)
        f.seek((200 << 20) - 5)
        assert f.read(100) == bytes(5)
    # SEEK_DATA/SEEK_HOLE may be coarse, but must never skip data.
    fd = os.open(p, os.O_RDONLY)
    try:
        data_at = os.lseek(fd, 1 << 20, os.SEEK_DATA)
        assert data_at <= 100 << 20
    finally:
        os.close(fd)
    assert int(sh(["du", "-k", str(p)]).stdout.split()[0]) < 1024
    node.restart()
    st = os.stat(p)
    assert st.st_size == 200 << 20 and st.st_blocks * 512 < 1 << 20
    with open(p, "rb") as f:
        f.seek((100 << 20) - 1)
        assert f.read(6) == b"\0tail\0"


@pytest.mark.slow  # a clean stop may re-checksum the 5 GiB file (see the report)
def test_offsets_past_4_gib(node: Mount) -> None:
    p = node.path / "big"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"five gib", 5 * GiB)
        os.pwrite(fd, b"just below 4g", 4 * GiB - 7)
        assert os.fstat(fd).st_size == 5 * GiB + 8
        assert os.pread(fd, 8, 5 * GiB) == b"five gib"
        assert os.pread(fd, 13, 4 * GiB - 7) == b"just below 4g"
        assert os.pread(fd, 10, 4 * GiB + 100) == bytes(10)
    finally:
        os.close(fd)
    node.restart()
    assert os.stat(p).st_size == 5 * GiB + 8
    with open(p, "rb") as f:
        f.seek(5 * GiB - 2)
        assert f.read(100) == b"\0\0five gib"
        f.seek(4 * GiB - 7)
        assert f.read(13) == b"just below 4g"


def test_truncate_down_and_up(mnt: Path) -> None:
    p = mnt / "f"
    data = random.Random(5).randbytes(300_000)
    p.write_bytes(data)
    os.truncate(p, 100_001)  # mid-block
    assert os.stat(p).st_size == 100_001
    os.truncate(p, 400_000)
    assert p.read_bytes() == data[:100_001] + bytes(299_999)
    os.truncate(p, 65536)  # on a block boundary
    os.truncate(p, 131072)
    assert p.read_bytes() == data[:65536] + bytes(65536)
    os.truncate(p, 0)
    assert p.read_bytes() == b""
    os.truncate(p, 10)
    assert p.read_bytes() == bytes(10)


def test_ftruncate_on_open_file(mnt: Path) -> None:
    p = mnt / "f"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"a" * 200_000)  # not yet flushed: truncate must see it
        os.ftruncate(fd, 70_000)
        assert os.fstat(fd).st_size == 70_000
        os.ftruncate(fd, 140_000)
        assert os.pread(fd, 200_000, 0) == b"a" * 70_000 + bytes(70_000)
        os.pwrite(fd, b"z", 139_999)
        os.ftruncate(fd, 65_537)
        os.ftruncate(fd, 70_000)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert p.read_bytes() == b"a" * 65_537 + bytes(70_000 - 65_537)
    with pytest.raises(OSError) as e:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
    assert e.value.errno in (errno.EINVAL, errno.EBADF)


def test_mmap_write_msync(node: Mount) -> None:
    p = node.path / "mapped"
    size = 3 * 65536 + 123
    p.write_bytes(bytes(size))
    rng = random.Random(9)
    want = bytearray(size)
    with open(p, "r+b") as f, mmap.mmap(f.fileno(), size) as m:
        for _ in range(50):
            off = rng.randrange(size - 100)
            chunk = rng.randbytes(100)
            m[off : off + 100] = chunk
            want[off : off + 100] = chunk
        m.flush()  # msync(MS_SYNC)
        assert os.pread(f.fileno(), size, 0) == bytes(want)
    node.restart()  # the data reached the daemon, not just the page cache
    assert p.read_bytes() == bytes(want)
    # A mapping that reads what write() put there.
    with open(p, "r+b") as f:
        os.pwrite(f.fileno(), b"via write", 1000)
        with mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
            assert m[1000:1009] == b"via write"


def test_flush_fsync_fdatasync_survive_daemon_kill(node: Mount) -> None:
    p = node.path / "f"
    data = random.Random(2).randbytes(1_000_000)
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, data[:500_000])
        os.fsync(fd)
        os.write(fd, data[500_000:])
        os.fdatasync(fd)
        (node.path / "d").mkdir()
        dfd = os.open(node.path / "d", os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.close(dfd)
        os.sync()
        node.kill()  # no clean shutdown: only what was synced counts
    finally:
        with contextlib.suppress(OSError):  # the flush on close meets a dead daemon
            os.close(fd)
    node.start()
    assert p.read_bytes() == data
    assert (node.path / "d").is_dir()


def test_unlinked_while_open(node: Mount) -> None:
    p = node.path / "f"
    p.write_bytes(b"before\n")
    fd = os.open(p, os.O_RDWR)
    try:
        os.unlink(p)
        assert not p.exists()
        assert os.listdir(node.path) == []
        assert os.fstat(fd).st_nlink == 0
        os.pwrite(fd, b"after unlink\n", 7)
        assert os.pread(fd, 100, 0) == b"before\nafter unlink\n"
        assert os.fstat(fd).st_size == 20
        os.fsync(fd)
        # The same name can be reused meanwhile without disturbing the open file.
        p.write_bytes(b"new file\n")
        assert os.pread(fd, 100, 0) == b"before\nafter unlink\n"
    finally:
        os.close(fd)
    assert p.read_bytes() == b"new file\n"
    check_offline(node)  # the unlinked inode was freed, nothing leaked
    assert p.read_bytes() == b"new file\n"
    assert os.listdir(node.path) == ["f"]


@pytest.mark.slow
def test_large_file_sha256(node: Mount, tmp_path: Path) -> None:
    src = tmp_path / "big"
    with open(src, "wb") as f:
        for i in range(64):
            f.write(random.Random(i).randbytes(1 << 20))
    want = hashlib.sha256(src.read_bytes()).hexdigest()
    sh(["cp", str(src), str(node.path / "big")])
    assert sh(["sha256sum", str(node.path / "big")]).stdout.split()[0] == want
    node.restart()  # read back from disk, not from the page cache
    h = hashlib.sha256()
    with open(node.path / "big", "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    assert h.hexdigest() == want
    assert os.stat(node.path / "big").st_blocks * 512 >= 64 << 20


def test_concurrent_writers_different_regions(mnt: Path) -> None:
    p = mnt / "f"
    p.write_bytes(b"")
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            fd = os.open(p, os.O_WRONLY)
            try:
                for i in range(50):
                    os.pwrite(fd, bytes([k]) * 10_000, (i * 4 + k) * 10_000)
            finally:
                os.close(fd)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    data = p.read_bytes()
    assert data == b"".join(bytes([k]) * 10_000 for _ in range(50) for k in range(4))


def test_statfs(mnt: Path) -> None:
    s = os.statvfs(mnt)
    assert s.f_namemax == 255
    assert s.f_bsize > 0 and s.f_frsize > 0
    assert 0 < s.f_bavail <= s.f_bfree <= s.f_blocks
    assert s.f_files >= s.f_ffree > 0
    # The free space is the backing disk's (same device as tmp_path's data dir).
    local = os.statvfs(mnt.parent)
    assert abs(s.f_blocks * s.f_frsize - local.f_blocks * local.f_frsize) < 1 << 30
    out = sh(["df", "-P", str(mnt)]).stdout.splitlines()
    # The source names the daemon's data directory (how `dfs` tools find its control socket).
    assert out[1].split()[0].startswith("dfs:/") and out[1].split()[-1] == str(mnt)
    out = sh(["stat", "-f", "-c", "%l %T", str(mnt)]).stdout.split()
    assert out[0] == "255"


def test_data_survives_clean_restart(node: Mount) -> None:
    m = node.path
    (m / "d" / "e").mkdir(parents=True)
    (m / "d" / "e" / "f").write_bytes(b"payload" * 1000)
    os.symlink("e/f", m / "d" / "link")
    os.link(m / "d" / "e" / "f", m / "hard")
    os.chmod(m / "d", 0o751)
    os.setxattr(m / "hard", "user.k", b"v")
    before = {p: os.lstat(m / p) for p in ["d", "d/e", "d/e/f", "d/link", "hard"]}
    check_offline(node)
    for p, st in before.items():
        now = os.lstat(m / p)
        for field in (
            "st_ino",
            "st_mode",
            "st_nlink",
            "st_uid",
            "st_gid",
            "st_size",
            "st_mtime_ns",
            "st_ctime_ns",
        ):
            assert getattr(now, field) == getattr(st, field), (p, field)
    assert (m / "d" / "link").read_bytes() == b"payload" * 1000
    assert os.getxattr(m / "d" / "e" / "f", "user.k") == b"v"
