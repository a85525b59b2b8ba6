"""Applying a primary's journal records (write-sets) to a replica's metadata store.

A record (layout in ``dfs/meta/schema.py``) lists the final value, or the
deletion, of every replicated key one update transaction changed. Applying the
records of a volume in sequence order to a store that holds the same
replicated databases as the primary did before them makes both equal byte for
byte; no operation logic runs on the replica. Records are applied in
transactions (one record, or a run of consecutive records: ``apply_writesets``)
that also store them, unchanged, in the replica's journal and move the
replica's sequence counter of the volume to the last one, so the replica can
serve catch-up to others later. A transaction applies all of its records or
none: whatever happens, the replica's metadata is the primary's as of some
sequence number, the one its counter says.

Counters: inode ids carry the allocating node's id (``make_inode_id``), so ids
the primary allocated never collide with the replica's own; they need no care.
Directory cookies are a per-node counter, so the replica's cookie counter is
raised past every cookie a record brings: readdir order stays right if this
node ever adds entries to those directories (as a later primary).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec

from dfs.errors import StoreError
from dfs.meta import schema as S
from dfs.meta.store import MetaStore
from dfs.types import VolumeId

_DIRENTS = S.DB_NAMES.index("dirents")
_DIRPOS = S.DB_NAMES.index("dirpos")
_REPLICATED = frozenset(S.REPLICATED)


WriteSet = list[tuple[int, bytes, bytes | None]]  # (db index, key, value or None: deleted)


class ReplicaError(StoreError):
    """A record that cannot be applied: out of sequence or malformed."""


@dataclass(frozen=True, slots=True)
class Record:
    """A decoded journal record (layout in ``dfs/meta/schema.py``)."""

    op: str
    ws: WriteSet
    data: list[list[Any]]  # [kind, ino, a, n]: the data-store changes, applied first
    origin: int  # the node the update came from; 0: the node that executed it
    epoch: int = 1  # the epoch of the primary that made it (dfs/cluster/epochs.py)


NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class _WireRecord(msgspec.Struct, forbid_unknown_fields=True):
    """A journal record as packed (``MetaStore._journal_writeset``; schema.py)."""

    op: str
    ws: list[tuple[int, bytes, bytes | None]]
    d: list[tuple[Literal["w", "t", "rm"], NonNegative, NonNegative, NonNegative]] = []
    o: int = 0
    e: Annotated[int, msgspec.Meta(ge=1)] = 1


_decoder = msgspec.msgpack.Decoder(_WireRecord)


def decode_record(record: bytes) -> Record:
    """A journal record, validated (types by msgspec, then which records may be replicated);
    ReplicaError if malformed."""
    try:
        rec = _decoder.decode(record)
    except msgspec.DecodeError as exc:
        raise ReplicaError(f"malformed journal record: {exc}") from None
    for idx, key, _value in rec.ws:
        if idx not in _REPLICATED or len(key) < 8:
            raise ReplicaError(f"write-set entry for a non-replicated record: {idx}, {key!r:.40}")
    return Record(rec.op, rec.ws, [list(op) for op in rec.d], rec.o, rec.e)


def decode_writeset(record: bytes) -> tuple[str, WriteSet]:
    """The (op, write-set) of a journal record, validated; ReplicaError if malformed."""
    rec = decode_record(record)
    return rec.op, rec.ws


def apply_writeset(
    meta: MetaStore,
    vol: VolumeId,
    seq: int,
    record: bytes,
    ws: WriteSet | None = None,
) -> None:
    """Apply journal record ``seq`` of volume ``vol`` (packed, as the primary stored it).

    The replica must have applied exactly ``seq - 1`` before: a gap (a record
    is missing) and a duplicate (already applied) raise ReplicaError and
    change nothing. ``ws``: the record's write-set, if the caller decoded it already.
    """
    apply_writesets(meta, vol, [(seq, record, decode_record(record).ws if ws is None else ws)])


def apply_writesets(
    meta: MetaStore,
    vol: VolumeId,
    records: Sequence[tuple[int, bytes, WriteSet]],
    *,
    clean: Iterable[int] = (),
) -> None:
    """Apply consecutive journal records of ``vol`` in one transaction: all of them or none.

    ``records``: (seq, packed record, its decoded write-set); the first must be
    ``meta.seq(vol) + 1`` and each next one the following number, else
    ReplicaError and nothing changes. ``clean``: inodes whose (per-node)
    ``dirty`` record is deleted in the same transaction.
    """
    have = meta.seq(vol)
    for i, (seq, _record, _ws) in enumerate(records):
        if seq != have + 1 + i:
            what = "duplicate" if seq <= have + i else "gap"
            raise ReplicaError(f"volume {vol}: record {seq} is a {what}; this store has {have + i}")
    if not records:
        return
    dbs = [meta.dbs[name] for name in S.DB_NAMES]
    cookie = 0
    try:
        with meta.write(record=False) as wtxn:
            txn = wtxn.raw  # nothing here is recorded: the records are stored as they are
            for seq, record, ws in records:
                for idx, key, value in ws:
                    db = dbs[idx]
                    if value is None:
                        txn.delete(key, db=db)
                        continue
                    txn.put(key, value, db=db)
                    if idx == _DIRENTS and len(value) == 16:
                        cookie = max(cookie, S.unpack_dirent(value)[1])
                    elif idx == _DIRPOS and len(key) == 16:
                        cookie = max(cookie, S.read_u64(key[8:]))
                meta.store_record(txn, vol, seq, record)
            for ino in clean:
                txn.delete(S.dirty_key(ino), db=meta.dirty)
            if cookie > meta.next_cookie:
                meta.raise_counters(wtxn, cookie=cookie)
    except BaseException:
        meta.reset_seq(vol, have)
        raise
