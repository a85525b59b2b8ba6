"""Handles of this node that stand for something on a volume's primary.

- ``on_primary``: a file of a volume stored here, opened for writing: the local handle (reads
  are local) and the handle the primary opened for this node (writes, fsync, release go there).
  A handle the primary of an earlier epoch opened is replaced by one the current primary opens
  (open files follow a new primary: ``WriteBehind.primary_handle``).
- ``files`` / ``dirs``: files and directories of volumes not stored here: every operation goes
  to the primary (numbers from ``REMOTE_FH`` up, apart from the local ones).
- ``counts``: the kernel's references to inodes of volumes not stored here (``lookup`` counts
  for ``forget``), with each inode's volume.
- ``learnt``: inodes of volumes stored here that the kernel got from the primary's answer while
  this node's replica may not have them yet (a site behind, or one that has just joined a new
  volume), with their volume, until the kernel forgets them: whatever the kernel asks of them
  is routed by volume (``ReadRouting.volume_of``). Their references are counted by the replica.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from dfs.types import InodeId, VolumeId

REMOTE_FH = 1 << 61
WRITE_ACCESS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC
EPOCH_SHIFT = 40  # a primary's handle on the wire: epoch << EPOCH_SHIFT | its handle number


def handle_epoch(wire: int) -> int:
    """The epoch of the primary that opened the handle ``wire`` (``OpServer``): a handle of an
    earlier epoch is refused by every primary, and the file is opened again on the current
    one (``WriteBehind.primary_handle``)."""
    return wire >> EPOCH_SHIFT


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """A handle on a file of a volume this node does not store: its primary's handle, and the
    flags it was opened with (to open it again on a new primary)."""

    vol: VolumeId
    ino: InodeId
    rfh: int
    flags: int


@dataclass
class RemoteHandles:
    on_primary: dict[int, int] = field(default_factory=dict)
    files: dict[int, RemoteFile] = field(default_factory=dict)
    dirs: dict[int, InodeId] = field(default_factory=dict)
    counts: dict[InodeId, list[int]] = field(default_factory=dict)  # ino -> [volume, refs]
    learnt: dict[InodeId, VolumeId] = field(default_factory=dict)
    _next: int = REMOTE_FH

    def new(self, table: dict[int, Any], value: Any) -> int:
        fh = self._next
        self._next += 1
        table[fh] = value
        return fh

    def count(self, ino: InodeId, vol: VolumeId) -> None:
        r = self.counts.get(ino)
        if r is None:
            self.counts[ino] = [int(vol), 1]
        else:
            r[1] += 1

    def forget(self, items: list[tuple[InodeId, int]]) -> list[tuple[InodeId, int]]:
        """Drop the kernel's references to remote inodes; returns those to local inodes."""
        local: list[tuple[InodeId, int]] = []
        for ino, n in items:
            r = self.counts.get(ino)
            if r is None:
                local.append((ino, n))
            elif r[1] <= n:
                del self.counts[ino]
                if n > r[1]:  # counted here too (the volume was stored here meanwhile)
                    local.append((ino, n - r[1]))
            else:
                r[1] -= n
        return local
