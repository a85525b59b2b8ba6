"""ClusterNode in one process: nodes on loopback TCP ping each other, keep a reachability table,
answer on their control sockets, and refuse nodes without the secret; plus daemon option helpers.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from dfs.cluster.control import arequest
from dfs.cluster.node import ClusterNode, StartError, probe_timeout
from dfs.config import ClusterConfig, ConfigError, parse
from dfs.net.rpc import PeerAuthError
from mountd.daemon import ClusterSetup, default_data_dir
from tests.waiting import DEADLINE, await_until

SECRET = b"k" * 32


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def make_config(tmp_path: Path, n: int = 3, heartbeat: float = 0.1) -> ClusterConfig:
    ports = free_ports(n)
    raw: dict[str, Any] = {
        "cluster": {"name": "t", "id": "cid-1", "secret_file": "s", "replicas": 2},
        "timeouts": {"connect": 1.0, "call": 2.0, "heartbeat": heartbeat},
        "nodes": [
            {"name": f"n{i + 1}", "address": "127.0.0.1", "port": p, "id": i + 1}
            for i, p in enumerate(ports)
        ],
    }
    return parse(raw, base=tmp_path)


@asynccontextmanager
async def running(
    config: ClusterConfig, tmp_path: Path, names: list[str], secrets: dict[str, bytes] | None = None
) -> AsyncIterator[dict[str, ClusterNode]]:
    secrets = secrets or {}
    async with trio.open_nursery() as nursery:
        nodes = {}
        for name in names:
            data = tmp_path / name
            data.mkdir(exist_ok=True)
            node = ClusterNode(
                config,
                name,
                secrets.get(name, SECRET),
                data_dir=data,
                mountpoint=tmp_path / f"mnt-{name}",
            )
            await node.start(nursery)
            nodes[name] = node
        yield nodes
        for node in nodes.values():
            node.stop_serving()
        for node in nodes.values():
            await node.aclose()
        nursery.cancel_scope.cancel()


async def wait_for(node: ClusterNode, peer: str, state: str, kind: str | None = None) -> None:
    with trio.fail_after(DEADLINE):
        while True:
            row = node.health[peer]
            got = {None: "unknown", True: "reachable", False: "unreachable"}[row.reachable]
            if got == state and (kind is None or row.error_kind == kind):
                return
            await node.health.wait_changed()


def test_nodes_see_each_other_and_answer_ping_and_status(tmp_path: Path) -> None:
    config = make_config(tmp_path)

    async def main() -> None:
        async with running(config, tmp_path, ["n1", "n2", "n3"]) as nodes:
            for me in nodes.values():
                for other in nodes:
                    if other != me.me.name:
                        await wait_for(me, other, "reachable")
            n1 = nodes["n1"]
            assert n1.pool is not None
            pong = await n1.pool.call("n2", "ping", {})
            assert pong["node"] == "n2" and pong["id"] == 2 and pong["cluster_id"] == "cid-1"
            assert pong["mount"] == str(tmp_path / "mnt-n2")
            assert pong["volumes"] == [{"path": "/", "primary": "n1", "sites": ["n1", "n2"]}]
            assert (await n1.pool.call("n3", "ping", {}))["volumes"] == []  # replicas = 2
            remote = await n1.pool.call("n3", "status", {})
            assert {p["name"] for p in remote["peers"]} == {"n1", "n2"}
            # The control socket tells local tools the same, with the node's own view.
            local = await arequest(tmp_path / "n1" / "control.sock", "status")
            assert local["node"] == "n1" and local["data"] == str(tmp_path / "n1")
            assert local["heartbeat"] == 0.1
            peers = {p["name"]: p for p in local["peers"]}
            assert set(peers) == {"n2", "n3"}
            assert all(p["state"] == "reachable" and p["rtt_ms"] > 0 for p in peers.values())
            assert local["rpc"]["auth_failures"] == 0 and local["rpc"]["connections"] >= 2

    trio.run(main)


def test_a_node_that_stops_becomes_unreachable_and_comes_back(tmp_path: Path) -> None:
    config = make_config(tmp_path, n=2)

    async def main() -> None:
        async with running(config, tmp_path, ["n1"]) as first:
            n1 = first["n1"]
            await wait_for(n1, "n2", "unreachable", "unreachable")
            async with running(config, tmp_path, ["n2"]) as second:
                await wait_for(n1, "n2", "reachable")
                await wait_for(second["n2"], "n1", "reachable")
            # n2 stopped (server, then peers): n1 notices at its next probes.
            await wait_for(n1, "n2", "unreachable", "unreachable")
            async with running(config, tmp_path, ["n2"]):
                await wait_for(n1, "n2", "reachable")  # within the 2 s backoff cap

    trio.run(main)


def test_a_node_with_the_wrong_secret_is_an_auth_failure_both_ways(tmp_path: Path) -> None:
    config = make_config(tmp_path)

    async def main() -> None:
        async with running(config, tmp_path, ["n1", "n2", "n3"], {"n3": b"x" * 32}) as nodes:
            n1, n2, n3 = nodes["n1"], nodes["n2"], nodes["n3"]
            await wait_for(n1, "n2", "reachable")
            for good in (n1, n2):
                await wait_for(good, "n3", "unreachable", "auth")
                await wait_for(n3, good.me.name, "unreachable", "auth")
            # It stays an auth failure across probes (also while backing off).
            for good in (n1, n2):
                await await_until(
                    f"3 failed probes of n3 from {good.me.name}",
                    lambda good=good: good.health["n3"].failures,
                    ok=lambda n: n >= 3,
                )
                assert good.health["n3"].error_kind == "auth"
                assert good.status()["peers"][-1]["auth_failed"] is True
                assert good.server.statistics().auth_failures >= 1
            assert n1.pool is not None
            with pytest.raises(PeerAuthError):
                await n1.pool.call("n3", "ping", {})

    trio.run(main)


def test_port_in_use_is_a_start_error_and_leaves_nothing(tmp_path: Path) -> None:
    config = make_config(tmp_path, n=2)
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    taken.bind(("127.0.0.1", config.node("n1").port))
    taken.listen()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            node = ClusterNode(config, "n1", SECRET, data_dir=tmp_path, mountpoint=tmp_path / "mnt")
            with pytest.raises(StartError, match="cannot listen on 127.0.0.1:.*in use"):
                await node.start(nursery)
            assert not (tmp_path / "control.sock").exists()
        # The nursery closed by itself: nothing was left running.

    try:
        trio.run(main)
    finally:
        taken.close()


def test_stop_serving_frees_the_port_and_the_socket(tmp_path: Path) -> None:
    config = make_config(tmp_path, n=2)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            node = ClusterNode(config, "n1", SECRET, data_dir=tmp_path, mountpoint=tmp_path / "mnt")
            await node.start(nursery)
            assert (tmp_path / "control.sock").exists()
            node.stop_serving()
            sock = tmp_path / "control.sock"
            await await_until("the control socket removed", sock.exists, ok=lambda there: not there)
            listeners = await trio.open_tcp_listeners(config.node("n1").port, host="127.0.0.1")
            for lst in listeners:
                await lst.aclose()
            await node.aclose()

    trio.run(main)


def test_probe_timeout_is_two_heartbeats_within_bounds(tmp_path: Path) -> None:
    assert probe_timeout(make_config(tmp_path, heartbeat=1.0)) == 2.0
    assert probe_timeout(make_config(tmp_path, heartbeat=0.1)) == 1.0
    assert probe_timeout(make_config(tmp_path, heartbeat=10.0)) == 2.0  # the call deadline


def test_default_data_dir(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    setup = ClusterSetup(config, config.node("n2"), SECRET)
    assert default_data_dir(setup) == Path("/var/lib/dfs/t/n2")
    bad = parse(
        {
            "cluster": {"name": "a/b", "id": "x", "secret_file": "s"},
            "nodes": [{"name": "n1", "address": "127.0.0.1", "port": 7000, "id": 1}],
        },
        base=tmp_path,
    )
    with pytest.raises(ConfigError, match="--data"):
        default_data_dir(ClusterSetup(bad, bad.node("n1"), SECRET))
