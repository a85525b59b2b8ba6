"""Asking every node of a cluster for its status at once: what ``dfs status`` shows.

Two ways in, one gathering (``gather``):

- through a node: its control socket's ``cluster.status`` (registered by
  ``ClusterNode``) answers its own status and asks every other node for theirs
  over its peer connections. Whatever that node cannot reach is reported as
  unreachable *from it*: on the minority side of a partition only that side
  answers;
- from the admin's machine (``dfs status --config FILE``): ``ask_cluster``
  connects to every node itself, proving the cluster secret under the name
  ``ADMIN``, which no node may bear (dfs/config.py); a node's RPC server lets
  that name call ``status`` and nothing else (``RpcServer(guests=...)``).

Each node's answer is its ``status`` RPC result as it is (dfs/cluster/node.py:
identity, peers as its heartbeat sees them, and the sections other services
add: ``replication``, which also carries the counters). ``gather`` returns one
report per node, ``{"node", "status"}`` or ``{"node", "error", "error_kind"}``
with the kinds of dfs/cluster/health.py; dfs/cluster/clusterview.py turns the
reports into the cluster's picture.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import trio

from dfs.cluster.health import error_kind
from dfs.config import ClusterConfig
from dfs.errors import FsError
from dfs.net.peer import Peer
from dfs.net.rpc import RpcError

log = logging.getLogger("dfs.cluster.survey")

ADMIN = "@admin"  # the admin tools' name in the handshake: may call ``status`` only
SURVEY_TIMEOUT = 3.0  # seconds each node has to answer

Report = dict[str, Any]
Call = Callable[[str, str, Mapping[str, Any], float], Awaitable[Any]]
"""``await call(node, method, args, timeout)``: one RPC; raises ``RpcError``/``FsError``."""


async def gather(
    nodes: Sequence[str],
    call: Call,
    *,
    me: str | None = None,
    local: Callable[[], dict[str, Any]] | None = None,
    each: float = SURVEY_TIMEOUT,
) -> list[Report]:
    """Every node's status, in the order of ``nodes``: node ``me`` answers with ``local()``,
    the others are called concurrently, each within ``each`` seconds."""
    reports: dict[str, Report] = {}

    async def one(name: str) -> None:
        try:
            got = await call(name, "status", {}, each)
            if not isinstance(got, dict) or got.get("node") != name:
                raise FsError(
                    errno.EPROTO, f"node {name} answered with something that is not its status"
                )
            reports[name] = {"node": name, "status": got}
        except (RpcError, FsError) as exc:
            reports[name] = {
                "node": name,
                "error": str(exc) or type(exc).__name__,
                "error_kind": error_kind(exc),
            }

    async with trio.open_nursery() as nursery:
        for name in nodes:
            if name == me and local is not None:
                reports[name] = {"node": name, "status": local()}
            else:
                nursery.start_soon(one, name)
    return [reports[name] for name in nodes]


async def ask_cluster(
    config: ClusterConfig, secret: bytes, *, each: float = SURVEY_TIMEOUT
) -> list[Report]:
    """Every node's status, asked over the network as ``ADMIN`` (the caller holds the
    secret): the view of the cluster from this machine."""
    async with trio.open_nursery() as nursery:
        peers = {
            n.name: Peer(
                n.name,
                n.address,
                n.port,
                secret=secret,
                cluster_id=config.id,
                my_name=ADMIN,
                timeouts=config.timeouts,
                nursery=nursery,
            )
            for n in config.nodes
        }

        async def call(node: str, method: str, args: Mapping[str, Any], limit: float) -> Any:
            return await peers[node].call(method, args, timeout=limit)

        try:
            return await gather([n.name for n in config.nodes], call, each=each)
        finally:
            for p in peers.values():
                p.close_nowait()
            nursery.cancel_scope.cancel()
