"""The data directory lock: one exclusive, non-blocking flock on DIR/lock per user of DIR.

The daemon holds it while it serves DIR; offline tools (``dfs fsck``) take it
too, so that a tool never works on a store a running daemon is changing, and a
daemon never starts on a store a tool is repairing. The file holds the
holder's pid and what it is, for the error message of whoever finds it taken.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from dfs.errors import StoreError


class DataDirLock:
    """An exclusive flock on DIR/lock, holding the owner's pid for error messages."""

    def __init__(self, data_dir: Path, owner: str = "dfs-mountd") -> None:
        self.path = data_dir / "lock"
        self.owner = owner
        self.fd = -1

    def acquire(self) -> None:
        """Take the lock or raise StoreError naming who holds it (never waits)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raw = os.pread(fd, 128, 0).decode(errors="replace").strip()
            os.close(fd)
            pid, _, who = raw.partition(" ")
            raise StoreError(
                f"{self.path.parent}: in use by another {who or 'dfs-mountd'} "
                f"(pid {pid or '?'}); stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {self.owner}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> DataDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
