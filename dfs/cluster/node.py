"""One node's cluster side inside the daemon: its RPC methods, peers, heartbeat, control socket.

``ClusterNode`` is built from the cluster configuration and this node's name;
the daemon (mountd/daemon.py) drives it in this order::

    node = ClusterNode(config, "n1", secret, data_dir=..., mountpoint=...)
    await node.start(nursery)   # RPC port bound (StartError if taken), control socket, heartbeat
    ...mount, serve...
    node.stop_serving()         # stop accepting RPC and control requests
    ...unmount...
    await node.aclose()         # stop the heartbeat, close the connections to peers

RPC methods (authenticated nodes of the cluster; both take no arguments):

- ``ping`` -> ``info()``: ``{node, id, cluster, cluster_id, address, pid, uptime,
  mount, volumes}``; ``volumes`` lists the configured volumes this node is a
  storage site of, with their primary and sites.
- ``status`` -> ``status()``: the info plus ``peers`` (the heartbeat table,
  ``dfs.cluster.health``) and ``rpc`` (the server's counters).

The control socket (``dfs.cluster.control``, ``DATA_DIR/control.sock``) offers
``status`` to local tools, and ``cluster.status``: this node's status and every
other node's, asked at once (``dfs.cluster.survey``; what ``dfs status`` shows).
The admin tools may also call ``status`` over the network, as the guest
``survey.ADMIN``. Replication registers its methods on ``methods`` and uses
``pool`` and ``health``.

With ``metrics`` (a ``dfs.metrics.NodeMetrics``, when cluster.toml asks for it:
``ClusterConfig.metrics_at``) the node serves Prometheus metrics over HTTP,
among them what ``status`` says, taken at each scrape.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import trio

from dfs.cluster import survey
from dfs.cluster.control import ControlServer, socket_path
from dfs.cluster.health import HealthTable, Heartbeat
from dfs.config import ClusterConfig
from dfs.metrics import MetricsServer, NodeMetrics
from dfs.net.peer import PeerPool
from dfs.net.rpc import Methods, PeerUnavailable
from dfs.net.server import RpcServer

log = logging.getLogger("dfs.cluster.node")

MIN_PROBE_TIMEOUT = 1.0


class StartError(Exception):
    """The node's network side cannot start (e.g. its port is taken); the message says why."""


def probe_timeout(config: ClusterConfig) -> float:
    """A probe's deadline: two heartbeats (at least 1 s), never more than a call's deadline."""
    t = config.timeouts
    return min(t.call, max(2 * t.heartbeat, MIN_PROBE_TIMEOUT))


async def start_scoped(
    nursery: trio.Nursery, fn: Callable[..., Awaitable[None]], *args: Any
) -> tuple[trio.CancelScope, Any]:
    """``nursery.start(fn, *args)`` under a cancel scope of its own, so it can be stopped alone."""
    scope = trio.CancelScope()

    async def runner(*, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await fn(*args, task_status=task_status)

    value = await nursery.start(runner)
    return scope, value


class ClusterNode:
    """The services that make a daemon a member of its cluster."""

    def __init__(
        self,
        config: ClusterConfig,
        node_name: str,
        secret: bytes,
        *,
        data_dir: Path,
        mountpoint: Path,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.config = config
        self.me = config.node(node_name)
        self._secret = secret
        self.data_dir = data_dir
        self.mountpoint = mountpoint
        self.control_path = socket_path(data_dir)
        self.started_at = trio.current_time()
        self.methods = Methods()
        self.methods.add("ping", {}, self._ping)
        self.methods.add("status", {}, self._status)
        self.control_methods = Methods()
        self.control_methods.add("status", {}, self._status)
        self.control_methods.add("cluster.status", {}, self._cluster_status)
        admin = Methods()  # what the admin tools may call over the network
        admin.add("status", {}, self._status)
        self.server = RpcServer.from_config(
            config, node_name, secret, self.methods, guests={survey.ADMIN: admin}
        )
        self.metrics = metrics
        self.metrics_at = config.metrics_at(node_name) if metrics is not None else None
        self._metrics_server: MetricsServer | None = None
        self.health = HealthTable(
            (n.name, n.address, n.port) for n in config.nodes if n.name != node_name
        )
        self.pool: PeerPool | None = None
        self._serving: list[trio.CancelScope] = []
        self._heartbeat: trio.CancelScope | None = None
        # Sections other services add to ``status`` (``add_status``), like their methods.
        self._sections: dict[str, Callable[[], dict[str, Any]]] = {}

    def add_status(self, name: str, section: Callable[[], dict[str, Any]]) -> None:
        """Add ``name: section()`` to what ``status`` answers (as ``methods.add`` adds a
        method): the cluster service reports volumes, roles, sites and leases."""
        if name in self._sections:
            raise ValueError(f"status section {name!r} is already registered")
        self._sections[name] = section

    # --- what the node says about itself ------------------------------------------------------

    def info(self) -> dict[str, Any]:
        me = self.me
        return {
            "node": me.name,
            "id": int(me.id),
            "cluster": self.config.name,
            "cluster_id": self.config.id,
            "address": f"{me.address}:{me.port}",
            "pid": os.getpid(),
            "uptime": round(trio.current_time() - self.started_at, 3),
            "mount": str(self.mountpoint),
            "metrics": None
            if self.metrics_at is None
            else f"http://{_host(self.metrics_at[0])}:{self.metrics_at[1]}/metrics",
            "volumes": [
                {"path": v.path, "primary": v.primary, "sites": list(v.sites)}
                for v in self.config.volumes
                if me.name in v.sites
            ],
        }

    def status(self) -> dict[str, Any]:
        return {
            **self.info(),
            "data": str(self.data_dir),
            "heartbeat": self.config.timeouts.heartbeat,
            "peers": self.health.snapshot(),
            "rpc": dataclasses.asdict(self.server.statistics()),
            **{name: section() for name, section in self._sections.items()},
        }

    async def _ping(self, peer: str, args: dict[str, Any]) -> dict[str, Any]:
        return self.info()

    async def _status(self, peer: str, args: dict[str, Any]) -> dict[str, Any]:
        return self.status()

    async def _cluster_status(self, peer: str, args: dict[str, Any]) -> dict[str, Any]:
        """Every node's status as this node sees the cluster (``dfs.cluster.survey``)."""

        async def call(node: str, method: str, a: Mapping[str, Any], limit: float) -> Any:
            if self.pool is None:
                raise PeerUnavailable("the cluster is not started")
            return await self.pool.peer(node).call(method, a, timeout=limit)

        reports = await survey.gather(
            [n.name for n in self.config.nodes],
            call,
            me=self.me.name,
            local=self.status,
            each=probe_timeout(self.config),
        )
        return {"asked": self.me.name, "nodes": reports}

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        """Listen for peers and local tools, start the heartbeat; StartError if it cannot listen.

        On StartError whatever was started is stopped again before it is raised.
        """
        self.pool = PeerPool(
            self.config, my_name=self.me.name, secret=self._secret, nursery=nursery
        )
        me = self.me
        try:
            scope, _ = await start_scoped(nursery, self.server.run, (me.address, me.port))
        except OSError as exc:
            await self.aclose()
            raise StartError(
                f"node {me.name}: cannot listen on {me.address}:{me.port}: "
                f"{exc.strerror or exc}"
                + (" (another process uses this port)" if exc.errno == errno.EADDRINUSE else "")
            ) from None
        self._serving.append(scope)
        try:
            scope, _ = await start_scoped(
                nursery, ControlServer(self.control_path, self.control_methods).run
            )
        except OSError as exc:
            self.stop_serving()
            await self.aclose()
            raise StartError(
                f"cannot create the control socket {self.control_path}: {exc.strerror or exc}"
            ) from None
        self._serving.append(scope)
        if self.metrics is not None and self.metrics_at is not None:
            self.metrics.watch_status(self.status)
            try:
                self._metrics_server = await MetricsServer.start(self.metrics, *self.metrics_at)
            except OSError as exc:
                self.stop_serving()
                await self.aclose()
                address, port = self.metrics_at
                raise StartError(
                    f"node {me.name}: cannot serve metrics on {address}:{port}: "
                    f"{exc.strerror or exc}"
                    + (" (another process uses this port)" if exc.errno == errno.EADDRINUSE else "")
                ) from None
        heartbeat = Heartbeat(
            self.health,
            self._probe,
            interval=self.config.timeouts.heartbeat,
            probe_timeout=probe_timeout(self.config),
        )
        self._heartbeat, _ = await start_scoped(nursery, heartbeat.run)

    async def _probe(self, name: str, deadline: float) -> Mapping[str, Any]:
        assert self.pool is not None
        result: Mapping[str, Any] = await self.pool.peer(name).call("ping", {}, timeout=deadline)
        return result

    def stop_serving(self) -> None:
        """Stop accepting RPC and control requests (handlers in progress are cancelled)."""
        for scope in self._serving:
            scope.cancel()
        self._serving.clear()

    async def aclose(self) -> None:
        """Stop the heartbeat and the metrics server, close every connection to peers."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        if self._metrics_server is not None:
            server, self._metrics_server = self._metrics_server, None
            await server.stop()
        if self.pool is not None:
            await self.pool.aclose()


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address
