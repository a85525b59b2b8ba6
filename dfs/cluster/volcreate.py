"""Creating a volume: `volume.create` (control socket), `vol.create`, `vol.init`, `vol.join`.

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
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from dfs.cluster.remote import pack_attr, unpack_attr
from dfs.cluster.replication import Notifier
from dfs.cluster.roles import VolumeRoles
from dfs.cluster.volumes import MAX_FAILOVER_AFTER, Volume, VolumeTable, encode_mount, from_wire
from dfs.config import ClusterConfig
from dfs.errors import FsError, NotFound
from dfs.fs.vfs import Vfs
from dfs.meta import schema as S
from dfs.meta.store import ORIGIN
from dfs.net.frames import Field
from dfs.net.rpc import Methods
from dfs.types import ROOT_INODE, ROOT_VOLUME, InodeId, VolumeId

log = logging.getLogger("dfs.cluster.volcreate")

MAX_PATH = 4096
ID_ATTEMPTS = 8

Call = Callable[[str, str, dict[str, Any], float], Awaitable[Any]]
"""``await call(node, method, args, timeout)``: one RPC to another node."""

CREATE_ARGS = {
    "path": Field(str, max_len=MAX_PATH),
    "primary": Field(str, max_len=64),
    "sites": Field(list, max_len=64),
    "failover_after": Field(float, optional=True),
}


class VolumeCreation:
    """This node's part in creating volumes (any node asks; the root primary decides)."""

    def __init__(
        self,
        config: ClusterConfig,
        me: str,
        vfs: Vfs,
        roles: VolumeRoles,
        notify: Notifier,
        call: Call,
        *,
        adopt: Callable[[Volume], None],
        fetch_volumes: Callable[[], Awaitable[bool]],
    ) -> None:
        """``adopt(v)``: start this node's part in ``v``; ``fetch_volumes()``: a node that
        stores no root replica asks one that does for the volume table."""
        assert roles.volumes is not None
        self.config = config
        self.me = me
        self.vfs = vfs
        self.roles = roles
        self.volumes: VolumeTable = roles.volumes
        self.notify = notify
        self._call = call
        self._adopt = adopt
        self._fetch_volumes = fetch_volumes
        self._creating = trio.Lock()  # one creation at a time
        self._joined: dict[VolumeId, str] = {}  # volumes being created here: vol -> primary

    def register(self, methods: Methods, control: Methods) -> None:
        control.add("volume.create", CREATE_ARGS, self._control_create)
        methods.add("vol.create", CREATE_ARGS, self._create)
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
        methods.add("vol.added", {"volume": Field(dict)}, self._added)

    def joining(self, vol: VolumeId) -> str | None:
        """The primary of ``vol`` if it is being created with this node as a site."""
        return self._joined.get(vol)

    def _check_nodes(self, primary: str, sites: list[Any]) -> tuple[str, ...]:
        names = {n.name for n in self.config.nodes}
        if not all(isinstance(s, str) for s in sites):
            raise FsError(errno.EINVAL, "sites: node names expected")
        out = tuple(dict.fromkeys([primary, *sites]))
        unknown = [n for n in out if n not in names]
        if unknown:
            raise FsError(errno.EINVAL, f"unknown node(s) {', '.join(unknown)}")
        return out

    def _check_failover_after(self, after: Any) -> float | None:
        if after is None:
            return None
        least = 2 * self.config.timeouts.heartbeat
        if not least <= float(after) <= MAX_FAILOVER_AFTER:
            raise FsError(
                errno.EINVAL,
                f"failover_after: {after} s is not between two heartbeats ({least:g} s) "
                f"and {MAX_FAILOVER_AFTER:g} s",
            )
        return float(after)

    async def _control_create(self, peer: str, args: dict[str, Any]) -> dict[str, Any]:
        """``dfs volume create`` on this node: done by the root volume's primary."""
        args = {k: args[k] for k in CREATE_ARGS if k in args}
        limit = 4 * self.config.timeouts.call
        if self.roles.orders(ROOT_VOLUME):
            got = await self._create(self.me, args)
        else:
            got = await self._call(self.roles.primary(ROOT_VOLUME), "vol.create", args, limit)
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

    async def _create(self, peer: str, args: dict[str, Any]) -> dict[str, Any]:
        if not self.roles.orders(ROOT_VOLUME):
            raise FsError(errno.EROFS, "not the primary of the root volume")
        path = args["path"]
        sites = self._check_nodes(args["primary"], args["sites"])
        after = self._check_failover_after(args.get("failover_after"))
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
            v = Volume(vol, path, root.ino, sites[0], sites, mdir.ino, parent, after)
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
        if peer != self.roles.primary(ROOT_VOLUME):
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
