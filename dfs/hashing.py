"""Block checksums: xxh3-64 of a block's logical contents (holes read as zeros)."""


from __future__ import annotations

import xxhash

BLOCK_SIZE = 64 * 1024
ZERO_BLOCK = bytes(BLOCK_SIZE)


def block_digest(data: bytes | bytearray | memoryview) -> int:
    """xxh3-64 of a block with its trailing zero bytes removed.

    Stripping makes a hole, a short last block and zero padding agree, so
    extending a file never changes the digest of its old last block.
    """
    if len(data) and data[-1] == 0:
        data = bytes(data).rstrip(b"\0")
    return int(xxhash.xxh3_64_intdigest(data))


def blocks_spanning(off: int, length: int) -> range:
    """Block numbers touched by the byte range [off, off+length)."""
    if length <= 0:
        return range(0)
    return range(off // BLOCK_SIZE, (off + length - 1) // BLOCK_SIZE + 1)
