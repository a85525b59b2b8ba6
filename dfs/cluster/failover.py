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
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from dfs.cluster import epochs as E
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
            },
            self._vote,
        )
        methods.add("vol.epoch", {**vol, "epoch": Field(int), "primary": Field(str)}, self._told)
        methods.add("vol.who", vol, self._who)

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
        elif self._hears_primary(vol):
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
        return trio.current_time() - self.heard.get(vol, -1e9) < self.failover_after

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
                    if since > self.failover_after + self.rng.random() * self.heartbeat:
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
        self, vol: VolumeId, n_sites: int, others: list[str], *, pre: bool = True
    ) -> bool:
        """Stand for primary of ``vol``; True if this node won. ``pre``: ask first whether a
        majority would vote (no epoch is used up if not)."""
        st = self.roles.epochs[vol]
        majority = n_sites // 2 + 1
        self.heard[vol] = trio.current_time()  # the next try, if this one fails, waits again
        ask = {
            "vol": int(vol),
            "epoch": st.epoch + 1,
            "last": st.last_epoch(),
            "seq": self.meta.seq(vol),
        }
        if pre and await self._poll(ask | {"pre": True}, others, majority - 1) + 1 < majority:
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
        log.warning(
            "volume %d: no word from primary for %.1fs: standing in epoch %d",
            vol,
            self.failover_after,
            epoch,
        )
        votes = 1 + await self._poll(ask | {"epoch": epoch}, others, majority - 1)
        if votes < majority or st.epoch != epoch or st.primary:
            log.info("volume %d: election of epoch %d lost (%d votes)", vol, epoch, votes)
            # Split votes: stand again after a longer, random wait than the others.
            self.heard[vol] = trio.current_time() + self.rng.random() * self.failover_after
            return False
        st.primary = self.me
        st.began(epoch, self.meta.seq(vol) + 1)
        self.meta.epochs[vol] = epoch
        await trio.to_thread.run_sync(self._save, vol)
        log.warning("volume %d: this node is the primary in epoch %d (%d votes)", vol, epoch, votes)
        # Every lease granted under the old primary, and its own claim to be current, end
        # within a lease of the votes: updates of this epoch are made from now on, but
        # acknowledged only after that (``Replicator(not_before=...)``).
        self.not_before[vol] = trio.current_time() + self.lease
        self._changed(vol)
        with self.meta.write() as txn:  # the epoch's first record: see the module docstring
            self.meta.log(txn, vol, "epoch")
        await self._announce(vol, epoch)
        return True

    async def _poll(self, args: dict[str, Any], others: list[str], enough: int) -> int:
        """How many of ``others`` grant ``args`` (a vote or a pre-vote); stops asking once
        ``enough`` did (the others may be down: no reason to wait for their timeouts)."""
        granted = 0

        async def one(site: str) -> None:
            nonlocal granted
            try:
                got = await self._call(site, "repl.vote", args, self.heartbeat)
            except (RpcError, FsError) as exc:
                log.debug("vote of %s: %s", site, exc)
                return
            if isinstance(got, dict) and got.get("granted") is True:
                granted += 1
                if granted >= enough:
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

    def status(self, vol: VolumeId) -> dict[str, Any]:
        st = self.roles.epochs.get(vol)
        out: dict[str, Any] = {"epoch": self.roles.epoch(vol)}
        if st is not None and st.voted:
            out["voted"] = st.voted
        if vol in self.heard and not self.roles.orders(vol):
            out["heard_ago"] = round(trio.current_time() - self.heard[vol], 2)
        return out
