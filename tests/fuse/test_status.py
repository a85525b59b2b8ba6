"""``dfs status`` and the metrics endpoints through a real 3-node cluster.

Real daemons and mounts (``dfs cluster up``), the commands run as an admin runs them:
through a node's mount, through ``$DFS_MOUNT``, and with ``--config`` over the network.
What they show is followed through a killed node, a failover (a killed primary) and,
in network namespaces, a partition; the metrics endpoints are scraped over loopback
while files are written and read, and their counters must move.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dfs.data.store import DataStore
from dfs.hashing import BLOCK_SIZE
from tests.fuse.clusters import DFS, Launcher, free_base_port, launched
from tests.fuse.test_netns import _need_namespaces, _ours, _up
from tests.waiting import wait_until

pytestmark = [pytest.mark.fuse, pytest.mark.slow]

NODES = ("n1", "n2", "n3")


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Launcher]:
    with launched(
        tmp_path / "c", show_logs=lambda: getattr(request.node, "rep_call_failed", False)
    ) as launcher:
        yield launcher


def _mnt(c: Launcher, node: str) -> Path:
    return c.root / node / "mnt"


def _status(c: Launcher, *args: str, env: dict[str, str] | None = None) -> tuple[int, Any]:
    """``dfs status ARGS --json``: its exit code and what it printed."""
    r = subprocess.run(
        [*DFS, "status", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    assert r.returncode in (0, 1), r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["exit_code"] == r.returncode
    return r.returncode, doc


def _via(c: Launcher, node: str) -> dict[str, Any]:
    return _status(c, "--mount", str(_mnt(c, node)))[1]


def _nodes(view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in view["nodes"]}


def _root(view: dict[str, Any]) -> dict[str, Any]:
    return next(v for v in view["volumes"] if v["vol"] == 1)


def _sites(view: dict[str, Any]) -> dict[str, str]:
    return {s["node"]: s["state"] for s in _root(view)["sites"]}


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=30) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def _metric(url: str, name: str, **labels: str) -> float:
    return _scrape(url).get((name, tuple(sorted(labels.items()))), 0.0)


def test_status_and_metrics_follow_a_dead_node_and_a_failover(cluster: Launcher) -> None:
    metrics_port = free_base_port(3)
    while abs(metrics_port - cluster.base_port) < 3:
        metrics_port = free_base_port(3)
    r = cluster.dfs(
        "up",
        "--nodes",
        "3",
        "--base-port",
        str(cluster.base_port),
        "--metrics-port",
        str(metrics_port),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    cluster.status()  # remember the daemons' PIDs

    # Healthy, the same through a mount, $DFS_MOUNT and --config.
    code, view = _status(cluster, "--mount", str(_mnt(cluster, "n2")))
    assert code == 0 and view["health"] == "ok" and view["problems"] == [], view
    assert view["asked"] == "n2" and view["cluster"] == "local"
    nodes = _nodes(view)
    assert set(nodes) == set(NODES) and all(n["reached"] for n in nodes.values())
    assert all(n["unreachable"] == [] for n in nodes.values())
    url = {n: nodes[n]["metrics"] for n in NODES}
    assert url["n1"] == f"http://127.0.0.1:{metrics_port}/metrics"
    root = _root(view)
    assert (root["path"], root["primary"], root["epoch"]) == ("/", "n1", 1)
    assert _sites(view) == {"n1": "primary", "n2": "in sync", "n3": "in sync"}
    env = {**os.environ, "DFS_MOUNT": str(_mnt(cluster, "n3"))}
    code, view = _status(cluster, env=env)
    assert code == 0 and view["asked"] == "n3"
    code, view = _status(cluster, "--config", str(cluster.config))
    assert code == 0 and view["asked"] is None and _sites(view)["n3"] == "in sync"

    # What an admin reads, and --watch for two rounds.
    r = cluster.dfs_tool("status", "--mount", str(_mnt(cluster, "n1")))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1] == "health: OK" and "\x1b" not in r.stdout
    assert {ln.split()[0] for ln in lines if ln.split()[1:2] == ["up"]} == set(NODES)
    watch = ("--watch", "--count", "2", "--interval", "0.1")
    r = cluster.dfs_tool("status", "--mount", str(_mnt(cluster, "n1")), *watch, "--json")
    assert r.returncode == 0, r.stderr
    rounds = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rounds) == 2 and rounds[0]["time"] <= rounds[1]["time"]
    r = cluster.dfs_tool("status", "--config", str(cluster.config), *watch)
    assert r.returncode == 0 and r.stdout.count("health: OK") == 2, r.stdout + r.stderr

    # The counters move with file operations: FUSE requests on the node used, updates and
    # replication on the primary, the applied sequence on a site; a block that fails its
    # checksum is read repaired and counted. Files are read on n2 that n3 wrote, so that
    # n2's kernel has none of their pages cached and every read is a FUSE request.
    def counters() -> dict[str, float]:
        fuse = "dfs_fuse_request_duration_seconds_count"
        return {
            "creates": _metric(url["n2"], fuse, op="create"),
            "reads": _metric(url["n2"], fuse, op="read"),
            "updates": _metric(url["n1"], "dfs_updates_total", volume="1"),
            "acked": _metric(url["n1"], "dfs_replication_ack_seconds_count", volume="1"),
            "repairs": _metric(url["n2"], "dfs_read_repairs_total"),
            "failures": _metric(url["n2"], "dfs_checksum_failures_total"),
        }

    before = counters()
    n3_seq = _metric(url["n3"], "dfs_volume_applied_sequence", path="/", volume="1")
    data = os.urandom(3 * BLOCK_SIZE)
    for i in range(5):
        (_mnt(cluster, "n2") / f"m{i}").write_bytes(data)
    (_mnt(cluster, "n3") / "r").write_bytes(data)
    ino = (_mnt(cluster, "n2") / "r").stat().st_ino
    path = DataStore(cluster.root / "n2" / "data" / "data").fspath(ino)
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, bytes([os.pread(fd, 1, 10)[0] ^ 0x5A]), 10)  # behind the daemon's back
    finally:
        os.close(fd)
    assert (_mnt(cluster, "n2") / "r").read_bytes() == data
    after = counters()
    assert after["creates"] >= before["creates"] + 5, (before, after)
    assert after["reads"] > before["reads"], (before, after)
    assert after["updates"] >= before["updates"] + 6, (before, after)
    assert after["acked"] > before["acked"], (before, after)
    assert (after["failures"], after["repairs"]) == (1, 1), (before, after)
    n2 = _nodes(_via(cluster, "n1"))["n2"]
    assert (n2["checksum_failures"], n2["read_repairs"]) == (1, 1)  # status says the same
    wait_until(
        "n3 applied the updates",
        lambda: _metric(url["n3"], "dfs_volume_applied_sequence", path="/", volume="1"),
        ok=lambda seq: seq >= n3_seq + 6,
    )
    assert _metric(url["n1"], "dfs_site_in_sync", path="/", site="n3", volume="1") == 1
    assert _metric(url["n1"], "dfs_peer_reachable", peer="n2") == 1

    # A storage site killed: unreachable from the others, the asker and --config alike.
    assert cluster.dfs("stop", "n3", "--kill").returncode == 0
    view = wait_until(
        "n1 and n2 see n3 unreachable",
        lambda: _via(cluster, "n1"),
        ok=lambda v: all(_nodes(v)[n]["unreachable"] == ["n3"] for n in ("n1", "n2")),
    )
    assert view["health"] == "degraded" and not _nodes(view)["n3"]["reached"]
    assert _sites(view)["n3"] == "unreachable"
    assert any(p.startswith("node n3: not reached from n1") for p in view["problems"])
    code, view = _status(cluster, "--config", str(cluster.config))
    assert code == 1 and not _nodes(view)["n3"]["reached"]
    assert _metric(url["n1"], "dfs_peer_reachable", peer="n3") == 0
    assert cluster.dfs("start", "n3").returncode == 0
    wait_until(
        "a healthy cluster again",
        lambda: _status(cluster, "--mount", str(_mnt(cluster, "n1"))),
        ok=lambda cv: cv[0] == 0,
    )

    # The primary killed: a new primary in a newer epoch, an election counted.
    assert cluster.dfs("stop", "n1", "--kill").returncode == 0
    view = wait_until(
        "a new primary of / seen from n2",
        lambda: _via(cluster, "n2"),
        ok=lambda v: _root(v)["primary"] in ("n2", "n3") and _root(v)["primary_reached"],
    )
    root = _root(view)
    assert root["epoch"] >= 2 and _sites(view)[root["primary"]] == "primary"
    assert _sites(view)["n1"] == "unreachable"
    assert view["totals"]["elections"] >= 1
    assert _metric(url["n2"], "dfs_volume_epoch", path="/", volume="1") >= 2
    r = cluster.dfs_tool("status", "--mount", str(_mnt(cluster, "n3")))
    assert r.returncode == 1 and "health: DEGRADED" in r.stdout
    row = next(ln.split() for ln in r.stdout.splitlines() if ln.split()[:2] == ["1", "/"])
    assert row[2:4] == [root["primary"], str(root["epoch"])], r.stdout


def test_status_through_a_partition(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    _need_namespaces()
    root_dir = tmp_path / "c"
    try:
        with launched(
            root_dir, show_logs=lambda: getattr(request.node, "rep_call_failed", False)
        ) as c:
            assert _up(c).returncode == 0
            c.status()
            assert _status(c, "--mount", str(_mnt(c, "n1")))[0] == 0
            assert c.dfs("partition", "n1", "n2,n3").returncode == 0
            # The majority side: n1 unreachable from n2 and n3, then a new primary there.
            view = wait_until(
                "the majority side elected a primary of /",
                lambda: _via(c, "n2"),
                ok=lambda v: (
                    _root(v)["primary"] in ("n2", "n3")
                    and _root(v)["primary_reached"]
                    and not _nodes(v)["n1"]["reached"]
                ),
            )
            assert _nodes(view)["n3"]["unreachable"] == ["n1"]
            assert _nodes(view)["n2"]["unreachable"] == ["n1"]
            assert _root(view)["epoch"] >= 2 and _sites(view)["n1"] == "unreachable"
            # The minority side: n1 reaches nobody; it still orders / in epoch 1 there.
            view = wait_until(
                "n1 cut off, as n1 sees it",
                lambda: _via(c, "n1"),
                ok=lambda v: _nodes(v)["n1"]["unreachable"] == ["n2", "n3"],
            )
            assert view["health"] == "degraded"
            assert not _nodes(view)["n2"]["reached"] and not _nodes(view)["n3"]["reached"]
            assert _root(view)["epoch"] == 1
            assert _sites(view)["n2"] == _sites(view)["n3"] == "unreachable"
            assert c.dfs("partition", "--heal").returncode == 0
            view = wait_until(
                "healthy again, n1 following the new primary",
                lambda: _via(c, "n1"),
                ok=lambda v: v["health"] == "ok",
            )
            assert _root(view)["primary"] in ("n2", "n3") and _root(view)["claims"] == []
    finally:
        left, _links = _ours(root_dir)
        assert not left, left
