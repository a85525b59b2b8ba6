"""When a primary may make an update and when it is acknowledged: the majority rule.

``Acknowledgement`` is the part of ``Replicator`` (dfs/cluster/replication.py) that counts:
an update is acknowledged once a majority of the volume's sites (the primary counts) and every
site in sync applied it (``wait``); a primary with fewer than a majority in sync for
``call_timeout`` refuses updates before making them (``admit``); a primary is *current* —
sure no other primary makes updates — while a majority answered its pings within a lease
(``current_until``), and grants no read lease longer than that (``grant``).
"""

from __future__ import annotations

import errno
import logging
import math
from typing import TYPE_CHECKING

import trio

from dfs.errors import FsError
from dfs.meta.store import MetaStore
from dfs.net.rpc import PeerTimeout
from dfs.types import VolumeId

if TYPE_CHECKING:
    from dfs.cluster.replication import SiteLink

log = logging.getLogger("dfs.cluster.replication")


class Acknowledgement:
    """See the module docstring; the state is the ``Replicator``'s."""

    meta: MetaStore
    vol: VolumeId
    links: dict[str, SiteLink]
    majority: int
    call_timeout: float
    lease: float
    heartbeat: float | None
    not_before: float
    _changed: trio.Event
    _short_since: float | None
    _nursery: trio.Nursery | None

    def _fail(self, link: SiteLink, exc: BaseException) -> None:
        raise NotImplementedError

    def _count_in_sync(self) -> None:
        """Note when the sites in sync stop (or start again) being a majority."""
        if self._nursery is None:
            return
        enough = 1 + sum(lk.in_sync for lk in self.links.values()) >= self.majority
        if enough:
            if self._short_since is not None:
                log.info("volume %d: a majority of its sites is in sync again", self.vol)
            self._short_since = None
        elif self._short_since is None:
            self._short_since = trio.current_time()

    def in_sync_sites(self) -> int:
        """How many of the volume's sites are in sync, this primary included."""
        return 1 + sum(lk.in_sync for lk in self.links.values())

    def admit(self) -> None:
        """Raise ``EROFS`` if this primary may not make an update now: fewer than a majority
        of the volume's sites have been in sync for ``call_timeout`` (an update could not be
        acknowledged; failing at once beats every caller waiting out the deadline)."""
        since = self._short_since
        if since is None or trio.current_time() - since < self.call_timeout:
            return
        raise FsError(
            errno.EROFS,
            f"volume {self.vol} is read-only here: {self.in_sync_sites()} of its "
            f"{len(self.links) + 1} sites are in sync with this primary, an update needs "
            f"{self.majority}",
        )

    def _reached(self, seq: int, skip: str | None) -> tuple[int, list[SiteLink]]:
        """How many sites applied ``seq`` (this primary and ``skip`` count), and the sites in
        sync that have not."""
        have = 1
        behind: list[SiteLink] = []
        for lk in self.links.values():
            if lk.name == skip or lk.acked >= seq:
                have += 1
            elif lk.in_sync:
                behind.append(lk)
        return have, behind

    async def wait(self, seq: int | None = None, *, skip: str | None = None) -> None:
        """Return once a majority of the volume's sites and every site in sync have applied
        ``seq`` (default: the latest), and every site that dropped out can no longer hold a
        lease. ``skip``: a site that waits for its own replica itself (it forwarded the
        update: ``NodeFs._applied_here``); it counts as having applied ``seq``.

        Bounded: after ``call_timeout``, sites in sync still behind are dropped out of sync
        (their leases then run out, as for any site that fails), and without a majority the
        update is ``ETIMEDOUT``: it is on this primary and perhaps some sites, and will
        reach the others if this node stays the primary, but it was not acknowledged."""
        if seq is None:
            seq = self.meta.seq(self.vol)
        if self.not_before > trio.current_time():
            await trio.sleep_until(self.not_before)
        deadline = trio.current_time() + self.call_timeout
        while True:
            have, behind = self._reached(seq, skip)
            if have >= self.majority and not behind:
                break
            if trio.current_time() >= deadline:
                if have < self.majority:
                    raise FsError(
                        errno.ETIMEDOUT,
                        f"volume {self.vol}: update {seq} reached {have} of its "
                        f"{len(self.links) + 1} sites within {self.call_timeout:g}s, an "
                        f"acknowledgement needs {self.majority}: its outcome is unknown",
                    )
                for lk in behind:
                    self._fail(
                        lk,
                        PeerTimeout(
                            f"node {lk.name}: did not apply update {seq} of volume "
                            f"{self.vol} within {self.call_timeout:g}s"
                        ),
                    )
                break
            with trio.move_on_at(deadline):
                await self._changed.wait()
        now = trio.current_time()
        late = max((lk.lease_until for lk in self.links.values() if not lk.in_sync), default=now)
        if late > now:
            await trio.sleep_until(late)

    def grant(self, site: str) -> float | bool:
        """A site asks for a read lease: granted while it is in sync and this primary is
        current; the answer is how long (no longer than this primary is sure to be current)."""
        link = self.links.get(site)
        if link is None or not link.in_sync:
            return False
        now = trio.current_time()
        last = self.current_until()
        if last <= now:
            return False
        length = min(self.lease, last - now)
        link.lease_until = max(link.lease_until, now + length)
        return length if length < self.lease else True

    def current_until(self) -> float:
        """Until when this primary is sure no other primary makes updates: a majority of the
        sites answered a ping sent within a lease of that time (forever when it is not
        pinging: no failover). A site votes for a new primary only when it has not heard
        this one for ``failover_after``, and the winner waits a lease before its first
        update."""
        if self.heartbeat is None or self.majority == 1:
            return math.inf
        heard = sorted((lk.heard for lk in self.links.values()), reverse=True)
        return heard[self.majority - 2] + self.lease

    def current(self) -> bool:
        return trio.current_time() < self.current_until()
