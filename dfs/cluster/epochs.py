"""Epochs: which primary a node follows for each volume, and what it promised in elections.

An *epoch* is the term of one primary of a volume: at most one primary makes updates in each
epoch (``dfs.cluster.failover`` elects them with a majority of the volume's sites). Every node
that stores a volume keeps, in its ``volumes`` record (schema.py) and on disk before it acts on
it (``MetaStore.update_volume_record``):

- ``epoch``: the highest epoch it has taken part in;
- ``primary``: the primary of that epoch, when known ("" while an election runs);
- ``voted``: whom it voted for in that epoch ("" if nobody): at most one vote per epoch;
- ``history``: for each epoch its records were made in, the sequence of the first of them,
  oldest first (Kafka's leader-epoch cache). The last record of epoch ``e`` in this node's
  journal is then one before the first of the next epoch (``end_of``): two nodes whose
  journals hold a record of the same sequence and epoch hold the same record and every one
  before it, so comparing (epoch of the last record, sequence) says which journal is ahead,
  and ``end_of`` where a journal that went its own way (an old primary's records nobody
  acknowledged) parts from the primary's.

Journal records carry the epoch they were made in (``"e"``, omitted for the first: records
made before epochs existed are epoch 1). A node that does not store a volume keeps its epoch
state in memory only and learns it from the sites.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from dfs.meta.replica import ReplicaError, decode_record
from dfs.meta.store import MetaStore
from dfs.types import VolumeId

log = logging.getLogger("dfs.cluster.epochs")

FIRST_EPOCH = 1


class EpochState(msgspec.Struct):
    epoch: int = FIRST_EPOCH
    primary: str = ""
    voted: str = ""
    history: list[tuple[int, int]] = msgspec.field(default_factory=list)

    def last_epoch(self) -> int:
        """The epoch of the last record in this node's journal (as far as ``history`` says)."""
        return self.history[-1][0] if self.history else FIRST_EPOCH

    def end_of(self, epoch: int, top: int) -> int:
        """The sequence of the last record of ``epoch`` or an earlier one in a journal whose
        last record is ``top`` and whose history this is."""
        for e, first in self.history:
            if e > epoch:
                return first - 1
        return top

    def began(self, epoch: int, first: int) -> None:
        """Records of ``epoch`` start at sequence ``first`` in this journal (from ``first``
        on, records of later epochs replace any of earlier ones)."""
        if self.history and self.history[-1][0] == epoch and self.history[-1][1] <= first:
            return  # known already
        while self.history and (self.history[-1][0] >= epoch or self.history[-1][1] >= first):
            self.history.pop()
        self.history.append((epoch, first))

    def wire(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "primary": self.primary}


_KEY = "ep"


def load(meta: MetaStore, vol: VolumeId, primary: str) -> EpochState:
    """This node's epoch state of a stored volume; ``primary``: that of the first epoch (the
    volume's record). A journal whose last records are of a later epoch than the history
    says (a crash between applying them and noting it) is believed over the history."""
    raw = meta.volume_record(vol).get(_KEY)
    try:
        st = msgspec.convert(raw, EpochState) if raw is not None else EpochState(primary=primary)
    except msgspec.ValidationError:
        log.error("volume %d: unreadable epoch state %r; starting from epoch 1", vol, raw)
        st = EpochState(primary=primary)
    _repair(meta, vol, st)
    return st


def save(meta: MetaStore, vol: VolumeId, st: EpochState) -> None:
    """Durably (blocking: call from a worker thread in the event loop's daemon)."""
    meta.update_volume_record(vol, **{_KEY: msgspec.to_builtins(st)})


def _repair(meta: MetaStore, vol: VolumeId, st: EpochState) -> None:
    """Add to ``st.history`` the epochs of the journal's last records it does not name."""
    top = meta.seq(vol)
    if top == 0:
        return
    known = st.last_epoch()
    firsts: dict[int, int] = {}  # epoch -> its first record found
    for seq in range(top, max(0, top - 100_000), -1):
        raw = _record(meta, vol, seq)
        if raw is None:
            break
        try:
            e = decode_record(raw).epoch
        except ReplicaError:
            break
        if e <= known:
            break
        firsts[e] = seq
    for e in sorted(firsts):
        log.warning(
            "volume %d: records of epoch %d from %d were not in its history", vol, e, firsts[e]
        )
        st.began(e, firsts[e])
        st.epoch = max(st.epoch, e)


def _record(meta: MetaStore, vol: VolumeId, seq: int) -> bytes | None:
    for s, raw in meta.journal_entries(vol, seq - 1):
        return raw if s == seq else None
    return None
