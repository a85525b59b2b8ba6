"""One node's part in every volume: replicating, applying, leasing, creating volumes.

``ClusterService`` wires a node's ``Vfs`` into the cluster for all the volumes
the ``VolumeTable`` knows:

- for each volume this node is the primary of, a ``Replicator`` (started when
  the volume appears) and the ``fs.op`` serving side of ``NodeFs``;
- for each volume it is a storage site of, a ``LeaseKeeper`` asking that
  volume's primary for read leases, and the shared ``ReplicaApplier`` behind
  ``repl.apply`` (records are accepted from the volume's primary only);
- ``NodeFs`` routes every update to the primary of the inode's volume and reads
  volumes this node does not store from their primary (``r.*`` methods).

Volumes appear in three ways: at start (the root volume from the configuration,
the others from the ``mounts`` records in the store), while running (a new
``mounts`` record arrives with the root volume's replication: ``_watch`` looks
every heartbeat) and on request (``vol.init``/``vol.join`` below, while a
volume is being created).

Creating a volume is ``dfs.cluster.volcreate``.
"""

from __future__ import annotations

import errno
import logging
import math
from collections.abc import Callable
from typing import Any

import trio

from dfs.cluster import epochs as E
from dfs.cluster.failover import Failover
from dfs.cluster.node import ClusterNode
from dfs.cluster.nodefs import NodeFs
from dfs.cluster.opserver import OpServer
from dfs.cluster.purge import PURGE_BATCH, OrphanPurge
from dfs.cluster.remote import (
    LocalReader,
    Reader,
    RemoteReader,
    register_read_methods,
)
from dfs.cluster.replication import (
    LeaseKeeper,
    Notifier,
    ReplicaApplier,
    Replicator,
    register_site_methods,
)
from dfs.cluster.roles import Role, VolumeRoles
from dfs.cluster.rollback import Rollback, list_rolled_back
from dfs.cluster.views import HostViews
from dfs.cluster.volcreate import MAX_PATH, VolumeCreation
from dfs.cluster.volumes import Volume, VolumeTable, from_wire
from dfs.config import ClusterConfig, NodeConfig
from dfs.errors import FsError
from dfs.fs.recovery import rechecksum
from dfs.fs.vfs import Vfs
from dfs.meta import schema as S
from dfs.metrics import ReplicationMetrics
from dfs.net.frames import Field
from dfs.net.peer import Peer, Pending
from dfs.net.rpc import PeerUnavailable
from dfs.types import ROOT_INODE, ROOT_VOLUME, InodeId, VolumeId

log = logging.getLogger("dfs.cluster.service")

LEASE_HEARTBEATS = 3
CATCH_UP_WAIT = 10.0


def root_volume(config: ClusterConfig) -> Volume:
    v = next(v for v in config.volumes if v.path == "/")
    sites = tuple(dict.fromkeys((v.primary, *v.sites)))
    return Volume(ROOT_VOLUME, "/", ROOT_INODE, v.primary, sites, ROOT_INODE)


class ClusterService:
    """See the module docstring."""

    def __init__(
        self,
        config: ClusterConfig,
        node: NodeConfig,
        cluster: ClusterNode,
        vfs: Vfs,
        notify: Notifier,
        roles: VolumeRoles,
        purge: OrphanPurge,
        metrics: ReplicationMetrics | None = None,
    ) -> None:
        """``vfs`` was made with ``replica=roles.is_replica`` and ``defer_purge=purge.defer``;
        ``metrics``: where each volume's ``Replicator`` counts (dfs/metrics.py), if at all."""
        assert roles.volumes is not None, "a cluster node knows the volumes"
        self.config = config
        self.me = node.name
        self.cluster = cluster
        self.vfs = vfs
        self.notify = notify
        self.roles = roles
        self.volumes: VolumeTable = roles.volumes
        self.purge = purge
        self.metrics = metrics
        self.lease = LEASE_HEARTBEATS * config.timeouts.heartbeat
        self._nursery: trio.Nursery | None = None
        self._readers: dict[tuple[str, bool], Reader] = {}
        self._adopted: set[VolumeId] = set()  # stored volumes whose epoch state is loaded
        self.views = self._views()
        self.fs = NodeFs(
            vfs,
            roles,
            send=self._forward,
            reader=lambda node: self._reader(node, raw=True),
            post=self._post,
            notify=notify,
            view_volume=self.views.volume_of,
            applied_timeout=config.timeouts.call,
        )
        self.ops = OpServer(
            vfs, roles, self.fs.commits, self.fs.writes, lambda name: config.node(name).id
        )
        methods = cluster.methods
        self.ops.register(methods)
        # Only what this node's kernel holds needs dropping from its caches.
        self.applier = ReplicaApplier(
            vfs.meta,
            vfs.data,
            node.id,
            notify,
            known=lambda ino: ino == ROOT_INODE or ino in vfs.lookups,
            applied=self.fs.applied,
            epochs=self._began,
        )
        t = config.timeouts
        self.failover = Failover(
            roles,
            self._call,
            self._changed,
            nodes=[n.name for n in config.nodes],
            heartbeat=t.heartbeat,
            lease=self.lease,
            failover_after=t.failover_after,
            applying=self.applier.lock,
            settle=vfs.files.settle_volume,
        )
        self.failover.register(methods)
        register_site_methods(methods, self.applier, self._admit_records, self._last_epoch)
        self.rollback = Rollback(
            vfs.meta,
            vfs.data,
            self._call,
            self._admit_records,
            self._last_epoch,
            self._forget,
            notify,
            timeout=t.call,
        )
        self.rollback.register(methods)
        register_read_methods(methods, vfs)
        vol_field = {"vol": Field(int, optional=True)}
        methods.add("repl.lease", vol_field, self._grant)
        methods.add("repl.hello", {}, self._hello)
        methods.add("repl.holds", {"inos": Field(list, max_len=PURGE_BATCH)}, self._holds)
        self.creation = VolumeCreation(
            config,
            self.me,
            vfs,
            roles,
            notify,
            self._call,
            adopt=self._adopt,
            fetch_volumes=self._fetch_volumes,
        )
        self.creation.register(methods, cluster.control_methods)
        cluster.control_methods.add("volume.list", {}, self._control_list)
        cluster.control_methods.add("volume.rolledback", {}, self._control_rolled_back)
        cluster.control_methods.add(
            "volume.promote",
            {"path": Field(str, max_len=MAX_PATH), "to": Field(str, max_len=255)},
            self._control_promote,
        )
        methods.add("vol.list", {}, self._list)
        cluster.add_status("replication", self.status)
        cluster.add_status("files", self.fs.open_files)
        vfs.meta.may_record = roles.may_record
        for v in self.volumes.all():
            self._adopt(v)

    # --- the volumes this node takes part in ------------------------------------------------

    def _adopt(self, v: Volume) -> None:
        """Start this node's part in ``v`` (idempotent): for a volume it stores, load what it
        follows (``dfs.cluster.epochs``), then replicate it or follow its primary."""
        meta = self.vfs.meta
        if v.stored_on(self.me) and meta.has_volume(v.vol) and v.root:
            meta.add_volume(v.vol, v.root, v.path)  # a record still without its root learns it
        if v.stored_on(self.me) and v.vol not in self._adopted:
            if not meta.has_volume(v.vol):
                if v.primary == self.me:
                    log.error(
                        "volume %d (%s): this node is its primary but has no copy", v.vol, v.path
                    )
                    return
                meta.add_volume(v.vol, v.root, v.path)
            st = self.roles.state(v.vol)
            if st is None:  # being created: not in the volume table yet
                st = self.roles.epochs[v.vol] = E.load(meta, v.vol, v.primary)
            self._adopted.add(v.vol)
            self.applier.knows_epoch(v.vol, st.last_epoch())
            if st.primary == self.me:
                meta.epochs[v.vol] = st.epoch
        self._take_part(v)

    def _changed(self, vol: VolumeId) -> None:
        """Failover changed whom this node follows in ``vol``."""
        v = self.volumes.get(vol)
        if v is not None:
            self._take_part(v)

    def _take_part(self, v: Volume) -> None:
        """Replicate ``v`` if this node orders it, else follow its primary as a site."""
        if not v.stored_on(self.me) or v.vol not in self.roles.epochs:
            return
        if self.roles.orders(v.vol):
            keeper = self.roles.leases.pop(v.vol, None)
            if keeper is not None:
                keeper.stop()
            if v.vol in self.roles.replicators:
                return
            repl = Replicator(
                self.vfs.meta,
                self.vfs.data,
                v.vol,
                [s for s in v.sites if s != self.me],
                self._call,
                call_timeout=self.config.timeouts.call,
                lease=self.lease,
                peer=self._peer,
                epoch=self.roles.epochs[v.vol],
                heartbeat=self.config.timeouts.heartbeat,
                newer=lambda epoch, primary: self.failover.newer(v.vol, epoch, primary),
                not_before=self.failover.not_before.pop(v.vol, -math.inf),
                metrics=None if self.metrics is None else self.metrics.for_volume(v.vol),
            )
            self.roles.replicators[v.vol] = repl
            if self._nursery is not None:
                self._nursery.start_soon(repl.run)
                if self.roles.epoch(v.vol) > E.FIRST_EPOCH:
                    self._purge_later(v.vol)  # the orphans the old primary had not purged
                    self._nursery.start_soon(self._settle_inherited, v.vol)
            return
        old = self.roles.replicators.pop(v.vol, None)
        if old is not None:
            log.warning("volume %d: no longer its primary", v.vol)
            old.stop()
            if self._nursery is not None:  # other nodes open their files on the new one
                self._nursery.start_soon(self.ops.release_volume, v.vol)
        if v.vol in self.roles.leases:
            return
        keeper = LeaseKeeper(
            lambda: self._ask_lease(v),
            interval=self.config.timeouts.heartbeat,
            lease=self.lease,
        )
        self.roles.leases[v.vol] = keeper
        if self._nursery is not None:
            self._nursery.start_soon(keeper.run)
            self._nursery.start_soon(self._say_hello, self.roles.primary(v.vol))

    def _purge_later(self, vol: VolumeId) -> None:
        meta = self.vfs.meta
        with meta.read() as txn:
            inos = [S.read_u64(k) for k in txn.cursor(db=meta.orphans).iternext(values=False)]
        for ino in inos:
            try:
                if self.vfs.getattr(InodeId(ino)).volume == vol:
                    self.purge.defer(InodeId(ino))
            except FsError:
                continue

    async def _settle_inherited(self, vol: VolumeId) -> None:
        """This node became the primary of ``vol``: the files its predecessor wrote and never
        settled (it died, or its settle record was not acknowledged and was rolled back) came
        with a ``dirty`` intent and no digests for the blocks written. Their digests are
        computed from the contents, as start-up recovery does, and journaled here; files
        open here are settled by their handles instead."""
        meta = self.vfs.meta
        with meta.read() as txn:
            inos = [S.read_u64(k) for k in txn.cursor(db=meta.dirty).iternext(values=False)]
        for raw in inos:
            ino = InodeId(raw)
            try:
                if self.vfs.files.is_open(ino) or self.vfs.getattr(ino).volume != vol:
                    continue
                # On the event loop, not in a worker thread: its commit is journaled and
                # replicated (the commit hook must run in trio). Rare: only after a failover,
                # for the files the dead primary left unsettled.
                rechecksum(meta, self.vfs.data, ino, self.roles.is_replica)
                await trio.lowlevel.checkpoint()
            except FsError as exc:  # gone meanwhile, or this node stepped down again
                log.info("volume %d: inode %#x not settled: %s", vol, ino, exc)
                continue
            log.info("volume %d: settled inode %#x, left unsettled by the old primary", vol, ino)

    def _admit_records(self, vol: int, peer: str, epoch: int | None) -> None:
        """``repl.apply`` of ``vol`` from ``peer``: raises unless this node follows it."""
        v = self.volumes.get(VolumeId(vol))
        if v is None:
            if self.creation.joining(VolumeId(vol)) != peer:
                raise FsError(errno.EPERM, f"{peer} is not the primary of volume {vol}")
            return
        if v.vol not in self._adopted:
            self._adopt(v)
        self.failover.admit_records(v.vol, peer, epoch)

    def _last_epoch(self, vol: VolumeId) -> int:
        st = self.roles.epochs.get(vol)
        return st.last_epoch() if st is not None else E.FIRST_EPOCH

    async def _forget(self, vol: VolumeId, to: int) -> None:
        """Records after ``to`` were rolled back: the history forgets their epochs."""
        st = self.roles.epochs.get(vol)
        if st is None:
            return
        st.history = [(e, first) for e, first in st.history if first <= to]
        self.applier.knows_epoch(vol, st.last_epoch())
        await trio.to_thread.run_sync(E.save, self.vfs.meta, vol, st)

    async def _began(self, vol: VolumeId, began: list[tuple[int, int]]) -> None:
        """Records of newer epochs were applied here: note them in the history, durably."""
        st = self.roles.epochs.get(vol)
        if st is None:
            return
        for epoch, first in began:
            st.began(epoch, first)
        await trio.to_thread.run_sync(E.save, self.vfs.meta, vol, st)

    async def _fetch_volumes(self) -> bool:
        """A node that does not store the root volume asks one that does for the volumes."""
        root = self.volumes.root
        primary = self.roles.primary(ROOT_VOLUME)
        for node in (primary, *[s for s in root.sites if s != primary]):
            try:
                got = await self._call(node, "vol.list", {}, self.config.timeouts.call)
                vols = [from_wire(d) for d in got if d.get("vol") != ROOT_VOLUME]
            except (FsError, ValueError, TypeError, AttributeError) as exc:
                log.debug("volume table from %s: %s", node, exc)
                continue
            for v in self.volumes.load(vols):
                log.info("volume %d at %s (primary %s)", v.vol, v.path, v.primary)
            return True
        return False

    async def _list(self, peer: str, args: dict[str, Any]) -> list[dict[str, Any]]:
        if not self.volumes.local:
            raise FsError(errno.ESTALE, f"{self.me} does not store the root volume")
        return [v.wire() for v in self.volumes.all()]

    async def _watch(self) -> None:
        """New volumes reach this node with the root volume's records: take part in them."""
        while True:
            await trio.sleep(self.config.timeouts.heartbeat)
            if not self.volumes.local:
                await self._fetch_volumes()
            for v in self.volumes.refresh():
                log.info("volume %d at %s (primary %s)", v.vol, v.path, v.primary)
            for v in self.volumes.all():
                self._adopt(v)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Take part in every volume: replicate, apply, lease, purge, write held writes.
        Started (``nursery.start``) once this node caught up with each primary, or a bounded
        time passed; runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if not self.volumes.local:
                with trio.move_on_after(CATCH_UP_WAIT):
                    for _ in range(int(CATCH_UP_WAIT / self.config.timeouts.heartbeat) + 1):
                        if await self._fetch_volumes():
                            break
                        await trio.sleep(self.config.timeouts.heartbeat)
                for v in self.volumes.all():
                    self._adopt(v)
            for repl in self.roles.replicators.values():
                nursery.start_soon(repl.run)
            nursery.start_soon(self.purge.run, self.vfs, self._ask_holds)
            nursery.start_soon(self.fs.writes.run)
            nursery.start_soon(self._watch)
            nursery.start_soon(self.failover.run)
            for keeper in self.roles.leases.values():
                nursery.start_soon(keeper.run)
            await self._catch_up()
            task_status.started()

    async def _catch_up(self) -> None:
        """Every primary hears that this node (re)started: it catches the sites up at once
        and closes the handles it held open for this node's previous run. Then wait (bounded)
        for a read lease on every volume stored here."""
        primaries = sorted({self.roles.primary(v.vol) for v in self.volumes.all()} - {self.me})
        for p in primaries:
            await self._say_hello(p)
        deadline = trio.current_time() + CATCH_UP_WAIT
        for vol, keeper in list(self.roles.leases.items()):
            known = self.volumes.get(vol)
            who = known.primary if known is not None else "?"
            if await keeper.wait_current(max(0.0, deadline - trio.current_time())):
                log.info("volume %d: caught up with primary %s", vol, who)
            else:
                log.warning(
                    "volume %d: not caught up with primary %s after %.0f s: serving the local "
                    "replica, which may be stale, and refusing updates until the primary answers",
                    vol,
                    who,
                    CATCH_UP_WAIT,
                )

    async def _say_hello(self, primary: str) -> None:
        if primary == self.me:
            return
        try:
            await self._call(primary, "repl.hello", {}, self.config.timeouts.call)
        except FsError as exc:
            log.warning("primary %s unreachable (%s)", primary, exc)

    def _views(self) -> HostViews:
        """``MOUNT/.../HOST``: this node's replica read locally, the others' over RPC."""
        hosts: dict[str, Reader] = {
            n.name: LocalReader(self.vfs) if n.name == self.me else self._reader(n.name)
            for n in self.config.nodes
        }

        def stored(host: str) -> list[tuple[str, InodeId]] | None:
            root = self.volumes.get(ROOT_VOLUME)
            if root is None or root.stored_on(host):
                return None
            return [
                (v.path, v.root)
                for v in self.volumes.all()
                if v.vol != ROOT_VOLUME and v.stored_on(host)
            ]

        return HostViews(hosts, root=lambda: self.vfs.getattr(ROOT_INODE), stored=stored)

    def status(self) -> dict[str, Any]:
        vols = []
        for v in self.volumes.all():
            d: dict[str, Any] = v.as_dict()
            d["epoch"] = self.roles.epoch(v.vol)
            role = self.roles.role(v.vol)
            keeper = self.roles.leases.get(v.vol)
            if role is Role.SITE and keeper is None:
                role = Role.NONE  # stored, but not taking part yet (no lease keeper)
            d["role"] = role.value
            if role is Role.PRIMARY:
                repl = self.roles.replicator(v.vol)
                d["sites_state"] = repl.snapshot() if repl is not None else []
            elif keeper is not None and role is Role.SITE:
                d["lease"] = keeper.current()
            d["applied"] = self.vfs.meta.seq(v.vol)
            d["primary"] = self.roles.primary(v.vol)
            d.update(self.failover.status(v.vol))
            vols.append(d)
        root = vols[0] if vols and vols[0]["vol"] == ROOT_VOLUME else None
        out: dict[str, Any] = {
            "volumes": vols,
            "checksum_failures": self.fs.checksum_failures,
            "read_repairs": self.fs.read_repairs,
            "elections": self.failover.elections,
            "rollbacks": self.rollback.count,
        }
        if root is not None:  # the root volume's part, as before volumes existed
            out["role"] = root["role"]
            out["primary"] = root["primary"]
            out["applied"] = root["applied"]
            if "lease" in root:
                out["lease"] = root["lease"]
            if "sites_state" in root:
                out["sites"] = root["sites_state"]
        return out

    # --- calls ------------------------------------------------------------------------------

    async def _call(self, node: str, method: str, args: dict[str, Any], limit: float) -> Any:
        if self.cluster.pool is None:
            raise FsError(errno.EHOSTDOWN, "the cluster is not started")
        if node == self.me:
            # Whom a volume's primary is, asked while nobody is (an election, a hand-over
            # under way): the record's primary, maybe this node, is the default answer.
            raise PeerUnavailable(f"{method}: no other node orders that volume now")
        return await self.cluster.pool.peer(node).call(method, args, timeout=limit)

    def _post(
        self, node: str, method: str, args: dict[str, Any], on_done: Callable[[Pending], None]
    ) -> Pending:
        if self.cluster.pool is None:
            raise PeerUnavailable("the cluster is not started")
        if node == self.me:
            raise PeerUnavailable(f"{method}: no other node orders that volume now")
        return self.cluster.pool.peer(node).post(method, args, on_done)

    def _peer(self, node: str) -> Peer | None:
        """The connection records are streamed over (``Peer.post``)."""
        return self.cluster.pool.peer(node) if self.cluster.pool is not None else None

    async def _forward(self, node: str, op: str, args: list[Any], ctx: list[Any]) -> Any:
        if node == self.me:
            return await self.ops.local(self.me, op, args, ctx)
        return await self._call(
            node, "fs.op", {"op": op, "args": args, "ctx": ctx}, self.config.timeouts.call
        )

    def _reader(self, node: str, *, raw: bool = False) -> Reader:
        """Reads of ``node``'s replica: ``raw`` for NodeFs (mount points as stored), else
        as a host view shows them."""
        r = self._readers.get((node, raw))
        if r is None:
            r = self._readers[node, raw] = RemoteReader(
                _PeerCaller(self.cluster, node, self.me), timeout=self.config.timeouts.call, raw=raw
            )
        return r

    async def _ask_lease(self, v: Volume) -> Any:
        return await self._call(
            self.roles.primary(v.vol),
            "repl.lease",
            {"vol": int(v.vol)},
            self.config.timeouts.heartbeat,
        )

    # --- served to the other nodes ---------------------------------------------------------

    async def _grant(self, peer: str, args: dict[str, Any]) -> float | bool:
        vol = VolumeId(args.get("vol", ROOT_VOLUME))
        repl = self.roles.replicators.get(vol)
        # (not once this primary stepped down to hand the volume over: ``Failover.hand_over``)
        return repl is not None and self.roles.orders(vol) and repl.grant(peer)

    async def _hello(self, peer: str, args: dict[str, Any]) -> None:
        await self.ops.release_node(peer)
        for repl in self.roles.replicators.values():
            if peer in repl.links:
                repl.kick(peer)

    async def _holds(self, peer: str, args: dict[str, Any]) -> list[int]:
        return self.fs.holds(args["inos"])

    async def _ask_holds(self, inos: list[int]) -> set[int]:
        """The inodes of ``inos`` that some in-sync site still uses (raises if one cannot say)."""
        held: set[int] = set()
        asked: set[str] = set()
        for repl in list(self.roles.replicators.values()):
            for link in list(repl.links.values()):
                if link.in_sync and link.name not in asked:
                    asked.add(link.name)
                    got = await self._call(
                        link.name, "repl.holds", {"inos": inos}, self.config.timeouts.call
                    )
                    held.update(i for i in got if isinstance(i, int))
        return held

    async def _control_rolled_back(self, peer: str, args: dict[str, Any]) -> list[Any]:
        """What this node rolled back (``dfs.cluster.rollback``), oldest first."""
        return list_rolled_back(self.vfs.data.root.parent)

    async def _control_promote(self, peer: str, args: dict[str, Any]) -> dict[str, Any]:
        """``dfs volume promote``: the primary of the volume at ``path`` hands it over."""
        path = args["path"].rstrip("/") or "/"
        vols = [
            v
            for v in self.volumes.all()
            if v.path == "/" or path == v.path or path.startswith(v.path.rstrip("/") + "/")
        ]
        if not vols:
            raise FsError(errno.ENOENT, f"no volume at {path}")
        v = max(vols, key=lambda v: len(v.path))
        if path != v.path:
            raise FsError(
                errno.EINVAL,
                f"{path} is not a volume: it is in volume {v.vol} at {v.path} (dfs volume list)",
            )
        to = args["to"]
        if to not in {n.name for n in self.config.nodes}:
            raise FsError(errno.EINVAL, f"unknown node {to}")
        limit = 2 * self.config.timeouts.call
        primary = self.roles.primary(v.vol)
        if primary == self.me:
            got = await self.failover.hand_over(v.vol, to, limit=limit)
        else:
            got = await self._call(primary, "vol.handover", {"vol": int(v.vol), "to": to}, limit)
        if not isinstance(got, dict):
            raise FsError(errno.EIO, "malformed answer to vol.handover")
        return {"vol": int(v.vol), "path": v.path, "was": primary, **got}

    async def _control_list(self, peer: str, args: dict[str, Any]) -> list[dict[str, Any]]:
        return list(self.status()["volumes"])


class _PeerCaller:
    """A peer of the cluster's pool, looked up at call time (the pool exists once started)."""

    def __init__(self, cluster: ClusterNode, name: str, me: str) -> None:
        self.cluster = cluster
        self.name = name
        self.me = me

    async def call(
        self,
        method: str,
        args: Any,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - as Peer.call
    ) -> Any:
        if self.cluster.pool is None:
            raise FsError(errno.EHOSTDOWN, "the cluster is not started")
        if self.name == self.me:
            raise PeerUnavailable(f"{method}: no other node orders that volume now")
        return await self.cluster.pool.peer(self.name).call(method, dict(args), timeout=timeout)
