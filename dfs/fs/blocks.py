"""Blocks of a file's contents: digests of written ranges, inline files, reading and rewriting
one block (for the checker, repair and read repair)."""

from __future__ import annotations

import logging

import trio

from dfs.data.store import DataStore
from dfs.errors import Corrupted
from dfs.hashing import BLOCK_SIZE, block_digest, blocks_spanning
from dfs.meta import schema as S
from dfs.meta.store import MetaStore
from dfs.types import InodeId

log = logging.getLogger("dfs.fs.files")


def digest_slices(data: bytes | memoryview, off: int) -> tuple[dict[int, int], set[int]]:
    """Digests of the blocks that ``data`` at ``off`` covers entirely, and the partial ones."""
    n = len(data)
    full: dict[int, int] = {}
    partial: set[int] = set()
    mv = memoryview(data)
    for blk in blocks_spanning(off, n):
        start = blk * BLOCK_SIZE
        if start >= off and start + BLOCK_SIZE <= off + n:
            piece = mv[start - off : start - off + BLOCK_SIZE]
            full[blk] = block_digest(piece)
        else:
            partial.add(blk)
    return full, partial


def inline_blocks(contents: bytes | bytearray) -> int:
    """st_blocks of an inline file: whole 4 KiB blocks, none if it is all zeros (a hole)."""
    if not contents.strip(b"\0"):
        return 0
    return (len(contents) + 4095) // 4096 * 8


def verify_inline(ino: int, contents: bytes, digest_raw: bytes | None) -> None:
    if digest_raw is None:
        return
    want, got = S.unpack_digest(digest_raw), block_digest(contents)
    if got != want:
        log.error(
            "checksum mismatch: inline inode %#x (stored %016x, read %016x); answering EIO",
            ino,
            want,
            got,
        )
        raise Corrupted(message=f"inode {ino:#x}: inline checksum mismatch")


def read_block(meta: MetaStore, data: DataStore, ino: int, blk: int, size: int) -> bytes:
    """Block ``blk`` of a file as stored (inline or data file), for the checker and repair."""
    with meta.read() as txn:
        inl = txn.get(S.inline_key(ino), db=meta.inline)
    if inl is not None:
        return inl[blk * BLOCK_SIZE : (blk + 1) * BLOCK_SIZE]
    fd = data.open(ino, create=False)
    try:
        return DataStore.pread(fd, blk * BLOCK_SIZE, BLOCK_SIZE, size)
    finally:
        if fd is not None:
            data.close(fd)


def write_and_digest(
    fd: int, off: int, data: bytes, direct: bool = False
) -> tuple[dict[int, int], set[int]]:
    if direct:
        DataStore.pwrite_direct(fd, off, data)
    else:
        DataStore.pwrite(fd, off, data)
    return digest_slices(data, off)


def pwrite_fsync(fd: int, off: int, data: bytes) -> None:
    DataStore.pwrite(fd, off, data)
    DataStore.fsync(fd)


async def rewrite_block(
    meta: MetaStore,
    store: DataStore,
    ino: InodeId,
    blk: int,
    data: bytes,
    want: int,
    limiter: trio.CapacityLimiter,
) -> bool:
    """Write ``data`` over block ``blk`` of ino's data file and fsync it, if the stored digest
    is still ``want`` (read repair; the caller checked ``data`` hashes to it)."""
    with meta.read() as txn:
        raw = txn.get(S.block_key(ino, blk), db=meta.blocks)
    if raw is None or S.unpack_digest(raw) != want:
        return False  # changed meanwhile: the next read looks again
    fd = store.open(ino, create=False)
    if fd is None:
        return False
    try:
        await trio.to_thread.run_sync(pwrite_fsync, fd, blk * BLOCK_SIZE, data, limiter=limiter)
    finally:
        store.close(fd)
    return True
