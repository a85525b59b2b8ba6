"""The records a primary sends a site: from its cache of recent ones, else from the journal.

``Item`` is one record of ``repl.apply``: [seq, packed record, the bytes of each data
operation or None]. A record read back from the journal gets its file bytes from the primary's
data file as it is now (a later record brings any change since).
"""

from __future__ import annotations

from typing import Any

from dfs.data.store import DataStore
from dfs.meta.replica import decode_record
from dfs.meta.store import MetaStore
from dfs.types import VolumeId

BATCH_RECORDS = 512
BATCH_BYTES = 8 << 20
Item = list[Any]  # [seq, packed record, [bytes of each data operation or None]]


def journal_has(meta: MetaStore, vol: VolumeId, seq: int) -> bool:
    for s, _raw in meta.journal_entries(vol, seq - 1):
        return s == seq
    return False


def run_after(
    meta: MetaStore, data: DataStore, vol: VolumeId, items: dict[int, Item], after: int
) -> list[Item]:
    """Consecutive records after ``after``, within the batch limits: kept ones as they are,
    the others from the journal."""
    out: list[Item] = []
    total = 0
    seq = after + 1
    while seq in items and len(out) < BATCH_RECORDS and total < BATCH_BYTES:
        item = items[seq]
        out.append(item)
        total += len(item[1]) + sum(len(b) for b in item[2] if b is not None)
        seq += 1
    if out:
        return out
    return batch_after(meta, data, vol, items, after)


def batch_after(
    meta: MetaStore, data: DataStore, vol: VolumeId, items: dict[int, Item], after: int
) -> list[Item]:
    """Records after ``after`` (none to learn the site's position when it is unknown, or
    when the journal no longer has the next one)."""
    if after < 0:
        return []
    out: list[Item] = []
    total = 0
    for seq, raw in meta.journal_entries(vol, after):
        if seq != (out[-1][0] if out else after) + 1:
            break
        item = items.get(seq)
        if item is None:
            item = [seq, raw, _blobs(data, decode_record(raw).data)]
        out.append(item)
        total += len(item[1]) + sum(len(b) for b in item[2] if b is not None)
        if len(out) >= BATCH_RECORDS or total >= BATCH_BYTES:
            break
    return out


def _blobs(data: DataStore, ops: list[list[Any]]) -> list[bytes | None]:
    out: list[bytes | None] = []
    for op in ops:
        if op[0] != "w":
            out.append(None)
            continue
        fd = data.open(op[1], create=False)
        if fd is None:
            out.append(None)
            continue
        try:
            out.append(DataStore.pread(fd, op[2], op[3], op[2] + op[3]))
        finally:
            data.close(fd)
    return out
