"""Repairs for the checker's findings: fix what is safely fixable, never delete user data.

``repair(meta, data, findings)`` applies one fix per repairable finding, in
an order where earlier fixes cannot be undone by later ones (counters first,
then stray records, directory entries, names, reconnection, link counts, and
file contents last), then re-checks the namespace and fixes what those fixes
made necessary (a link count after an entry was dropped, a subtree that lost
its only name). Afterwards ``check()`` reports no repairable finding.

Safety rules:
  * Nothing reachable or holding data is deleted, nor queued for purging: an
    orphan record is only trusted on an inode with no name and link count 0. Inodes that cannot be
    reached from the root are moved into ``/lost+found`` (created if needed)
    under ``#<ino in hex>``; a data file whose inode is gone is adopted there
    as a new regular file. Only records that describe nothing (entries naming
    missing inodes, records of missing inodes, digests past EOF) are deleted.
  * Contents are never rewritten, except that bytes past the end of a file
    (invisible to readers) are cut off. A block whose checksum does not match
    gets the digest of what is on disk now, and the repair says so: the data
    may be corrupt, only the checksum was fixed.
  * Repairs are local fixes of this node's store and are not journaled as
    volume updates (only creating ``lost+found`` is an ordinary mkdir).
"""

from __future__ import annotations

import os
import stat
from collections import defaultdict
from collections.abc import Callable

from dfs.check.checker import Finding, check
from dfs.check.scan import Index, build_index, get
from dfs.data.store import DataStore
from dfs.errors import FsError
from dfs.fs.blocks import read_block
from dfs.fs.ctx import ROOT_CTX
from dfs.fs.files import FileIO
from dfs.fs.vfs import Vfs
from dfs.hashing import block_digest
from dfs.meta import schema as S
from dfs.meta.store import MetaStore, Txn, WriteTxn
from dfs.types import ROOT_INODE, ROOT_VOLUME, Attr, InodeId, VolumeId

LOST_FOUND = b"lost+found"
MAX_ROUNDS = 8

# Findings that fixing others can cause; the re-check after a repair fixes these too.
_NAMESPACE = frozenset(
    {
        "counter-ahead",
        "cookie-ahead",
        "dirpos-stale",
        "dirpos-missing",
        "root-named",
        "dir-multiple-names",
        "dir-parent",
        "unreachable",
        "dir-cycle",
        "nlink0-not-orphan",
        "orphan-linked",
        "orphan-nlink",
        "nlink-mismatch",
    }
)


def repair(meta: MetaStore, data: DataStore, findings: list[Finding]) -> list[str]:
    """Fix every repairable finding; returns one line per thing done (or found unfixable)."""
    r = _Repairer(meta, data)
    r.apply([f for f in findings if f.repairable])
    for _ in range(MAX_ROUNDS):
        fresh = [
            f for f in check(meta, data, verify_data=False) if f.repairable and f.code in _NAMESPACE
        ]
        if not fresh:
            break
        r.apply(fresh)
    return r.done


class _Repairer:
    def __init__(self, meta: MetaStore, data: DataStore) -> None:
        self.meta = meta
        self.data = data
        self.done: list[str] = []
        self.handlers: list[tuple[frozenset[str], Callable[[list[Finding]], None]]] = [
            (frozenset({"counter-ahead", "cookie-ahead", "journal-seq-ahead"}), self._counters),
            (
                frozenset(
                    {"journal-bad-key", "journal-bad-record", "stray-record", "digest-past-eof"}
                ),
                self._delete_records,
            ),
            (frozenset({"root-missing"}), self._root),
            (
                frozenset(
                    {"dirent-malformed", "dirent-bad-name", "dirent-bad-parent", "dangling-dirent"}
                ),
                self._drop_dirents,
            ),
            (frozenset({"root-named"}), self._unname_root),
            (frozenset({"dirpos-stale"}), self._delete_records),
            (frozenset({"dirpos-missing", "bad-cookie"}), self._readd_dirpos),
            (frozenset({"dir-multiple-names"}), self._one_name),
            (frozenset({"dir-parent"}), self._set_parent),
            (frozenset({"stray-data-file"}), self._adopt_data),
            (frozenset({"unreachable", "dir-cycle", "nlink0-not-orphan"}), self._reconnect),
            (frozenset({"orphan-linked", "orphan-nlink"}), self._unorphan),
            (frozenset({"nlink-mismatch"}), self._recount),
            (frozenset({"symlink-size"}), self._symlink_size),
            (frozenset({"data-past-eof"}), self._truncate),
            (frozenset({"dirty-unsettled", "inline-and-data-file"}), self._rechecksum),
            (frozenset({"checksum-mismatch", "unchecksummed-block"}), self._rehash),
        ]

    def apply(self, findings: list[Finding]) -> None:
        by_code: dict[str, list[Finding]] = defaultdict(list)
        for f in findings:
            by_code[f.code].append(f)
        known: set[str] = set()
        for codes, handler in self.handlers:
            known |= codes
            batch = [f for c in sorted(codes) for f in by_code.get(c, [])]
            if batch:
                handler(batch)
        for code in sorted(set(by_code) - known):
            self.done.append(f"{code}: no repair known; left as it is")

    # --- helpers ------------------------------------------------------------------------

    def _inode(self, txn: Txn, ino: int) -> Attr | None:
        raw = get(txn, S.inode_key(ino), self.meta.inodes)
        try:
            return None if raw is None else S.unpack_inode(ino, raw)
        except Exception:  # noqa: BLE001 - a malformed record is left alone
            return None

    def _put_inode(self, txn: WriteTxn, a: Attr) -> None:
        txn.put(S.inode_key(a.ino), S.pack_inode(a), db=self.meta.inodes)

    def _drop_entry(self, txn: WriteTxn, parent: int, name: bytes) -> None:
        """Delete one directory entry and its readdir position (if that names it)."""
        key = S.dirent_key(parent, name)
        raw = get(txn, key, self.meta.dirents)
        if raw is not None and len(raw) == 16:
            cookie = S.unpack_dirent(raw)[1]
            if get(txn, S.dirpos_key(parent, cookie), self.meta.dirpos) == name:
                txn.delete(S.dirpos_key(parent, cookie), db=self.meta.dirpos)
        txn.delete(key, db=self.meta.dirents)

    def _add_entry(self, txn: WriteTxn, parent: int, name: bytes, child: int) -> None:
        cookie = self.meta.new_cookie(txn)
        txn.put(S.dirent_key(parent, name), S.pack_dirent(child, cookie), db=self.meta.dirents)
        txn.put(S.dirpos_key(parent, cookie), name, db=self.meta.dirpos)

    @staticmethod
    def _show(name: bytes) -> str:
        return name.decode(errors="backslashreplace")

    # --- counters and records -----------------------------------------------------------

    def _counters(self, fs: list[Finding]) -> None:
        with self.meta.write(record=False) as txn:
            for f in fs:
                assert f.value is not None
                if f.code == "counter-ahead":
                    self.meta.raise_counters(txn, counter=f.value)
                    self.done.append(f"raised next_counter to {f.value}")
                elif f.code == "cookie-ahead":
                    self.meta.raise_counters(txn, cookie=f.value)
                    self.done.append(f"raised next_cookie to {f.value}")
                else:
                    assert f.where is not None
                    vol = S.journal_of_key(f.where[1])[0]
                    self.meta.raise_counters(txn, seq=(VolumeId(vol), f.value))
                    self.done.append(f"raised the sequence of volume {vol} to {f.value}")

    def _delete_records(self, fs: list[Finding]) -> None:
        with self.meta.write(record=False) as txn:
            for f in fs:
                assert f.where is not None
                db_name, key = f.where
                txn.delete(key, db=self.meta.dbs[db_name])
                self.done.append(f"deleted {db_name} record {key.hex()} ({f.message})")

    def _root(self, fs: list[Finding]) -> None:
        now = self.meta.clock()
        root = Attr(
            ROOT_INODE,
            0o40755,
            0,
            0,
            2,
            0,
            now,
            now,
            now,
            now,
            parent=ROOT_INODE,
            volume=ROOT_VOLUME,
        )
        with self.meta.write(record=False) as txn:
            if self._inode(txn, ROOT_INODE) is None:
                self._put_inode(txn, root)
                self.done.append("recreated the root directory (mode 755, owner root)")

    # --- directory entries ----------------------------------------------------------------

    def _drop_dirents(self, fs: list[Finding]) -> None:
        with self.meta.write(record=False) as txn:
            for f in fs:
                assert f.where is not None
                key = f.where[1]
                if len(key) > 8:
                    self._drop_entry(txn, S.read_u64(key[:8]), key[8:])
                else:
                    txn.delete(key, db=self.meta.dirents)
                self.done.append(f"removed entry {key[8:]!r} of {f.ino:#x} ({f.message})")

    def _unname_root(self, fs: list[Finding]) -> None:
        idx = build_index(self.meta)
        with self.meta.write(record=False) as txn:
            for parent, name in idx.names.get(ROOT_INODE, []):
                self._drop_entry(txn, parent, name)
                self.done.append(f"removed entry {self._show(name)!r} of {parent:#x} naming /")

    def _readd_dirpos(self, fs: list[Finding]) -> None:
        with self.meta.write(record=False) as txn:
            for f in fs:
                assert f.where is not None
                key = f.where[1]
                parent, name = S.read_u64(key[:8]), key[8:]
                raw = get(txn, key, self.meta.dirents)
                if raw is None or len(raw) != 16:
                    continue
                child, cookie = S.unpack_dirent(raw)
                pos = S.dirpos_key(parent, cookie)
                if cookie >= S.FIRST_COOKIE and get(txn, pos, self.meta.dirpos) is None:
                    txn.put(pos, name, db=self.meta.dirpos)
                    self.meta.raise_counters(txn, cookie=cookie)
                    self.done.append(
                        f"restored readdir position {cookie} of {self._show(name)!r} in {parent:#x}"
                    )
                    continue
                if get(txn, pos, self.meta.dirpos) == name:
                    txn.delete(pos, db=self.meta.dirpos)
                new = self.meta.new_cookie(txn)
                txn.put(key, S.pack_dirent(child, new), db=self.meta.dirents)
                txn.put(S.dirpos_key(parent, new), name, db=self.meta.dirpos)
                self.done.append(
                    f"gave entry {self._show(name)!r} in {parent:#x} the new readdir position "
                    f"{new} (was {cookie})"
                )

    def _one_name(self, fs: list[Finding]) -> None:
        idx = build_index(self.meta)
        with self.meta.write(record=False) as txn:
            for f in fs:
                a = self._inode(txn, f.ino)
                names = idx.names.get(f.ino, [])
                if a is None or len(names) < 2:
                    continue
                keep = next((n for n in names if n[0] == a.parent), names[0])
                for parent, name in names:
                    if (parent, name) != keep:
                        self._drop_entry(txn, parent, name)
                        self.done.append(
                            f"removed extra name {self._show(name)!r} in {parent:#x} of "
                            f"directory {f.ino:#x}"
                        )
                a.parent = InodeId(keep[0])
                self._put_inode(txn, a)

    def _set_parent(self, fs: list[Finding]) -> None:
        with self.meta.write(record=False) as txn:
            for f in fs:
                a = self._inode(txn, f.ino)
                if a is None or f.value is None:
                    continue
                a.parent = InodeId(f.value)
                self._put_inode(txn, a)
                self.done.append(f"set parent of directory {f.ino:#x} to {f.value:#x}")

    # --- reconnecting ------------------------------------------------------------------------

    def _lost_found(self) -> int | None:
        name = LOST_FOUND
        for i in range(100):
            with self.meta.read() as txn:
                raw = get(txn, S.dirent_key(ROOT_INODE, name), self.meta.dirents)
                if raw is not None and len(raw) == 16:
                    a = self._inode(txn, S.unpack_dirent(raw)[0])
                    if a is not None and a.is_dir:
                        return int(a.ino)
            if raw is None:
                try:
                    a = Vfs(self.meta, self.data).mkdir(ROOT_INODE, name, 0o700, ROOT_CTX)
                except FsError as exc:
                    self.done.append(f"cannot create /{self._show(name)}: {exc}")
                    return None
                self.done.append(f"created /{self._show(name)}")
                return int(a.ino)
            name = LOST_FOUND + f".{i + 1}".encode()
        return None

    def _move_to(self, txn: WriteTxn, lf: int, ino: int, idx: Index) -> str:
        a = self._inode(txn, ino)
        assert a is not None
        for parent, name in idx.names.get(ino, []):
            self._drop_entry(txn, parent, name)
        base = f"#{ino:x}".encode()
        name, i = base, 0
        while get(txn, S.dirent_key(lf, name), self.meta.dirents) is not None:
            i += 1
            name = base + f".{i}".encode()
        self._add_entry(txn, lf, name, ino)
        if a.is_dir:
            a.parent = InodeId(lf)
            self._put_inode(txn, a)
        return self._show(name)

    def _reconnect(self, fs: list[Finding]) -> None:
        for _ in range(10_000):
            idx = build_index(self.meta)
            lost = idx.lost()
            if not lost:
                return
            tops = [ino for ino in sorted(lost) if not idx.lost_parents(ino, lost)]
            if not tops:  # only cycles are left: break one
                tops = [min(ino for ino in lost if idx.inodes[ino].is_dir)]
            lf = self._lost_found()
            if lf is None:
                self.done.append(f"could not reconnect {len(lost)} unreachable inodes")
                return
            with self.meta.write(record=False) as txn:
                for ino in tops:
                    name = self._move_to(txn, lf, ino, idx)
                    kind = "directory" if idx.inodes[ino].is_dir else "inode"
                    self.done.append(f"moved unreachable {kind} {ino:#x} to /lost+found/{name}")

    def _adopt_data(self, fs: list[Finding]) -> None:
        """Give a data file without a regular-file inode one, named in lost+found."""
        lf = self._lost_found()
        if lf is None:
            return
        for f in fs:
            now = self.meta.clock()
            with self.meta.write(record=False) as txn:
                owner = self._inode(txn, f.ino)
                if owner is None and get(txn, S.inode_key(f.ino), self.meta.inodes) is None:
                    ino = InodeId(f.ino)
                else:  # the id belongs to something else: the contents get a new one
                    ino = self.meta.new_inode_id(txn)
                    os.rename(self.data.path(f.ino), self.data.path(ino))
                size = self.data.path(ino).stat().st_size
                a = Attr(ino, stat.S_IFREG | 0o600, 0, 0, 1, size, now, now, now, now)
                self._put_inode(txn, a)
                txn.put(S.dirty_key(ino), b"", db=self.meta.dirty)  # settled just below
                name = f"#{ino:x}".encode()
                if get(txn, S.dirent_key(lf, name), self.meta.dirents) is not None:
                    name += b".data"
                self._add_entry(txn, lf, name, ino)
            self._file_io().rechecksum(ino)
            self.done.append(
                f"adopted the data file of {f.ino:#x} ({size} bytes) as "
                f"/lost+found/{self._show(name)}"
            )

    # --- link counts and orphans ------------------------------------------------------------

    def _unorphan(self, fs: list[Finding]) -> None:
        """An orphan record on an inode with names or links is dropped: it is not purged.

        A nameless one is reconnected into lost+found by the re-check that follows.
        """
        with self.meta.write(record=False) as txn:
            for f in fs:
                txn.delete(S.orphan_key(f.ino), db=self.meta.orphans)
                why = "has names" if f.code == "orphan-linked" else "has a link count"
                self.done.append(f"{f.ino:#x} {why}: no longer an orphan (kept, not purged)")

    def _recount(self, fs: list[Finding]) -> None:
        idx = build_index(self.meta)
        with self.meta.write(record=False) as txn:
            for f in fs:
                a = self._inode(txn, f.ino)
                want = idx.expected_nlink(f.ino) if f.ino in idx.inodes else None
                if a is None or want is None or a.nlink == want:
                    continue
                self.done.append(f"link count of {f.ino:#x}: {a.nlink} -> {want}")
                a.nlink = want
                self._put_inode(txn, a)

    def _symlink_size(self, fs: list[Finding]) -> None:
        with self.meta.write(record=False) as txn:
            for f in fs:
                a = self._inode(txn, f.ino)
                if a is not None and f.value is not None:
                    a.size = f.value
                    self._put_inode(txn, a)
                    self.done.append(f"set size of symlink {f.ino:#x} to {f.value}")

    # --- contents ----------------------------------------------------------------------------

    def _file_io(self) -> FileIO:
        return FileIO(self.meta, self.data, self.meta.clock, lambda ino: None)

    def _size(self, ino: int) -> int | None:
        with self.meta.read() as txn:
            a = self._inode(txn, ino)
        return a.size if a is not None and a.is_reg else None

    def _truncate(self, fs: list[Finding]) -> None:
        for f in fs:
            size = self._size(f.ino)
            fd = self.data.open(f.ino, create=False) if size is not None else None
            if fd is None or size is None:
                continue
            try:
                DataStore.truncate(fd, size)
                DataStore.fsync(fd)
            finally:
                self.data.close(fd)
            self.done.append(f"cut the data file of {f.ino:#x} to its size, {size} bytes")

    def _rechecksum(self, fs: list[Finding]) -> None:
        io = self._file_io()
        for f in fs:
            io.rechecksum(InodeId(f.ino))
            self.done.append(f"settled the checksums of {f.ino:#x} from its contents")

    def _rehash(self, fs: list[Finding]) -> None:
        for f in fs:
            size = self._size(f.ino)
            blk = f.value
            if size is None or blk is None:
                continue
            try:
                digest = block_digest(read_block(self.meta, self.data, f.ino, blk, size))
            except FsError as exc:
                self.done.append(
                    f"{f.ino:#x} block {blk}: NOT repaired, the block cannot be read: {exc}"
                )
                continue
            with self.meta.write(record=False) as txn:
                txn.put(S.block_key(f.ino, blk), S.pack_digest(digest), db=self.meta.blocks)
            if f.code == "checksum-mismatch":
                self.done.append(
                    f"{f.ino:#x} block {blk}: checksum mismatch repaired by re-hashing; "
                    "contents unverified (the data may be corrupt)"
                )
            else:
                self.done.append(f"{f.ino:#x} block {blk}: recorded its missing checksum")
