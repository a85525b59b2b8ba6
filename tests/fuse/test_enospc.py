"""A full disk under the daemon: ENOSPC is reported, nothing already stored is harmed.

The data directory (or only its ``data`` part) lives on a 64 MiB tmpfs mounted
for the test and always unmounted, also when the test fails. A big file fills
it through the mount; then existing files must read back intact, the daemon
must stay up, metadata operations must succeed or fail with ENOSPC (never
EIO), and deleting the big file must make the file system usable again. The
checker ends every test.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fsckrun import assert_fsck_clean
from tests.mounting import Mount
from tests.waiting import wait_until

pytestmark = pytest.mark.fuse

DISK_MB = 64


@contextlib.contextmanager
def small_disk(tmp_path: Path, *, data_only: bool = False) -> Iterator[Mount]:
    """A started dfs mount whose data directory (or only DIR/data) is on a 64 MiB tmpfs."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")
    m = Mount(tmp_path / "dir", tmp_path / "mnt", tmp_path / "mountd.log")
    disk = m.data_dir / "data" if data_only else m.data_dir
    if data_only:  # the metadata store stays on the big disk
        m.start()
        assert m.stop_daemon() == 0
    disk.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(disk)], check=True
    )
    try:
        try:
            m.start()
            yield m
        except BaseException:
            print(f"---- dfs-mountd log ----\n{m.log()}")
            raise
        finally:
            try:
                m.stop()
            finally:
                r = subprocess.run(["umount", str(disk)], capture_output=True, text=True)
                if r.returncode != 0:
                    subprocess.run(["umount", "-l", str(disk)], check=True)
        bugs = m.bugs()
        assert not bugs, "daemon logged unexpected exceptions:\n" + "\n".join(bugs)
    finally:
        assert not m.is_mounted()


def disk_free(m: Mount) -> int:
    st = os.statvfs(m.data_dir / "data")
    return st.f_bavail * st.f_frsize


def ok_or_enospc(what: str, fn: Callable[[], object]) -> bool:
    """Run ``fn``: True if it worked, False if it failed with ENOSPC; any other error fails."""
    try:
        fn()
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, f"{what}: {exc} (expected success or ENOSPC)"
        return False
    return True


def write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def make_existing(mnt: Path) -> dict[str, bytes]:
    existing = {
        "tiny": b"hello\n",  # small enough to live in the metadata store
        "medium": os.urandom(300_000),
        "sub/nested": os.urandom(70_000),
    }
    (mnt / "sub").mkdir()
    for name, data in existing.items():
        write_file(mnt / name, data)
    os.symlink("tiny", mnt / "link")
    os.setxattr(mnt / "medium", "user.tag", b"kept")
    return existing


def check_existing(mnt: Path, existing: dict[str, bytes]) -> None:
    for name, data in existing.items():
        assert (mnt / name).read_bytes() == data, name
    assert os.readlink(mnt / "link") == "tiny"
    assert os.getxattr(mnt / "medium", "user.tag") == b"kept"


def fill(m: Mount) -> None:
    """Write a file bigger than the disk with dd: it must fail and say why."""
    r = subprocess.run(
        ["dd", "if=/dev/urandom", f"of={m.path / 'big'}", "bs=1M", f"count={DISK_MB + 16}"]
        + ["conv=fsync"],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0, f"dd wrote {DISK_MB + 16} MiB to a {DISK_MB} MiB disk"
    assert "No space left on device" in r.stderr, r.stderr
    # Full, but for the reserve dfs keeps for deletes (2% of the disk, at least 1 MiB).
    assert disk_free(m) < 3 << 20
    assert m.proc is not None and m.proc.poll() is None, "the daemon died"
    # dd's last partial write may have left a little room (less than a MiB above the
    # reserve): top it up in small fsynced writes until they fail too.
    fd = os.open(m.path / "top", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        for _ in range(4 << 10):
            if not ok_or_enospc("topping up", lambda: (os.write(fd, b"t" * 4096), os.fsync(fd))):
                break
        else:
            raise AssertionError("16 MiB more written to a full disk")
    finally:
        os.close(fd)


def delete_big_and_reuse(m: Mount) -> None:
    os.unlink(m.path / "big")
    wait_until(
        "the space of a deleted file freed (bytes free)",
        lambda: disk_free(m),
        ok=lambda free: free >= (DISK_MB // 2) << 20,
    )
    fresh = os.urandom(8 << 20)
    write_file(m.path / "fresh", fresh)
    assert (m.path / "fresh").read_bytes() == fresh
    os.mkdir(m.path / "dir2")
    write_file(m.path / "dir2" / "small", b"x" * 10_000)
    assert (m.path / "dir2" / "small").read_bytes() == b"x" * 10_000


def test_full_disk_reports_enospc_and_keeps_data(tmp_path: Path) -> None:
    with small_disk(tmp_path) as m:
        mnt = m.path
        existing = make_existing(mnt)
        fill(m)
        r = subprocess.run(
            ["cp", str(mnt / "medium"), str(mnt / "medium2")], capture_output=True, text=True
        )
        assert r.returncode != 0 and "No space left on device" in r.stderr, r.stderr

        # Small files (their contents go to the metadata store) until that is full too.
        small: dict[str, bytes] = {}
        for i in range(2000):
            name, data = f"s{i}", os.urandom(8192)
            if not ok_or_enospc(name, lambda: write_file(mnt / name, data)):  # noqa: B023
                break
            small[name] = data
        else:
            raise AssertionError("16 MiB of small files fit on a full disk")

        check_existing(mnt, existing)
        for name, data in small.items():
            assert (mnt / name).read_bytes() == data, name
        assert {"tiny", "medium", "sub", "link", "big"} <= set(os.listdir(mnt))
        st = os.statvfs(mnt)
        assert st.f_bavail * st.f_frsize < 1 << 20, "statfs should show the disk full"

        # Metadata operations succeed or fail cleanly; what succeeded is there.
        if ok_or_enospc("mkdir", lambda: os.mkdir(mnt / "newdir")):
            assert (mnt / "newdir").is_dir()
        if ok_or_enospc("create", lambda: os.close(os.open(mnt / "empty", os.O_CREAT, 0o644))):
            assert (mnt / "empty").stat().st_size == 0
        if ok_or_enospc("rename", lambda: os.rename(mnt / "tiny", mnt / "tiny2")):
            os.rename(mnt / "tiny2", mnt / "tiny")
        ok_or_enospc("chmod", lambda: os.chmod(mnt / "medium", 0o600))
        ok_or_enospc("setxattr", lambda: os.setxattr(mnt / "sub", "user.x", b"1" * 1000))
        ok_or_enospc("symlink", lambda: os.symlink("medium", mnt / "link2"))
        ok_or_enospc("extend", lambda: os.truncate(mnt / "medium", 400_000))
        if ok_or_enospc("unlink", lambda: os.unlink(mnt / "sub" / "nested")):
            del existing["sub/nested"]
        assert m.proc is not None and m.proc.poll() is None, "the daemon died"
        assert (mnt / "medium").read_bytes()[:300_000] == existing["medium"]
        existing["medium"] = (mnt / "medium").read_bytes()
        assert "checksum mismatch" not in m.log()

        # A clean stop on a full disk; the checker agrees; everything is back after a restart.
        assert m.stop_daemon() == 0
        assert not m.is_mounted()
        assert_fsck_clean(m)
        m.start()
        check_existing(mnt, existing)
        for name, data in small.items():
            if (mnt / name).exists():
                assert (mnt / name).read_bytes() == data, name


def test_deleting_a_file_frees_a_full_disk(tmp_path: Path) -> None:
    """Data and metadata on the full disk: the space reserve lets the unlink commit."""
    with small_disk(tmp_path) as m:
        existing = make_existing(m.path)
        fill(m)
        delete_big_and_reuse(m)
        check_existing(m.path, existing)
        assert m.stop_daemon() == 0
        assert_fsck_clean(m)


def test_full_data_disk_is_usable_after_a_delete(tmp_path: Path) -> None:
    """Only file contents on the small disk: the data side of ENOSPC, end to end."""
    with small_disk(tmp_path, data_only=True) as m:
        existing = make_existing(m.path)
        fill(m)
        check_existing(m.path, existing)
        delete_big_and_reuse(m)
        check_existing(m.path, existing)
        assert "checksum mismatch" not in m.log()
        assert m.stop_daemon() == 0
        assert_fsck_clean(m)
