"""What a check yields and what the checks share: ``Finding`` and ``CheckContext``."""

from __future__ import annotations

import stat
from dataclasses import dataclass
from functools import cached_property

from dfs.check.scan import Index, Progress, build_index
from dfs.data.store import DataStore
from dfs.meta.store import MetaStore


@dataclass(frozen=True, slots=True)
class Finding:
    """One broken invariant.

    ``code`` is a short stable id (listed in dfs/check/checker.py); ``ino`` the inode
    concerned (the directory, for entry findings; 0 when none). ``where`` is
    the (database, key) of the record at fault and ``value`` a number the
    repair needs (a block, a cookie, a counter), when there is one.
    """

    code: str
    ino: int
    message: str
    repairable: bool
    where: tuple[str, bytes] | None = None
    value: int | None = None


class CheckContext:
    """What the checks share: the stores, the progress callback and the index (built once)."""

    def __init__(self, meta: MetaStore, data: DataStore, progress: Progress | None = None) -> None:
        self.meta = meta
        self.data = data
        self.progress = progress

    @cached_property
    def index(self) -> Index:
        return build_index(self.meta, self.progress)

    def report(self, what: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(what, done, total)


def kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISREG(mode):
        return "regular file"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "special file"
