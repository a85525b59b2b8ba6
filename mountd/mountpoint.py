"""Mount point checks and stale-mount recovery, done before anything is mounted."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from dfs.mounts import UnmountError, force_unmount, mount_at


class MountPointError(Exception):
    """The mount point cannot be used; the message says why and what to do."""


def fuse_device(path: Path) -> str | None:
    """``major:minor`` of the FUSE mount at ``path`` (from mountinfo: no request to the mount)."""
    entry = mount_at(path)
    if entry is None or not entry.fstype.startswith("fuse"):
        return None
    return f"{os.major(entry.dev)}:{os.minor(entry.dev)}"


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
    entry = mount_at(path)
    if entry is not None:
        if entry.fstype.startswith("fuse") and _is_stale(path):
            try:
                force_unmount(path)
            except UnmountError as exc:
                raise MountPointError(f"stale mount: {exc}") from None
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
