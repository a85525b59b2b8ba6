"""Identifiers and the attribute record shared by every layer.

Inode ids are globally unique across a cluster: the high 16 bits carry the
NodeId of the node that allocated the inode, the low 48 bits a per-node
counter. The kernel sees the same number as its inode number, so the same file
has the same st_ino on every node. The root directory is inode 1.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import NewType

InodeId = NewType("InodeId", int)
NodeId = NewType("NodeId", int)
VolumeId = NewType("VolumeId", int)
FileHandle = NewType("FileHandle", int)

ROOT_INODE = InodeId(1)
ROOT_VOLUME = VolumeId(1)
NODE_SHIFT = 48
COUNTER_MASK = (1 << NODE_SHIFT) - 1
MAX_NODE_ID = (1 << 16) - 1


def make_inode_id(node: NodeId, counter: int) -> InodeId:
    if not 0 < node <= MAX_NODE_ID:
        raise ValueError(f"node id {node} out of range")
    if not 0 < counter <= COUNTER_MASK:
        raise ValueError(f"inode counter {counter} out of range")
    return InodeId((node << NODE_SHIFT) | counter)


def inode_node(ino: InodeId) -> NodeId:
    return NodeId(ino >> NODE_SHIFT)


@dataclass(slots=True)
class Attr:
    """One inode's attributes, as stored (see dfs/meta/schema.py for the layout)."""

    ino: InodeId
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    btime_ns: int
    rdev: int = 0
    blocks: int = 0  # allocated 512-byte units, refreshed when data settles
    version: int = 0  # volume update sequence of the last change
    generation: int = 0
    volume: VolumeId = ROOT_VOLUME
    parent: InodeId = InodeId(0)  # directories only: for ".." and subtree checks

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_lnk(self) -> bool:
        return stat.S_ISLNK(self.mode)
