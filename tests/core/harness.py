"""A node's core (Vfs on a real lmdb MetaStore and DataStore) in a tmp dir, for tests without FUSE.

The async parts of the core (file I/O, setattr) are driven with ``trio.run``
one call at a time, which is what the FUSE layer does one request at a time.
``crash()`` simulates ``kill -9``: open files are dropped without settling and
the stores are reopened from disk. ``settle()`` simulates the kernel letting
go at unmount: every handle released, every lookup forgotten.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from dfs.check.checker import Finding, check
from dfs.data.store import DataStore
from dfs.fs.ctx import ROOT_CTX, Ctx, SetAttrs
from dfs.fs.vfs import Vfs
from dfs.meta.store import MetaStore
from dfs.types import ROOT_INODE, Attr, FileHandle, InodeId

T = TypeVar("T")


def run(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run one coroutine function of the core to completion on a fresh trio loop."""
    return trio.run(fn, *args)


class Core:
    def __init__(self, root: Path, ctx: Ctx = ROOT_CTX, *, replica: bool = False) -> None:
        """``replica``: the node is a storage site of every volume, not their primary."""
        self.dir = root
        self.ctx = ctx
        self.meta = MetaStore.open(root / "meta")
        self.data = DataStore(root / "data")
        self._replica = (lambda vol: True) if replica else None
        self.vfs = Vfs(self.meta, self.data, replica=self._replica)

    # --- namespace by path -------------------------------------------------------------

    def resolve(self, path: str) -> Attr:
        a = self.vfs.getattr(ROOT_INODE)
        for part in path.strip("/").split("/"):
            if part:
                found = self.vfs.peek(a.ino, part.encode())
                if found is None:
                    raise FileNotFoundError(path)
                a = found
        return a

    def ino(self, path: str) -> InodeId:
        return self.resolve(path).ino

    def _parent(self, path: str) -> tuple[InodeId, bytes]:
        head, _, name = path.strip("/").rpartition("/")
        return self.ino(head), name.encode()

    def mkdir(self, path: str, mode: int = 0o755) -> Attr:
        parent, name = self._parent(path)
        return self.vfs.mkdir(parent, name, mode, self.ctx)

    def create(self, path: str, flags: int = os.O_RDWR) -> tuple[FileHandle, Attr]:
        parent, name = self._parent(path)
        return self.vfs.create(parent, name, 0o644, flags, self.ctx)

    def open(self, path: str, flags: int = os.O_RDWR) -> FileHandle:
        return self.vfs.files.open(self.ino(path), flags)

    def symlink(self, path: str, target: bytes) -> Attr:
        parent, name = self._parent(path)
        return self.vfs.symlink(parent, name, target, self.ctx)

    def link(self, src: str, dst: str) -> Attr:
        parent, name = self._parent(dst)
        return self.vfs.link(self.ino(src), parent, name)

    def unlink(self, path: str) -> None:
        self.vfs.unlink(*self._parent(path))

    def rmdir(self, path: str) -> None:
        self.vfs.rmdir(*self._parent(path))

    def rename(self, src: str, dst: str, flags: int = 0) -> None:
        self.vfs.rename(*self._parent(src), *self._parent(dst), flags)

    def names(self, path: str = "/") -> list[str]:
        return sorted(
            e.name.decode() for e in self.vfs.readdir(self.ino(path)) if e.name not in (b".", b"..")
        )

    # --- contents -----------------------------------------------------------------------

    def write(self, fh: int, off: int, data: bytes) -> int:
        return run(self.vfs.files.write, fh, off, data)

    def read(self, fh: int, off: int, size: int) -> bytes:
        return run(self.vfs.files.read, fh, off, size)

    def release(self, fh: int) -> None:
        run(self.vfs.files.release, fh)

    def fsync(self, fh: int) -> None:
        run(self.vfs.files.fsync, fh, False)

    def truncate(self, path: str, size: int) -> Attr:
        return run(self.vfs.setattr, self.ino(path), SetAttrs(size=size), self.ctx)

    def write_file(self, path: str, data: bytes) -> Attr:
        fh, a = self.create(path)
        self.write(fh, 0, data)
        self.release(fh)
        return self.vfs.getattr(a.ino)

    def read_file(self, path: str) -> bytes:
        fh = self.open(path, os.O_RDONLY)
        try:
            return self.read(fh, 0, self.resolve(path).size + 1)
        finally:
            self.release(fh)

    # --- lifecycle ----------------------------------------------------------------------

    def settle(self) -> None:
        """What unmounting does: the kernel releases every handle and forgets every inode."""
        for fh in list(self.vfs.files._handles):
            self.release(fh)
        self.vfs.forget(list(self.vfs.lookups.items()))

    def crash(self) -> None:
        """kill -9: lose the process state (open files unsettled) and reopen from disk."""
        for st in list(self.vfs.files._inodes.values()):
            if st.fd is not None:
                os.close(st.fd)
                st.fd = None
        self.meta.close()
        self.meta = MetaStore.open(self.dir / "meta")
        self.data = DataStore(self.dir / "data")
        self.vfs = Vfs(self.meta, self.data, replica=self._replica)

    def findings(self, *, verify_data: bool = True) -> list[Finding]:
        return check(self.meta, self.data, verify_data=verify_data)

    def close(self) -> None:
        for st in list(self.vfs.files._inodes.values()):
            if st.fd is not None:
                os.close(st.fd)
                st.fd = None
        self.meta.close()
