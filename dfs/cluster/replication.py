"""Primary-site replication of a volume: journal records shipped to storage sites, applied there.

The primary executes every update of the volume in one lmdb transaction that
becomes journal record ``seq`` (a write-set plus the data-store changes, see
dfs/meta/schema.py). ``Replicator`` (on the primary) runs one sender task per
storage site that sends the records the site has not acknowledged, oldest
first, in batches (``repl.apply``); ``wait(seq)`` returns once every site *in
sync* has applied ``seq`` — an update is acknowledged to its caller only then.

A site that fails a call (unreachable, deadline passed, error) drops out of
sync: updates stop waiting for it, but only after its read lease has run out
(below), so a site that missed an acknowledged update never answers reads as
current. Its sender keeps retrying with backoff; the site's answer always
says which sequence it has applied, so the sender resumes from there (from
the journal; a record's file bytes are then read from the primary's data
file as it is at that moment — later records bring the rest). Once the site
has applied everything the primary has, it is back in sync.

Leases: a site asks the primary for a lease every heartbeat (``repl.lease``),
noting the time *before* it asks; a grant (given only to sites in sync) lets
it treat its replica as current until that time plus ``lease``. The primary
notes the time of each grant; since the site's start time precedes the grant,
the site's lease always ends before the primary's note of it does.

``ReplicaApplier`` (on a site) applies records strictly in order, each in one
lmdb transaction after its data-store changes, with a ``dirty`` intent marking
files whose blocks are newer than their digests (a settle record from the
primary clears it), and reports what changed so the mount can invalidate
the kernel's caches — except for updates this node made itself.
"""

from __future__ import annotations

import errno
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from dfs.data.store import DataStore
from dfs.errors import FsError
from dfs.meta import schema as S
from dfs.meta.replica import ReplicaError, apply_writeset, decode_record
from dfs.meta.store import MetaStore, WriteTxn
from dfs.net.frames import Field
from dfs.net.rpc import Methods, RpcError
from dfs.types import InodeId, NodeId, VolumeId

log = logging.getLogger("dfs.cluster.replication")

_INODES = S.DB_NAMES.index("inodes")
_DIRENTS = S.DB_NAMES.index("dirents")
_INLINE = S.DB_NAMES.index("inline")
_BLOCKS = S.DB_NAMES.index("blocks")

BATCH_RECORDS = 512
BATCH_BYTES = 8 << 20
LIVE_CACHE_BYTES = 256 << 20
BACKOFF_MIN = 0.2
BACKOFF_MAX = 2.0

# What changed, for the kernel's caches: ("i", ino) attributes, ("d", ino) attributes and
# contents, ("e", parent, name) a directory entry.
Inval = tuple[str, int] | tuple[str, int, bytes]


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


# --- the site side ------------------------------------------------------------------------

INLINE_APPLY_BYTES = 256 * 1024


def _data_bytes(records: list[Any]) -> int:
    total = 0
    for item in records:
        if isinstance(item, list) and len(item) == 3 and isinstance(item[2], list):
            total += sum(len(b) for b in item[2] if isinstance(b, bytes))
    return total


class ReplicaApplier:
    """Applies a primary's records to this node's stores; see the module docstring."""

    def __init__(
        self,
        meta: MetaStore,
        data: DataStore,
        me: NodeId,
        notify: Notifier | None = None,
    ) -> None:
        self.meta = meta
        self.data = data
        self.me = me
        self.notify = notify
        self._lock = trio.Lock()

    async def apply(self, vol: VolumeId, records: list[Any]) -> int:
        """Apply ``records`` ([seq, record, blobs]) in order; returns the sequence now applied.

        Records already applied are skipped; a record after a gap stops the batch
        (the answer tells the primary where to resume).
        """
        async with self._lock:
            changed: list[Inval] = []
            try:
                if _data_bytes(records) < INLINE_APPLY_BYTES:
                    # Metadata and small writes: cheaper here than a worker thread's hop.
                    return self._apply_batch(vol, records, changed)
                return await trio.to_thread.run_sync(self._apply_batch, vol, records, changed)
            finally:
                if changed and self.notify is not None:
                    # Before the answer: once the update returns to its caller, no kernel
                    # here may still show the old state.
                    await self.notify.flush(self.notify.put(changed))

    def _apply_batch(self, vol: VolumeId, records: list[Any], changed: list[Inval]) -> int:
        for item in records:
            if not (isinstance(item, list) and len(item) == 3):
                raise ReplicaError("malformed replication record")
            seq, record, blobs = item
            if not isinstance(seq, int) or not isinstance(record, bytes):
                raise ReplicaError("malformed replication record")
            have = self.meta.seq(vol)
            if seq <= have:
                continue
            if seq != have + 1:
                break
            changed.extend(self._apply_one(vol, seq, record, blobs))
        return self.meta.seq(vol)

    def _apply_one(self, vol: VolumeId, seq: int, record: bytes, blobs: Any) -> list[Inval]:
        rec = decode_record(record)
        ws, ops = rec.ws, rec.data
        if not isinstance(blobs, list) or len(blobs) != len(ops):
            raise ReplicaError(f"record {seq}: {len(ops)} data operations, bytes for {blobs!r:.40}")
        touched = {int(op[1]) for op in ops if op[0] != "rm"}
        if touched:
            # Marked before the data changes: blocks newer than their digests are
            # re-checksummed after a crash and not verified by reads until settled.
            with self.meta.write() as txn:
                for ino in touched:
                    txn.put(S.dirty_key(ino), b"", db=self.meta.dirty)
        for op, blob in zip(ops, blobs, strict=True):
            self._data_op(op, blob)
        apply_writeset(self.meta, vol, seq, record, ws)
        settled = {S.read_u64(key[:8]) for idx, key, _v in ws if idx == _BLOCKS} - touched
        settled |= {int(op[1]) for op in ops if op[0] == "rm"}
        if settled:
            with self.meta.write() as txn:
                for ino in settled:
                    txn.delete(S.dirty_key(ino), db=self.meta.dirty)
        if rec.origin == self.me:
            return []
        return invalidations(ws, ops)

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
            fd, _created = self.data.create(ino)
            try:
                DataStore.pwrite(fd, op[2], blob)
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


# --- the primary side -----------------------------------------------------------------------


@dataclass(eq=False)
class SiteLink:
    """The primary's view of one storage site."""

    name: str
    acked: int = -1  # the sequence the site said it has applied; -1: not heard yet
    in_sync: bool = False
    lease_until: float = -math.inf  # when the last lease granted to it ends (trio clock)
    last_error: str = ""
    wake: trio.Event = field(default_factory=trio.Event)

    def snapshot(self) -> dict[str, Any]:
        return {
            "site": self.name,
            "applied": self.acked,
            "in_sync": self.in_sync,
            "error": self.last_error,
        }


Caller = Callable[[str, str, dict[str, Any], float], Any]


class Replicator:
    """The primary's side of one volume's replication (see the module docstring)."""

    def __init__(
        self,
        meta: MetaStore,
        data: DataStore,
        vol: VolumeId,
        sites: Iterable[str],
        call: Caller,
        *,
        call_timeout: float,
        lease: float,
    ) -> None:
        self.meta = meta
        self.data = data
        self.vol = vol
        self.links = {name: SiteLink(name) for name in sites}
        self._call = call
        self.call_timeout = call_timeout
        self.lease = lease
        self._changed = trio.Event()
        self._live: dict[int, list[bytes | memoryview | None]] = {}
        self._live_bytes = 0

    # hooked to MetaStore.on_commit
    def committed(self, txn: WriteTxn) -> None:
        if txn.vol != self.vol:
            return
        if (
            any(b is not None for b in txn.live)
            and self._live_bytes < LIVE_CACHE_BYTES
            and any(link.in_sync for link in self.links.values())
        ):
            self._live[txn.seq] = list(txn.live)
            self._live_bytes += sum(len(b) for b in txn.live if b is not None)
        for link in self.links.values():
            link.wake.set()

    def _progress(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
        low = min((lk.acked for lk in self.links.values() if lk.in_sync), default=None)
        if low is None:
            low = self.meta.seq(self.vol)
        for seq in [s for s in self._live if s <= low]:
            self._live_bytes -= sum(len(b) for b in self._live.pop(seq) if b is not None)

    async def wait(self, seq: int | None = None) -> None:
        """Return once every site in sync has applied ``seq`` (default: the latest), and every
        site that dropped out can no longer hold a lease."""
        if seq is None:
            seq = self.meta.seq(self.vol)
        while True:
            if all(not lk.in_sync or lk.acked >= seq for lk in self.links.values()):
                break
            await self._changed.wait()
        now = trio.current_time()
        late = max((lk.lease_until for lk in self.links.values() if not lk.in_sync), default=now)
        if late > now:
            await trio.sleep_until(late)

    def grant(self, site: str) -> bool:
        """A site asks for a read lease: granted while it is in sync."""
        link = self.links.get(site)
        if link is None or not link.in_sync:
            return False
        link.lease_until = trio.current_time() + self.lease
        return True

    def snapshot(self) -> list[dict[str, Any]]:
        return [lk.snapshot() for lk in self.links.values()]

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for link in self.links.values():
                nursery.start_soon(self._sender, link)

    def kick(self, site: str) -> None:
        """A site announced itself (restart): try it now instead of after the backoff."""
        link = self.links.get(site)
        if link is not None:
            link.wake.set()

    async def _sender(self, link: SiteLink) -> None:
        backoff = BACKOFF_MIN
        while True:
            if link.acked >= self.meta.seq(self.vol):
                link.wake = trio.Event()
                if link.acked >= self.meta.seq(self.vol):
                    await link.wake.wait()
                continue
            batch = self._batch(link.acked)
            try:
                reply = await self._call(
                    link.name,
                    "repl.apply",
                    {"vol": int(self.vol), "records": batch},
                    self.call_timeout,
                )
                have = reply.get("have") if isinstance(reply, dict) else None
                if not isinstance(have, int):
                    raise FsError(errno.EPROTO, f"bad apply answer {reply!r:.80}")
            except (RpcError, FsError) as exc:
                self._drop(link, exc)
                with trio.move_on_after(backoff):
                    link.wake = trio.Event()
                    await link.wake.wait()
                    await trio.sleep(BACKOFF_MIN)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = BACKOFF_MIN
            if batch and have < batch[0][0] - 1 and link.acked >= 0 and have < link.acked:
                log.warning(
                    "site %s went back from %d to %d (restarted?)", link.name, link.acked, have
                )
            link.acked = have
            link.last_error = ""
            if have > self.meta.seq(self.vol):
                log.error(
                    "site %s has applied %d updates of volume %d, more than this primary (%d); "
                    "not replicating to it",
                    link.name,
                    have,
                    self.vol,
                    self.meta.seq(self.vol),
                )
                link.last_error = "ahead of the primary"
                link.in_sync = False
                self._progress()
                await trio.sleep(BACKOFF_MAX * 5)
                continue
            if not batch and have < self.meta.seq(self.vol) and not self._journal_has(have + 1):
                link.last_error = f"needs records from {have + 1}, no longer in the journal"
                log.error("site %s: %s; it needs a full resync", link.name, link.last_error)
                await trio.sleep(BACKOFF_MAX * 5)
                continue
            if not link.in_sync and have >= self.meta.seq(self.vol):
                link.in_sync = True
                log.info("site %s in sync at update %d of volume %d", link.name, have, self.vol)
            self._progress()

    def _drop(self, link: SiteLink, exc: BaseException) -> None:
        link.last_error = str(exc)
        if link.in_sync:
            link.in_sync = False
            log.warning(
                "site %s dropped out of sync (%s); updates go on without it once its lease ends",
                link.name,
                exc,
            )
        link.acked = max(link.acked, -1)
        self._progress()

    def _journal_has(self, seq: int) -> bool:
        for s, _raw in self.meta.journal_entries(self.vol, seq - 1):
            return s == seq
        return False

    def _batch(self, after: int) -> list[list[Any]]:
        """Records after ``after`` (none to learn the site's position when it is unknown)."""
        if after < 0:
            return []
        out: list[list[Any]] = []
        total = 0
        for seq, raw in self.meta.journal_entries(self.vol, after):
            if out and seq != out[-1][0] + 1:
                break
            blobs = self._blobs(seq, decode_record(raw).data)
            out.append([seq, raw, blobs])
            total += len(raw) + sum(len(b) for b in blobs if b is not None)
            if len(out) >= BATCH_RECORDS or total >= BATCH_BYTES:
                break
        return out

    def _blobs(self, seq: int, ops: list[list[Any]]) -> list[bytes | None]:
        live = self._live.get(seq)
        out: list[bytes | None] = []
        for i, op in enumerate(ops):
            if op[0] != "w":
                out.append(None)
                continue
            if live is not None and live[i] is not None:
                out.append(bytes(live[i]))  # type: ignore[arg-type]
                continue
            fd = self.data.open(op[1], create=False)
            if fd is None:
                out.append(None)
                continue
            try:
                out.append(DataStore.pread(fd, op[2], op[3], op[2] + op[3]))
            finally:
                self.data.close(fd)
        return out


class LeaseKeeper:
    """A site's read lease on a volume from its primary (see the module docstring)."""

    def __init__(self, ask: Callable[[], Any], *, interval: float, lease: float) -> None:
        self._ask = ask
        self.interval = interval
        self.lease = lease
        self.until = -math.inf
        self._granted = trio.Event()

    def current(self) -> bool:
        return trio.current_time() < self.until

    async def wait_current(self, limit: float) -> bool:
        with trio.move_on_after(limit):
            while not self.current():
                await self._granted.wait()
        return self.current()

    async def run(self) -> None:
        while True:
            start = trio.current_time()
            try:
                granted = await self._ask()
            except (RpcError, FsError):
                granted = False
            if granted is True:
                self.until = start + self.lease
                self._granted.set()
                self._granted = trio.Event()
            await trio.sleep(self.interval)


def register_site_methods(
    methods: Methods, applier: ReplicaApplier, primary_of: Callable[[int], str | None]
) -> None:
    """``repl.apply``: records from the volume's primary (and only from it)."""

    async def apply(peer: str, args: dict[str, Any]) -> dict[str, Any]:
        vol = VolumeId(args["vol"])
        if primary_of(vol) != peer:
            raise FsError(errno.EPERM, f"{peer} is not the primary of volume {vol}")
        try:
            have = await applier.apply(vol, args["records"])
        except ReplicaError as exc:
            log.error("cannot apply records of volume %d from %s: %s", vol, peer, exc)
            raise FsError(errno.EPROTO, str(exc)) from None
        return {"have": have}

    methods.add(
        "repl.apply",
        {"vol": Field(int), "records": Field(list)},
        apply,
    )
