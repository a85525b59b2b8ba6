"""Start-up recovery after a crash: unsettled checksums are settled, orphans reclaimed."""

from __future__ import annotations

from dfs.check.checker import stored_digests
from dfs.hashing import BLOCK_SIZE, block_digest
from dfs.meta import schema as S
from tests.core.harness import Core

B = BLOCK_SIZE


def test_crash_with_unsettled_writes(core: Core) -> None:
    fh, a = core.create("/f")
    core.write(fh, 0, b"A" * (2 * B))
    core.release(fh)
    fh = core.open("/f")
    core.write(fh, 10, b"new")  # partial block: digest not settled before the crash
    core.write(fh, 2 * B, b"tail")
    core.crash()
    assert {f.code for f in core.findings()} == {"dirty-unsettled"}
    assert core.vfs.recover() == (0, 1)
    expect = b"A" * 10 + b"new" + b"A" * (2 * B - 13) + b"tail"
    assert core.read_file("/f") == expect
    assert stored_digests(core.meta, a.ino) == {
        0: block_digest(expect[:B]),
        1: block_digest(expect[B : 2 * B]),
        2: block_digest(b"tail"),
    }


def test_crash_with_open_unlinked_file(core: Core) -> None:
    fh, a = core.create("/f")
    core.write(fh, 0, b"x" * 1000)
    core.unlink("/f")
    core.crash()
    # nobody references the orphan any more: recovery reclaims it
    assert core.vfs.recover() == (1, 0)
    assert not core.data.exists(a.ino)
    assert core.names() == []


def test_crash_after_metadata_only(core: Core) -> None:
    core.mkdir("/d")
    core.write_file("/d/f", b"settled")
    core.symlink("/d/l", b"f")
    core.rename("/d/f", "/d/g")
    core.crash()
    assert core.findings() == []
    assert core.vfs.recover() == (0, 0)
    assert core.read_file("/d/g") == b"settled"


def test_crash_between_data_and_metadata_is_repaired(core: Core) -> None:
    """Bytes written past EOF whose size update never committed are cut off by recovery."""
    base = b"x" * S.INLINE_MAX  # large enough to live in a data file
    fh, a = core.create("/f")
    core.write(fh, 0, base + b"12345")
    core.fsync(fh)
    core.write(fh, 0, b"abcde")  # records the dirty intent
    # the daemon died after pwrite() extended the file but before the size commit
    with open(core.data.path(a.ino), "r+b") as f:
        f.seek(len(base) + 5)
        f.write(b"lost")
    core.crash()
    codes = {f.code for f in core.findings()}
    assert codes == {"dirty-unsettled", "data-past-eof"}
    core.vfs.recover()
    assert core.read_file("/f") == b"abcde" + base[5:] + b"12345"
    assert core.data.path(a.ino).stat().st_size == len(base) + 5


def test_recover_twice_is_harmless(core: Core) -> None:
    big = b"data" * S.INLINE_MAX
    fh, _ = core.create("/f")
    core.write(fh, 0, big)
    core.crash()
    assert core.vfs.recover() == (0, 1)
    assert core.vfs.recover() == (0, 0)
    assert core.read_file("/f") == big


def test_inline_writes_need_no_recovery(core: Core) -> None:
    """Small files are written with their metadata in one transaction: nothing to settle."""
    fh, a = core.create("/small")
    core.write(fh, 0, b"hello")
    core.write(fh, 10, b"world")  # a gap reads as zeros
    core.crash()
    assert core.findings() == []
    assert core.vfs.recover() == (0, 0)
    assert core.read_file("/small") == b"hello" + bytes(5) + b"world"
    assert not core.data.exists(a.ino)


def test_interrupted_move_out_of_inline(core: Core) -> None:
    """Killed after the data file was written but before the inline record went: inline wins."""
    core.write_file("/f", b"small")
    ino = core.ino("/f")
    with core.meta.write() as txn:
        txn.put(S.dirty_key(ino), b"", db=core.meta.dirty)
    core.data.path(ino).write_bytes(b"small")
    core.crash()
    assert core.vfs.recover() == (0, 1)
    assert not core.data.exists(ino)
    assert core.read_file("/f") == b"small"
