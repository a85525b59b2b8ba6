"""One node's lmdb environment: opening, identity, counters, the journal (transactions: txn.py).

Transactions are synchronous and never span an ``await`` (lmdb allows one write
transaction at a time, and a trio task switch inside one would stall every
other writer). Commits do not fsync (``sync=False``): a committed transaction
survives ``kill -9`` of the daemon because its pages are already in the
kernel's page cache; ``sync()`` makes everything committed so far durable
against a machine crash and is what ``fsync``/``fsyncdir`` call.
"""

from __future__ import annotations

import contextvars
import errno
import os
import struct
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import msgpack

from dfs.clock import WallClock, system_time_ns
from dfs.errors import FsError, StoreError
from dfs.meta import schema as S
from dfs.meta.txn import ReadTxn, Txn, WriteTxn, lmdb_to_fs_error
from dfs.types import ROOT_INODE, ROOT_VOLUME, Attr, InodeId, NodeId, VolumeId, make_inode_id

__all__ = [  # the transaction types live in dfs.meta.txn; importers find them here too
    "ORIGIN",
    "Identity",
    "MetaStore",
    "ReadTxn",
    "Txn",
    "WriteTxn",
    "lmdb_to_fs_error",
]


STANDALONE_NODE = NodeId(1)
MAP_SIZE = 1 << 40  # address space only; the file grows as pages are used
JOURNAL_KEEP = 100_000  # entries kept per volume for replicas to catch up from
JOURNAL_TRIM_EVERY = 1024

# The node an update being executed came from (a forwarded update runs on the primary in
# a task of its own, so a context variable follows it across awaits); 0: this node.
# Journal records carry it ("o") so that node can skip invalidating its own kernel cache.
ORIGIN: contextvars.ContextVar[int] = contextvars.ContextVar("dfs_origin", default=0)


@dataclass(frozen=True, slots=True)
class Identity:
    cluster_id: str
    node_id: NodeId
    format_version: int


def _required(txn: Txn, key: bytes, db: lmdb._Database) -> bytes:
    raw = txn.get(key, db=db)
    if raw is None:
        raise StoreError(f"damaged metadata store: record {key.decode()!r} missing")
    return raw


class MetaStore:
    """One node's metadata. Single writer: the daemon holds DIR/lock while it is open."""

    def __init__(self, env: lmdb.Environment, identity: Identity, clock: WallClock) -> None:
        self.env = env
        self.identity = identity
        self.clock = clock
        self.dbs = {name: env.open_db(name.encode()) for name in S.DB_NAMES}
        self.meta = self.dbs["meta"]
        self.inodes = self.dbs["inodes"]
        self.dirents = self.dbs["dirents"]
        self.dirpos = self.dbs["dirpos"]
        self.symlinks = self.dbs["symlinks"]
        self.xattrs = self.dbs["xattrs"]
        self.blocks = self.dbs["blocks"]
        self.orphans = self.dbs["orphans"]
        self.dirty = self.dbs["dirty"]
        self.volumes = self.dbs["volumes"]
        self.journal = self.dbs["journal"]
        self.inline = self.dbs["inline"]
        self.mounts = self.dbs["mounts"]
        self._replicated = {self.dbs[S.DB_NAMES[i]]: i for i in S.REPLICATED}
        self._pack = msgpack.Packer(use_bin_type=True).pack  # reused: this is on every commit
        with env.begin() as txn:
            self._next_counter = S.read_u64(_required(txn, S.META_NEXT_COUNTER, self.meta))
            self._next_cookie = S.read_u64(_required(txn, S.META_NEXT_COOKIE, self.meta))
            self._seq: dict[int, int] = {}
            for key in txn.cursor(db=self.volumes).iternext(values=False):
                vol = S.read_u32(key)
                raw = txn.get(S.seq_key(vol), db=self.meta)
                self._seq[vol] = S.read_u64(raw) if raw is not None else 0
        self._appends = 0
        self._on_commit: Callable[[WriteTxn], None] | None = None
        # The epoch each volume's records are made in here (dfs/cluster/epochs.py): set by
        # the cluster layer while this node is the volume's primary; absent: the first.
        self.epochs: dict[int, int] = {}
        # Whether this node may make records of a volume (it orders it): a last guard, so
        # that an update that began before this node stopped being the primary fails
        # instead of forking the journal. None: always (a node alone).
        self.may_record: Callable[[VolumeId], bool] | None = None

    def subscribe(self, on_commit: Callable[[WriteTxn], None]) -> Callable[[], None]:
        """Call ``on_commit`` with each committed transaction that logged an update (its
        ``vol``, ``seq``, ``ws``, ``data``, ``live`` bytes and packed journal ``record``, so
        replication need not read the journal back). One subscriber (the cluster layer's
        ``CommitHook``); returns the call that ends the subscription, after which commits
        are only journaled (sites catch up from the journal)."""
        if self._on_commit is not None:
            raise RuntimeError("the store's commits already have a subscriber")
        self._on_commit = on_commit

        def end() -> None:
            if self._on_commit is on_commit:
                self._on_commit = None

        return end

    # --- opening -------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        cluster_id: str | None = None,
        node_id: NodeId = STANDALONE_NODE,
        create: bool = True,
        clock: WallClock = system_time_ns,
        readonly: bool = False,
    ) -> MetaStore:
        """Open (or create) the metadata store in ``path``.

        ``cluster_id=None`` accepts whatever cluster the store belongs to
        (standalone use); otherwise a store of another cluster is an error.
        """
        exists = (path / "data.mdb").exists()
        if not exists and (not create or readonly):
            raise StoreError(f"{path}: no dfs metadata here")
        path.mkdir(parents=True, exist_ok=True)
        try:
            env = lmdb.open(
                str(path),
                map_size=MAP_SIZE,
                max_dbs=len(S.DB_NAMES) + 2,
                sync=False,
                metasync=False,
                readahead=False,
                readonly=readonly,
                lock=not readonly,
            )
        except lmdb.Error as exc:
            raise StoreError(f"{path}: cannot open metadata store: {exc}") from exc
        try:
            if not readonly:
                cls._initialise(env, cluster_id or str(uuid.uuid4()), node_id, clock)
            identity = cls._read_identity(env, path)
            if cluster_id is not None and identity.cluster_id != cluster_id:
                raise StoreError(
                    f"{path}: belongs to cluster {identity.cluster_id}, not {cluster_id}"
                )
            return cls(env, identity, clock)
        except BaseException:
            env.close()
            raise

    @staticmethod
    def _initialise(
        env: lmdb.Environment, cluster_id: str, node_id: NodeId, clock: WallClock
    ) -> None:
        meta = env.open_db(b"meta")
        with env.begin(write=True) as txn:
            if txn.get(S.META_FORMAT, db=meta) is not None:
                return
            for name in S.DB_NAMES:
                env.open_db(name.encode(), txn=txn)
            txn.put(S.META_FORMAT, S.u32(S.FORMAT_VERSION), db=meta)
            txn.put(S.META_NODE_ID, S.u16(node_id), db=meta)
            txn.put(S.META_CLUSTER_ID, cluster_id.encode(), db=meta)
            txn.put(S.META_NEXT_COUNTER, S.u64(1), db=meta)  # counter 1 is the root
            txn.put(S.META_NEXT_COOKIE, S.u64(S.FIRST_COOKIE - 1), db=meta)
            txn.put(S.META_CLEAN, b"1", db=meta)
            now = clock()
            root = Attr(
                ROOT_INODE,
                0o40755,
                os.getuid(),
                os.getgid(),
                2,
                0,
                now,
                now,
                now,
                now,
                parent=ROOT_INODE,
                volume=ROOT_VOLUME,
            )
            txn.put(S.inode_key(ROOT_INODE), S.pack_inode(root), db=env.open_db(b"inodes", txn=txn))
            vols = env.open_db(b"volumes", txn=txn)
            txn.put(
                S.volume_key(ROOT_VOLUME),
                msgpack.packb({"root": int(ROOT_INODE), "path": "/"}),
                db=vols,
            )

    @staticmethod
    def _read_identity(env: lmdb.Environment, path: Path) -> Identity:
        try:
            meta = env.open_db(b"meta", create=False)
        except lmdb.NotFoundError as exc:
            raise StoreError(f"{path}: not a dfs metadata store") from exc
        with env.begin() as txn:
            fmt = txn.get(S.META_FORMAT, db=meta)
            if fmt is None:
                raise StoreError(f"{path}: not a dfs metadata store")
            version = S.read_u32(fmt)
            if version != S.FORMAT_VERSION:
                raise StoreError(
                    f"{path}: metadata format version {version}, this dfs reads "
                    f"version {S.FORMAT_VERSION}"
                )
            for key, size in S.META_REQUIRED:
                raw = txn.get(key, db=meta)
                if raw is None or (size and len(raw) != size):
                    raise StoreError(
                        f"{path}: damaged metadata store: record {key.decode()!r} "
                        f"{'missing' if raw is None else 'malformed'}"
                    )
            return Identity(
                cluster_id=_required(txn, S.META_CLUSTER_ID, meta).decode(),
                node_id=NodeId(S.read_u16(_required(txn, S.META_NODE_ID, meta))),
                format_version=version,
            )

    def close(self) -> None:
        self.env.close()

    # --- transactions ----------------------------------------------------------------

    def read(self) -> ReadTxn:
        """A read-only transaction, used as ``with meta.read() as txn:``."""
        return self.env.begin(buffers=False)

    def write(self, *, record: bool = True) -> WriteTxn:
        """A write transaction; lmdb failures surface as FsError (ENOSPC, EIO).

        It records its write-set and journals it at commit (see ``log``).
        ``record=False`` is for local-only writes that are not volume updates:
        offline repair, and applying a replicated record (which journals the
        primary's record as it is).
        """
        return WriteTxn(self, record)

    def sync(self) -> None:
        """Make every committed transaction durable (blocking: call off the event loop)."""
        self.env.sync(True)

    # --- counters (single writer: cached, persisted in the transaction that uses them) ---

    def new_inode_id(self, txn: WriteTxn) -> InodeId:
        self._next_counter += 1
        txn.put(S.META_NEXT_COUNTER, S.u64(self._next_counter), db=self.meta)
        return make_inode_id(self.identity.node_id, self._next_counter)

    def new_cookie(self, txn: WriteTxn) -> int:
        self._next_cookie += 1
        txn.put(S.META_NEXT_COOKIE, S.u64(self._next_cookie), db=self.meta)
        return self._next_cookie

    def raise_counters(
        self,
        txn: WriteTxn,
        *,
        counter: int = 0,
        cookie: int = 0,
        seq: tuple[VolumeId, int] | None = None,
    ) -> None:
        """Move counters forward to at least the given values (repair; never backwards).

        Compared with what is stored, not only with this process's cache, so a
        damaged record is rewritten even when the cache is already ahead.
        """

        def stored(key: bytes) -> int:
            raw = txn.get(key, db=self.meta)
            return S.read_u64(bytes(raw)) if raw is not None and len(raw) == 8 else 0

        if counter > stored(S.META_NEXT_COUNTER):
            self._next_counter = max(self._next_counter, counter)
            txn.put(S.META_NEXT_COUNTER, S.u64(self._next_counter), db=self.meta)
        if cookie > stored(S.META_NEXT_COOKIE):
            self._next_cookie = max(self._next_cookie, cookie)
            txn.put(S.META_NEXT_COOKIE, S.u64(self._next_cookie), db=self.meta)
        if seq is not None and seq[1] > stored(S.seq_key(seq[0])):
            self._seq[seq[0]] = max(self._seq.get(seq[0], 0), seq[1])
            txn.put(S.seq_key(seq[0]), S.u64(self._seq[seq[0]]), db=self.meta)

    def set_clean(self, clean: bool) -> bool:
        """Record whether the store is cleanly closed; returns the previous state."""
        with self.write() as txn:
            prev = txn.get(S.META_CLEAN, db=self.meta)
            txn.put(S.META_CLEAN, b"1" if clean else b"0", db=self.meta)
        self.sync()
        return prev == b"1"

    # --- the journal of applied updates --------------------------------------------------

    def seq(self, vol: VolumeId) -> int:
        return self._seq.get(vol, 0)

    def has_volume(self, vol: VolumeId) -> bool:
        """This node stores (a replica of) ``vol``."""
        return vol in self._seq

    def add_volume(self, vol: VolumeId, root: InodeId, path: str) -> None:
        """Start storing volume ``vol``: its sequence is 0. If it is stored already, only a
        record without its root directory (0: a site that joined the volume while it was
        being created, before its root existed) gets ``root``."""
        if vol in self._seq:
            if root:
                self._learn_root(vol, root)
            return
        with self.write(record=False) as txn:
            txn.put(
                S.volume_key(vol),
                msgpack.packb({"root": int(root), "path": path}),
                db=self.volumes,
            )
        self._seq.setdefault(vol, 0)

    def _learn_root(self, vol: VolumeId, root: InodeId) -> None:
        with self.read() as txn:
            raw = txn.get(S.volume_key(vol), db=self.volumes)
        try:
            rec = msgpack.unpackb(raw) if raw is not None else None
        except (ValueError, msgpack.UnpackException):
            return  # the checker reports it
        if not isinstance(rec, dict) or rec.get("root"):
            return
        rec["root"] = int(root)
        with self.write(record=False) as txn:
            txn.put(S.volume_key(vol), msgpack.packb(rec), db=self.volumes)

    def stored_volumes(self) -> dict[VolumeId, dict[str, Any]]:
        """The volumes this node stores: vol -> {"root": ino, "path": str}."""
        out: dict[VolumeId, dict[str, Any]] = {}
        with self.read() as txn:
            for key, raw in txn.cursor(db=self.volumes):
                v = msgpack.unpackb(raw)
                out[VolumeId(S.read_u32(key))] = v if isinstance(v, dict) else {}
        return out

    def volume_record(self, vol: VolumeId) -> dict[str, Any]:
        """This node's ``volumes`` record of ``vol`` (empty if it stores no replica)."""
        with self.read() as txn:
            raw = txn.get(S.volume_key(vol), db=self.volumes)
        v = msgpack.unpackb(raw) if raw is not None else None
        return v if isinstance(v, dict) else {}

    def update_volume_record(self, vol: VolumeId, **fields: Any) -> None:
        """Merge ``fields`` into the ``volumes`` record of a stored volume, durably (on disk
        when this returns: an epoch or a vote must not be forgotten by a crash)."""
        if vol not in self._seq:
            raise StoreError(f"volume {vol} is not stored here")
        with self.write(record=False) as txn:
            key = S.volume_key(vol)
            raw = txn.get(key, db=self.volumes)
            v = msgpack.unpackb(raw) if raw is not None else {}
            if not isinstance(v, dict):
                v = {}
            v.update(fields)
            txn.put(key, msgpack.packb(v), db=self.volumes)
        self.sync()

    def reset_seq(self, vol: VolumeId, seq: int) -> None:
        """Set the cached counter back to what is stored (after an aborted transaction)."""
        self._seq[vol] = seq

    @property
    def next_cookie(self) -> int:
        """The last directory cookie handed out."""
        return self._next_cookie

    def log(self, txn: WriteTxn, vol: VolumeId, op: str) -> int:
        """Name the transaction's update of ``vol``; returns its sequence number.

        The sequence orders every update of a volume (the primary's order once
        volumes replicate) and is stamped into the changed inodes' ``version``.
        It is reserved here and the journal record is written when the
        transaction commits: the record is the whole transaction's write-set
        (schema.py), including puts made after this call; ``op`` names it.
        A transaction updates one volume: logging twice returns the same seq.
        """
        if txn.seq:
            if txn.vol != vol:
                raise StoreError(f"one transaction updates volumes {txn.vol} and {vol}")
            return txn.seq
        seq = self._seq.get(vol, 0) + 1
        self._seq[vol] = seq
        txn.vol, txn.seq, txn.op = vol, seq, op
        return seq

    def _unreserve(self, txn: WriteTxn) -> None:
        """The transaction was aborted: give its sequence number back (no gaps)."""
        if txn.seq and txn.vol is not None and self._seq.get(txn.vol) == txn.seq:
            self._seq[txn.vol] = txn.seq - 1
        txn.seq = 0

    def _volume_of_raw(self, raw: bytes | None) -> VolumeId | None:
        """The volume of a packed inode, if it is a readable inode of a known volume."""
        if raw is None:
            return None
        try:
            vol = S.unpack_inode(0, raw).volume
        except struct.error:
            return None
        return vol if vol in self._seq else None

    def _volume_of_writeset(self, txn: WriteTxn) -> VolumeId:
        """The volume an unlogged transaction changed: that of the first inode it touched.

        Every replicated key starts with an inode number (the directory's, for
        dirents and dirpos). An inode deleted in the transaction (a purge) is
        known by the volume of the record it had.
        """
        for _idx, key in txn.ws:
            vol = self._volume_of_raw(txn.get(key[:8], db=self.inodes))
            if vol is not None:
                return vol
        return txn._gone_vol if txn._gone_vol is not None else ROOT_VOLUME

    def _journal_writeset(self, txn: WriteTxn) -> None:
        """Called just before the commit: the write-set becomes the journal record."""
        if not txn.seq:
            self.log(txn, self._volume_of_writeset(txn), "")
        assert txn.vol is not None
        if self.may_record is not None and not self.may_record(txn.vol):
            raise FsError(errno.EROFS, f"this node no longer orders volume {txn.vol}")
        rec: dict[str, Any] = {"op": txn.op, "ws": [[i, k, v] for (i, k), v in txn.ws.items()]}
        if txn.data:
            rec["d"] = txn.data
        origin = ORIGIN.get()
        if origin:
            rec["o"] = origin
        epoch = self.epochs.get(txn.vol, 1)
        if epoch != 1:
            rec["e"] = epoch
        record = self._pack(rec)
        self.store_record(txn._txn, txn.vol, txn.seq, record)
        txn.record = record

    def store_record(self, txn: ReadTxn, vol: VolumeId, seq: int, record: bytes) -> None:
        """Write journal record ``seq`` of ``vol`` and move the volume's counter to it.

        ``txn`` is the raw lmdb transaction (the journal is not replicated).
        """
        txn.put(S.journal_key(vol, seq), record, db=self.journal)
        txn.put(S.seq_key(vol), S.u64(seq), db=self.meta)
        self._seq[vol] = max(self._seq.get(vol, 0), seq)
        self._appends += 1
        if self._appends % JOURNAL_TRIM_EVERY == 0:
            self._trim_journal(txn, vol, seq - JOURNAL_KEEP)

    def _trim_journal(self, txn: ReadTxn, vol: VolumeId, below: int) -> None:
        if below <= 0:
            return
        cur = txn.cursor(db=self.journal)
        if not cur.set_range(S.journal_key(vol, 0)):
            return
        removed = 0
        while removed < 2 * JOURNAL_TRIM_EVERY:
            v, s = S.journal_of_key(cur.key())
            if v != vol or s >= below:
                break
            if not cur.delete():
                break
            removed += 1

    def journal_entries(self, vol: VolumeId, after: int = 0) -> Iterator[tuple[int, bytes]]:
        """Journal records of ``vol`` (packed, see schema.py) with sequence > ``after``, oldest
        first: what a replica applies with ``dfs.meta.replica.apply_writeset``."""
        with self.read() as txn:
            cur = txn.cursor(db=self.journal)
            if not cur.set_range(S.journal_key(vol, after + 1)):
                return
            for key, raw in cur:
                v, s = S.journal_of_key(key)
                if v != vol:
                    break
                yield s, raw
