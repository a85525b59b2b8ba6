"""Network namespaces for the local cluster: each node on a private bridge, and partitions.

``dfs cluster up --netns`` gives every node a network namespace of its own, wired
to one bridge that lives in a "switch" namespace, so the host's own network is
never touched::

    dfs-TAG-sw     the switch: bridge br0, one port TAG-I per node (a veth), the partition rules
    dfs-TAG-NODE   one per node: eth0 (the other end of port TAG-I) with the node's address; lo up

TAG is the first 8 hex digits of the SHA-256 of the cluster directory, so two
clusters on one machine (two CI runs, say) never share a name. The nodes'
addresses are one /24 of 198.18.0.0/15 (the benchmarking range, RFC 2544),
picked from the same hash, skipping /24s that the host or another dfs namespace
uses; they are written into cluster.toml like any other address.

Daemons enter their namespace with ``nsenter --net=/run/netns/NAME``: only the
network namespace changes, so their FUSE mounts are in the host's mount
namespace and their control sockets (Unix sockets in the data directory) answer
the host's ``dfs cluster status`` as on loopback. (``ip netns exec`` would
unshare the mount namespace too, hiding the mount: it is not used for daemons.)

A partition is a set of groups: frames between ports of different groups are
dropped in the switch's bridge (an nftables table ``bridge dfs``, replaced in
one transaction at each change), both ways; a node named in no group is a group
of its own. The recorded state, in DIR/network.json::

    {"subnet": "198.18.7.0/24", "partition": [["n1"], ["n2", "n3"]]}   (null: healed)

``remove_all`` deletes every namespace whose name starts with ``dfs-TAG-``:
with them go their veths, the bridge and the rules, whatever state a failed
start or killed daemons left.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NETNS_DIR = Path("/run/netns")  # where `ip netns` keeps the names (iproute2's NETNS_RUN_DIR)
STATE_FILE = "network.json"
RANGE = ipaddress.IPv4Network("198.18.0.0/15")
PREFIX = 24
BRIDGE = "br0"
NODE_LINK = "eth0"
TABLE = "dfs"  # the nftables table (family bridge) in the switch namespace
COMMAND_TIMEOUT = 30.0

Partition = tuple[tuple[str, ...], ...]  # every node in exactly one group; None when healed


class NetnsError(Exception):
    """A namespace, link or rule could not be made or removed; the message says which."""


class NetnsUsage(NetnsError):
    """A request that cannot be carried out as given: unknown node, no network, ..."""


# --- names and addresses (pure) ------------------------------------------------------------------


def tag_for(root: Path) -> str:
    return hashlib.sha256(str(Path(os.path.abspath(root))).encode()).hexdigest()[:8]


def subnet_candidates(root: Path) -> list[ipaddress.IPv4Network]:
    """Every /24 of the range, starting at the one the directory's hash picks."""
    subnets = list(RANGE.subnets(new_prefix=PREFIX))
    start = int(tag_for(root), 16) % len(subnets)
    return subnets[start:] + subnets[:start]


def choose_subnet(root: Path, used: Iterable[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    taken = list(used)
    for net in subnet_candidates(root):
        if not any(net.overlaps(t) for t in taken):
            return net
    raise NetnsError(f"every /{PREFIX} of {RANGE} is in use on this machine")


def node_address(subnet: ipaddress.IPv4Network, index: int) -> str:
    """The address of the node at ``index`` (0-based): .1, .2, ..."""
    if not 0 <= index < subnet.num_addresses - 2:
        raise NetnsError(f"no address for node {index + 1} in {subnet}")
    return str(subnet.network_address + index + 1)


def parse_groups(args: Sequence[str], nodes: Sequence[str]) -> Partition | None:
    """``["n1,n2", "n3"]`` -> the partition, every node of ``nodes`` in one group.

    Nodes not named are isolated (a group each). One group holding every node
    is no partition (None). Groups keep the order given, then the isolated
    nodes in ``nodes`` order.
    """
    if not args:
        raise NetnsUsage("name at least one group, e.g. `n1,n2 n3` (or use --heal)")
    known = set(nodes)
    seen: set[str] = set()
    groups: list[tuple[str, ...]] = []
    for arg in args:
        members = tuple(m.strip() for m in arg.split(","))
        if any(not m for m in members):
            raise NetnsUsage(f"empty node name in group {arg!r}")
        for m in members:
            if m not in known:
                raise NetnsUsage(f"no node named {m!r} (nodes: {', '.join(nodes)})")
            if m in seen:
                raise NetnsUsage(f"node {m!r} is named twice")
            seen.add(m)
        groups.append(members)
    groups += [(n,) for n in nodes if n not in seen]
    return None if len(groups) == 1 else tuple(groups)


def describe(partition: Partition | None) -> str:
    if partition is None:
        return "none (every node reaches every other)"
    return " | ".join(",".join(g) for g in partition)


def ruleset(partition: Partition | None, ports: dict[str, str]) -> str:
    """The nft script that puts ``partition`` in place in the switch namespace.

    It replaces the whole table in one transaction (declaring the table first
    makes the delete valid when there is none); healed, no table is left.
    Each port gets one rule: frames coming in on it may go out only on the
    ports of its own group; as every port has its rule, both ways are cut.
    """
    lines = [f"table bridge {TABLE}", f"delete table bridge {TABLE}"]
    if partition is None:
        return "\n".join(lines) + "\n"
    lines += [
        f"table bridge {TABLE} {{",
        "  chain forward {",
        "    type filter hook forward priority 0; policy accept;",
    ]
    for group in partition:
        same = ", ".join(f'"{ports[n]}"' for n in group)
        for node in group:
            if len(group) == 1:
                lines.append(f'    iifname "{ports[node]}" drop')
            else:
                lines.append(f'    iifname "{ports[node]}" oifname != {{ {same} }} drop')
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


# --- the recorded state --------------------------------------------------------------------------


def state_path(root: Path) -> Path:
    return root / STATE_FILE


def load_state(root: Path) -> dict[str, Any] | None:
    """DIR/network.json, or None for a cluster on loopback."""
    try:
        raw = json.loads(state_path(root).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise NetnsError(f"{state_path(root)}: unreadable ({exc})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("subnet"), str):
        raise NetnsError(f"{state_path(root)}: not a network record")
    return raw


def save_state(root: Path, state: dict[str, Any]) -> None:
    tmp = state_path(root).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, state_path(root))


def _recorded(root: Path) -> tuple[dict[str, Any], Partition | None]:
    state = load_state(root) or {}
    groups = state.get("partition")
    if not isinstance(groups, list):
        return state, None
    return state, tuple(tuple(str(n) for n in g) for g in groups if isinstance(g, list))


def _record(root: Path, partition: Partition | None) -> None:
    state, _ = _recorded(root)
    save_state(root, {**state, "partition": partition and [list(g) for g in partition]})


def create(root: Path, nodes: int) -> list[str]:
    """Pick the subnet of a new cluster in ``root`` and record it; the nodes' addresses."""
    subnet = choose_subnet(root, used_subnets())
    addresses = [node_address(subnet, i) for i in range(nodes)]
    save_state(root, {"subnet": str(subnet), "partition": None})
    return addresses


def load(root: Path, nodes: Sequence[tuple[str, str]]) -> Network | None:
    """The network of the cluster in ``root`` (nodes: name, address), None on loopback."""
    state = load_state(root)
    if state is None:
        return None
    try:
        subnet = ipaddress.IPv4Network(state["subnet"])
    except ValueError as exc:
        raise NetnsError(f"{state_path(root)}: {exc}") from None
    return Network(root, tuple(nodes), subnet)


# --- commands ------------------------------------------------------------------------------------


def _run(argv: Sequence[str], *, stdin: str | None = None, check: bool = True) -> bool:
    """Run a command; False (or NetnsError with ``check``) if it failed."""
    try:
        r = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            stdin=None if stdin is not None else subprocess.DEVNULL,
        )
    except FileNotFoundError:
        raise NetnsError(f"{argv[0]} not found: install iproute2 and nftables") from None
    except subprocess.TimeoutExpired:
        raise NetnsError(f"`{' '.join(argv)}` did not finish in {COMMAND_TIMEOUT:g}s") from None
    if r.returncode != 0 and check:
        raise NetnsError(f"`{' '.join(argv)}` failed: {r.stderr.strip() or r.returncode}")
    return r.returncode == 0


def namespaces() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def _addresses(ns: str | None, dev: str | None = None) -> list[ipaddress.IPv4Interface]:
    """The IPv4 addresses in namespace ``ns`` (None: the host's), of ``dev`` or of all links."""
    argv = ["ip", *(["-n", ns] if ns else []), "-o", "-4", "addr", "show"]
    r = subprocess.run(
        [*argv, *(["dev", dev] if dev else [])],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    return [ipaddress.IPv4Interface(a) for a in re.findall(r"\binet (\S+)", r.stdout)]


def used_subnets() -> list[ipaddress.IPv4Network]:
    """IPv4 networks of the host and of every dfs namespace (other clusters, vagrant)."""
    used = _addresses(None)
    for ns in namespaces():
        if ns.startswith("dfs-"):
            used += _addresses(ns)
    return [a.network for a in used]


def nsenter() -> str:
    path = shutil.which("nsenter")
    if path is None:
        raise NetnsError("nsenter not found: install util-linux")
    return path


# --- the network of one cluster ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Network:
    """The namespaces, links and rules of the cluster in ``root``; nodes in config order."""

    root: Path
    nodes: tuple[tuple[str, str], ...]  # (name, address)
    subnet: ipaddress.IPv4Network

    @property
    def tag(self) -> str:
        return tag_for(self.root)

    @property
    def switch(self) -> str:
        return f"dfs-{self.tag}-sw"

    def namespace(self, node: str) -> str:
        return f"dfs-{self.tag}-{node}"

    @property
    def ports(self) -> dict[str, str]:
        """Each node's port on the bridge, in the switch namespace (at most 15 characters)."""
        return {name: f"{self.tag}-{i + 1}" for i, (name, _) in enumerate(self.nodes)}

    def enter(self, node: str) -> list[str]:
        """The argv prefix that runs a command in ``node``'s network namespace only."""
        return [nsenter(), f"--net={NETNS_DIR / self.namespace(node)}", "--"]

    def _ns(self, name: str, *argv: str, stdin: str | None = None, check: bool = True) -> bool:
        return _run([nsenter(), f"--net={NETNS_DIR / name}", "--", *argv], stdin=stdin, check=check)

    def is_up(self) -> bool:
        return (NETNS_DIR / self.switch).exists()

    def partition(self) -> Partition | None:
        """The partition in place (as recorded), None when healed."""
        return _recorded(self.root)[1]

    def ensure(self) -> None:
        """Make whatever is missing (idempotent), then put the recorded partition in place."""
        partition = self.partition()
        have = set(namespaces())
        for ns in [self.switch, *(self.namespace(n) for n, _ in self.nodes)]:
            if ns not in have:
                _run(["ip", "netns", "add", ns])
        sw = self.switch
        if not _run(["ip", "-n", sw, "link", "show", BRIDGE], check=False):
            _run(["ip", "-n", sw, "link", "add", BRIDGE, "type", "bridge"])
        _run(["ip", "-n", sw, "link", "set", BRIDGE, "up"])
        ports = self.ports
        for name, address in self.nodes:
            ns, port = self.namespace(name), ports[name]
            if not _run(["ip", "-n", sw, "link", "show", port], check=False):
                # Both ends are made in their namespaces: nothing appears in the host's.
                _run(
                    ["ip", "link", "add", port, "netns", sw, "type", "veth"]
                    + ["peer", "name", NODE_LINK, "netns", ns]
                )
            _run(["ip", "-n", sw, "link", "set", port, "master", BRIDGE, "up"])
            want = ipaddress.IPv4Interface(f"{address}/{PREFIX}")
            have_addrs = _addresses(ns, NODE_LINK)
            for stale in (a for a in have_addrs if a != want):  # left by an older cluster
                _run(["ip", "-n", ns, "addr", "del", str(stale), "dev", NODE_LINK])
            if want not in have_addrs:  # never touched when there: a running daemon uses it
                _run(["ip", "-n", ns, "addr", "add", str(want), "dev", NODE_LINK])
            _run(["ip", "-n", ns, "link", "set", NODE_LINK, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        if partition is not None or self._has_table():
            self.apply(partition)

    def _has_table(self) -> bool:
        if shutil.which("nft") is None:
            return False
        return self._ns(self.switch, "nft", "list", "table", "bridge", TABLE, check=False)

    def apply(self, partition: Partition | None) -> None:
        """Replace the switch's rules with those of ``partition`` (None: no rules)."""
        if shutil.which("nft") is None:
            raise NetnsError(
                "nft not found: install the Debian package nftables (./dev setup does)"
            )
        self._ns(self.switch, "nft", "-f", "-", stdin=ruleset(partition, self.ports))

    def cut(self, groups: Sequence[str] | None) -> Partition | None:
        """Cut the network between ``groups`` (``["n1,n2", "n3"]``), or heal it (None);
        recorded for ``status`` and for the next ``ensure``."""
        part = None if groups is None else parse_groups(groups, [n for n, _ in self.nodes])
        if not self.is_up():
            raise NetnsUsage(f"the network of {self.root} is not up: `dfs cluster up` first")
        self.apply(part)
        _record(self.root, part)
        return part


def remove_all(root: Path) -> list[str]:
    """Delete every namespace of the cluster in ``root`` (and so its links and rules); the
    names removed. The partition goes with the rules: the next ``ensure`` starts healed."""
    prefix = f"dfs-{tag_for(root)}-"
    removed = []
    for ns in namespaces():
        if ns.startswith(prefix):
            if not _run(["ip", "netns", "delete", ns], check=False) and (NETNS_DIR / ns).exists():
                _run(["ip", "netns", "delete", ns])  # still there: this time, say why
            removed.append(ns)
    if load_state(root) is not None:
        _record(root, None)
    return removed
