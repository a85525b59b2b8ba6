"""The checker finds deliberate damage, and repair fixes it without losing user data."""

from __future__ import annotations

import errno
import os
import random
import stat
from typing import Any

import msgpack
import pytest

from dfs.check.checker import Finding, check, stored_digests
from dfs.check.repair import repair
from dfs.check.scan import build_index
from dfs.data.store import DataStore
from dfs.errors import FsError
from dfs.hashing import BLOCK_SIZE
from dfs.meta import schema as S
from dfs.types import COUNTER_MASK, ROOT_INODE, Attr, InodeId
from tests.core.harness import Core

B = BLOCK_SIZE


def contents(core: Core) -> dict[int, bytes]:
    """Every regular file's bytes, by inode, read straight from the stores."""
    out = {}
    for ino, info in build_index(core.meta).inodes.items():
        if info.is_reg:
            fd = core.data.open(ino, create=False)
            try:
                out[ino] = DataStore.pread(fd, 0, info.size, info.size)
            finally:
                if fd is not None:
                    os.close(fd)
    return out


def codes(findings: list[Finding]) -> set[tuple[str, int]]:
    return {(f.code, f.ino) for f in findings}


def edit_inode(core: Core, ino: int, **changes: Any) -> None:
    with core.meta.write() as txn:
        a = S.unpack_inode(ino, txn.get(S.inode_key(ino), db=core.meta.inodes))
        for k, v in changes.items():
            setattr(a, k, v)
        txn.put(S.inode_key(ino), S.pack_inode(a), db=core.meta.inodes)


def inode(core: Core, ino: int) -> Attr:
    return core.vfs.getattr(InodeId(ino))


def drop_name(core: Core, parent: int, name: bytes, *, dirpos: bool = True) -> None:
    with core.meta.write() as txn:
        raw = txn.get(S.dirent_key(parent, name), db=core.meta.dirents)
        cookie = S.unpack_dirent(raw)[1]
        txn.delete(S.dirent_key(parent, name), db=core.meta.dirents)
        if dirpos:
            txn.delete(S.dirpos_key(parent, cookie), db=core.meta.dirpos)


def repair_all(core: Core) -> list[str]:
    """Repair everything found; afterwards the checker must find nothing."""
    done = repair(core.meta, core.data, core.findings())
    left = core.findings()
    assert left == [], "left after repair:\n" + "\n".join(map(str, left))
    return done


@pytest.fixture
def tree(core: Core) -> Core:
    """A small tree with every kind of inode, settled."""
    core.mkdir("/d")
    core.mkdir("/d/sub")
    core.write_file("/d/sub/deep", b"deep data")
    core.write_file("/d/f", bytes(range(256)) * 600)  # 2+ blocks
    core.write_file("/top", b"top")
    core.link("/top", "/d/hard")
    core.symlink("/d/link", b"../top")
    core.vfs.setxattr(core.ino("/top"), b"user.k", b"v")
    core.vfs.mknod(ROOT_INODE, b"fifo", stat.S_IFIFO | 0o644, 0, core.ctx)
    core.settle()
    assert core.findings() == []
    return core


def test_clean_tree_has_no_findings(tree: Core) -> None:
    assert check(tree.meta, tree.data) == []
    assert repair(tree.meta, tree.data, []) == []


def test_flipped_data_byte(tree: Core) -> None:
    ino = tree.ino("/d/f")
    path = tree.data.path(ino)
    raw = bytearray(path.read_bytes())
    raw[B + 7] ^= 0x01
    path.write_bytes(bytes(raw))
    before = contents(tree)
    findings = tree.findings()
    assert [(f.code, f.ino, f.value) for f in findings] == [("checksum-mismatch", ino, 1)]
    assert tree.findings(verify_data=False) == []
    done = repair_all(tree)
    assert any("contents unverified" in line for line in done)
    assert contents(tree) == before  # the data itself is not rewritten


def test_deleted_dirent_of_file(tree: Core) -> None:
    ino = tree.ino("/d/f")
    before = contents(tree)
    drop_name(tree, tree.ino("/d"), b"f", dirpos=False)
    assert codes(tree.findings()) == {("dirpos-stale", tree.ino("/d")), ("unreachable", ino)}
    repair_all(tree)
    assert tree.ino(f"/lost+found/#{ino:x}") == ino
    assert contents(tree) == before
    assert inode(tree, ino).nlink == 1


def test_orphaned_directory_goes_to_lost_and_found(tree: Core) -> None:
    d = tree.ino("/d")
    before = contents(tree)
    drop_name(tree, ROOT_INODE, b"d")
    found = codes(tree.findings())
    assert found == {("unreachable", d), ("nlink-mismatch", ROOT_INODE)}
    repair_all(tree)
    assert tree.ino(f"/lost+found/#{d:x}") == d
    assert tree.read_file(f"/lost+found/#{d:x}/sub/deep") == b"deep data"
    assert inode(tree, d).parent == tree.ino("/lost+found")
    assert contents(tree) == before


def test_broken_link_counts(tree: Core) -> None:
    top, d = tree.ino("/top"), tree.ino("/d")
    edit_inode(tree, top, nlink=7)
    edit_inode(tree, d, nlink=2)
    edit_inode(tree, ROOT_INODE, nlink=9)
    assert codes(tree.findings()) == {
        ("nlink-mismatch", top),
        ("nlink-mismatch", d),
        ("nlink-mismatch", ROOT_INODE),
    }
    repair_all(tree)
    assert inode(tree, top).nlink == 2
    assert inode(tree, d).nlink == 3
    assert inode(tree, ROOT_INODE).nlink == 3  # ., .., d


def test_nlink_zero_without_orphan_record(tree: Core) -> None:
    """A nameless inode with link count 0 that is not an orphan is kept, not purged."""
    ino = tree.ino("/d/sub/deep")
    drop_name(tree, tree.ino("/d/sub"), b"deep")
    edit_inode(tree, ino, nlink=0)
    assert codes(tree.findings()) == {("nlink0-not-orphan", ino)}
    repair_all(tree)
    assert tree.read_file(f"/lost+found/#{ino:x}") == b"deep data"


def test_dangling_dirent_and_stray_records(tree: Core) -> None:
    """An inode record lost: its name is removed and its data adopted into lost+found."""
    ino = tree.ino("/d/f")
    data = tree.read_file("/d/f")
    with tree.meta.write() as txn:
        txn.delete(S.inode_key(ino), db=tree.meta.inodes)
        txn.put(S.xattr_key(ino, b"user.x"), b"1", db=tree.meta.xattrs)
    found = {f.code for f in tree.findings()}
    assert found == {"dangling-dirent", "stray-record", "stray-data-file"}
    done = repair_all(tree)
    assert "f" not in tree.names("/d")
    assert tree.read_file(f"/lost+found/#{ino:x}") == data
    assert any("adopted" in line for line in done)


def test_missing_and_stale_dirpos(tree: Core) -> None:
    d = tree.ino("/d")
    with tree.meta.write() as txn:
        _, cookie = S.unpack_dirent(txn.get(S.dirent_key(d, b"f"), db=tree.meta.dirents))
        txn.delete(S.dirpos_key(d, cookie), db=tree.meta.dirpos)
        txn.put(S.dirpos_key(d, cookie - 1 if cookie > 3 else 10**6), b"ghost", db=tree.meta.dirpos)
    found = {f.code for f in tree.findings()}
    assert "dirpos-missing" in found and "dirpos-stale" in found
    assert "f" not in tree.names("/d")  # readdir cannot see it
    repair_all(tree)
    assert "f" in tree.names("/d") and "ghost" not in tree.names("/d")


def test_directory_cycle(tree: Core) -> None:
    """Two directories that name each other and nothing else: both reconnected."""
    a, b = tree.mkdir("/a").ino, tree.mkdir("/a/b").ino
    drop_name(tree, ROOT_INODE, b"a")
    with tree.meta.write() as txn:
        cookie = tree.meta.new_cookie(txn)
        txn.put(S.dirent_key(b, b"loop"), S.pack_dirent(a, cookie), db=tree.meta.dirents)
        txn.put(S.dirpos_key(b, cookie), b"loop", db=tree.meta.dirpos)
    edit_inode(tree, a, parent=b)
    found = {f.code for f in tree.findings()}
    assert "dir-cycle" in found
    repair_all(tree)
    lf = tree.names("/lost+found")
    assert len(lf) == 1
    top = tree.resolve(f"/lost+found/{lf[0]}")
    inner = tree.names(f"/lost+found/{lf[0]}")
    assert len(inner) == 1
    assert {top.ino, tree.ino(f"/lost+found/{lf[0]}/{inner[0]}")} == {a, b}


def test_directory_with_two_names(tree: Core) -> None:
    sub = tree.ino("/d/sub")
    with tree.meta.write() as txn:
        cookie = tree.meta.new_cookie(txn)
        txn.put(
            S.dirent_key(ROOT_INODE, b"alias"), S.pack_dirent(sub, cookie), db=tree.meta.dirents
        )
        txn.put(S.dirpos_key(ROOT_INODE, cookie), b"alias", db=tree.meta.dirpos)
    found = {f.code for f in tree.findings()}
    assert "dir-multiple-names" in found
    repair_all(tree)
    assert "alias" not in tree.names()  # the name matching its parent field is kept
    assert tree.read_file("/d/sub/deep") == b"deep data"


def test_wrong_parent_field(tree: Core) -> None:
    sub = tree.ino("/d/sub")
    edit_inode(tree, sub, parent=ROOT_INODE)
    assert codes(tree.findings()) == {("dir-parent", sub)}
    repair_all(tree)
    assert inode(tree, sub).parent == tree.ino("/d")


def test_counters_behind(tree: Core) -> None:
    top_counter = max(ino & COUNTER_MASK for ino in build_index(tree.meta).inodes)
    with tree.meta.write() as txn:
        txn.put(S.META_NEXT_COUNTER, S.u64(1), db=tree.meta.meta)
        txn.put(S.META_NEXT_COOKIE, S.u64(3), db=tree.meta.meta)
    assert {f.code for f in tree.findings()} == {"counter-ahead", "cookie-ahead"}
    repair_all(tree)
    tree.crash()  # a new process reads the repaired counters from disk
    new = tree.write_file("/new", b"n")
    assert new.ino & COUNTER_MASK > top_counter
    entries = list(tree.vfs.readdir(ROOT_INODE))
    assert len({e.cookie for e in entries}) == len(entries)
    assert tree.read_file("/top") == b"top"


def test_digest_records(tree: Core) -> None:
    f = tree.ino("/d/f")
    with tree.meta.write() as txn:
        txn.delete(S.block_key(f, 0), db=tree.meta.blocks)
        txn.put(S.block_key(f, 50), S.pack_digest(1), db=tree.meta.blocks)
        txn.put(S.block_key(tree.ino("/d"), 0), S.pack_digest(1), db=tree.meta.blocks)
    assert [(x.code, x.ino) for x in tree.findings()] == [
        ("stray-record", tree.ino("/d")),
        ("digest-past-eof", f),
        ("unchecksummed-block", f),
    ]
    repair_all(tree)
    assert set(stored_digests(tree.meta, f)) == {0, 1, 2}


def test_data_past_eof(tree: Core) -> None:
    ino = tree.ino("/d/f")
    size = tree.vfs.getattr(ino).size
    with open(tree.data.path(ino), "ab") as fobj:
        fobj.write(b"garbage")
    assert codes(tree.findings()) == {("data-past-eof", ino)}
    repair_all(tree)
    assert tree.data.path(ino).stat().st_size == size
    assert tree.read_file("/d/f") == bytes(range(256)) * 600


def test_inline_file_with_a_leftover_data_file(tree: Core) -> None:
    """A move to the data store interrupted after the data file was written: inline wins."""
    ino = tree.ino("/top")
    assert not tree.data.exists(ino)
    tree.data.path(ino).write_bytes(b"top")
    with tree.meta.write() as txn:
        txn.put(S.dirty_key(ino), b"", db=tree.meta.dirty)
    assert codes(tree.findings()) == {
        ("inline-and-data-file", ino),
        ("dirty-unsettled", ino),
    }
    repair_all(tree)
    assert not tree.data.exists(ino)
    assert tree.read_file("/top") == b"top"


def test_corrupted_inline_contents(tree: Core) -> None:
    ino = tree.ino("/top")
    with tree.meta.write() as txn:
        txn.put(S.inline_key(ino), b"tOp", db=tree.meta.inline)
    assert codes(tree.findings()) == {("checksum-mismatch", ino)}
    fh = tree.open("/top")
    try:
        with pytest.raises(FsError) as err:
            tree.read(fh, 0, 3)
        assert err.value.errno == errno.EIO
    finally:
        tree.release(fh)
    with tree.meta.write() as txn:
        txn.put(S.inline_key(ino), b"top" + b"x", db=tree.meta.inline)
    assert ("inline-size", ino) in codes(tree.findings())
    with tree.meta.write() as txn:
        txn.put(S.inline_key(ino), b"top", db=tree.meta.inline)
    assert tree.findings() == []


def test_unsettled_dirty_record(tree: Core) -> None:
    ino = tree.ino("/d/f")
    with open(tree.data.path(ino), "r+b") as fobj:
        fobj.write(b"rewritten")
    with tree.meta.write() as txn:
        txn.put(S.dirty_key(ino), b"", db=tree.meta.dirty)
    assert codes(tree.findings()) == {("dirty-unsettled", ino)}
    repair_all(tree)
    assert tree.read_file("/d/f").startswith(b"rewritten")


def test_orphan_records(tree: Core) -> None:
    top = tree.ino("/top")
    with tree.meta.write() as txn:
        txn.put(S.orphan_key(top), b"", db=tree.meta.orphans)  # orphan that still has names
        txn.put(S.orphan_key(0xDEAD), b"", db=tree.meta.orphans)  # orphan of nothing
    assert codes(tree.findings()) == {("orphan-linked", top), ("stray-record", 0xDEAD)}
    repair_all(tree)
    tree.vfs.recover()  # would purge orphans: /top must survive
    assert tree.read_file("/top") == b"top"


def test_symlink_records(tree: Core) -> None:
    link = tree.ino("/d/link")
    top = tree.ino("/top")
    edit_inode(tree, link, size=99)
    with tree.meta.write() as txn:
        txn.put(S.symlink_key(top), b"nonsense", db=tree.meta.symlinks)
    assert codes(tree.findings()) == {("symlink-size", link), ("stray-record", top)}
    repair_all(tree)
    assert tree.vfs.readlink(link) == b"../top"
    assert inode(tree, link).size == 6


def test_unrepairable_symlink_without_target(tree: Core) -> None:
    link = tree.ino("/d/link")
    with tree.meta.write() as txn:
        txn.delete(S.symlink_key(link), db=tree.meta.symlinks)
    findings = tree.findings()
    assert [(f.code, f.repairable) for f in findings] == [("symlink-no-target", False)]
    repair(tree.meta, tree.data, findings)
    assert [f.code for f in tree.findings()] == ["symlink-no-target"]
    with tree.meta.write() as txn:  # put it back for the teardown check
        txn.put(S.symlink_key(link), b"../top", db=tree.meta.symlinks)


def test_journal_records(tree: Core) -> None:
    with tree.meta.write() as txn:
        seq = S.read_u64(txn.get(S.seq_key(1), db=tree.meta.meta))
        record = msgpack.packb({"op": "create", "ws": []})
        txn.put(S.journal_key(1, seq + 5), record, db=tree.meta.journal)
        txn.put(S.journal_key(77, 1), record, db=tree.meta.journal)
        txn.put(b"short", b"", db=tree.meta.journal)
    found = {f.code for f in tree.findings()}
    assert found == {"journal-seq-ahead", "journal-bad-key"}
    repair_all(tree)
    assert tree.meta.seq(1) == seq + 5  # type: ignore[arg-type]
    tree.write_file("/after", b"x")  # the next update gets a fresh sequence number
    assert tree.meta.seq(1) == seq + 7  # type: ignore[arg-type]


def test_missing_root_is_recreated(tree: Core) -> None:
    with tree.meta.write() as txn:
        txn.delete(S.inode_key(ROOT_INODE), db=tree.meta.inodes)
    assert "root-missing" in {f.code for f in tree.findings()}
    repair_all(tree)
    assert tree.read_file("/d/sub/deep") == b"deep data"


def test_repair_on_live_store_with_open_files(core: Core) -> None:
    """The checker tolerates what a running node legitimately has: dirty files, orphans."""
    fh, a = core.create("/f")
    core.write(fh, 0, b"x" * (B + 1))
    core.unlink("/f")
    assert [f.code for f in core.findings()] == ["dirty-unsettled"]
    core.release(fh)
    assert core.findings() == []
    assert inode(core, a.ino).nlink == 0


def _corruptions(core: Core, rnd: random.Random) -> list[str]:
    """Apply a few random kinds of metadata damage that destroy no contents."""
    idx = build_index(core.meta)
    inos = sorted(i for i in idx.inodes if i != ROOT_INODE)
    dirs = sorted(i for i, info in idx.inodes.items() if info.is_dir)
    named = sorted((p, n) for where in idx.names.values() for p, n in where)
    done = []
    for _ in range(rnd.randint(1, 4)):
        kind = rnd.choice(
            [
                "drop-name",
                "drop-pos",
                "nlink",
                "parent",
                "orphan",
                "digest",
                "tail",
                "alias",
                "counters",
            ]
        )
        done.append(kind)
        with core.meta.write() as txn:
            if kind in ("drop-name", "drop-pos") and named:
                p, n = rnd.choice(named)
                raw = txn.get(S.dirent_key(p, n), db=core.meta.dirents)
                if raw is None:
                    continue
                cookie = S.unpack_dirent(raw)[1]
                if kind == "drop-name":
                    txn.delete(S.dirent_key(p, n), db=core.meta.dirents)
                txn.delete(S.dirpos_key(p, cookie), db=core.meta.dirpos)
            elif kind in ("nlink", "parent"):
                ino = rnd.choice(dirs if kind == "parent" else inos + [ROOT_INODE])
                a = S.unpack_inode(ino, txn.get(S.inode_key(ino), db=core.meta.inodes))
                if kind == "nlink":
                    a.nlink = rnd.randint(0, 9)
                else:
                    a.parent = InodeId(rnd.choice(inos + [0xBAD]))
                txn.put(S.inode_key(ino), S.pack_inode(a), db=core.meta.inodes)
            elif kind == "orphan":
                txn.put(S.orphan_key(rnd.choice(inos)), b"", db=core.meta.orphans)
            elif kind == "digest":
                cur = txn.cursor(db=core.meta.blocks)
                keys = list(cur.iternext(values=False))
                if keys:
                    txn.delete(rnd.choice(keys), db=core.meta.blocks)
            elif kind == "tail":
                ino = rnd.choice([i for i in inos if idx.inodes[i].is_reg])
                with open(core.data.path(ino), "ab") as f:
                    f.write(b"junk")
            elif kind == "alias":
                d, where = rnd.choice(dirs[1:]), rnd.choice(dirs)
                cookie = core.meta.new_cookie(txn)
                txn.put(
                    S.dirent_key(where, b"alias"), S.pack_dirent(d, cookie), db=core.meta.dirents
                )
                txn.put(S.dirpos_key(where, cookie), b"alias", db=core.meta.dirpos)
            else:
                txn.put(S.META_NEXT_COOKIE, S.u64(5), db=core.meta.meta)
    return done


@pytest.mark.parametrize("seed", range(12))
def test_random_damage_is_repaired_without_loss(tree: Core, seed: int) -> None:
    for i in range(3):
        tree.mkdir(f"/r{i}")
        tree.mkdir(f"/r{i}/s")
        tree.write_file(f"/r{i}/s/file", bytes([i]) * (B + i))
    tree.settle()
    before = contents(tree)
    rnd = random.Random(seed)
    kinds = _corruptions(tree, rnd)
    findings = tree.findings()
    print(seed, kinds, [(f.code, hex(f.ino)) for f in findings])
    repair_all(tree)
    assert contents(tree) == before, kinds  # every file kept, byte for byte
    assert build_index(tree.meta).lost() == set()
