"""The on-disk layout: codecs round-trip, keys sort in numeric order, ids pack and unpack."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dfs.meta import schema as S
from dfs.types import (
    COUNTER_MASK,
    MAX_NODE_ID,
    NODE_SHIFT,
    Attr,
    InodeId,
    NodeId,
    VolumeId,
    inode_node,
    make_inode_id,
)

u8 = st.integers(0, 2**8 - 1)
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
names = st.binary(min_size=1, max_size=S.MAX_NAME)

attrs = st.builds(
    Attr,
    ino=u64.map(InodeId),
    mode=u32,
    uid=u32,
    gid=u32,
    nlink=u32,
    size=u64,
    atime_ns=i64,
    mtime_ns=i64,
    ctime_ns=i64,
    btime_ns=i64,
    rdev=u64,
    blocks=u64,
    version=u64,
    generation=u32,
    volume=u32.map(VolumeId),
    parent=u64.map(InodeId),
)


@given(attrs)
def test_inode_round_trip(a: Attr) -> None:
    assert S.unpack_inode(a.ino, S.pack_inode(a)) == a


def test_inode_rejects_wrong_length() -> None:
    a = Attr(InodeId(5), 0o100644, 0, 0, 1, 0, 0, 0, 0, 0)
    with pytest.raises(struct.error):
        S.unpack_inode(5, S.pack_inode(a)[:-1])


@given(u64, u64)
def test_dirent_round_trip(child: int, cookie: int) -> None:
    assert S.unpack_dirent(S.pack_dirent(child, cookie)) == (child, cookie)


@given(u64)
def test_digest_and_ints_round_trip(v: int) -> None:
    assert S.unpack_digest(S.pack_digest(v)) == v
    assert S.read_u64(S.u64(v)) == v
    assert S.read_u32(S.u32(v & 0xFFFFFFFF)) == v & 0xFFFFFFFF
    assert S.read_u16(S.u16(v & 0xFFFF)) == v & 0xFFFF


@given(u64, u64)
def test_block_and_journal_keys_round_trip(a: int, b: int) -> None:
    assert S.block_of_key(S.block_key(a, b)) == (a, b)
    assert S.journal_of_key(S.journal_key(a & 0xFFFFFFFF, b)) == (a & 0xFFFFFFFF, b)


@given(u64, u64)
def test_u64_keys_sort_numerically(a: int, b: int) -> None:
    assert (S.inode_key(a) < S.inode_key(b)) == (a < b)


@given(u64, u64, u64, u64)
def test_pair_keys_sort_by_first_then_second(a: int, b: int, c: int, d: int) -> None:
    assert (S.block_key(a, b) < S.block_key(c, d)) == ((a, b) < (c, d))
    assert (S.dirpos_key(a, b) < S.dirpos_key(c, d)) == ((a, b) < (c, d))
    va, vc = a & 0xFFFFFFFF, c & 0xFFFFFFFF
    assert (S.journal_key(va, b) < S.journal_key(vc, d)) == ((va, b) < (vc, d))


@given(u64, names, u64, names)
def test_dirents_group_by_directory(p1: int, n1: bytes, p2: int, n2: bytes) -> None:
    """All entries of a directory are contiguous and after its prefix: prefix scans work."""
    k1, k2 = S.dirent_key(p1, n1), S.dirent_key(p2, n2)
    if p1 != p2:
        assert (k1 < k2) == (p1 < p2)
    else:
        assert (k1 < k2) == (n1 < n2)
    assert k1.startswith(S.dirent_prefix(p1))
    assert S.xattr_key(p1, n1).startswith(S.ino_prefix(p1))
    assert S.block_key(p1, p2).startswith(S.ino_prefix(p1))


def test_seq_keys_do_not_collide_with_meta_records() -> None:
    keys = {
        S.META_FORMAT,
        S.META_NODE_ID,
        S.META_CLUSTER_ID,
        S.META_NEXT_COUNTER,
        S.META_NEXT_COOKIE,
        S.META_CLEAN,
    }
    assert not keys & {S.seq_key(v) for v in (0, 1, 2**32 - 1)}


@given(st.integers(1, MAX_NODE_ID), st.integers(1, COUNTER_MASK))
def test_inode_id_packing(node: int, counter: int) -> None:
    ino = make_inode_id(NodeId(node), counter)
    assert inode_node(ino) == node
    assert ino & COUNTER_MASK == counter
    assert ino >> NODE_SHIFT == node
    assert 0 < ino < 2**64


@pytest.mark.parametrize(
    ("node", "counter"),
    [(0, 1), (MAX_NODE_ID + 1, 1), (1, 0), (1, COUNTER_MASK + 1)],
)
def test_inode_id_out_of_range(node: int, counter: int) -> None:
    with pytest.raises(ValueError):
        make_inode_id(NodeId(node), counter)


def test_inode_ids_of_different_nodes_differ() -> None:
    assert make_inode_id(NodeId(1), 7) != make_inode_id(NodeId(2), 7)
