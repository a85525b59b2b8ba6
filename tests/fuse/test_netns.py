"""``dfs cluster up --netns`` and ``dfs cluster partition``: real partitions on one machine.

Three real daemons, each in a network namespace of its own on a private bridge,
with their mounts on the host. Every test ends with ``dfs cluster down`` (the
``launched`` fixture checks mounts and daemons) and then checks that no
namespace or link of the cluster is left; whatever is left is removed, and the
test fails.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dfs_tools import netns
from dfs_tools.launcher import LocalCluster

from dfs.meta.store import MetaStore
from tests.fuse.clusters import Launcher, launched, need_fuse
from tests.mounting import mounts_under
from tests.waiting import wait_until

pytestmark = [pytest.mark.fuse, pytest.mark.slow]


def _need_namespaces() -> None:
    need_fuse()
    probe = f"dfs-probe-{os.getpid()}"
    try:
        made = subprocess.run(
            ["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30
        )
    except FileNotFoundError:
        pytest.skip("no `ip` (iproute2)")
    if made.returncode != 0:
        pytest.skip(f"cannot make network namespaces here: {made.stderr.strip()}")
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True, timeout=30)


def _ours(root: Path) -> tuple[list[str], list[str]]:
    """The namespaces, and the host's links, that carry the cluster's tag."""
    tag = netns.tag_for(root)
    links = subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    return (
        [ns for ns in netns.namespaces() if ns.startswith(f"dfs-{tag}-")],
        [ln for ln in links.splitlines() if tag in ln],
    )


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Launcher]:
    _need_namespaces()
    root = tmp_path / "c"
    try:
        with launched(
            root, show_logs=lambda: getattr(request.node, "rep_call_failed", False)
        ) as launcher:
            yield launcher
    finally:
        left, links = _ours(root)
        for ns in left:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=30)
    assert not left, f"namespaces left after dfs cluster down: {left}"
    assert not links, f"links left in the host after dfs cluster down: {links}"


def _up(c: Launcher) -> subprocess.CompletedProcess[str]:
    return c.dfs("up", "--netns", "--nodes", "3", "--base-port", str(c.base_port))


def _reaches(nodes: dict[str, dict[str, Any]]) -> set[tuple[str, str]]:
    """(a, b) for every running node a whose status shows peer b reachable."""
    return {
        (name, p["name"])
        for name, n in nodes.items()
        if n["pid"]
        for p in n["peers"]
        if p["state"] == "reachable"
    }


EVERYONE = {(a, b) for a in ("n1", "n2", "n3") for b in ("n1", "n2", "n3") if a != b}


def test_partition_and_heal(cluster: Launcher) -> None:
    r = _up(cluster)
    assert r.returncode == 0, r.stdout + r.stderr
    assert " cluster partition n1 n2,n3 --dir " in r.stdout  # among the hints
    code, doc = cluster.status()
    assert code == 0, doc
    net = doc["network"]
    assert net["up"] and net["partition"] is None
    subnet = ipaddress.IPv4Network(net["subnet"])
    assert subnet.subnet_of(ipaddress.IPv4Network("198.18.0.0/15"))
    for n in doc["nodes"]:
        assert ipaddress.IPv4Address(n["address"].split(":")[0]) in subnet
        # Its own network namespace, but the host's mount namespace: the mount is ours.
        assert os.readlink(f"/proc/{n['pid']}/ns/net") != os.readlink("/proc/self/ns/net")
        assert os.readlink(f"/proc/{n['pid']}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
    assert set(net["namespaces"]) <= set(netns.namespaces())
    mnt = {name: cluster.root / name / "mnt" for name in ("n1", "n2", "n3")}

    (mnt["n1"] / "before").write_text("one tree\n")
    assert (mnt["n2"] / "before").read_text() == (mnt["n3"] / "before").read_text() == "one tree\n"

    r = cluster.dfs("partition", "n1", "n2,n3")
    assert r.returncode == 0 and r.stdout.strip() == "partition: n1 | n2,n3", r.stderr
    cluster.wait(
        "n1 cut off from n2 and n3, which still reach each other",
        lambda nodes: _reaches(nodes) == {("n2", "n3"), ("n3", "n2")},
    )
    assert cluster.status()[1]["network"]["partition"] == [["n1"], ["n2", "n3"]]
    assert cluster.dfs("partition").stdout.strip() == "partition: n1 | n2,n3"

    # The majority side (n2, n3) goes on: it elects a new primary if needed (n1 ordered the
    # root volume) and takes updates; n1, cut off alone, refuses them (docs/CONSISTENCY.md
    # §4b; tests/fuse/test_failover.py looks closer).
    def made_on_n2() -> bool:
        try:
            (mnt["n2"] / "during").write_text("made in a partition\n")
            return True
        except OSError as exc:
            assert exc.errno in (errno.EROFS, errno.ETIMEDOUT), exc
            return False

    wait_until("an update on the majority side", made_on_n2)
    with pytest.raises(OSError) as e:
        (mnt["n1"] / "refused").write_text("no majority here\n")
    assert e.value.errno in (errno.EROFS, errno.ETIMEDOUT), e.value

    r = cluster.dfs("partition", "--heal")
    assert r.returncode == 0 and "partition: none" in r.stdout, r.stderr
    cluster.wait("every node reaching every other again", lambda n: _reaches(n) == EVERYONE)
    for name in ("n1", "n3"):
        wait_until(
            f"the write made during the partition on {name}",
            (mnt[name] / "during").read_text,
            ok=lambda text: text == "made in a partition\n",
            retry_on=(FileNotFoundError,),
        )
    assert cluster.status()[1]["network"]["partition"] is None

    # Cutting one node off = naming the others.
    r = cluster.dfs("partition", "n1,n2")
    assert r.returncode == 0 and r.stdout.strip() == "partition: n1,n2 | n3", r.stderr
    cluster.wait(
        "n3 isolated",
        lambda nodes: _reaches(nodes) == {("n1", "n2"), ("n2", "n1")},
    )

    # down with a partition in place and a killed daemon: nothing is left (the fixture checks).
    assert cluster.dfs("stop", "n3", "--kill").returncode == 0
    r = cluster.dfs("down")
    assert r.returncode == 0, r.stderr
    assert f"network namespace dfs-{netns.tag_for(cluster.root)}-sw removed" in r.stdout
    assert _ours(cluster.root) == ([], [])
    assert cluster.dfs("down").returncode == 0  # idempotent
    r = cluster.dfs("partition", "--heal")
    assert r.returncode == 2 and "not up" in r.stderr


def test_down_after_a_failed_start_leaves_nothing(cluster: Launcher) -> None:
    data = cluster.root / "n2" / "data"
    data.mkdir(parents=True)
    MetaStore.open(data / "meta", cluster_id="another-cluster").close()
    r = _up(cluster)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "node n2: dfs-mountd exited with status 4" in r.stderr, r.stderr
    assert not mounts_under(cluster.root)
    assert _ours(cluster.root) == ([], [])  # the failed `up` removed what it made
    # What an `up` killed half-way would leave: the namespaces, links and bridge, no daemon.
    LocalCluster(cluster.root)._ensure_network()
    assert len(_ours(cluster.root)[0]) == 4
    r = cluster.dfs("down")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("network namespace dfs-") == 4, r.stdout
    assert _ours(cluster.root) == ([], [])
