"""block_digest: holes, short blocks and zero padding agree; any other change shows."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dfs.hashing import BLOCK_SIZE, ZERO_BLOCK, block_digest, blocks_spanning

blocks = st.binary(max_size=BLOCK_SIZE)


def test_hole_equals_empty_equals_zero_block() -> None:
    assert block_digest(ZERO_BLOCK) == block_digest(b"") == block_digest(b"\0")


@given(blocks, st.integers(0, BLOCK_SIZE))
def test_trailing_zeros_within_the_block_do_not_matter(data: bytes, pad: int) -> None:
    pad = min(pad, BLOCK_SIZE - len(data))
    assert block_digest(data) == block_digest(data + bytes(pad))
    assert block_digest(data) == block_digest(data + bytes(BLOCK_SIZE - len(data)))


@given(blocks)
def test_buffer_types_agree(data: bytes) -> None:
    d = block_digest(data)
    assert block_digest(bytearray(data)) == d
    assert block_digest(memoryview(data)) == d


@given(st.binary(min_size=1, max_size=4096), st.data())
def test_a_flipped_byte_changes_the_digest(data: bytes, draw: st.DataObject) -> None:
    i = draw.draw(st.integers(0, len(data) - 1))
    bit = draw.draw(st.integers(0, 7))
    changed = bytearray(data)
    changed[i] ^= 1 << bit
    assert block_digest(bytes(changed)) != block_digest(data)


def test_leading_zeros_matter() -> None:
    assert block_digest(b"\0a") != block_digest(b"a")


def test_digest_is_a_u64() -> None:
    assert 0 <= block_digest(b"hello") < 2**64


@given(st.integers(0, 10 * BLOCK_SIZE), st.integers(-5, 5 * BLOCK_SIZE))
def test_blocks_spanning(off: int, length: int) -> None:
    r = blocks_spanning(off, length)
    if length <= 0:
        assert len(r) == 0
        return
    touched = {
        b
        for b in range(off // BLOCK_SIZE, (off + length) // BLOCK_SIZE + 2)
        if b * BLOCK_SIZE < off + length and (b + 1) * BLOCK_SIZE > off
    }
    assert set(r) == touched
