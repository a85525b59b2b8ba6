"""Recomputing a file's block digests from its contents (recovery after an unclean stop).

A file whose ``dirty`` record survived a crash may have blocks newer than their digests; the
contents are the truth (the data was written before the digests), so every digest is
recomputed from them, holes keep none, and a data file longer than the file is cut.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from dfs.data.store import DataStore, data_blocks, digest_range
from dfs.hashing import block_digest
from dfs.meta import schema as S
from dfs.meta.store import MetaStore, WriteTxn
from dfs.types import InodeId, VolumeId

_EMPTY_DIGEST = block_digest(b"")


def rechecksum(
    meta: MetaStore, data: DataStore, ino: InodeId, is_replica: Callable[[VolumeId], bool]
) -> None:
    """Recompute every digest of ino from its contents (after an unclean stop)."""
    with meta.read() as txn:
        raw = txn.get(S.inode_key(ino), db=meta.inodes)
        inl = txn.get(S.inline_key(ino), db=meta.inline)
    replica = raw is not None and is_replica(S.unpack_inode(ino, raw).volume)
    if inl is not None:
        # Interrupted move to a data file: the inline contents win.
        data.remove(ino)
        with meta.write(record=not replica) as txn:
            delete_digests(txn, meta, ino)
            txn.put(S.block_key(ino, 0), S.pack_digest(block_digest(inl)), db=meta.blocks)
            txn.delete(S.dirty_key(ino), db=meta.dirty)
        return
    fd = data.open(ino, create=False)
    try:
        if raw is None:
            digests: dict[int, int] = {}
            size = 0
            blocks = 0
        else:
            size = S.unpack_inode(ino, raw).size
            if fd is not None and os.fstat(fd).st_size > size:
                DataStore.truncate(fd, size)
            # Holes have no digest: only blocks holding data are read.
            held = sorted(data_blocks(fd, size)) if fd is not None else []
            digests = digest_range(fd, held, size)
            blocks = data.allocated_blocks(fd)
        with meta.write(record=not replica) as txn:
            delete_digests(txn, meta, ino)
            for blk, d in digests.items():
                if d != _EMPTY_DIGEST:
                    txn.put(S.block_key(ino, blk), S.pack_digest(d), db=meta.blocks)
            txn.delete(S.dirty_key(ino), db=meta.dirty)
            if raw is not None:
                a = S.unpack_inode(ino, raw)
                a.blocks = blocks
                txn.put(S.inode_key(ino), S.pack_inode(a), db=meta.inodes)
    finally:
        if fd is not None:
            data.close(fd)


def delete_digests(txn: WriteTxn, meta: MetaStore, ino: int) -> None:
    txn.delete_prefix(S.ino_prefix(ino), db=meta.blocks)
