"""Reading a whole store for the checker: batched scans and the in-memory index of the tree.

A scan is a series of short read transactions of ``SCAN_BATCH`` records each,
resuming after the last key seen (STYLE habit 3): it never holds one
transaction open for the whole store, so a long check does not pin old pages
or stall a writer. The checker runs on a quiescent store (offline, or a test's
Vfs between operations), so the batches see one consistent state.

``Index`` is what the link-count and reachability checks need of the tree,
built once per check: every inode's type, link count, size and parent, the
names of every inode, and the orphan and dirty sets. It holds a few hundred
bytes per inode, which is fine for the stores this project targets.
"""

from __future__ import annotations

import stat
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import lmdb
import msgpack

from dfs.hashing import BLOCK_SIZE
from dfs.meta import schema as S
from dfs.meta.store import MetaStore, Txn
from dfs.types import ROOT_INODE

SCAN_BATCH = 1000

# (what, done, total): called now and then during long work; total 0 means unknown.
Progress = Callable[[str, int, int], None]

_FILE_TYPES = frozenset(
    {
        stat.S_IFREG,
        stat.S_IFDIR,
        stat.S_IFLNK,
        stat.S_IFCHR,
        stat.S_IFBLK,
        stat.S_IFIFO,
        stat.S_IFSOCK,
    }
)


def get(txn: Txn, key: bytes, db: lmdb._Database) -> bytes | None:
    """``txn.get`` as bytes (the stubs allow memoryviews; MetaStore.read uses bytes)."""
    raw = txn.get(key, db=db)
    return None if raw is None else bytes(raw)


def scan_batches(
    meta: MetaStore, db: lmdb._Database, prefix: bytes = b"", batch: int = SCAN_BATCH
) -> Iterator[list[tuple[bytes, bytes]]]:
    """The records of ``db`` whose key starts with ``prefix``, in key order, a batch at a time.

    Each batch is read in its own transaction, closed before it is yielded.
    """
    after: bytes | None = None
    while True:
        items: list[tuple[bytes, bytes]] = []
        with meta.read() as txn:
            cur = txn.cursor(db=db)
            if after is not None:
                found = cur.set_range(after + b"\0")  # the smallest key after ``after``
            elif prefix:
                found = cur.set_range(prefix)
            else:
                found = cur.first()
            if found:
                for key, value in cur:
                    if not bytes(key).startswith(prefix):
                        break
                    items.append((bytes(key), bytes(value)))
                    if len(items) >= batch:
                        break
        if items:
            yield items
        if len(items) < batch:
            return
        after = items[-1][0]


def scan(meta: MetaStore, db: lmdb._Database, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
    for items in scan_batches(meta, db, prefix):
        yield from items


def count(meta: MetaStore, db: lmdb._Database) -> int:
    with meta.read() as txn:
        return int(txn.stat(db)["entries"])


def valid_name(name: bytes) -> bool:
    return 0 < len(name) <= S.MAX_NAME and b"/" not in name and b"\0" not in name


class Inode(NamedTuple):
    """The fields of an inode record the structural checks look at."""

    mode: int
    nlink: int
    size: int
    parent: int

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_lnk(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def nblocks(self) -> int:
        return (self.size + BLOCK_SIZE - 1) // BLOCK_SIZE


@dataclass
class Index:
    node_id: int
    next_counter: int
    next_cookie: int
    inodes: dict[int, Inode] = field(default_factory=dict)
    # Inode records that exist but cannot be decoded: never treated as missing,
    # so that nothing of theirs is deleted as a stray record.
    malformed: dict[int, str] = field(default_factory=dict)
    # child -> every (directory, name) naming it, for well-formed entries whose
    # directory and child both exist.
    names: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)
    subdirs: Counter[int] = field(default_factory=Counter)
    orphans: set[int] = field(default_factory=set)
    dirty: set[int] = field(default_factory=set)
    inline: dict[int, int] = field(default_factory=dict)  # ino -> length of inline contents
    root_missing: bool = False
    # Root directories of the other volumes this store holds: named by no entry (their
    # name is the mount point's, in the root volume), like the root.
    volume_roots: set[int] = field(default_factory=set)
    _reachable: set[int] | None = None

    def is_top(self, ino: int) -> bool:
        """The root, or the root of another volume."""
        return ino == ROOT_INODE or ino in self.volume_roots

    def exists(self, ino: int) -> bool:
        return ino in self.inodes or ino in self.malformed

    def expected_nlink(self, ino: int) -> int | None:
        """The link count ``ino`` must have, or None when its names must be fixed first."""
        info = self.inodes[ino]
        n = len(self.names.get(ino, ()))
        if n == 0 and not self.is_top(ino):
            return None  # an orphan (checked on its own) or lost (reconnected first)
        if info.is_dir:
            return 2 + self.subdirs[ino]
        return n

    def reachable(self) -> set[int]:
        """Every inode reachable from the root through directory entries."""
        if self._reachable is None:
            children: dict[int, list[int]] = {}
            for child, where in self.names.items():
                for parent, _ in where:
                    children.setdefault(parent, []).append(child)
            seen = {i for i in (ROOT_INODE, *self.volume_roots) if i in self.inodes}
            todo: list[int] = list(seen)
            while todo:
                d = todo.pop()
                for c in children.get(d, ()):
                    if c not in seen:
                        seen.add(c)
                        if self.inodes[c].is_dir:
                            todo.append(c)
            self._reachable = seen
        return self._reachable

    def lost(self) -> set[int]:
        """Inodes that are neither reachable from the root nor orphans (or the root)."""
        reach = self.reachable()
        return {
            ino
            for ino in self.inodes
            if ino not in reach and ino not in self.orphans and not self.is_top(ino)
        }

    def lost_parents(self, ino: int, lost: set[int]) -> list[int]:
        """The directories naming ``ino`` that are lost themselves."""
        return [p for p, _ in self.names.get(ino, ()) if p in lost]


def build_index(meta: MetaStore, progress: Progress | None = None) -> Index:
    with meta.read() as txn:
        node_id = S.read_u16(get(txn, S.META_NODE_ID, meta.meta) or bytes(2))
        next_counter = S.read_u64(get(txn, S.META_NEXT_COUNTER, meta.meta) or bytes(8))
        next_cookie = S.read_u64(get(txn, S.META_NEXT_COOKIE, meta.meta) or bytes(8))
    idx = Index(node_id, next_counter, next_cookie)
    total = count(meta, meta.inodes)
    done = 0
    for items in scan_batches(meta, meta.inodes):
        for key, raw in items:
            if len(key) != 8:
                continue  # reported by check_inodes_records; it names no inode
            ino = S.read_u64(key)
            try:
                a = S.unpack_inode(ino, raw)
            except Exception as exc:  # noqa: BLE001 - any decoding failure is a finding
                idx.malformed[ino] = f"undecodable ({len(raw)} bytes: {exc})"
                continue
            if stat.S_IFMT(a.mode) not in _FILE_TYPES:
                idx.malformed[ino] = f"unknown file type in mode {a.mode:o}"
                continue
            idx.inodes[ino] = Inode(a.mode, a.nlink, a.size, a.parent)
        done += len(items)
        if progress is not None:
            progress("reading inodes", done, total)
    if ROOT_INODE not in idx.inodes and ROOT_INODE not in idx.malformed:
        # Stand in for the missing root so its entries are judged as usual
        # (repair recreates it, and does not scatter the whole tree).
        idx.root_missing = True
        idx.inodes[ROOT_INODE] = Inode(stat.S_IFDIR | 0o755, 0, 0, ROOT_INODE)
    for items in scan_batches(meta, meta.dirents):
        for key, raw in items:
            if len(key) <= 8 or len(raw) != 16:
                continue
            parent = S.read_u64(key[:8])
            name = key[8:]
            child, _ = S.unpack_dirent(raw)
            p = idx.inodes.get(parent)
            c = idx.inodes.get(child)
            if p is None or c is None or not p.is_dir or not valid_name(name):
                continue
            idx.names.setdefault(child, []).append((parent, name))
            if c.is_dir:
                idx.subdirs[parent] += 1
    for key, _ in scan(meta, meta.orphans):
        if len(key) == 8:
            idx.orphans.add(S.read_u64(key))
    for key, _ in scan(meta, meta.dirty):
        if len(key) == 8:
            idx.dirty.add(S.read_u64(key))
    for key, raw in scan(meta, meta.inline):
        if len(key) == 8:
            idx.inline[S.read_u64(key)] = len(raw)
    for db in (meta.mounts, meta.volumes):
        for _key, raw in scan(meta, db):
            root = _record_root(raw)
            if root is not None and root != ROOT_INODE and root in idx.inodes:
                idx.volume_roots.add(root)
    return idx


def _record_root(raw: bytes) -> int | None:
    """The ``root`` of a ``mounts`` or ``volumes`` record (schema.py), if it has one."""
    try:
        rec = msgpack.unpackb(raw)
    except Exception:  # noqa: BLE001 - check_meta_volumes reports undecodable records
        return None
    root = rec.get("root") if isinstance(rec, dict) else None
    return root if isinstance(root, int) and root > 0 else None
