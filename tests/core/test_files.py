"""File contents on the core: write/read/truncate, sparse files, and block checksums."""

from __future__ import annotations

import errno
import os

import pytest

from dfs.check.checker import stored_digests
from dfs.errors import Corrupted, FsError
from dfs.hashing import BLOCK_SIZE, block_digest
from dfs.meta import schema as S
from tests.core.harness import Core

B = BLOCK_SIZE


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(n))


def test_write_read_round_trip(core: Core) -> None:
    data = pattern(3 * B + 123)
    a = core.write_file("/f", data)
    assert a.size == len(data)
    assert core.read_file("/f") == data
    fh = core.open("/f")
    assert core.read(fh, B - 10, 20) == data[B - 10 : B + 10]
    assert core.read(fh, len(data), 10) == b""
    assert core.read(fh, len(data) + 100, 10) == b""
    core.release(fh)


def test_checksums_settled_on_release(core: Core) -> None:
    data = pattern(2 * B + 5)
    fh, a = core.create("/f")
    core.write(fh, 0, data)
    core.release(fh)
    digests = stored_digests(core.meta, a.ino)
    assert digests == {
        0: block_digest(data[:B]),
        1: block_digest(data[B : 2 * B]),
        2: block_digest(data[2 * B :]),
    }


def test_partial_overwrites(core: Core) -> None:
    fh, _ = core.create("/f")
    core.write(fh, 0, pattern(2 * B))
    core.fsync(fh)
    core.write(fh, 100, b"X" * 10)  # inside block 0
    core.write(fh, B - 5, b"Y" * 10)  # straddles blocks 0 and 1
    expect = bytearray(pattern(2 * B))
    expect[100:110] = b"X" * 10
    expect[B - 5 : B + 5] = b"Y" * 10
    assert core.read(fh, 0, 2 * B) == bytes(expect)
    core.release(fh)
    assert core.read_file("/f") == bytes(expect)


def test_sparse_file(core: Core) -> None:
    fh, a = core.create("/f")
    core.write(fh, 10 * B + 7, b"end")
    core.release(fh)
    assert core.resolve("/f").size == 10 * B + 10
    data = core.read_file("/f")
    assert data == bytes(10 * B + 7) + b"end"
    assert set(stored_digests(core.meta, a.ino)) <= {10}  # holes have no digest
    st = os.stat(core.data.path(a.ino))
    assert st.st_blocks * 512 < 2 * B  # the data file keeps the hole


def test_truncate_shrink_extend(core: Core) -> None:
    data = pattern(3 * B)
    a = core.write_file("/f", data)
    core.truncate("/f", B + 10)
    assert core.resolve("/f").size == B + 10
    assert core.read_file("/f") == data[: B + 10]
    assert set(stored_digests(core.meta, a.ino)) == {0, 1}
    core.truncate("/f", 2 * B + 1)  # extend: a hole, zeros
    assert core.read_file("/f") == data[: B + 10] + bytes(B - 9)
    core.truncate("/f", 0)
    assert core.read_file("/f") == b""
    assert stored_digests(core.meta, a.ino) == {}


def test_truncate_while_open_and_dirty(core: Core) -> None:
    fh, a = core.create("/f")
    core.write(fh, 0, pattern(2 * B))
    core.truncate("/f", 100)
    core.write(fh, 50, b"Z" * 100)
    assert core.read(fh, 0, 1000) == pattern(2 * B)[:50] + b"Z" * 100
    core.release(fh)
    assert core.read_file("/f") == pattern(2 * B)[:50] + b"Z" * 100


def test_truncate_dir_and_symlink(core: Core) -> None:
    core.mkdir("/d")
    core.symlink("/l", b"target")
    with pytest.raises(FsError) as e:
        core.truncate("/d", 0)
    assert e.value.errno == errno.EISDIR
    with pytest.raises(FsError) as e:
        core.truncate("/l", 0)
    assert e.value.errno == errno.EINVAL
    assert core.resolve("/l").size == len(b"target")


def test_corrupted_block_reads_eio(core: Core) -> None:
    data = pattern(2 * B)
    a = core.write_file("/f", data)
    path = core.data.path(a.ino)
    raw = bytearray(path.read_bytes())
    raw[B + 3] ^= 0xFF
    path.write_bytes(bytes(raw))
    fh = core.open("/f")
    assert core.read(fh, 0, 100) == data[:100]  # block 0 is fine
    with pytest.raises(Corrupted):
        core.read(fh, B, 100)
    core.release(fh)
    codes = [(f.code, f.ino, f.value) for f in core.findings()]
    assert codes == [("checksum-mismatch", a.ino, 1)]
    raw[B + 3] ^= 0xFF  # put it back: the store is consistent again
    path.write_bytes(bytes(raw))
    assert core.read_file("/f") == data


def test_many_small_writes_then_fsync(core: Core) -> None:
    fh, _ = core.create("/f")
    chunks = [pattern(4096, seed=i) for i in range(40)]
    for i, c in enumerate(chunks):
        core.write(fh, i * 4096, c)
    core.fsync(fh)
    assert core.read(fh, 0, 40 * 4096) == b"".join(chunks)
    core.release(fh)


def test_unlinked_open_file_keeps_data_until_forgotten(core: Core) -> None:
    fh, a = core.create("/f")
    core.write(fh, 0, pattern(B + 1))
    core.unlink("/f")
    assert core.read(fh, 0, B + 1) == pattern(B + 1)
    core.release(fh)
    assert core.data.exists(a.ino)
    core.vfs.forget([(a.ino, core.vfs.lookups[a.ino])])
    assert not core.data.exists(a.ino)
    assert stored_digests(core.meta, a.ino) == {}


# --- inline small files (dfs/meta/schema.py: INLINE_MAX) ---------------------------------


def test_small_file_stays_inline_and_grows_into_a_data_file(core: Core) -> None:
    fh, a = core.create("/f")
    core.write(fh, 0, b"head")
    assert not core.data.exists(a.ino)
    assert core.resolve("/f").blocks == 8
    tail = pattern(100)
    core.write(fh, S.INLINE_MAX - 2, tail)  # crosses the limit: moves to the data store
    assert core.data.exists(a.ino)
    want = b"head" + bytes(S.INLINE_MAX - 6) + tail
    assert core.read(fh, 0, len(want) + 10) == want
    core.release(fh)
    assert core.read_file("/f") == want
    assert core.resolve("/f").size == len(want)


def test_truncate_inline_file(core: Core) -> None:
    core.write_file("/f", b"0123456789")
    core.truncate("/f", 4)
    assert core.read_file("/f") == b"0123"
    core.truncate("/f", 8)
    assert core.read_file("/f") == b"0123" + bytes(4)
    ino = core.ino("/f")
    core.truncate("/f", S.INLINE_MAX + 1)  # past the limit: a data file, sparse
    assert core.data.exists(ino)
    assert core.read_file("/f") == b"0123" + bytes(S.INLINE_MAX - 3)
    core.truncate("/f", 2)  # a data-file file that shrinks stays in its data file
    assert core.read_file("/f") == b"01"
    core.truncate("/f", 0)
    assert core.read_file("/f") == b""


def test_empty_file_extended_is_a_hole(core: Core) -> None:
    fh, a = core.create("/f")
    core.release(fh)
    core.truncate("/f", 10_000)
    assert core.resolve("/f").blocks == 0
    assert core.read_file("/f") == bytes(10_000)
    assert not core.data.exists(a.ino)


def test_inline_file_open_twice(core: Core) -> None:
    fh1, _ = core.create("/f")
    fh2 = core.open("/f")
    core.write(fh1, 0, b"aaaa")
    core.write(fh2, 2, b"bb")
    assert core.read(fh1, 0, 10) == b"aabb"
    core.write(fh2, 0, pattern(S.INLINE_MAX + 5))
    assert core.read(fh1, 0, S.INLINE_MAX + 5) == pattern(S.INLINE_MAX + 5)
    core.release(fh1)
    core.release(fh2)


def test_fsync_of_a_new_data_file_syncs_its_directory(
    core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data file's directory entry must be durable too: synced once, at the first fsync."""
    synced: list[int] = []
    monkeypatch.setattr(core.data, "sync_dirs", synced.append)
    fh, a = core.create("/big")
    core.write(fh, 0, pattern(S.INLINE_MAX + 1))  # past the inline limit: a new data file
    core.fsync(fh)
    core.fsync(fh)
    core.release(fh)
    assert synced == [a.ino]
    small, b = core.create("/small")
    core.write(small, 0, b"inline")
    core.fsync(small)
    core.release(small)
    assert synced == [a.ino]  # an inline file has no data file to sync


@pytest.mark.parametrize("size", [100, 3 * B])  # an inline file, and one with a data file
def test_truncate_that_changes_the_size_changes_mtime_and_ctime(core: Core, size: int) -> None:
    """(A data file's truncate commits the new size first: the check whether the size
    changed once read that, and kept the old times. The kernel's writeback cache hid it on
    one node; cluster nodes, which have none, showed the old mtime.)"""
    now = [1_000_000_000_000_000_000]
    core.vfs.clock = core.vfs.files.clock = lambda: now[0]
    core.write_file("/f", pattern(size))
    now[0] += 5_000_000_000
    a = core.truncate("/f", 10)
    assert (a.size, a.mtime_ns, a.ctime_ns) == (10, now[0], now[0])
    now[0] += 5_000_000_000
    b = core.truncate("/f", 10)  # the same size: no time changes (as ext4 with writeback)
    assert (b.mtime_ns, b.ctime_ns) == (a.mtime_ns, a.ctime_ns)
