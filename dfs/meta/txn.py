"""Transactions on the metadata store: the read subset the core uses, and ``WriteTxn``.

``WriteTxn`` is a write transaction that records its *write-set* (the final value or deletion
of every key it changed in the replicated databases) and the data-store changes it goes with,
so that ``MetaStore`` can journal it as one update of a volume at commit (dfs/meta/store.py,
``MetaStore.log``; layout in schema.py) and hand it to the store's commit subscriber.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Any, Protocol

import lmdb

from dfs.errors import FsError, NoSpace
from dfs.meta import schema as S
from dfs.types import VolumeId

if TYPE_CHECKING:
    from lmdb import _StatDict

    from dfs.meta.store import MetaStore

    ReadTxn = lmdb.Transaction[bytes]  # every transaction here is opened with buffers=False
else:
    ReadTxn = lmdb.Transaction

_INODES = S.DB_NAMES.index("inodes")


class Txn(Protocol):
    """Any transaction, for code that only reads: ``read()``'s and ``write()``'s both fit."""

    def get(
        self, key: bytes, default: None = None, db: lmdb._Database | None = None
    ) -> bytes | None: ...

    def cursor(self, db: lmdb._Database | None = None) -> lmdb.Cursor[bytes]: ...

    def stat(self, db: lmdb._Database | None = None) -> _StatDict: ...


LOW_SPACE = 1 << 20  # below this many free bytes, a failed commit is taken for a full disk


def lmdb_to_fs_error(exc: lmdb.Error, path: str | None = None) -> FsError:
    """The errno a failed lmdb call means; ``path`` is the environment's directory.

    lmdb reports a page write cut short by a full disk as EIO ("short write,
    filesystem full?" in mdb_page_flush), so an EIO while the store's file
    system has (almost) no space left is ENOSPC. The environment stays usable.
    """
    if isinstance(exc, lmdb.MapFullError) or "No space" in str(exc):
        return NoSpace(message=f"metadata store full: {exc}")
    if path is not None and "Input/output error" in str(exc):
        try:
            st = os.statvfs(path)
        except OSError:
            pass
        else:
            if st.f_bavail * st.f_frsize < LOW_SPACE:
                return NoSpace(message=f"metadata store's disk is full: {exc}")
    return FsError(errno.EIO, f"metadata store error: {exc}")


class WriteTxn:
    """One write transaction that records its write-set; ``with meta.write() as txn:``.

    Every put and delete on a replicated database (``schema.REPLICATED``) is
    recorded as ``(db index, key) -> value or None`` (last write wins: the
    record describes the transaction's effect, which is all a replica needs).
    Just before the commit the write-set becomes the volume's journal record
    (see ``MetaStore.log`` and schema.py). Deletes must go through
    ``delete``/``delete_prefix``: a cursor is for reading only, since a
    ``Cursor.delete`` would escape the record. A class, not a generator: this
    is on every update's path.
    """

    __slots__ = (
        "ws",
        "data",
        "live",
        "vol",
        "seq",
        "op",
        "record",
        "_meta",
        "_rep",
        "_txn",
        "_gone_vol",
    )

    def __init__(self, meta: MetaStore, record: bool) -> None:
        self._meta = meta
        self._rep = meta._replicated if record else {}
        self.ws: dict[tuple[int, bytes], bytes | None] = {}
        # Changes to the data store that go with the write-set (see ``data_op``).
        self.data: list[list[Any]] = []
        self.live: list[bytes | memoryview | None] = []
        self.vol: VolumeId | None = None
        self.seq = 0  # reserved by MetaStore.log; 0: none yet
        self.op = ""
        self.record = b""  # the packed journal record, once committed (for replication)
        self._gone_vol: VolumeId | None = None

    def __enter__(self) -> WriteTxn:
        self._txn: ReadTxn = self._meta.env.begin(write=True)
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        meta = self._meta
        if exc_type is not None:
            self._txn.abort()
            meta._unreserve(self)
            return
        try:
            if self.ws or self.seq or self.data:
                meta._journal_writeset(self)
            self._txn.commit()
        except lmdb.Error as err:
            self._txn.abort()
            meta._unreserve(self)
            raise lmdb_to_fs_error(err, meta.env.path()) from err
        except BaseException:
            self._txn.abort()
            meta._unreserve(self)
            raise
        if self.seq and meta._on_commit is not None:
            meta._on_commit(self)

    def data_op(
        self, kind: str, ino: int, a: int = 0, live: bytes | memoryview | None = None
    ) -> None:
        """Record a change of ino's contents in the data store that this transaction goes with.

        ``"w"``: bytes ``live`` were written at offset ``a`` (the journal keeps only the
        range; a replica that catches up later gets the bytes the file holds then);
        ``"t"``: the data file was cut to ``a`` bytes; ``"rm"``: it was removed. A replica
        applies them before the write-set, in order (``dfs.cluster.replication``).
        """
        self.data.append([kind, ino, a, len(live) if live is not None else 0])
        self.live.append(live)

    @property
    def raw(self) -> ReadTxn:
        """The lmdb transaction itself, for per-node records only (nothing is recorded)."""
        return self._txn

    # --- the lmdb Transaction subset the core uses ---------------------------------------

    def get(
        self, key: bytes, default: None = None, db: lmdb._Database | None = None
    ) -> bytes | None:
        return self._txn.get(key, db=db)

    def cursor(self, db: lmdb._Database | None = None) -> lmdb.Cursor[bytes]:
        return self._txn.cursor(db=db)

    def stat(self, db: lmdb._Database | None = None) -> _StatDict:
        return self._txn.stat(db)

    def put(self, key: bytes, value: bytes | bytearray, *, db: lmdb._Database) -> bool:
        idx = self._rep.get(db)
        if idx is not None:
            self.ws[idx, key] = bytes(value)
        return self._txn.put(key, value, db=db)

    def delete(self, key: bytes, *, db: lmdb._Database) -> bool:
        idx = self._rep.get(db)
        if idx is None:
            return self._txn.delete(key, db=db)
        if idx == _INODES and self.seq == 0 and self._gone_vol is None:
            self._gone_vol = self._meta._volume_of_raw(self._txn.get(key, db=db))
        if not self._txn.delete(key, db=db):
            return False
        self.ws[idx, key] = None
        return True

    def delete_prefix(self, prefix: bytes, *, db: lmdb._Database, start: bytes = b"") -> int:
        """Delete every key starting with ``prefix`` (and >= ``start``); returns how many."""
        cur = self._txn.cursor(db=db)
        if not cur.set_range(max(prefix, start)):
            return 0
        idx = self._rep.get(db)
        n = 0
        while True:
            key = cur.key()
            if not key.startswith(prefix):
                break
            if idx is not None:
                self.ws[idx, key] = None
            if not cur.delete():
                break
            n += 1
        return n
