"""Mount point checks and stale-mount recovery, done before anything is mounted."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path


class MountPointError(Exception):
    """The mount point cannot be used; the message says why and what to do."""


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) + 1 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts() -> dict[str, str]:
    """Mount point -> file system type, from /proc/self/mountinfo."""
    out: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            out[_unescape(parts[4])] = parts[sep + 1]
    return out


def fuse_device(path: Path) -> str | None:
    """``major:minor`` of the FUSE mount at ``path`` (from mountinfo: no request to the mount)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            if _unescape(parts[4]) == str(path) and parts[sep + 1].startswith("fuse"):
                return parts[2]
    return None


def is_mounted(path: Path) -> bool:
    return str(path) in mounts()


def force_unmount(path: Path) -> None:
    """Lazily detach whatever is mounted at ``path`` (a stale FUSE mount)."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is not None:
        r = subprocess.run([tool, "-u", "-z", str(path)], capture_output=True, text=True)
        if r.returncode == 0:
            return
    r = subprocess.run(["umount", "-l", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        raise MountPointError(f"{path}: cannot unmount stale mount: {r.stderr.strip()}")


def _is_stale(path: Path) -> bool:
    """A FUSE mount whose daemon died answers ENOTCONN (attributes may still be cached)."""
    try:
        os.listdir(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def prepare(mountpoint: Path) -> bool:
    """Check that ``mountpoint`` can be mounted on; recover a stale mount.

    Returns True if a stale mount (left by a daemon that died) was cleaned up.
    """
    recovered = False
    path = Path(os.path.abspath(mountpoint))
    fstype = mounts().get(str(path))
    if fstype is not None:
        if fstype.startswith("fuse") and _is_stale(path):
            force_unmount(path)
            recovered = True
        else:
            raise MountPointError(
                f"{mountpoint}: something is already mounted here "
                f"(unmount it first: fusermount3 -u {mountpoint})"
            )
    try:
        os.stat(path)
    except FileNotFoundError:
        raise MountPointError(
            f"{mountpoint}: mount point does not exist (mkdir it first)"
        ) from None
    except OSError as exc:
        raise MountPointError(f"{mountpoint}: {exc.strerror}") from None
    if not path.is_dir():
        raise MountPointError(f"{mountpoint}: mount point is not a directory")
    if os.listdir(path):
        raise MountPointError(f"{mountpoint}: mount point is not empty")
    return recovered
