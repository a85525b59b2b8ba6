"""A storage site's side of replication: applying the records a volume's primary ships.

``ReplicaApplier.apply`` (behind ``repl.apply``, see ``register_site_methods``)
applies a request's records strictly in order — the ones already applied are
skipped, a gap stops it — in one lmdb transaction (``replica.apply_writesets``)
after their data-store changes. A ``dirty`` intent, committed before any data
file changes, marks files whose blocks are newer than their digests (a settle
record from the primary clears it, in the same transaction as its write-set).
A ``kill -9`` at any point leaves the replica's metadata equal to the
primary's at some sequence, which the site reports: the next request starts
there. Small requests are applied in the event loop (no thread hop), large
ones in a worker thread.

It reports what changed so the mount can drop it from the kernel's caches
(``Notifier``), before the answer — except for updates this node made itself,
and (with ``known``) for inodes the kernel does not hold, for which there is
nothing to drop and nothing to wait for. ``repl.apply`` is carried out by the
connection's reader in arrival order (``in_order``): a primary pipelines its
requests, and they must be applied in the order it sent them.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import trio

from dfs.data.store import DataStore, direct_eligible
from dfs.errors import FsError
from dfs.meta import schema as S
from dfs.meta.replica import Record, ReplicaError, apply_writesets, decode_record
from dfs.meta.store import MetaStore
from dfs.net.frames import Field
from dfs.net.rpc import Methods
from dfs.types import InodeId, NodeId, VolumeId

log = logging.getLogger("dfs.cluster.replication")

_INODES = S.DB_NAMES.index("inodes")
_DIRENTS = S.DB_NAMES.index("dirents")
_INLINE = S.DB_NAMES.index("inline")
_BLOCKS = S.DB_NAMES.index("blocks")

# What changed, for the kernel's caches: ("i", ino) attributes, ("d", ino) attributes and
# contents, ("e", parent, name) a directory entry.
Inval = tuple[str, int] | tuple[str, int, bytes]


_Item = tuple[int, bytes, list[bytes | None]]
"""One record of ``repl.apply``: its sequence, the packed record, each data operation's bytes."""


class Notifier(Protocol):
    """Where changes made elsewhere go to be dropped from this node's kernel caches."""

    def put(self, batch: list[Inval]) -> int:
        """Queue a batch (never blocks); returns its ticket."""
        ...

    async def flush(self, ticket: int) -> None:
        """Return once batch ``ticket`` is done, or after a short bound (see mountd)."""
        ...


def invalidations(
    ws: Iterable[tuple[int, bytes, bytes | None]], data: Iterable[list[Any]]
) -> list[Inval]:
    """The kernel cache entries a record makes stale."""
    out: list[Inval] = []
    contents: set[int] = set()
    for op in data:
        contents.add(int(op[1]))
    attrs: set[int] = set()
    for idx, key, _value in ws:
        if idx == _INODES:
            attrs.add(S.read_u64(key[:8]))
        elif idx == _DIRENTS:
            out.append(("e", S.read_u64(key[:8]), bytes(key[8:])))
        elif idx == _INLINE:
            contents.add(S.read_u64(key[:8]))
    out.extend(("d", ino) for ino in sorted(contents))
    out.extend(("i", ino) for ino in sorted(attrs - contents))
    return out


INLINE_APPLY_BYTES = 256 * 1024


@dataclass(slots=True)
class _Incoming:
    """One record of a request, checked and decoded."""

    seq: int
    record: bytes
    rec: Record
    blobs: list[Any]


def _data_bytes(records: list[Any]) -> int:
    total = 0
    for item in records:
        if isinstance(item, list) and len(item) == 3 and isinstance(item[2], list):
            total += sum(len(b) for b in item[2] if isinstance(b, bytes))
    return total


class ReplicaApplier:
    """Applies a primary's records to this node's stores; see the module docstring.

    ``known(ino)``: whether this node's kernel may cache anything about ``ino``
    (it holds a reference to it); when given, invalidations of other inodes
    are skipped, and so is the wait for them.
    """

    def __init__(
        self,
        meta: MetaStore,
        data: DataStore,
        me: NodeId,
        notify: Notifier | None = None,
        *,
        known: Callable[[int], bool] | None = None,
        applied: Callable[[], None] | None = None,
        epochs: Callable[[VolumeId, list[tuple[int, int]]], Awaitable[None]] | None = None,
    ) -> None:
        """``epochs(vol, [(epoch, first seq), ...])``: records of newer epochs were applied
        (``dfs.cluster.epochs``: the site notes them in its history)."""
        self.meta = meta
        self.epochs = epochs
        self._last_epoch: dict[VolumeId, int] = {}
        # Called once records are applied (and their invalidations done).
        self.applied = applied
        self.data = data
        self.me = me
        self.notify = notify
        self.known = known
        self._lock = trio.Lock()

    @property
    def lock(self) -> trio.Lock:
        """Held while records are applied: a vote (``dfs.cluster.failover``) takes it, so
        that no record of the old epoch is applied after this site voted in a new one."""
        return self._lock

    async def apply(
        self, vol: VolumeId, records: list[Any], admit: Callable[[], None] | None = None
    ) -> int:
        """Apply ``records`` ([seq, record, blobs]) in order; returns the sequence now applied.

        Records already applied are skipped; a record after a gap stops the batch
        (the answer tells the primary where to resume). ``admit()`` runs once the lock is
        held and may raise: whether the sender is still the primary this node follows.
        """
        try:
            self._lock.acquire_nowait()  # the usual case: no scheduling round for the lock
        except trio.WouldBlock:
            await self._lock.acquire()
        if admit is not None:
            try:
                admit()
            except BaseException:
                self._lock.release()
                raise
        changed: list[Inval] = []
        began: list[tuple[int, int]] = []
        try:
            if _data_bytes(records) < INLINE_APPLY_BYTES:
                # Metadata and small writes: cheaper here than a worker thread's hop.
                have = self._apply_batch(vol, records, changed, began)
            else:
                have = await trio.to_thread.run_sync(
                    self._apply_batch, vol, records, changed, began
                )
            if began and self.epochs is not None:
                await self.epochs(vol, began)
        finally:
            # Filtered here, in the event loop, once the records are committed: a kernel
            # reference taken after this point sees the new state.
            if changed and self.known is not None:
                known = self.known
                changed = [c for c in changed if known(c[1])]
            try:
                if changed and self.notify is not None:
                    # Before the answer: once the update returns to its caller, no kernel
                    # here may still show the old state.
                    await self.notify.flush(self.notify.put(changed))
            finally:
                self._lock.release()
                if self.applied is not None:
                    self.applied()
        return have

    def _apply_batch(
        self,
        vol: VolumeId,
        records: list[Any],
        changed: list[Inval],
        began: list[tuple[int, int]] | None = None,
    ) -> int:
        """Apply the records that follow this store's sequence: data changes (under a
        ``dirty`` intent), then every write-set in one transaction. ``began`` gets each
        epoch whose first record here is among them, with that record's sequence."""
        have = self.meta.seq(vol)
        todo: list[_Incoming] = []
        try:
            items = msgspec.convert(records, list[_Item], strict=True)
        except msgspec.ValidationError as exc:
            raise ReplicaError(f"malformed replication record: {exc}") from None
        for seq, record, blobs in items:
            if seq <= have + len(todo):
                continue
            if seq != have + len(todo) + 1:
                break
            rec = decode_record(record)
            if len(blobs) != len(rec.data):
                raise ReplicaError(
                    f"record {seq}: {len(rec.data)} data operations, bytes for {blobs!r:.40}"
                )
            todo.append(_Incoming(seq, record, rec, blobs))
        if not todo:
            return have
        last = self._last_epoch.get(vol, 0)
        for inc in todo:
            if inc.rec.epoch > last:
                if began is not None:
                    began.append((inc.rec.epoch, inc.seq))
                last = inc.rec.epoch
        # Whether each file's blocks are newer than their digests once all are applied.
        dirty: dict[int, bool] = {}
        for inc in todo:
            ops = inc.rec.data
            touched = {int(op[1]) for op in ops if op[0] != "rm"}
            settled = {S.read_u64(key[:8]) for idx, key, _v in inc.rec.ws if idx == _BLOCKS}
            settled = (settled - touched) | {int(op[1]) for op in ops if op[0] == "rm"}
            dirty.update(dict.fromkeys(touched, True))
            dirty.update(dict.fromkeys(settled, False))
        touched_any = {int(op[1]) for inc in todo for op in inc.rec.data if op[0] != "rm"}
        if touched_any:
            # Committed before the data changes: blocks newer than their digests are
            # re-checksummed after a crash and not verified by reads until settled.
            with self.meta.write(record=False) as txn:
                raw = txn.raw
                for ino in touched_any:
                    raw.put(S.dirty_key(ino), b"", db=self.meta.dirty)
        for inc in todo:
            for op, blob in zip(inc.rec.data, inc.blobs, strict=True):
                self._data_op(op, blob)
        apply_writesets(
            self.meta,
            vol,
            [(inc.seq, inc.record, inc.rec.ws) for inc in todo],
            clean=[ino for ino, d in dirty.items() if not d],
        )
        for inc in todo:
            if inc.rec.origin != self.me:
                changed.extend(invalidations(inc.rec.ws, inc.rec.data))
        self._last_epoch[vol] = last
        return self.meta.seq(vol)

    def knows_epoch(self, vol: VolumeId, epoch: int) -> None:
        """The epoch of the last record this store has of ``vol`` (from its history)."""
        self._last_epoch[vol] = epoch

    def _data_op(self, op: list[Any], blob: Any) -> None:
        kind, ino = op[0], InodeId(op[1])
        if kind == "rm":
            self.data.remove(ino)
            return
        if kind == "w":
            if blob is None:
                return  # gone on the primary by the time it was sent: a later record says so
            if not isinstance(blob, bytes):
                raise ReplicaError("malformed data bytes")
            off = op[2]
            # Large aligned writes (sequential ones) skip the page cache, as on the primary
            # (FileIO._write): a copy in it costs more CPU here than the disk write.
            dfd = self.data.create_direct(ino) if direct_eligible(off, len(blob)) else None
            if dfd is not None:
                try:
                    DataStore.pwrite_direct(dfd, off, blob)
                finally:
                    self.data.close(dfd)
                return
            fd, _created = self.data.create(ino)
            try:
                DataStore.pwrite(fd, off, blob)
            finally:
                self.data.close(fd)
            return
        fd2 = self.data.open(ino, create=False)
        if fd2 is None:
            return
        try:
            DataStore.truncate(fd2, op[2])
        finally:
            self.data.close(fd2)


def register_site_methods(
    methods: Methods,
    applier: ReplicaApplier,
    admit: Callable[[VolumeId, str, int | None], None],
    last_epoch: Callable[[VolumeId], int],
) -> None:
    """``repl.apply``: records from the volume's primary, and only from it: ``admit(vol,
    peer, epoch)`` raises unless ``peer`` is the primary this node follows in ``epoch``.
    The answer is the sequence applied and the epoch of the last record (``last_epoch``)."""

    async def apply(peer: str, args: dict[str, Any]) -> dict[str, Any]:
        vol = VolumeId(args["vol"])
        epoch = args.get("epoch")
        admit(vol, peer, epoch)  # early, and again under the applier's lock
        try:
            have = await applier.apply(vol, args["records"], lambda: admit(vol, peer, epoch))
        except ReplicaError as exc:
            log.error("cannot apply records of volume %d from %s: %s", vol, peer, exc)
            raise FsError(errno.EPROTO, str(exc)) from None
        return {"have": have, "last": last_epoch(vol)}

    methods.add(
        "repl.apply",
        {"vol": Field(int), "records": Field(list), "epoch": Field(int, optional=True)},
        apply,
        in_order=True,  # one primary's stream of updates: applied in order anyway
    )
