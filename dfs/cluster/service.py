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

Creating a volume (``volume.create`` on the control socket of any node):

1. that node asks the root volume's primary (``vol.create {path, primary,
   sites}``); it resolves ``path`` to an empty directory of the root volume
   and picks a fresh volume id;
2. the root primary asks the new volume's primary (``vol.init``), which tells
   each of its storage sites (``vol.join``) and creates the volume's root
   directory as the volume's first update (replicated like any other);
3. the root primary records the mount (``Vfs.cover``: a ``mounts`` record in
   the root volume, replicated to every storage site of the root volume before
   the call returns) and every node's kernel drops the old directory; nodes
   that store no root replica, which get no mount records, are told
   (``vol.added``).

A failure between 2 and 3 leaves an empty volume that nothing mounts
(harmless; ``dfs volume list`` does not show it). Only one creation runs at a
time. Volumes are mounted on directories of the root volume only (no nesting),
and are not deleted by this version.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from typing import Any

import trio

from dfs.cluster.node import ClusterNode
from dfs.cluster.nodefs import NodeFs
from dfs.cluster.opserver import OpServer
from dfs.cluster.purge import PURGE_BATCH, OrphanPurge
from dfs.cluster.remote import (
    LocalReader,
    Reader,
    RemoteReader,
    pack_attr,
    register_read_methods,
    unpack_attr,
)
from dfs.cluster.replication import (
    LeaseKeeper,
    Notifier,
    ReplicaApplier,
    Replicator,
    register_site_methods,
)
from dfs.cluster.roles import Role, VolumeRoles
from dfs.cluster.views import HostViews
from dfs.cluster.volumes import Volume, VolumeTable, encode_mount, from_wire
from dfs.config import ClusterConfig, NodeConfig
from dfs.errors import FsError, NotFound
from dfs.fs.vfs import Vfs
from dfs.meta import schema as S
from dfs.meta.store import ORIGIN
from dfs.net.frames import Field
from dfs.net.peer import Peer, Pending
from dfs.net.rpc import PeerUnavailable
from dfs.types import ROOT_INODE, ROOT_VOLUME, InodeId, VolumeId

log = logging.getLogger("dfs.cluster.service")

LEASE_HEARTBEATS = 3
CATCH_UP_WAIT = 10.0
MAX_PATH = 4096
ID_ATTEMPTS = 8


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
    ) -> None:
        """``vfs`` was made with ``replica=roles.is_replica`` and ``defer_purge=purge.defer``."""
        assert roles.volumes is not None, "a cluster node knows the volumes"
        self.config = config
        self.me = node.name
        self.cluster = cluster
        self.vfs = vfs
        self.notify = notify
        self.roles = roles
        self.volumes: VolumeTable = roles.volumes
        self.purge = purge
        self.lease = LEASE_HEARTBEATS * config.timeouts.heartbeat
        self._joined: dict[VolumeId, str] = {}  # volumes being created here: vol -> primary
        self._nursery: trio.Nursery | None = None
        self._creating = trio.Lock()
        self._readers: dict[tuple[str, bool], Reader] = {}
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
        applier = ReplicaApplier(
            vfs.meta,
            vfs.data,
            node.id,
            notify,
            known=lambda ino: ino == ROOT_INODE or ino in vfs.lookups,
            applied=self.fs.applied,
        )
        register_site_methods(methods, applier, self._primary_of)
        register_read_methods(methods, vfs)
        vol_field = {"vol": Field(int, optional=True)}
        methods.add("repl.lease", vol_field, self._grant)
        methods.add("repl.hello", {}, self._hello)
        methods.add("repl.holds", {"inos": Field(list, max_len=PURGE_BATCH)}, self._holds)
        create = {
            "path": Field(str, max_len=MAX_PATH),
            "primary": Field(str, max_len=64),
            "sites": Field(list, max_len=64),
        }
        methods.add("vol.create", create, self._create)
        methods.add(
            "vol.init",
            {
                "vol": Field(int),
                "path": Field(str, max_len=MAX_PATH),
                "sites": Field(list, max_len=64),
                "template": Field(list, max_len=2),
            },
            self._init,
        )
        methods.add(
            "vol.join",
            {"vol": Field(int), "path": Field(str, max_len=MAX_PATH), "primary": Field(str)},
            self._join,
        )
        cm = cluster.control_methods
        cm.add("volume.create", create, self._control_create)
        cm.add("volume.list", {}, self._control_list)
        methods.add("vol.list", {}, self._list)
        methods.add("vol.added", {"volume": Field(dict)}, self._added)
        cluster.add_status("replication", self.status)
        for v in self.volumes.all():
            self._adopt(v)

    # --- the volumes this node takes part in ------------------------------------------------

    def _adopt(self, v: Volume) -> None:
        """Start this node's part in ``v`` (idempotent)."""
        meta = self.vfs.meta
        if v.primary == self.me:
            if v.vol in self.roles.replicators:
                return
            if not meta.has_volume(v.vol):
                log.error("volume %d (%s): this node is its primary but has no copy", v.vol, v.path)
                return
            repl = Replicator(
                meta,
                self.vfs.data,
                v.vol,
                [s for s in v.sites if s != self.me],
                self._call,
                call_timeout=self.config.timeouts.call,
                lease=self.lease,
                peer=self._peer,
            )
            self.roles.replicators[v.vol] = repl
            if self._nursery is not None:
                self._nursery.start_soon(repl.run)
            return
        if self.me not in v.sites or v.vol in self.roles.leases:
            return
        meta.add_volume(v.vol, v.root, v.path)
        keeper = LeaseKeeper(
            lambda: self._ask_lease(v),
            interval=self.config.timeouts.heartbeat,
            lease=self.lease,
        )
        self.roles.leases[v.vol] = keeper
        if self._nursery is not None:
            self._nursery.start_soon(keeper.run)
            self._nursery.start_soon(self._say_hello, v.primary)

    def _primary_of(self, vol: int) -> str | None:
        """Whose records of ``vol`` this node applies (repl.apply)."""
        v = self.volumes.get(VolumeId(vol))
        if v is not None:
            if self.me in v.sites and not self.vfs.meta.has_volume(v.vol):
                self.vfs.meta.add_volume(v.vol, v.root, v.path)
            return v.primary
        return self._joined.get(VolumeId(vol))

    async def _fetch_volumes(self) -> bool:
        """A node that does not store the root volume asks one that does for the volumes."""
        root = self.volumes.root
        for node in (root.primary, *[s for s in root.sites if s != root.primary]):
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
            for keeper in self.roles.leases.values():
                nursery.start_soon(keeper.run)
            await self._catch_up()
            task_status.started()

    async def _catch_up(self) -> None:
        """Every primary hears that this node (re)started: it catches the sites up at once
        and closes the handles it held open for this node's previous run. Then wait (bounded)
        for a read lease on every volume stored here."""
        primaries = sorted({v.primary for v in self.volumes.all()} - {self.me})
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
            if self.roles.orders(v.vol):
                d["role"] = Role.PRIMARY.value
                repl = self.roles.replicator(v.vol)
                d["sites_state"] = repl.snapshot() if repl is not None else []
            elif v.vol in self.roles.leases:
                d["role"] = Role.SITE.value
                d["lease"] = self.roles.leases[v.vol].current()
            else:
                d["role"] = Role.NONE.value
            d["applied"] = self.vfs.meta.seq(v.vol)
            vols.append(d)
        root = vols[0] if vols and vols[0]["vol"] == ROOT_VOLUME else None
        out: dict[str, Any] = {"volumes": vols}
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
        return await self.cluster.pool.peer(node).call(method, args, timeout=limit)

    def _post(
        self, node: str, method: str, args: dict[str, Any], on_done: Callable[[Pending], None]
    ) -> Pending:
        if self.cluster.pool is None:
            raise PeerUnavailable("the cluster is not started")
        return self.cluster.pool.peer(node).post(method, args, on_done)

    def _peer(self, node: str) -> Peer | None:
        """The connection records are streamed over (``Peer.post``)."""
        return self.cluster.pool.peer(node) if self.cluster.pool is not None else None

    async def _forward(self, node: str, op: str, args: list[Any], ctx: list[Any]) -> Any:
        return await self._call(
            node, "fs.op", {"op": op, "args": args, "ctx": ctx}, self.config.timeouts.call
        )

    def _reader(self, node: str, *, raw: bool = False) -> Reader:
        """Reads of ``node``'s replica: ``raw`` for NodeFs (mount points as stored), else
        as a host view shows them."""
        r = self._readers.get((node, raw))
        if r is None:
            r = self._readers[node, raw] = RemoteReader(
                _PeerCaller(self.cluster, node), timeout=self.config.timeouts.call, raw=raw
            )
        return r

    async def _ask_lease(self, v: Volume) -> Any:
        return await self._call(
            v.primary, "repl.lease", {"vol": int(v.vol)}, self.config.timeouts.heartbeat
        )

    # --- served to the other nodes ---------------------------------------------------------

    async def _grant(self, peer: str, args: dict[str, Any]) -> bool:
        repl = self.roles.replicators.get(VolumeId(args.get("vol", ROOT_VOLUME)))
        return repl is not None and repl.grant(peer)

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

    # --- creating volumes -------------------------------------------------------------------

    def _check_nodes(self, primary: str, sites: list[Any]) -> tuple[str, ...]:
        names = {n.name for n in self.config.nodes}
        if not all(isinstance(s, str) for s in sites):
            raise FsError(errno.EINVAL, "sites: node names expected")
        out = tuple(dict.fromkeys([primary, *sites]))
        unknown = [n for n in out if n not in names]
        if unknown:
            raise FsError(errno.EINVAL, f"unknown node(s) {', '.join(unknown)}")
        return out

    async def _control_create(self, peer: str, args: dict[str, Any]) -> dict[str, Any]:
        """``dfs volume create`` on this node: done by the root volume's primary."""
        root = self.volumes.root
        args = {"path": args["path"], "primary": args["primary"], "sites": args["sites"]}
        limit = 4 * self.config.timeouts.call
        if root.primary == self.me:
            got = await self._create(self.me, args)
        else:
            got = await self._call(root.primary, "vol.create", args, limit)
        # The root primary returned once this node (a storage site of the root volume in
        # sync) applied the mount: it is in the table from now on.
        if not self.volumes.local:
            await self._fetch_volumes()
        self.volumes.refresh()
        for v in self.volumes.all():
            self._adopt(v)
        if not isinstance(got, dict):
            raise FsError(errno.EIO, "malformed answer to vol.create")
        return got

    async def _control_list(self, peer: str, args: dict[str, Any]) -> list[dict[str, Any]]:
        return list(self.status()["volumes"])

    async def _create(self, peer: str, args: dict[str, Any]) -> dict[str, Any]:
        if self.volumes.root.primary != self.me:
            raise FsError(errno.EROFS, "not the primary of the root volume")
        path = args["path"]
        sites = self._check_nodes(args["primary"], args["sites"])
        async with self._creating:
            parent, name, mdir = self._resolve(path)
            template = [int(mdir.parent), S.pack_inode(mdir)]
            limit = 2 * self.config.timeouts.call
            vol = self.volumes.new_id()
            for _attempt in range(ID_ATTEMPTS):
                init = {"vol": int(vol), "path": path, "sites": list(sites), "template": template}
                try:
                    if sites[0] == self.me:
                        wire = await self._init(self.me, init)
                    else:
                        wire = await self._call(sites[0], "vol.init", init, limit)
                    break
                except FsError as exc:
                    if exc.errno != errno.EEXIST:
                        raise
                    # An earlier creation failed half-way there: take the next id.
                    vol = self.volumes.new_id(after=vol)
            else:
                raise FsError(errno.EEXIST, "no free volume id")
            root = unpack_attr(wire)
            v = Volume(vol, path, root.ino, sites[0], sites, mdir.ino, parent)
            token = ORIGIN.set(0)  # every node's kernel must drop what it has of the name
            try:
                self.vfs.cover(parent, name, encode_mount(v))
            finally:
                ORIGIN.reset(token)
            repl = self.roles.replicator(ROOT_VOLUME)
            if repl is not None:
                await repl.wait()
            await self.notify.flush(self.notify.put([("e", int(parent), name)]))
            self.volumes.refresh()
            self._adopt(v)
            # Nodes that store no root replica learn of it now rather than at their next
            # heartbeat: the volume's primary may be one, and must know the volume is its own.
            root_vol = self.volumes.root
            async with trio.open_nursery() as nursery:
                for n in self.config.nodes:
                    if n.name != self.me and not root_vol.stored_on(n.name):
                        nursery.start_soon(self._tell_added, n.name, v)
            log.info(
                "volume %d created at %s (primary %s, sites %s)", vol, path, v.primary, v.sites
            )
            return v.as_dict()

    async def _tell_added(self, node: str, v: Volume) -> None:
        try:
            await self._call(node, "vol.added", {"volume": v.wire()}, self.config.timeouts.call)
        except FsError as exc:
            log.info("volume %d: %s not told (%s); it learns of it later", v.vol, node, exc)

    async def _added(self, peer: str, args: dict[str, Any]) -> None:
        """From the root volume's primary: a volume was created (this node does not store
        the root volume, so its table does not get the mount record by replication)."""
        if peer != self.volumes.root.primary:
            raise FsError(errno.EPERM, "only the root volume's primary adds volumes")
        try:
            v = from_wire(args["volume"])
        except (ValueError, TypeError) as exc:
            raise FsError(errno.EINVAL, f"malformed volume: {exc}") from None
        if self.volumes.add(v):
            log.info("volume %d at %s (primary %s)", v.vol, v.path, v.primary)
        self._adopt(v)

    def _resolve(self, path: str) -> tuple[InodeId, bytes, Any]:
        """(parent, name, attributes) of the directory ``path`` of the root volume."""
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if not path.startswith("/") or ".." in parts:
            raise FsError(errno.EINVAL, f"{path!r}: an absolute path in the tree expected")
        if not parts:
            raise FsError(errno.EBUSY, "the root directory is the root volume")
        cur = ROOT_INODE
        parent = ROOT_INODE
        a = self.vfs.getattr(ROOT_INODE)
        for i, part in enumerate(parts):
            parent = cur
            got = self.vfs.peek(cur, part.encode())
            if got is None:
                raise NotFound(message=f"{path}: no such directory")
            if got.is_dir and self.volumes.covering(got.ino) is not None:
                if i == len(parts) - 1:
                    raise FsError(errno.EBUSY, f"{path}: a volume is mounted there already")
                raise FsError(errno.EXDEV, f"{path}: volumes cannot be nested")
            a = got
            cur = got.ino
        if not a.is_dir:
            raise FsError(errno.ENOTDIR, f"{path}: not a directory")
        if not self.vfs.is_empty_dir(a.ino):
            raise FsError(
                errno.ENOTEMPTY, f"{path}: directory not empty (volumes are made on empty ones)"
            )
        return parent, parts[-1].encode(), a

    async def _init(self, peer: str, args: dict[str, Any]) -> list[Any]:
        """On the new volume's primary: tell its sites, then create its root directory."""
        vol = VolumeId(args["vol"])
        if self.vfs.meta.seq(vol) != 0:
            raise FsError(errno.EEXIST, f"volume {vol} exists on {self.me}")
        sites = self._check_nodes(self.me, args["sites"])
        t = args["template"]
        if not (len(t) == 2 and isinstance(t[0], int) and isinstance(t[1], bytes)):
            raise FsError(errno.EINVAL, "malformed template")
        template = S.unpack_inode(InodeId(0), t[1])
        template.parent = InodeId(t[0])
        path = args["path"]
        for s in sites[1:]:
            try:
                await self._call(
                    s,
                    "vol.join",
                    {"vol": int(vol), "path": path, "primary": self.me},
                    self.config.timeouts.call,
                )
            except FsError as exc:
                log.warning("volume %d: site %s not told (%s); it joins later", vol, s, exc)
        self.vfs.meta.add_volume(vol, InodeId(0), path)
        self._adopt(Volume(vol, path, InodeId(0), self.me, sites, InodeId(0)))
        root = self.vfs.make_volume_root(vol, path, template)
        repl = self.roles.replicators.get(vol)
        if repl is not None:
            await repl.wait()
        return pack_attr(root)

    async def _join(self, peer: str, args: dict[str, Any]) -> None:
        """On a storage site of a volume being created: accept its primary's records."""
        vol = VolumeId(args["vol"])
        if args["primary"] != peer:
            raise FsError(errno.EPERM, "only the volume's primary says who its primary is")
        self._joined[vol] = peer
        self.vfs.meta.add_volume(vol, InodeId(0), args["path"])


class _PeerCaller:
    """A peer of the cluster's pool, looked up at call time (the pool exists once started)."""

    def __init__(self, cluster: ClusterNode, name: str) -> None:
        self.cluster = cluster
        self.name = name

    async def call(
        self,
        method: str,
        args: Any,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - as Peer.call
    ) -> Any:
        if self.cluster.pool is None:
            raise FsError(errno.EHOSTDOWN, "the cluster is not started")
        return await self.cluster.pool.peer(self.name).call(method, dict(args), timeout=timeout)
