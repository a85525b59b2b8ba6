"""Who is asking: the core's view of a request's caller (no pyfuse3 types here)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Ctx:
    uid: int = 0
    gid: int = 0
    pid: int = 0
    umask: int = 0o022
    # Supplementary groups cost a /proc read, so they are fetched only when a
    # rule needs them (setgid inheritance); None means "primary group only".
    sup_groups: Callable[[], frozenset[int]] | None = None

    def in_group(self, gid: int) -> bool:
        if gid == self.gid:
            return True
        return self.sup_groups is not None and gid in self.sup_groups()


ROOT_CTX = Ctx()


@dataclass(slots=True)
class SetAttrs:
    """Which attributes a setattr changes; None means unchanged.

    ``atime_ns``/``mtime_ns`` hold the final value (UTIME_NOW already resolved
    to the current time by the caller or the FUSE layer).
    """

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    ctime_ns: int | None = None
