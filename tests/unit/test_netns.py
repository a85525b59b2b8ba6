"""tools/netns.py without namespaces: names, subnets, groups, nft rules, CLI refusals."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from dfs_tools import netns
from dfs_tools.cluster import cluster
from dfs_tools.launcher import LocalCluster

from dfs.config import init

NODES = ["n1", "n2", "n3"]


# --- names and addresses -------------------------------------------------------------------------


def test_names_are_derived_from_the_directory(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert netns.tag_for(a) == netns.tag_for(a) and netns.tag_for(a) != netns.tag_for(b)
    assert re.fullmatch(r"[0-9a-f]{8}", netns.tag_for(a))
    net = netns.Network(a, (("n1", "198.18.0.1"), ("n2", "198.18.0.2")), netns.RANGE)
    assert net.switch == f"dfs-{net.tag}-sw" and net.namespace("n2") == f"dfs-{net.tag}-n2"
    assert all(len(p) <= 15 for p in net.ports.values())  # IFNAMSIZ - 1
    assert len(set(net.ports.values())) == 2


def test_subnets_start_at_the_hash_and_skip_those_in_use(tmp_path: Path) -> None:
    cands = netns.subnet_candidates(tmp_path)
    assert len(cands) == len(set(cands)) == 512
    assert all(c.prefixlen == 24 and c.subnet_of(netns.RANGE) for c in cands)
    assert netns.choose_subnet(tmp_path, []) == cands[0]
    assert netns.choose_subnet(tmp_path, [cands[0]]) == cands[1]
    wide = ipaddress.IPv4Network(f"{cands[0].network_address}/23", strict=False)
    assert not netns.choose_subnet(tmp_path, [wide]).overlaps(wide)
    with pytest.raises(netns.NetnsError, match="in use"):
        netns.choose_subnet(tmp_path, [netns.RANGE])
    other = netns.subnet_candidates(tmp_path / "other")
    assert other[0] != cands[0]  # two clusters start at different /24s (for these two dirs)


def test_node_addresses() -> None:
    net = ipaddress.IPv4Network("198.19.4.0/24")
    assert [netns.node_address(net, i) for i in range(3)] == [
        "198.19.4.1",
        "198.19.4.2",
        "198.19.4.3",
    ]
    with pytest.raises(netns.NetnsError):
        netns.node_address(net, 254)


# --- groups --------------------------------------------------------------------------------------


def test_groups_are_parsed_and_unnamed_nodes_isolated() -> None:
    assert netns.parse_groups(["n1", "n2,n3"], NODES) == (("n1",), ("n2", "n3"))
    assert netns.parse_groups(["n2,n3"], NODES) == (("n2", "n3"), ("n1",))
    assert netns.parse_groups(["n2"], NODES) == (("n2",), ("n1",), ("n3",))
    assert netns.parse_groups(["n3, n1"], NODES) == (("n3", "n1"), ("n2",))
    assert netns.parse_groups(["n1,n2,n3"], NODES) is None  # one group: nothing is cut


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        ([], "at least one group"),
        (["n1", "n9"], "no node named 'n9' (nodes: n1, n2, n3)"),
        (["n1,n2", "n2"], "'n2' is named twice"),
        (["n1,", "n2"], "empty node name"),
    ],
)
def test_bad_groups(args: list[str], phrase: str) -> None:
    with pytest.raises(netns.NetnsUsage) as exc:
        netns.parse_groups(args, NODES)
    assert phrase in str(exc.value)


def test_describe() -> None:
    assert netns.describe(None).startswith("none")
    assert netns.describe((("n1",), ("n2", "n3"))) == "n1 | n2,n3"


# --- rules ---------------------------------------------------------------------------------------


def _blocked(rules: str, ports: dict[str, str]) -> set[tuple[str, str]]:
    """Which (from, to) node pairs the rules drop, read back from the rules' text."""
    node_of = {p: n for n, p in ports.items()}
    out = set()
    for line in rules.splitlines():
        m = re.fullmatch(r'\s*iifname "([^"]+)"(?: oifname != \{ (.*) \})? drop', line)
        if not m:
            continue
        allowed = {node_of[p.strip('" ')] for p in (m.group(2) or "").split(",") if p}
        src = node_of[m.group(1)]
        out |= {(src, dst) for dst in ports if dst != src and dst not in allowed}
    return out


@pytest.mark.parametrize(
    "groups", [["n1", "n2,n3"], ["n2,n3"], ["n1", "n2", "n3"], ["n1,n3", "n2", "n4,n5"]]
)
def test_rules_drop_exactly_between_groups_both_ways(groups: list[str]) -> None:
    nodes = ["n1", "n2", "n3", "n4", "n5"]
    ports = {n: f"abcdef01-{i + 1}" for i, n in enumerate(nodes)}
    part = netns.parse_groups(groups, nodes)
    assert part is not None
    group_of = {n: i for i, g in enumerate(part) for n in g}
    want = {(a, b) for a in nodes for b in nodes if group_of[a] != group_of[b]}
    assert _blocked(netns.ruleset(part, ports), ports) == want


def test_healed_rules_remove_the_table() -> None:
    text = netns.ruleset(None, {"n1": "p1"})
    assert text.splitlines() == [
        f"table bridge {netns.TABLE}",
        f"delete table bridge {netns.TABLE}",
    ]


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("nft") is None or shutil.which("unshare") is None,
    reason="checking rules with nft needs root and nftables",
)
def test_nft_accepts_the_rules() -> None:
    """``nft -c`` parses and checks without applying, in a throwaway network namespace."""
    ports = {n: f"abcdef01-{i + 1}" for i, n in enumerate(NODES)}
    for part in (netns.parse_groups(["n1", "n2,n3"], NODES), None):
        r = subprocess.run(
            ["unshare", "--net", "nft", "-c", "-f", "-"],
            input=netns.ruleset(part, ports),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 0, r.stderr


# --- the recorded state and the CLI --------------------------------------------------------------


def _netns_cluster(root: Path) -> LocalCluster:
    """A cluster directory as `up --netns` writes it, without making any namespace."""
    root.mkdir(parents=True)
    netns.save_state(root, {"subnet": "198.18.77.0/24", "partition": None})
    specs = [(n, f"198.18.77.{i + 1}", 7801 + i) for i, n in enumerate(NODES)]
    init(root / "cluster.toml", specs, name="local")
    return LocalCluster(root)


def _cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(cluster, list(args))
    return r.exit_code, r.output


def test_the_daemon_enters_its_namespace_and_is_still_recognised(tmp_path: Path) -> None:
    if shutil.which("nsenter") is None:
        pytest.skip("no nsenter")
    c = _netns_cluster(tmp_path / "c")
    net = c.network()
    assert net is not None and net.subnet == ipaddress.IPv4Network("198.18.77.0/24")
    argv = c.daemon_argv(c.node("n2"))
    assert os.path.basename(argv[0]) == "nsenter"
    assert argv[1:3] == [f"--net=/run/netns/dfs-{net.tag}-n2", "--"]
    assert c._is_daemon_of(argv, c.node("n2")) and not c._is_daemon_of(argv, c.node("n1"))
    loop = tmp_path / "loop"
    init(loop / "cluster.toml", [("n1", "127.0.0.1", 7801)], name="local")
    assert LocalCluster(loop).network() is None
    assert LocalCluster(loop).daemon_argv(LocalCluster(loop).node("n1"))[0] != argv[0]


def test_partition_refusals(tmp_path: Path) -> None:
    code, out = _cli("partition", "n1", "--dir", str(tmp_path / "none"))
    assert code == 2 and "up --netns" in out
    loop = tmp_path / "loop"
    init(loop / "cluster.toml", [("n1", "127.0.0.1", 7801)], name="local")
    code, out = _cli("partition", "n1", "--dir", str(loop))
    assert code == 2 and "up --netns" in out
    code, out = _cli("up", "--netns", "--dir", str(loop))
    assert code == 2 and "holds a cluster on loopback" in out
    root = tmp_path / "c"
    _netns_cluster(root)
    code, out = _cli("partition", "n1", "n9", "--dir", str(root))
    assert code == 2 and "no node named 'n9'" in out
    code, out = _cli("partition", "n1", "--heal", "--dir", str(root))
    assert code == 2 and "one of them" in out
    code, out = _cli("partition", "--dir", str(root))
    assert code == 0 and "partition: none" in out
    if not (netns.NETNS_DIR / f"dfs-{netns.tag_for(root)}-sw").exists():
        code, out = _cli("partition", "n1", "--dir", str(root))
        assert code == 2 and "not up" in out
    assert json.loads(netns.state_path(root).read_text())["partition"] is None


def test_the_recorded_partition_is_shown(tmp_path: Path) -> None:
    root = tmp_path / "c"
    c = _netns_cluster(root)
    netns.save_state(root, {"subnet": "198.18.77.0/24", "partition": [["n1"], ["n2", "n3"]]})
    net = c.network()
    assert net is not None and net.partition() == (("n1",), ("n2", "n3"))
    code, out = _cli("partition", "--show", "--dir", str(root))
    assert code == 0 and out.strip() == "partition: n1 | n2,n3"
