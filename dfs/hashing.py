"""Block checksums: xxh3-64 of a block's logical contents (holes read as zeros)."""

from __future__ import annotations

import xxhash

BLOCK_SIZE = 64 * 1024
ZERO_BLOCK = bytes(BLOCK_SIZE)
_ZERO_VIEW = memoryview(ZERO_BLOCK)


def block_digest(data: bytes | bytearray | memoryview) -> int:
    """xxh3-64 of a block's contents zero-padded to BLOCK_SIZE.

    Padding makes a hole, a short last block and zeros written explicitly
    agree, so extending a file never changes its old last block's digest, and
    a block with no stored digest is equivalent to one of all zeros.
    """
    n = len(data)
    if n == BLOCK_SIZE:
        return int(xxhash.xxh3_64_intdigest(data))
    h = xxhash.xxh3_64()
    h.update(data)
    h.update(_ZERO_VIEW[n:])
    return int(h.intdigest())


def blocks_spanning(off: int, length: int) -> range:
    """Block numbers touched by the byte range [off, off+length)."""
    if length <= 0:
        return range(0)
    return range(off // BLOCK_SIZE, (off + length - 1) // BLOCK_SIZE + 1)
