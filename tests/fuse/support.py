"""Helpers shared by the mounted POSIX tests: shell runs, other users, raw syscalls, tree snapshots.

The syscalls Python's ``os`` module does not expose (``renameat2``,
``utimensat`` with UTIME_OMIT, ``getxattr``/``listxattr`` with a caller-sized
buffer) are called through ctypes so the tests exercise exactly the flags they
name.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.mounting import Mount

NOBODY = 65534
# The unprivileged users' interpreter: the venv's python lives under /root (mode 0700).
USER_PYTHON = "/usr/bin/python3"

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def sh(
    cmd: str | Sequence[str], cwd: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a command (a string goes through ``sh -c``); raise with its output if it fails."""
    args = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
    p = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def as_user(
    code: str,
    cwd: Path,
    uid: int = NOBODY,
    gid: int = NOBODY,
    groups: Sequence[int] = (),
    umask: int = 0o022,
) -> subprocess.CompletedProcess[str]:
    """Run python ``code`` as another user (no supplementary groups unless given).

    The process starts in ``cwd`` (entered while still root), so ``code`` should use
    relative paths: pytest's temporary directories are private to root (mode 0700).
    """
    return subprocess.run(
        [USER_PYTHON, "-c", code],
        user=uid,
        group=gid,
        extra_groups=list(groups),
        umask=umask,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def check_offline(node: Mount) -> None:
    """Stop the daemon cleanly, require a clean ``dfs fsck``, and mount again."""
    assert node.stop_daemon() == 0
    r = node.fsck()
    assert r.returncode == 0, f"fsck exited {r.returncode}:\n{r.stdout}{r.stderr}"
    node.start()


def user_ops(
    cwd: Path,
    ops: Sequence[str],
    uid: int = NOBODY,
    gid: int = NOBODY,
    groups: Sequence[int] = (),
    umask: int = 0o022,
) -> list[str]:
    """Evaluate each python expression in ``ops`` as another user, in order, in ``cwd``.

    Returns, per expression, the errno name of the OSError it raised, or the repr of
    its value (``"ok"`` for None).
    """
    code = (
        "import errno, json, os, stat, sys\n"
        "out = []\n"
        f"for op in {list(ops)!r}:\n"
        "    try:\n"
        "        v = eval(op)\n"
        "        out.append('ok' if v is None else repr(v))\n"
        "    except OSError as e:\n"
        "        out.append(errno.errorcode[e.errno])\n"
        "print(json.dumps(out))\n"
    )
    p = as_user(code, cwd, uid=uid, gid=gid, groups=groups, umask=umask)
    assert p.returncode == 0, p.stderr
    return list(json.loads(p.stdout))


def _check(ret: int, what: str, *paths: object) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}", *[str(p) for p in paths[:1]])
    return ret


def renameat2(old: Path, new: Path, flags: int) -> None:
    _check(
        _libc.renameat2(AT_FDCWD, bytes(old), AT_FDCWD, bytes(new), ctypes.c_uint(flags)),
        "renameat2",
        old,
    )


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path: Path, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    """utimensat(2) with (sec, nsec) pairs; nsec may be UTIME_NOW or UTIME_OMIT."""
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    _check(_libc.utimensat(AT_FDCWD, bytes(path), times, 0), "utimensat", path)


def getxattr_sized(path: Path, name: bytes, size: int) -> bytes:
    """getxattr(2) with a buffer of exactly ``size`` bytes (0 asks for the length)."""
    buf = ctypes.create_string_buffer(max(size, 1))
    n = _check(_libc.getxattr(bytes(path), name, buf if size else None, size), "getxattr", path)
    return buf.raw[:n] if size else n.to_bytes(8, "little")


def listxattr_sized(path: Path, size: int) -> bytes:
    buf = ctypes.create_string_buffer(max(size, 1))
    n = _check(_libc.listxattr(bytes(path), buf if size else None, size), "listxattr", path)
    return buf.raw[:n] if size else n.to_bytes(8, "little")


def xattrs(path: Path) -> dict[str, bytes]:
    return {
        n: os.getxattr(path, n, follow_symlinks=False)
        for n in os.listxattr(path, follow_symlinks=False)
        if not n.startswith("system.")
    }


def snapshot(root: Path, *, dir_times: bool = True) -> dict[str, object]:
    """Everything ``cp -a`` should preserve, per relative path: type, mode, owner, size,
    mtime (ns), contents or link target, xattrs, and which paths share an inode."""
    out: dict[str, object] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [*dirnames, *sorted(filenames), *([] if dirpath != str(root) else ["."])]:
            p = Path(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            rec: dict[str, object] = {
                "mode": oct(st.st_mode),
                "owner": (st.st_uid, st.st_gid),
                "xattrs": xattrs(p),
            }
            if dir_times or not stat.S_ISDIR(st.st_mode):
                rec["mtime"] = st.st_mtime_ns
            if stat.S_ISREG(st.st_mode):
                rec["size"] = st.st_size
                rec["data"] = p.read_bytes()
                rec["nlink"] = st.st_nlink
                rec["same_as"] = inodes.setdefault(st.st_ino, rel)
            elif stat.S_ISLNK(st.st_mode):
                rec["target"] = os.readlink(p)
            out[rel] = rec
    return out
