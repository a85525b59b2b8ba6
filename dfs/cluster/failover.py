"""Failover: electing a new primary of a volume, in a new epoch, when its primary is gone.

Each storage site hears its primary every heartbeat (``repl.ping``, sent by the primary's
``Replicator``). A site that has not heard it for ``failover_after`` (plus a random part of a
heartbeat, so that sites rarely stand at once) asks the other sites whether they would vote for
it (a *pre-vote*: nothing changes; a site that still hears a primary says no, so one cut-off
site cannot disturb a working volume). With a majority of yeses it starts an election:
epoch + 1, a vote for itself, on disk; then ``repl.vote`` to the others. A site grants its vote
in an epoch once, to a candidate whose journal is at least as far as its own (the epoch of the
last record, then its sequence: see ``dfs.cluster.epochs``), and only if it does not hear a
primary itself; it writes the vote to disk and drops its read lease before answering. So the
winner holds every update a majority acknowledged (each was on a majority, and the voters were
a majority: one of them had it, and the winner is at least as far).

The winner becomes the primary at once and tells every node (``vol.epoch``): records from
then on carry the new epoch, and its first is an empty ``epoch`` record (so that no record of
an earlier epoch is acknowledged by being counted: Raft's rule). It acknowledges no update
before one lease has passed: every read lease a site holds, and the old primary's own claim to
be current, were granted before the voters moved on and end within a lease.

A node that hears of a higher epoch follows it: an old primary steps down and becomes a site;
a site applies records only from the primary of its epoch (``admit_records``). A node that
stores no replica learns the primary from the announcement, or asks a site (``vol.who``)
every few heartbeats.

What an old primary made that the new one does not have (never acknowledged) is found by the
new primary when that site answers (``EpochState.end_of``): the site is reported as *diverged*
and not counted or leased until it is rolled back (docs/CONSISTENCY.md).
"""

from __future__ import annotations

import errno
import logging
import random
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import trio

from dfs.cluster import epochs as E
from dfs.cluster.replication import Replicator, SiteLink
from dfs.cluster.roles import VolumeRoles
from dfs.errors import FsError
from dfs.net.frames import Field
from dfs.net.rpc import Methods, RpcError
from dfs.types import VolumeId

log = logging.getLogger("dfs.cluster.failover")

Call = Callable[[str, str, dict[str, Any], float], Awaitable[Any]]
WHO_EVERY = 5  # heartbeats between a non-site's questions about a volume's primary


class Failover:
    """See the module docstring. ``changed(vol)``: this node's role in ``vol`` may have
    changed (the service starts or stops its replicator or lease keeper)."""

    def __init__(
        self,
        roles: VolumeRoles,
        call: Call,
        changed: Callable[[VolumeId], None],
        *,
        nodes: list[str],
        heartbeat: float,
        lease: float,
        failover_after: float,
        applying: trio.Lock | None = None,
        settle: Callable[[VolumeId], Awaitable[None]] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.roles = roles
        self.me = roles.me
        self.meta = roles.meta
        self._call = call
        self._changed = changed
        self.nodes = nodes
        self.heartbeat = heartbeat
        self.lease = lease
        self.failover_after = failover_after
        # The applier's lock: a vote is given while no record is being applied (after it,
        # records of the old epoch are refused), so the journal it compared is the one kept.
        self._applying = applying or trio.Lock()
        # Journal the digests of the volume's files written here and still open (hand-over).
        self._settle = settle
        # Per node, not per run: the random waits differ between nodes, and a simulated
        # cluster replays exactly (tests/sim).
        self.rng = rng or random.Random(f"failover:{roles.me}")
        self.heard: dict[VolumeId, float] = {}  # when this site last heard its primary
        self._asked: dict[VolumeId, float] = {}  # when a non-site last asked who orders
        # A primary elected here acknowledges no update of the volume before this time.
        self.not_before: dict[VolumeId, float] = {}
        self._restand: dict[VolumeId, int] = {}  # ordered here, but a site is in this epoch
        self.elections = 0  # started here (for status)

    def register(self, methods: Methods) -> None:
        vol = {"vol": Field(int)}
        methods.add("repl.ping", {**vol, "epoch": Field(int)}, self._ping)
        methods.add(
            "repl.vote",
            {
                **vol,
                "epoch": Field(int),
                "last": Field(int),
                "seq": Field(int),
                "pre": Field(bool, optional=True),
                "handed_by": Field(str, optional=True),
            },
            self._vote,
        )
        methods.add("vol.epoch", {**vol, "epoch": Field(int), "primary": Field(str)}, self._told)
        methods.add("vol.who", vol, self._who)
        methods.add("vol.handover", {**vol, "to": Field(str, max_len=255)}, self._handover)
        methods.add("vol.stand", {**vol, "leases": Field(list, max_len=1024)}, self._stand)

    # --- what this node follows ---------------------------------------------------------------

    def learn(self, vol: VolumeId, epoch: int, primary: str) -> bool:
        """``primary`` orders ``vol`` in ``epoch``: follow it if that is newer than what this
        node follows (durably when it stores the volume). True if anything changed."""
        st = self.roles.epochs.get(vol)
        if st is None:
            st = self.roles.epochs[vol] = E.EpochState(epoch=0)
        if epoch < st.epoch or (epoch == st.epoch and st.primary == primary):
            return False
        if primary == self.me:
            return False  # only an election here makes this node a primary, never hearsay
        if epoch == st.epoch and st.primary not in ("", primary):
            log.error(
                "volume %d: %s and %s both claim epoch %d; keeping %s",
                vol,
                st.primary,
                primary,
                epoch,
                st.primary,
            )
            return False
        was = st.primary
        if epoch > st.epoch:
            st.voted = ""
        st.epoch, st.primary = epoch, primary
        self._save(vol)
        if was != primary:
            log.info("volume %d: primary %s in epoch %d (was %s)", vol, primary, epoch, was or "?")
        self.roles.release(vol)  # a hand-over this node voted in is over
        self.heard[vol] = trio.current_time()
        self._changed(vol)
        return True

    def newer(self, vol: VolumeId, epoch: int, primary: str) -> None:
        """A site of ``vol`` that this node orders answered in a newer ``epoch``: follow its
        ``primary``; or, if nobody won that epoch (the site stood and lost: its vote blocks
        this node's records now), stand again in a later epoch at the next look, without a
        pre-vote — the sites that moved on no longer follow this primary anyway."""
        if primary:
            self.learn(vol, epoch, primary)
        else:
            self._restand[vol] = max(self._restand.get(vol, 0), epoch)

    def _save(self, vol: VolumeId) -> None:
        if self.meta.has_volume(vol) and vol in self.roles.epochs:
            E.save(self.meta, vol, self.roles.epochs[vol])

    def admit_records(self, vol: VolumeId, peer: str, epoch: int | None) -> None:
        """Records of ``vol`` from ``peer``, made in ``epoch``, may be applied here: it is the
        primary this node follows (a higher epoch is learnt first); else ``ESTALE``."""
        if epoch is not None and self.roles.stores(vol):
            st = self.roles.epochs.get(vol)
            if st is not None and epoch > st.epoch:
                self.learn(vol, epoch, peer)
        if self.roles.primary(vol) != peer or (epoch is not None and epoch < self.roles.epoch(vol)):
            raise FsError(
                errno.ESTALE,
                f"{peer} is not the primary of volume {vol} in epoch "
                f"{self.roles.epoch(vol)} ({self.roles.primary(vol)} is)",
            )
        self.heard[vol] = trio.current_time()

    # --- served -----------------------------------------------------------------------------

    async def _ping(self, peer: str, args: dict[str, Any]) -> dict[str, Any]:
        """The primary of ``vol`` in ``epoch`` says it is alive; ``ok`` if this site follows
        it (a newer primary is followed from now on)."""
        vol, epoch = VolumeId(args["vol"]), args["epoch"]
        st = self.roles.epochs.get(vol)
        if st is not None and (epoch > st.epoch or (epoch == st.epoch and st.primary == "")):
            self.learn(vol, epoch, peer)
        ok = self.roles.epoch(vol) == epoch and self.roles.primary(vol) == peer
        if ok:
            self.heard[vol] = trio.current_time()
        # Whom this node follows: "" while an election of its epoch has no winner yet.
        follows = st.primary if st is not None else self.roles.primary(vol)
        return {"ok": ok, "epoch": self.roles.epoch(vol), "primary": follows}

    async def _vote(self, peer: str, args: dict[str, Any]) -> dict[str, Any]:
        async with self._applying:
            return await self._vote_now(peer, args)

    async def _vote_now(self, peer: str, args: dict[str, Any]) -> dict[str, Any]:
        vol, epoch = VolumeId(args["vol"]), args["epoch"]
        pre = bool(args.get("pre"))
        st = self.roles.epochs.get(vol)
        if st is None or not self.roles.stores(vol):
            return {"granted": False, "why": "not a site"}
        mine = (st.last_epoch(), self.meta.seq(vol))
        why = ""
        if epoch < st.epoch or (not pre and epoch == st.epoch and st.voted not in ("", peer)):
            why = f"epoch {st.epoch}, voted for {st.voted or 'nobody'}"
        elif self._hears_primary(vol) and args.get("handed_by") != st.primary:
            # (unless the primary it hears hands the volume over to this candidate)
            why = f"it hears primary {self.roles.primary(vol)}"
        elif (args["last"], args["seq"]) < mine:
            why = f"its journal is further ({mine[0]}, {mine[1]})"
        if why or pre:
            return {"granted": not why, "epoch": st.epoch, "why": why}
        st.epoch, st.voted, st.primary = epoch, peer, ""
        await trio.to_thread.run_sync(self._save, vol)
        keeper = self.roles.leases.get(vol)
        if keeper is not None:
            keeper.revoke()
        self.heard[vol] = trio.current_time()  # give the candidate time to win
        if args.get("handed_by"):  # calls here wait for the winner's word (``learn``)
            self.roles.hold(vol, trio.current_time() + self.heartbeat)
        log.info("volume %d: voted for %s in epoch %d", vol, peer, epoch)
        self._changed(vol)  # an old primary that grants a vote steps down
        return {"granted": True, "epoch": epoch}

    def _hears_primary(self, vol: VolumeId) -> bool:
        """This node follows a live primary of ``vol`` (or is one that has a majority)."""
        if self.roles.orders(vol):
            repl = self.roles.replicator(vol)
            return repl is None or repl.current()
        st = self.roles.epochs.get(vol)
        if st is None or not st.primary:
            return False
        return trio.current_time() - self.heard.get(vol, -1e9) < self.after(vol)

    def after(self, vol: VolumeId) -> float:
        """How long ``vol``'s sites go without its primary before electing another: the
        volume's own ``failover_after`` if it was created with one, else the cluster's."""
        v = self.roles.volumes.get(vol) if self.roles.volumes is not None else None
        if v is not None and v.failover_after is not None:
            return v.failover_after
        return self.failover_after

    async def _told(self, peer: str, args: dict[str, Any]) -> None:
        self.learn(VolumeId(args["vol"]), args["epoch"], args["primary"])

    async def _who(self, peer: str, args: dict[str, Any]) -> dict[str, Any]:
        vol = VolumeId(args["vol"])
        st = self.roles.epochs.get(vol)
        if st is None or not st.primary:
            raise FsError(errno.EAGAIN, f"{self.me} does not know who orders volume {vol}")
        return st.wire()

    # --- watching -----------------------------------------------------------------------------

    async def run(self) -> None:
        now = trio.current_time()
        for vol in self.roles.epochs:
            self.heard.setdefault(vol, now)
        while True:
            await trio.sleep(self.heartbeat / 2)
            if self.roles.volumes is None:
                continue
            for v in self.roles.volumes.all():
                vol = v.vol
                seen = self._restand.pop(vol, 0)
                if seen and self.roles.orders(vol) and self.roles.epoch(vol) < seen:
                    st = self.roles.epochs[vol]
                    st.epoch = seen  # the election below is in a later epoch still
                    others = [s for s in v.sites if s != self.me]
                    await self.elect(vol, len(v.sites), others, pre=False)
                    continue
                if v.stored_on(self.me) and self.roles.stores(vol):
                    if self.roles.orders(vol) or len(v.sites) < 2:
                        continue
                    since = trio.current_time() - self.heard.setdefault(vol, trio.current_time())
                    if since > self.after(vol) + self.rng.random() * self.heartbeat:
                        await self.elect(vol, len(v.sites), [s for s in v.sites if s != self.me])
                elif not v.stored_on(self.me):
                    await self._ask_who(vol, list(v.sites))

    async def _ask_who(self, vol: VolumeId, sites: list[str]) -> None:
        now = trio.current_time()
        if now - self._asked.get(vol, -1e9) < WHO_EVERY * self.heartbeat:
            return
        self._asked[vol] = now
        for site in self.rng.sample(sites, len(sites)):
            try:
                got = await self._call(site, "vol.who", {"vol": int(vol)}, self.heartbeat)
                self.learn(vol, int(got["epoch"]), str(got["primary"]))
                return
            except (RpcError, FsError, KeyError, TypeError, ValueError):
                continue

    async def elect(
        self,
        vol: VolumeId,
        n_sites: int,
        others: list[str],
        *,
        pre: bool = True,
        handed_by: str = "",
        leases: dict[str, float] | None = None,
    ) -> bool:
        """Stand for primary of ``vol``; True if this node won. ``pre``: ask first whether a
        majority would vote (no epoch is used up if not). ``handed_by``: the primary hands
        the volume over to this node (``hand_over``); ``leases`` are the read leases it
        granted that have not ended, in seconds from when it stepped down: this node waits
        for those of sites that did not vote for it (a vote drops a site's lease) before
        its first update, instead of a whole lease."""
        st = self.roles.epochs[vol]
        majority = n_sites // 2 + 1
        self.heard[vol] = trio.current_time()  # the next try, if this one fails, waits again
        ask: dict[str, Any] = {
            "vol": int(vol),
            "epoch": st.epoch + 1,
            "last": st.last_epoch(),
            "seq": self.meta.seq(vol),
        }
        if handed_by:
            ask["handed_by"] = handed_by
        if pre and len(await self._poll(ask | {"pre": True}, others, majority - 1)) + 1 < majority:
            return False
        self.elections += 1
        epoch = st.epoch = st.epoch + 1
        ask["epoch"] = epoch
        was_primary = st.primary == self.me
        st.voted, st.primary = self.me, ""
        await trio.to_thread.run_sync(self._save, vol)
        keeper = self.roles.leases.get(vol)
        if keeper is not None:
            keeper.revoke()
        if was_primary:
            self._changed(vol)  # a candidate orders nothing: its replication stops
        if handed_by:
            log.warning("volume %d: %s hands it over: standing in epoch %d", vol, handed_by, epoch)
        else:
            log.warning(
                "volume %d: no word from primary for %.1fs: standing in epoch %d",
                vol,
                self.after(vol),
                epoch,
            )
        leased = {s for s, left in (leases or {}).items() if left > 0 and s != self.me}
        granted = await self._poll(ask | {"epoch": epoch}, others, majority - 1, leased)
        votes = 1 + len(granted)
        if votes < majority or st.epoch != epoch or st.primary:
            log.info("volume %d: election of epoch %d lost (%d votes)", vol, epoch, votes)
            # Split votes: stand again after a longer, random wait than the others.
            self.heard[vol] = trio.current_time() + self.rng.random() * self.after(vol)
            return False
        st.primary = self.me
        st.began(epoch, self.meta.seq(vol) + 1)
        self.meta.epochs[vol] = epoch
        await trio.to_thread.run_sync(self._save, vol)
        log.warning("volume %d: this node is the primary in epoch %d (%d votes)", vol, epoch, votes)
        # Every lease granted under the old primary, and its own claim to be current, end
        # within a lease of the votes: updates of this epoch are made from now on, but
        # acknowledged only after that (``Replicator(not_before=...)``).
        wait = self.lease
        if leases is not None:
            wait = max((leases[s] for s in leased - granted), default=0.0)
        self.not_before[vol] = trio.current_time() + wait
        self._changed(vol)
        with self.meta.write() as txn:  # the epoch's first record: see the module docstring
            self.meta.log(txn, vol, "epoch")
        await self._announce(vol, epoch)
        return True

    async def _poll(
        self, args: dict[str, Any], others: list[str], enough: int, wanted: Collection[str] = ()
    ) -> set[str]:
        """Which of ``others`` grant ``args`` (a vote or a pre-vote); stops asking once
        ``enough`` did, and every one of ``wanted`` (the others may be down: no reason to
        wait for their timeouts)."""
        granted: set[str] = set()

        async def one(site: str) -> None:
            try:
                got = await self._call(site, "repl.vote", args, self.heartbeat)
            except (RpcError, FsError) as exc:
                log.debug("vote of %s: %s", site, exc)
                return
            if isinstance(got, dict) and got.get("granted") is True:
                granted.add(site)
                if len(granted) >= enough and granted.issuperset(wanted):
                    nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            for site in others:
                nursery.start_soon(one, site)
        return granted

    async def _announce(self, vol: VolumeId, epoch: int) -> None:
        args = {"vol": int(vol), "epoch": epoch, "primary": self.me}

        async def one(node: str) -> None:
            try:
                await self._call(node, "vol.epoch", args, self.heartbeat)
            except (RpcError, FsError) as exc:
                log.debug("telling %s of epoch %d: %s", node, epoch, exc)

        async with trio.open_nursery() as nursery:
            for node in self.nodes:
                if node != self.me:
                    nursery.start_soon(one, node)

    # --- a planned hand-over (``dfs volume promote``) ---------------------------------------------

    async def hand_over(self, vol: VolumeId, to: str, *, limit: float) -> dict[str, Any]:
        """On the primary of ``vol``: make its site ``to`` the primary, in the next epoch,
        losing nothing and refusing nothing (see ``_hand_over``). Returns the new epoch, the
        primary and how long updates waited."""
        if not self.roles.orders(vol):
            raise FsError(
                errno.EAGAIN,
                f"{self.me} is not the primary of volume {vol}: {self.roles.primary(vol)} is",
            )
        if to == self.me:
            return {"epoch": self.roles.epoch(vol), "primary": self.me, "held": 0.0}
        v = self.roles.volume(vol)
        if to not in v.sites:
            raise FsError(
                errno.EINVAL,
                f"{to} is not a storage site of volume {vol} (its sites: {', '.join(v.sites)})",
            )
        repl = self.roles.replicator(vol)
        link = repl.links.get(to) if repl is not None else None
        if repl is None or link is None or not link.in_sync or link.diverged:
            raise FsError(
                errno.EAGAIN,
                f"{to} is not in sync with volume {vol}'s primary {self.me}: promote it once "
                "`dfs volume list` shows it in sync",
            )
        start = trio.current_time()
        with self.roles.handing_over(vol):
            got = await self._hand_over(vol, to, repl, link, limit)
        got["held"] = round(trio.current_time() - start, 3)
        return got

    async def _hand_over(
        self, vol: VolumeId, to: str, repl: Replicator, link: SiteLink, limit: float
    ) -> dict[str, Any]:
        """Client calls and updates from other nodes wait meanwhile (``VolumeRoles.steady``).
        1. The files of the volume open here are settled (their digests journaled), and
           every update made here is acknowledged and applied on ``to``.
        2. This node steps down: it records nothing more (``MetaStore.may_record``), grants
           no lease, and notes how long the leases it granted still run.
        3. ``to`` stands in the next epoch without a pre-vote; the sites vote for it although
           they still hear this primary (it asked), each dropping its lease as it votes; it
           waits only for the leases of sites that did not vote, and tells every node.
        If ``to`` does not win, the volume has no primary until its sites elect one, as
        when a primary dies (within ``failover_after``)."""
        with trio.move_on_after(limit):
            if self._settle is not None:
                await self._settle(vol)
            seq = self.meta.seq(vol)
            await repl.wait(seq)
        seq = self.meta.seq(vol)
        if not (link.in_sync and link.acked >= seq):
            raise FsError(
                errno.EAGAIN,
                f"{to} did not apply update {seq} of volume {vol} within {limit:g}s: "
                f"{self.me} stays its primary",
            )
        st = self.roles.epochs[vol]
        st.primary = ""
        now = trio.current_time()
        leases = [
            [lk.name, round(lk.lease_until - now, 3)]
            for lk in repl.links.values()
            if lk.lease_until > now
        ]
        log.warning("volume %d: handing it over to %s (update %d)", vol, to, seq)
        try:
            got = await self._call(to, "vol.stand", {"vol": int(vol), "leases": leases}, limit)
            epoch, primary = int(got["epoch"]), str(got["primary"])
        except (RpcError, FsError, KeyError, TypeError, ValueError) as exc:
            log.error("volume %d: handing it over to %s failed: %s", vol, to, exc)
            self._changed(vol)  # this node orders it no more: its replication stops
            raise FsError(
                errno.EAGAIN,
                f"handing volume {vol} over to {to} failed ({exc}); its sites elect a "
                f"primary by themselves within {self.failover_after:g}s",
            ) from None
        self.learn(vol, epoch, primary)
        return {"epoch": epoch, "primary": primary, "waited": got.get("waited", 0.0)}

    async def _handover(self, peer: str, args: dict[str, Any]) -> dict[str, Any]:
        limit = max(self.heartbeat, 2 * self.lease)
        return await self.hand_over(VolumeId(args["vol"]), args["to"], limit=limit)

    async def _stand(self, peer: str, args: dict[str, Any]) -> dict[str, Any]:
        """The primary ``peer`` hands ``vol`` over to this site (``_hand_over``)."""
        vol = VolumeId(args["vol"])
        st = self.roles.epochs.get(vol)
        if st is None or not self.roles.stores(vol):
            raise FsError(errno.EINVAL, f"{self.me} is not a storage site of volume {vol}")
        if st.primary != peer:
            raise FsError(
                errno.EAGAIN,
                f"{self.me} follows {st.primary or 'nobody'} in epoch {st.epoch} of volume "
                f"{vol}, not {peer}",
            )
        leases: dict[str, float] = {}
        for item in args["leases"]:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
                raise FsError(errno.EINVAL, "leases: [node, seconds] pairs expected")
            leases[item[0]] = float(item[1])
        v = self.roles.volume(vol)
        others = [s for s in v.sites if s != self.me]
        self.roles.hold(vol, trio.current_time() + 2 * self.heartbeat)  # calls here wait
        try:
            won = await self.elect(
                vol, len(v.sites), others, pre=False, handed_by=peer, leases=leases
            )
        finally:
            self.roles.release(vol)
        if not won:
            raise FsError(errno.EAGAIN, f"{self.me} was not elected in epoch {st.epoch}")
        repl = self.roles.replicator(vol)
        waited = repl.not_before - trio.current_time() if repl is not None else 0.0
        return {"epoch": st.epoch, "primary": self.me, "waited": round(max(0.0, waited), 3)}

    def status(self, vol: VolumeId) -> dict[str, Any]:
        st = self.roles.epochs.get(vol)
        out: dict[str, Any] = {"epoch": self.roles.epoch(vol)}
        if st is not None and st.voted:
            out["voted"] = st.voted
        if vol in self.heard and not self.roles.orders(vol):
            out["heard_ago"] = round(trio.current_time() - self.heard[vol], 2)
        return out
