"""Who orders each volume, in which epoch, and whether this node may read its replica as current.

``VolumeRoles`` is the one owner of these answers on a node: every routing decision (does this
node apply an update itself or forward it, are reads of a volume answered locally, where do
remote reads go, which ``Replicator`` waits for the sites) asks it, and nothing re-derives them
from a ``Volume`` record at the call site. Failover (a new primary in a new epoch) changes what
it answers, in one place.

A node's role in a volume (``Role``):

- ``PRIMARY``: it orders the volume's updates; its ``Replicator`` ships them to the sites.
- ``SITE``: it stores a replica and applies the primary's records; it reads its replica as
  current while it holds a read lease (its ``LeaseKeeper``).
- ``NONE``: it stores no replica; reads and updates go to the primary.

The epoch of a volume is the term of its current primary: at most one primary accepts updates
per epoch (``dfs.cluster.epochs``; ``dfs.cluster.failover`` elects a new primary in a new epoch
and changes ``epochs``, which every answer here follows). Until a volume's first failover its
primary is the one its record names, in epoch 1.

A node alone (no ``VolumeTable``) orders every volume it has, in epoch 1.
"""

from __future__ import annotations

import enum
import errno
import math
from collections.abc import Iterator
from contextlib import contextmanager

import trio

from dfs.cluster.epochs import FIRST_EPOCH, EpochState
from dfs.cluster.epochs import load as load_epochs
from dfs.cluster.replication import LeaseKeeper, Replicator
from dfs.cluster.volumes import Volume, VolumeTable
from dfs.errors import FsError
from dfs.meta.store import MetaStore
from dfs.types import VolumeId

__all__ = ["FIRST_EPOCH", "Role", "VolumeRoles"]


class Role(enum.Enum):
    PRIMARY = "primary"
    SITE = "site"
    NONE = "none"


class VolumeRoles:
    """See the module docstring.

    ``replicators`` and ``leases`` are this node's parts in the volumes it orders or stores;
    the cluster service adds to them as it takes part in volumes (``ClusterService._adopt``).
    """

    def __init__(
        self,
        me: str,
        meta: MetaStore,
        volumes: VolumeTable | None = None,
        *,
        always_current: bool = False,
    ) -> None:
        """``always_current``: a site reads its replica as current without a lease (core
        tests that drive replication by hand)."""
        self.me = me
        self.meta = meta
        self.volumes = volumes
        self.replicators: dict[VolumeId, Replicator] = {}
        self.leases: dict[VolumeId, LeaseKeeper] = {}
        # What this node follows, per volume: the epoch and its primary (and its votes and
        # journal's epochs for stored volumes). No entry: the volume record's primary, epoch 1.
        self.epochs: dict[VolumeId, EpochState] = {}
        self._always_current = always_current
        # Volumes whose primary (this node) is handing over to another site: client calls and
        # updates from other nodes wait (``steady``) until the new primary orders them.
        self._moving: dict[VolumeId, tuple[trio.Event, float]] = {}

    @classmethod
    def alone(cls, meta: MetaStore, *replicators: Replicator) -> VolumeRoles:
        """A node that orders every volume it has, replicating those of ``replicators``."""
        roles = cls("", meta)
        for r in replicators:
            roles.replicators[r.vol] = r
        return roles

    @property
    def clustered(self) -> bool:
        """Other nodes may change this node's files (it is part of a cluster)."""
        return self.volumes is not None or bool(self.replicators)

    def state(self, vol: VolumeId) -> EpochState | None:
        """What this node follows in ``vol``; for a volume stored here, read from its store the
        first time it is asked (before the cluster service starts: start-up recovery must
        not take this node for a primary it no longer is)."""
        st = self.epochs.get(vol)
        if st is None and self.volumes is not None and self.meta.has_volume(vol):
            v = self.volumes.get(vol)
            if v is not None and v.stored_on(self.me):
                st = self.epochs[vol] = load_epochs(self.meta, vol, v.primary)
        return st

    @contextmanager
    def handing_over(self, vol: VolumeId) -> Iterator[None]:
        """While this node hands ``vol`` over to another primary (``Failover.hand_over``)."""
        if vol in self._moving:
            raise FsError(errno.EAGAIN, f"volume {vol} is being handed over already")
        self.hold(vol, math.inf)
        try:
            yield
        finally:
            self.release(vol)

    def hold(self, vol: VolumeId, until: float) -> None:
        """Calls wait (``steady``) until ``release(vol)``, or at the latest until ``until``
        (trio clock): a hand-over of ``vol`` is under way and this node takes part in it (the
        old primary, the candidate, a voter): its answer of who orders ``vol`` is about to
        change."""
        if vol not in self._moving:
            self._moving[vol] = (trio.Event(), until)

    def release(self, vol: VolumeId) -> None:
        got = self._moving.pop(vol, None)
        if got is not None:
            got[0].set()

    async def steady(self) -> None:
        """Return once no hand-over that this node takes part in is under way (each takes at
        most a call's timeout); every client call and every update from another node passes
        here first, so that none is made by an old primary after it stepped down, nor refused
        for want of a primary while the new one is being elected."""
        while self._moving:
            vol, (done, until) = next(iter(self._moving.items()))
            with trio.move_on_at(until):
                await done.wait()
            if self._moving.get(vol, (None, 0.0))[0] is done:
                self.release(vol)  # it outlived its limit (the candidate lost)

    def volume(self, vol: VolumeId) -> Volume:
        v = self.volumes.get(vol) if self.volumes is not None else None
        if v is None:
            raise FsError(errno.ESTALE, f"volume {vol} is not known here")
        return v

    def role(self, vol: VolumeId) -> Role:
        if self.orders(vol):
            return Role.PRIMARY
        return Role.SITE if self.stores(vol) else Role.NONE

    def primary(self, vol: VolumeId) -> str:
        """The node that orders ``vol`` now (ESTALE when the volume is not known here)."""
        if self.volumes is None:
            return self.me
        st = self.state(vol)
        if st is not None and st.primary:
            return st.primary
        return self.volume(vol).primary

    def epoch(self, vol: VolumeId) -> int:
        """The epoch of ``vol``'s current primary."""
        st = self.state(vol)
        return st.epoch if st is not None and st.epoch else FIRST_EPOCH

    def orders(self, vol: VolumeId) -> bool:
        """This node is the primary of ``vol``: it applies updates itself."""
        if self.volumes is None:
            return True
        st = self.state(vol)
        if st is not None and st.epoch:
            return st.primary == self.me
        v = self.volumes.get(vol)
        return v is not None and v.primary == self.me

    def may_record(self, vol: VolumeId) -> bool:
        """This node may journal an update of ``vol`` (``MetaStore.may_record``): it orders
        it, or the volume is not in the table yet (being created here)."""
        if self.volumes is None or self.volumes.get(vol) is None:
            return True
        return self.orders(vol)

    def admits(self, vol: VolumeId) -> bool:
        """This node orders ``vol`` and may make an update of it now: False when another
        node orders it (forward the update there); ``EROFS`` when this primary has been
        without a majority of the volume's sites in sync for too long (``Replicator.admit``)."""
        if not self.orders(vol):
            return False
        repl = self.replicators.get(vol)
        if repl is not None:
            repl.admit()
        return True

    def is_replica(self, vol: VolumeId) -> bool:
        """This node stores ``vol`` (or will) without ordering it (``Vfs(replica=...)``)."""
        return not self.orders(vol)

    def stores(self, vol: VolumeId) -> bool:
        """This node holds a replica of ``vol``."""
        if self.volumes is None:
            return True
        v = self.volumes.get(vol)
        return v is not None and v.stored_on(self.me) and self.meta.has_volume(vol)

    def current(self, vol: VolumeId) -> bool:
        """This node's replica of ``vol`` (which it stores) answers reads as current: it orders
        the volume, or holds a read lease from its primary."""
        if self._always_current or self.orders(vol):
            return True
        keeper = self.leases.get(vol)
        return keeper is not None and keeper.current()

    def replicator(self, vol: VolumeId) -> Replicator | None:
        """The replication of ``vol`` if this node orders it and it has other sites."""
        return self.replicators.get(vol)
