"""Primary-site replication of a volume: journal records shipped to storage sites.

The primary executes every update of the volume in one lmdb transaction that
becomes journal record ``seq`` (a write-set plus the data-store changes, see
dfs/meta/schema.py). ``Replicator`` (on the primary) ships the records to each
storage site (``repl.apply``, oldest first, in batches; the site's side is
``dfs.cluster.applier``); ``wait(seq)`` returns once a *majority* of the
volume's sites (this primary counts) and every site *in sync* have applied
``seq`` — an update is acknowledged to its caller only then.

Majority: a volume of N sites needs N // 2 + 1 of them (2 of 3, 2 of 2, 3 of
5) for an update to be acknowledged, so that any later majority — the one a
new primary is chosen by — includes a site that has it. ``wait`` gives up
after ``call_timeout`` with ``ETIMEDOUT`` when no majority applied the update
(it is on this primary and maybe some sites: the outcome is unknown), and a
primary that has had fewer than a majority of sites in sync for
``call_timeout`` refuses updates before making them (``admit``: ``EROFS``),
until enough sites are back in sync.

Shipping to a site in sync is *streaming*: the commit hook (``committed``)
sends the new record at once, from the committing task and with the record
and write bytes it already has in memory (no journal read, one encoding for
every site), without waiting for the answers to earlier requests: up to
``WINDOW`` requests per site are in flight, and records committed while the
window is full go in one batch when an answer frees it. Answers are taken in
the connection's receiver task (``Peer.post``); a site's sender task only
watches the deadlines (``call_timeout``). Without a ``post``-capable peer
(``peer`` not given) each request is a task doing ``call``, one at a time
(tasks may start in any order, requests must not). A site carries out
``repl.apply`` requests in the order they arrive on the connection and
answers the sequence it has applied: an answer below the request's last
record (a gap: an earlier request was lost) stops the stream, and the sender
catches up one call at a time before streaming again. A site's acknowledged
sequence moves forward only, and only from its answers: an update waits
until each site in sync reported a sequence at least its own.

A site that fails a call (unreachable, deadline passed, error) drops out of
sync: updates stop waiting for it, but only after its read lease has run out
(below), so a site that missed an acknowledged update never answers reads as
current. Its sender keeps retrying with backoff, one call at a time; the
site's answer always says which sequence it has applied, so the sender
resumes from there (from the journal; a record's file bytes are then read
from the primary's data file as it is at that moment — later records bring
the rest). Once the site has applied everything the primary has, it is back
in sync and streams again.

Leases: a site asks the primary for a lease every heartbeat (``repl.lease``),
noting the time *before* it asks; a grant (given only to sites in sync) lets
it treat its replica as current until that time plus ``lease``. The primary
notes the time of each grant; since the site's start time precedes the grant,
the site's lease always ends before the primary's note of it does.
"""

from __future__ import annotations

import errno
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import trio

from dfs.cluster.acks import Acknowledgement
from dfs.cluster.applier import INLINE_APPLY_BYTES as INLINE_APPLY_BYTES
from dfs.cluster.applier import Inval as Inval
from dfs.cluster.applier import Notifier as Notifier
from dfs.cluster.applier import ReplicaApplier as ReplicaApplier
from dfs.cluster.applier import invalidations as invalidations
from dfs.cluster.applier import register_site_methods as register_site_methods
from dfs.cluster.epochs import EpochState
from dfs.cluster.journal_items import Item, batch_after, journal_has, run_after
from dfs.cluster.leases import LeaseKeeper as LeaseKeeper
from dfs.data.store import DataStore
from dfs.errors import FsError
from dfs.meta.store import MetaStore, WriteTxn
from dfs.metrics import VolumeReplicationMetrics
from dfs.net.frames import Packed, pack_args
from dfs.net.peer import Pending
from dfs.net.rpc import PeerTimeout, PeerUnavailable, RpcError
from dfs.types import VolumeId

log = logging.getLogger("dfs.cluster.replication")

WINDOW = 4  # requests in flight per streaming site
LIVE_CACHE_BYTES = 256 << 20
BACKOFF_MIN = 0.2
BACKOFF_MAX = 2.0
ROLLBACK_CALLS = 12  # a rollback's deadline, in call timeouts (it copies files)
COMMIT_TIMES_MAX = 4096  # commit times kept for the acknowledgement latency metric


class Poster(Protocol):
    """A peer that can pipeline requests (``dfs.net.peer.Peer``)."""

    def post(self, method: str, args: Packed, on_done: Callable[[Pending], None]) -> Pending: ...

    def abandon(self, pending: Pending) -> None: ...


@dataclass(eq=False, slots=True)
class _Request:
    """A ``repl.apply`` in flight to a streaming site: records ``first`` .. ``last``."""

    first: int
    last: int
    deadline: float
    gen: int  # the link's ``stream_gen`` when it was sent
    pending: Pending | None = None
    peer: Poster | None = None
    sent: float = 0.0  # when (trio clock), for the replication latency metric


@dataclass(eq=False)
class SiteLink:
    """The primary's view of one storage site."""

    name: str
    acked: int = -1  # the sequence the site said it has applied; -1: not heard yet
    in_sync: bool = False
    lease_until: float = -math.inf  # when the last lease granted to it ends (trio clock)
    last_error: str = ""
    wake: trio.Event = field(default_factory=trio.Event)
    # Streaming: records up to ``sent`` were sent in the requests ``inflight`` (oldest
    # first) or answered; ``stream_gen`` changes whenever the stream stops, so that answers
    # to requests given up on are ignored. (Not the volume's epoch: VolumeRoles.epoch.)
    streaming: bool = False
    sent: int = -1
    inflight: deque[_Request] = field(default_factory=deque)
    stream_gen: int = 0
    poster: Poster | None = None  # how this stream sends; None: a task per call
    failure: BaseException | None = None  # the stream failed: back off, then catch up
    heard: float = -math.inf  # when the last ping it answered as our site was sent
    diverged: bool = False  # it holds records of an older epoch that this primary has not

    def snapshot(self) -> dict[str, Any]:
        return {
            "site": self.name,
            "applied": self.acked,
            "in_sync": self.in_sync,
            "diverged": self.diverged,
            "error": self.last_error,
        }


Caller = Callable[[str, str, dict[str, Any], float], Any]


class Replicator(Acknowledgement):
    """The primary's side of one volume's replication (see the module docstring).

    ``call(site, method, args, timeout)`` makes one RPC; ``peer(site)``, when
    given, returns the site's ``Poster`` (None while it has none) for streaming
    without a task per request.
    """

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
        peer: Callable[[str], Poster | None] | None = None,
        epoch: EpochState | None = None,
        heartbeat: float | None = None,
        newer: Callable[[int, str], object] | None = None,
        not_before: float = -math.inf,
        metrics: VolumeReplicationMetrics | None = None,
    ) -> None:
        """``epoch``: what this primary follows (its epoch and its journal's history), sent with
        every request and used to find sites that diverged; ``heartbeat``: how often each site
        is pinged (None: never — a volume ordered here for good, as in core tests); ``newer``:
        told of a site's answer naming a newer epoch and its primary (this node steps down);
        ``not_before``: no update is acknowledged before this time (trio clock: a primary just
        elected waits until every lease of the old epoch has ended); ``metrics``: where the
        updates ordered here and the replication latencies are counted (dfs/metrics.py)."""
        self.meta = meta
        self.data = data
        self.vol = vol
        self.links = {name: SiteLink(name) for name in sites}
        self._call = call
        self._peer = peer
        self.call_timeout = call_timeout
        self.lease = lease
        self._changed = trio.Event()
        self.majority = (len(self.links) + 1) // 2 + 1  # sites, this primary included
        self._low = -1  # what every site in sync has applied, as last told to ``wait``
        self._synced = 0  # which sites were in sync then (bit i: the i-th of ``links``)
        self._quorum = -1  # what a majority of the sites has applied, as last told to ``wait``
        # Since when fewer than a majority of the sites are in sync (trio clock; None: enough
        # are, or ``run`` has not started).
        self._short_since: float | None = None
        # Records not yet applied by every site in sync, as sent (oldest first).
        self._items: dict[int, Item] = {}
        self._items_bytes = 0
        self._packed: tuple[int, int, Packed] | None = None  # the last request's args
        self._nursery: trio.Nursery | None = None
        self.state = epoch
        self.epoch = epoch.epoch if epoch is not None else 1
        self.heartbeat = heartbeat
        self._newer = newer
        self.not_before = not_before
        self.metrics = metrics
        # Commit times of records not yet on a majority, oldest first (only with metrics).
        self._commit_times: deque[tuple[int, float]] = deque(maxlen=COMMIT_TIMES_MAX)

    def committed(self, txn: WriteTxn) -> None:
        """A transaction committed on this node (``CommitHook``): stream its record. While
        ``run`` is not running (before it starts, or at shutdown, when recovery may commit
        outside trio), the record is only journaled: each site's sender catches up from the
        journal when it runs."""
        if txn.vol != self.vol:
            return
        if self.metrics is not None and txn.record:
            self.metrics.updated()
            if self._nursery is not None and self.majority > 1:
                self._commit_times.append((txn.seq, trio.current_time()))
        if self._nursery is None:
            return
        seq = txn.seq
        if not txn.record or not any(lk.in_sync or lk.streaming for lk in self.links.values()):
            for link in self.links.values():
                link.wake.set()
            return
        blobs = [None if b is None else bytes(b) for b in txn.live]
        size = len(txn.record) + sum(len(b) for b in blobs if b is not None)
        if self._items_bytes + size <= LIVE_CACHE_BYTES:
            self._items[seq] = [seq, txn.record, blobs]
            self._items_bytes += size
        for link in self.links.values():
            if link.streaming:
                self._pump(link)
            else:
                link.wake.set()

    def _progress(self) -> None:
        """A site answered or changed state: wake the updates waiting, if that can matter."""
        top = self.meta.seq(self.vol)
        low = top
        synced = 0
        acked = [top]
        for i, lk in enumerate(self.links.values()):
            acked.append(min(lk.acked, top))
            if lk.in_sync:
                synced |= 1 << i
                if lk.acked < low:
                    low = lk.acked
        acked.sort(reverse=True)
        quorum = acked[self.majority - 1]
        times = self._commit_times
        if times and times[0][0] <= quorum and self.metrics is not None:
            now = trio.current_time()
            while times and times[0][0] <= quorum:
                self.metrics.acknowledged(now - times.popleft()[1])
        if low != self._low or synced != self._synced or quorum != self._quorum:
            self._low, self._synced, self._quorum = low, synced, quorum
            self._changed.set()
            self._changed = trio.Event()
        self._count_in_sync()
        items = self._items
        while items:
            seq = next(iter(items))
            if seq > low:
                break
            _s, record, blobs = items.pop(seq)
            self._items_bytes -= len(record) + sum(len(b) for b in blobs if b is not None)

    def snapshot(self) -> list[dict[str, Any]]:
        """Each site as this primary sees it: applied, lag (updates behind), in sync,
        diverged, lease left (seconds), last error."""
        now = trio.current_time()
        top = self.meta.seq(self.vol)
        out = []
        for lk in self.links.values():
            d = lk.snapshot()
            d["lag"] = top - lk.acked if lk.acked >= 0 else None
            d["lease"] = round(max(0.0, lk.lease_until - now), 2)
            out.append(d)
        return out

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._count_in_sync()  # the sites have until ``call_timeout`` to be in sync
                for link in self.links.values():
                    nursery.start_soon(self._sender, link)
                    if self.heartbeat is not None:
                        nursery.start_soon(self._pinger, link)
        finally:
            self._nursery = None
            self._short_since = None
            for link in self.links.values():
                self._stop(link, "replication stopped")

    def stop(self) -> None:
        """Stop replicating (this node is no longer the primary): ``run`` returns."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _pinger(self, link: SiteLink) -> None:
        """Every heartbeat: is ``link`` still a site of this primary, in this epoch?"""
        assert self.heartbeat is not None
        args = {"vol": int(self.vol), "epoch": self.epoch}
        while True:
            sent = trio.current_time()
            try:
                got = await self._call(link.name, "repl.ping", args, self.heartbeat)
            except (RpcError, FsError):
                got = None
            if isinstance(got, dict):
                if got.get("ok") is True:
                    link.heard = max(link.heard, sent)
                else:
                    epoch, primary = got.get("epoch"), got.get("primary")
                    if (
                        isinstance(epoch, int)
                        and epoch > self.epoch
                        and isinstance(primary, str)
                        and self._newer is not None
                    ):
                        self._newer(epoch, primary)  # "": an election there won by nobody
            await trio.sleep_until(sent + self.heartbeat)

    def kick(self, site: str) -> None:
        """A site announced itself (restart): try it now instead of after the backoff."""
        link = self.links.get(site)
        if link is not None:
            link.wake.set()

    # --- streaming -----------------------------------------------------------------------

    def _pump(self, link: SiteLink) -> None:
        """Send ``link`` what it was not sent yet, while its window has room."""
        top = self.meta.seq(self.vol)
        window = WINDOW if link.poster is not None else 1
        while link.streaming and link.sent < top and len(link.inflight) < window:
            items = run_after(self.meta, self.data, self.vol, self._items, link.sent)
            if not items:  # not in the journal any more: the sender says so
                self._stop(link, f"record {link.sent + 1} is not in the journal")
                return
            self._request(link, items)

    def _request(self, link: SiteLink, items: list[Item]) -> None:
        first, last = items[0][0], items[-1][0]
        now = trio.current_time()
        req = _Request(first, last, now + self.call_timeout, link.stream_gen, sent=now)
        args: dict[str, Any] = {"vol": int(self.vol), "records": items, "epoch": self.epoch}
        link.inflight.append(req)
        link.sent = last
        peer = link.poster
        if peer is None:
            assert self._nursery is not None  # streaming starts in ``run``
            self._nursery.start_soon(self._call_request, link, req, args)
            return
        packed = self._packed
        if packed is None or packed[0] != first or packed[1] != last:
            packed = self._packed = (first, last, pack_args(args))
        req.peer = peer
        try:
            req.pending = peer.post("repl.apply", packed[2], partial(self._posted, link, req))
        except PeerUnavailable as exc:
            # No connection (lost while idle): a call opens one; no reason to drop the site.
            self._stop(link, str(exc))

    async def _call_request(self, link: SiteLink, req: _Request, args: dict[str, Any]) -> None:
        try:
            reply = await self._call(link.name, "repl.apply", args, self.call_timeout)
        except (RpcError, FsError) as exc:
            self._answered(link, req, None, exc)
        else:
            self._answered(link, req, reply, None)

    def _posted(self, link: SiteLink, req: _Request, pending: Pending) -> None:
        try:
            reply = pending.result()
        except (RpcError, FsError) as exc:
            self._answered(link, req, None, exc)
        else:
            self._answered(link, req, reply, None)

    def _answered(
        self, link: SiteLink, req: _Request, reply: Any, exc: BaseException | None
    ) -> None:
        if req.gen != link.stream_gen or req not in link.inflight:
            return  # given up on already
        link.inflight.remove(req)
        have = reply.get("have") if isinstance(reply, dict) else None
        if exc is None:
            if not isinstance(have, int) or isinstance(have, bool):
                exc = FsError(errno.EPROTO, f"bad apply answer {reply!r:.80}")
            elif have > self.meta.seq(self.vol):
                exc = FsError(errno.EPROTO, "ahead of the primary")
        if exc is not None or not isinstance(have, int):
            self._fail(link, exc or FsError(errno.EPROTO, "no answer"))
            return
        if have > link.acked:
            link.acked = have
        if self.metrics is not None:
            self.metrics.site_applied(link.name, trio.current_time() - req.sent)
        if have < req.last:
            # An earlier request did not arrive in time: catch up one call at a time.
            self._stop(link, f"applied {have} of records {req.first}..{req.last}")
        else:
            link.last_error = ""
            self._pump(link)
        self._progress()

    def _stop(self, link: SiteLink, why: str) -> None:
        """Stop streaming to ``link`` (it stays in sync); its sender catches it up."""
        if link.streaming:
            log.debug("site %s: streaming stopped: %s", link.name, why)
        link.streaming = False
        link.stream_gen += 1
        for req in link.inflight:
            if req.pending is not None and req.peer is not None:
                req.peer.abandon(req.pending)
        link.inflight.clear()
        link.sent = link.acked
        link.wake.set()

    def _fail(self, link: SiteLink, exc: BaseException) -> None:
        """A request failed: the site drops out of sync; its sender backs off."""
        self._stop(link, str(exc))
        link.failure = exc
        self._drop(link, exc)

    async def _watch(self, link: SiteLink) -> None:
        """While ``link`` streams: fail it when a request is not answered in time."""
        while link.streaming:
            link.wake = trio.Event()
            if link.inflight:
                deadline = link.inflight[0].deadline
            else:  # a request sent from now on is looked at within a quarter of its time
                deadline = trio.current_time() + self.call_timeout / 4
            with trio.move_on_at(deadline):
                await link.wake.wait()
                continue
            late = link.inflight and link.inflight[0].deadline <= trio.current_time()
            if link.streaming and late:
                self._fail(
                    link,
                    PeerTimeout(
                        f"node {link.name}: repl.apply got no answer within {self.call_timeout:g}s"
                    ),
                )

    def _stream(self, link: SiteLink) -> None:
        link.poster = self._peer(link.name) if self._peer is not None else None
        link.streaming = True
        link.stream_gen += 1
        link.sent = link.acked
        link.inflight.clear()
        self._pump(link)

    # --- catching up ---------------------------------------------------------------------

    async def _sender(self, link: SiteLink) -> None:
        backoff = BACKOFF_MIN
        while True:
            if link.streaming:
                await self._watch(link)
                continue
            if link.failure is not None:
                link.failure = None
                await self._backoff(link, backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            if link.acked >= self.meta.seq(self.vol):
                link.wake = trio.Event()
                if link.acked >= self.meta.seq(self.vol):
                    await link.wake.wait()
                continue
            batch = batch_after(self.meta, self.data, self.vol, self._items, link.acked)
            try:
                reply = await self._call(
                    link.name,
                    "repl.apply",
                    {"vol": int(self.vol), "records": batch, "epoch": self.epoch},
                    self.call_timeout,
                )
                have = reply.get("have") if isinstance(reply, dict) else None
                if not isinstance(have, int):
                    raise FsError(errno.EPROTO, f"bad apply answer {reply!r:.80}")
            except (RpcError, FsError) as exc:
                self._drop(link, exc)
                await self._backoff(link, backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = BACKOFF_MIN
            if batch and have < batch[0][0] - 1 and link.acked >= 0 and have < link.acked:
                log.warning(
                    "site %s went back from %d to %d (restarted?)", link.name, link.acked, have
                )
            top = self.meta.seq(self.vol)
            last = reply.get("last", 1)
            if not isinstance(last, int) or isinstance(last, bool):
                last = 1
            end = self.state.end_of(last, top) if self.state is not None else top
            if have > end:
                link.acked = end  # the records up to there are this primary's
                if not link.diverged:
                    log.error(
                        "site %s holds records %d..%d of volume %d (epoch %d) that this "
                        "primary (epoch %d) does not have: never acknowledged; it must roll "
                        "them back before it is a site again",
                        link.name,
                        end + 1,
                        have,
                        self.vol,
                        last,
                        self.epoch,
                    )
                link.diverged = True
                link.last_error = f"diverged after update {end} (epoch {last})"
                link.in_sync = False
                self._progress()
                try:  # dfs.cluster.rollback: it keeps them aside and takes this journal's
                    await self._call(
                        link.name,
                        "repl.rollback",
                        {"vol": int(self.vol), "epoch": self.epoch, "to": end},
                        ROLLBACK_CALLS * self.call_timeout,
                    )
                except (RpcError, FsError) as exc:
                    link.last_error = f"diverged after update {end}; rollback failed: {exc}"
                    log.warning("site %s: %s", link.name, link.last_error)
                    await self._backoff(link, backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            link.diverged = False
            link.acked = have
            link.last_error = ""
            if have > top:
                log.error(
                    "site %s has applied %d updates of volume %d, more than this primary (%d); "
                    "not replicating to it",
                    link.name,
                    have,
                    self.vol,
                    top,
                )
                link.last_error = "ahead of the primary"
                link.in_sync = False
                self._progress()
                await trio.sleep(BACKOFF_MAX * 5)
                continue
            if not batch and have < top and not journal_has(self.meta, self.vol, have + 1):
                link.last_error = f"needs records from {have + 1}, no longer in the journal"
                log.error("site %s: %s; it needs a full resync", link.name, link.last_error)
                link.in_sync = False
                self._progress()
                await trio.sleep(BACKOFF_MAX * 5)
                continue
            if not link.in_sync and have >= top:
                link.in_sync = True
                log.info("site %s in sync at update %d of volume %d", link.name, have, self.vol)
            if link.in_sync:
                self._stream(link)
            self._progress()

    async def _backoff(self, link: SiteLink, delay: float) -> None:
        with trio.move_on_after(delay):
            link.wake = trio.Event()
            await link.wake.wait()
            await trio.sleep(BACKOFF_MIN)

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
