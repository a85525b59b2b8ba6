"""Real dfs nodes in one process over ``SimNet``: stores, Vfs, VolumeRoles, ClusterService.

Each node is wired as ``mountd/daemon.py`` wires it (``_serve``, ``_join_cluster``): its own lmdb
``MetaStore`` and ``DataStore`` in a directory of its own, ``Vfs(replica=roles.is_replica,
defer_purge=purge.defer)``, start-up ``recover()``, then the real ``ClusterService`` (which
builds ``NodeFs``, ``OpServer``, ``ReplicaApplier``, ``Replicator``s, ``LeaseKeeper``s) over a
``SimClusterNode`` instead of a ``ClusterNode`` with sockets, started with ``nursery.start``.

A crash is ``kill -9`` of the process, not a power loss: everything the node committed to lmdb
(``sync=False``) or wrote to its data files is in the kernel's page cache and survives, so the
stores are simply reopened from disk. (Power loss, which only keeps what ``vfs.sync()``/fsync
made durable, would need a file-system-level model below lmdb; out of scope here.) Its trio
tasks are cancelled (one difference from kill -9: ``finally`` blocks in dfs code run), its open
file descriptors are closed without settling, its connections break.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

import trio

from dfs.cluster.node import ClusterNode
from dfs.cluster.purge import OrphanPurge
from dfs.cluster.roles import VolumeRoles
from dfs.cluster.service import ClusterService, root_volume
from dfs.cluster.volumes import VolumeTable
from dfs.config import ClusterConfig, NodeConfig, Timeouts, VolumeConfig
from dfs.data.store import DataStore
from dfs.fs.vfs import Vfs
from dfs.meta.store import MetaStore
from dfs.net.rpc import dispatch
from dfs.types import NodeId, VolumeId
from tests.sim.net import SimClusterNode, SimNet

T0 = 1_700_000_000_000_000_000


def make_config(
    names: list[str], root_primary: str, root_sites: list[str], t: Timeouts
) -> ClusterConfig:
    nodes = tuple(NodeConfig(n, "127.0.0.1", 7000 + i, NodeId(i + 1)) for i, n in enumerate(names))
    return ClusterConfig(
        name="sim",
        id="sim-cluster",
        secret_file=Path("/nonexistent"),
        replicas=len(root_sites),
        nodes=nodes,
        volumes=(VolumeConfig("/", root_primary, tuple(root_sites)),),
        timeouts=t,
    )


class _Notify:
    """No kernel: invalidations have nothing to drop."""

    def put(self, batch: list[Any]) -> int:
        return 0

    async def flush(self, ticket: int) -> None:
        return None


class SimNode:
    """One node's process: ``start`` opens its stores and joins; ``crash`` kills it."""

    def __init__(self, net: SimNet, config: ClusterConfig, name: str, root: Path) -> None:
        self.net = net
        self.config = config
        self.name = name
        self.node = config.node(name)
        self.dir = root
        self.service: ClusterService | None = None
        self.vfs: Vfs | None = None
        self.meta: MetaStore | None = None
        self.scope: trio.CancelScope | None = None
        self.nursery: trio.Nursery | None = None
        self.stopped = trio.Event()
        self.stopped.set()
        self.starts = 0
        self.now = T0

    def clock(self) -> int:
        """Wall-clock times for stat: from trio's (mock) clock, so runs repeat."""
        return T0 + int(trio.current_time() * 1e9)

    @property
    def up(self) -> bool:
        return self.scope is not None

    async def start(self, parent: trio.Nursery) -> None:
        assert not self.up
        await self.stopped.wait()
        self.stopped = trio.Event()
        self.starts += 1
        await parent.start(self._process)

    async def _process(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        meta = MetaStore.open(
            self.dir / "meta", cluster_id=self.config.id, node_id=self.node.id, clock=self.clock
        )
        files: Vfs | None = None
        try:
            meta.set_clean(False)
            root = root_volume(self.config)
            roles = VolumeRoles(
                self.name, meta, VolumeTable(meta, root, local=root.stored_on(self.name))
            )
            purge = OrphanPurge()
            vfs = files = Vfs(
                meta,
                DataStore(self.dir / "data"),
                replica=roles.is_replica,
                defer_purge=purge.defer,
            )
            vfs.recover()
            cluster = SimClusterNode(self.net, self.name, self.config.timeouts.connect)
            service = ClusterService(
                self.config, self.node, cast(ClusterNode, cluster), vfs, _Notify(), roles, purge
            )
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    self.scope, self.nursery = scope, nursery
                    self.net.methods[self.name] = cluster.methods
                    self.net.nurseries[self.name] = nursery
                    self.service, self.vfs, self.meta = service, vfs, meta
                    await nursery.start(service.run)
                    task_status.started()
        finally:
            self.net.crashed(self.name)
            self.scope = self.nursery = None
            self.service = None
            if files is not None:  # file descriptors die with the process, unsettled
                for st in list(files.files._inodes.values()):
                    if st.fd is not None:
                        os.close(st.fd)
                        st.fd = None
            meta.close()
            self.vfs = self.meta = None
            self.stopped.set()

    def crash(self) -> None:
        if self.scope is not None:
            self.scope.cancel()
            self.scope = None
            self.net.crashed(self.name)

    async def control(self, method: str, args: dict[str, Any]) -> Any:
        """What ``dfs volume ...`` asks over the control socket."""
        assert self.service is not None
        kind, body = await dispatch(
            self.service.cluster.control_methods, "control", {"m": method, "a": args}
        )
        if "r" not in body:
            raise RuntimeError(f"{method} on {self.name}: {body}")
        return body["r"]


def default_timeouts() -> Timeouts:
    return Timeouts(connect=2.0, call=5.0, heartbeat=1.0)


def volume_ids(node: SimNode) -> list[VolumeId]:
    assert node.service is not None
    return [v.vol for v in node.service.volumes.all()]
