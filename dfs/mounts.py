"""The mount table of this process (/proc/self/mountinfo), and detaching a stale mount.

The one mountinfo reader of dfs: mountd checks its mount point with it, the
tools find a path's mount and a mount's daemon with it, the launcher and the
tests ask whether something is mounted. It never touches a mount (a hung
FUSE daemon cannot make it block).

mountinfo (proc(5)) has one line per mount::

    36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue
    (1)(2) (3)   (4)   (5)        (6)        (7)    (8) (9)  (10)      (11)

(7) is zero or more optional fields, ended by the separator (8). The kernel
writes space, tab, newline and backslash in (4), (5) and (10) as octal
escapes ``\\040``, ``\\011``, ``\\012``, ``\\134``; every other byte is
written as it is in the path, so a field is decoded *after* unescaping, as
the bytes of a file name: ``os.fsdecode`` (UTF-8, with undecodable bytes kept
as surrogates, so ``os.fsencode`` gives the original bytes back).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")

_OCTAL = re.compile(rb"\\([0-7]{3})")


class UnmountError(Exception):
    """A mount could not be detached; the message says why."""


@dataclass(frozen=True, slots=True)
class MountEntry:
    """One line of mountinfo (the fields dfs needs), unescaped."""

    mount_point: str  # absolute
    root: str  # the directory of the file system mounted there ("/" unless a bind mount)
    dev: int  # st_dev of files in it (os.makedev of the MAJ:MIN field)
    fstype: str  # e.g. "fuse.dfs"
    source: str  # e.g. "dfs:/srv/dfs/data" (what mountd passes as the FUSE fsname)


def unescape(field: bytes) -> str:
    """A mountinfo field as a file name: octal escapes undone, then ``os.fsdecode``."""
    return os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m.group(1), 8) & 0xFF]), field))


def read_mounts(data: str | bytes | None = None) -> list[MountEntry]:
    """Parse mountinfo ``data`` (default: read /proc/self/mountinfo now), in its order.

    ``data`` given as ``str`` is taken as ``os.fsdecode`` would have made it (so a
    test can write non-ASCII bytes as surrogates). Lines that are not mountinfo
    lines are skipped.
    """
    if data is None:
        data = MOUNTINFO.read_bytes()
    elif isinstance(data, str):
        data = os.fsencode(data)
    out: list[MountEntry] = []
    for line in data.split(b"\n"):
        parts = line.split()
        try:
            sep = parts.index(b"-", 6)
            major, minor = parts[2].split(b":")
            out.append(
                MountEntry(
                    mount_point=unescape(parts[4]),
                    root=unescape(parts[3]),
                    dev=os.makedev(int(major), int(minor)),
                    fstype=os.fsdecode(parts[sep + 1]),
                    source=unescape(parts[sep + 2]),
                )
            )
        except (ValueError, IndexError):
            continue
    return out


def mount_at(
    path: str | os.PathLike[str], table: list[MountEntry] | None = None
) -> MountEntry | None:
    """What is mounted at ``path`` (the top one, if mounts are stacked), or None."""
    target = os.fspath(path)
    found = None
    for entry in read_mounts() if table is None else table:
        if entry.mount_point == target:
            found = entry
    return found


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """Is something mounted at ``path``?"""
    return mount_at(path) is not None


def force_unmount(path: str | os.PathLike[str]) -> None:
    """Lazily detach whatever is mounted at ``path`` (a stale or hung FUSE mount).

    ``fusermount3 -u -z`` (or ``fusermount``), else ``umount -l``; raises
    ``UnmountError`` with the last tool's complaint if none of them succeeds.
    """
    where = os.fspath(path)
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmds = ([[tool, "-u", "-z", where]] if tool else []) + [["umount", "-l", where]]
    reason = "no fusermount3 or umount"
    for cmd in cmds:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False)
        except FileNotFoundError:
            continue
        if r.returncode == 0:
            return
        reason = r.stderr.strip() or f"{cmd[0]} exited with {r.returncode}"
    raise UnmountError(f"{where}: cannot unmount: {reason}")


def mount_points() -> list[str]:
    """Every mount point of this process, in mountinfo's order (a stacked one more than once)."""
    return [e.mount_point for e in read_mounts()]
