"""``mount -t fuse.dfs`` and an fstab line on a local standalone node, through mount(8).

mount(8) runs /sbin/mount.TYPE: the test links the virtualenv's ``mount.fuse.dfs`` there for
its duration (only if nothing is there already), and every mount is unmounted in ``finally``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dfs.mounts import force_unmount, is_mounted
from mountd.mount_helper import UsageError, daemon_command, parse_options

SBIN = Path("/usr/sbin/mount.fuse.dfs")
HELPER = Path(sys.prefix) / "bin" / "mount.fuse.dfs"


# --- options -------------------------------------------------------------------------------


def test_fstab_and_systemd_options_are_ignored() -> None:
    req = parse_options(
        "n1",
        Path("/mnt/dfs"),
        ["rw,_netdev,nofail,x-systemd.requires=dfs-mountd@n1.service,noauto", "log_level=debug"],
        sloppy=False,
    )
    assert req.config == Path("/etc/dfs/cluster.toml")
    assert req.log_level == "debug"
    cmd = daemon_command(req)
    assert cmd[-5:] == ["--config", "/etc/dfs/cluster.toml", "--node", "n1", "/mnt/dfs"]


def test_standalone_source_is_a_data_directory() -> None:
    req = parse_options("/srv/dfs", Path("/mnt/x"), ["noallow_other"], sloppy=False)
    assert req.config is None
    assert "--data" in daemon_command(req) and "--no-allow-other" in daemon_command(req)


@pytest.mark.parametrize("opts", ["bogus", "ro", "log_level=loud", "timeout=soon"])
def test_bad_options_are_refused(opts: str) -> None:
    with pytest.raises(UsageError):
        parse_options("n1", Path("/mnt/x"), [opts], sloppy=False)


def test_sloppy_ignores_unknown_options() -> None:
    parse_options("n1", Path("/mnt/x"), ["bogus"], sloppy=True)


# --- through mount(8) ----------------------------------------------------------------------


@pytest.fixture
def helper() -> Iterator[None]:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")
    created = False
    if SBIN.is_symlink() or SBIN.exists():
        if SBIN.resolve() != HELPER.resolve():
            pytest.skip(f"{SBIN} belongs to another dfs installation")
    else:
        SBIN.symlink_to(HELPER)
        created = True
    try:
        yield
    finally:
        if created:
            SBIN.unlink()


def _daemon_pid(data: Path) -> int | None:
    try:
        return int((data / "lock").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def node(tmp_path: Path, helper: None) -> Iterator[tuple[Path, Path, Path]]:
    data, mnt, log = tmp_path / "data", tmp_path / "mnt", tmp_path / "mountd.log"
    mnt.mkdir()
    try:
        yield data, mnt, log
    finally:
        pid = _daemon_pid(data)
        if is_mounted(mnt):
            force_unmount(mnt)
        if pid is not None and not _wait_gone(pid, 10):
            os.kill(pid, signal.SIGKILL)


def _run(*cmd: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120)


def _mountinfo(mnt: Path) -> tuple[str, str] | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        parts = line.split()
        sep = parts.index("-")
        if parts[4] == str(mnt):
            return parts[sep + 1], parts[sep + 2]
    return None


@pytest.mark.fuse
def test_mount_t_fuse_dfs_mounts_serves_and_unmounts(node: tuple[Path, Path, Path]) -> None:
    data, mnt, log = node
    r = _run("mount", "-t", "fuse.dfs", "-o", f"log={log}", data, mnt)
    assert r.returncode == 0, r.stderr + log.read_text()
    # Ready means mounted: no waiting after mount(8) returns.
    assert _mountinfo(mnt) == ("fuse.dfs", f"dfs:{data.resolve()}")
    sh = f"echo hello > {mnt}/f && cat {mnt}/f && ls {mnt}"
    assert _run("sh", "-c", sh).stdout.split() == ["hello", "f"]
    # Mounting again is a no-op for the same node (how the fstab line meets the unit's mount).
    r = _run("mount", "-t", "fuse.dfs", "-o", f"log={log}", data, mnt)
    assert r.returncode == 0, r.stderr
    pid = _daemon_pid(data)
    assert pid is not None
    r = _run("umount", mnt)
    assert r.returncode == 0, r.stderr
    assert _wait_gone(pid), "the daemon did not exit after umount"
    assert not is_mounted(mnt)
    assert "ready:" in log.read_text()


@pytest.mark.fuse
def test_fstab_line(node: tuple[Path, Path, Path], tmp_path: Path) -> None:
    data, mnt, log = node
    fstab = tmp_path / "fstab"
    fstab.write_text(
        f"{data} {mnt} fuse.dfs _netdev,nofail,x-systemd.requires=dfs-mountd@x.service,"
        f"log={log} 0 0\n"
    )
    r = _run("mount", "--fstab", fstab, mnt)
    assert r.returncode == 0, r.stderr + (log.read_text() if log.exists() else "")
    assert _mountinfo(mnt) == ("fuse.dfs", f"dfs:{data.resolve()}")
    assert _run("sh", "-c", f"echo x > {mnt}/y && cat {mnt}/y").stdout == "x\n"
    assert _run("umount", mnt).returncode == 0


@pytest.mark.fuse
def test_a_daemon_that_fails_is_reported_with_its_log(node: tuple[Path, Path, Path]) -> None:
    data, mnt, log = node
    data.write_text("not a directory")
    r = _run("mount", "-t", "fuse.dfs", "-o", f"log={log}", data, mnt)
    assert r.returncode == 32, r.stderr  # mount(8)'s "mount failure"
    assert "exited with status 4" in r.stderr  # unusable data directory
    assert str(data) in r.stderr  # the daemon's own message, from its log
    assert not is_mounted(mnt)


@pytest.mark.fuse
def test_bad_usage_exits_1(node: tuple[Path, Path, Path]) -> None:
    data, mnt, log = node
    r = _run("mount", "-t", "fuse.dfs", "-o", "bogus", data, mnt)
    assert r.returncode == 1 and "unknown mount option 'bogus'" in r.stderr
    r = _run(HELPER, "n1", mnt, "-o", f"config={data}/missing.toml")
    assert r.returncode == 1 and "missing.toml" in r.stderr
    assert not is_mounted(mnt)
