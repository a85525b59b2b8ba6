"""The cluster configuration: a TOML file, parsed into frozen dataclasses and validated.

Example (what ``dfs init`` writes)::

    [cluster]
    name = "lab"
    id = "6f1c..."                 # random, fixed at creation; data dirs remember it
    secret_file = "secret"         # relative to this file; mode 0600; shared by all nodes
    replicas = 3                   # storage sites of the root volume (default 3)

    [timeouts]                     # seconds
    connect = 2.0
    call = 5.0
    heartbeat = 1.0

    [[nodes]]
    name = "n1"
    address = "127.0.0.1"
    port = 7801
    id = 1                         # NodeId, 1..65535, unique; high bits of its inode ids

    [[volumes]]
    path = "/"
    primary = "n1"
    sites = ["n1", "n2", "n3"]

Unknown keys, duplicate names/ids/ports, unknown nodes in volumes and other
inconsistencies are ``ConfigError`` with a message that names the key.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import stat
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dfs.types import MAX_NODE_ID, NodeId

SECRET_BYTES = 32
DEFAULT_REPLICAS = 3
DEFAULT_PORT = 7800


class ConfigError(Exception):
    """The configuration file cannot be used; the message says which key and why."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 2.0
    call: float = 5.0
    heartbeat: float = 1.0


@dataclass(frozen=True, slots=True)
class NodeConfig:
    name: str
    address: str
    port: int
    id: NodeId


@dataclass(frozen=True, slots=True)
class VolumeConfig:
    path: str
    primary: str
    sites: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    name: str
    id: str
    secret_file: Path
    replicas: int
    nodes: tuple[NodeConfig, ...]
    volumes: tuple[VolumeConfig, ...]
    timeouts: Timeouts = field(default_factory=Timeouts)
    path: Path | None = None  # the file it was read from

    def node(self, name: str) -> NodeConfig:
        for n in self.nodes:
            if n.name == name:
                return n
        known = ", ".join(n.name for n in self.nodes)
        raise ConfigError(f"no node named {name!r} in the configuration (nodes: {known})")

    def read_secret(self) -> bytes:
        """The shared secret; refuses a file that other users can read."""
        try:
            st = os.stat(self.secret_file)
        except OSError as exc:
            raise ConfigError(f"cluster.secret_file {self.secret_file}: {exc.strerror}") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"cluster.secret_file {self.secret_file}: readable by others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it"
            )
        data = self.secret_file.read_bytes().strip()
        if len(data) < 16:
            raise ConfigError(f"cluster.secret_file {self.secret_file}: secret too short")
        return data


_TOP_KEYS = {"cluster", "timeouts", "nodes", "volumes"}
_CLUSTER_KEYS = {"name", "id", "secret_file", "replicas"}
_TIMEOUT_KEYS = {"connect", "call", "heartbeat"}
_NODE_KEYS = {"name", "address", "port", "id"}
_VOLUME_KEYS = {"path", "primary", "sites"}


def _unknown(where: str, got: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(got) - allowed)
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(extra)}")


def _get(where: str, d: dict[str, Any], key: str, typ: type | tuple[type, ...]) -> Any:
    if key not in d:
        raise ConfigError(f"{where}.{key}: missing")
    v = d[key]
    if isinstance(v, bool) and typ is not bool or not isinstance(v, typ):
        names = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise ConfigError(f"{where}.{key}: expected {names}, got {type(v).__name__}")
    return v


def load(path: Path) -> ClusterConfig:
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return parse(raw, base=path.parent, path=path)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse(raw: dict[str, Any], *, base: Path, path: Path | None = None) -> ClusterConfig:
    _unknown("top level", raw, _TOP_KEYS)
    cl = _get("top level", raw, "cluster", dict)
    _unknown("cluster", cl, _CLUSTER_KEYS)
    name = _get("cluster", cl, "name", str)
    cid = _get("cluster", cl, "id", str)
    if not cid:
        raise ConfigError("cluster.id: empty")
    secret_file = Path(_get("cluster", cl, "secret_file", str))
    if not secret_file.is_absolute():
        secret_file = base / secret_file
    replicas = cl.get("replicas", DEFAULT_REPLICAS)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ConfigError("cluster.replicas: expected a positive integer")

    tm = raw.get("timeouts", {})
    if not isinstance(tm, dict):
        raise ConfigError("timeouts: expected a table")
    _unknown("timeouts", tm, _TIMEOUT_KEYS)
    values: dict[str, float] = {}
    for k in _TIMEOUT_KEYS & set(tm):
        v = _get("timeouts", tm, k, (int, float))
        if v <= 0:
            raise ConfigError(f"timeouts.{k}: must be positive")
        values[k] = float(v)
    timeouts = Timeouts(**values)

    nodes_raw = _get("top level", raw, "nodes", list)
    if not nodes_raw:
        raise ConfigError("nodes: at least one node is needed")
    nodes: list[NodeConfig] = []
    for i, n in enumerate(nodes_raw):
        where = f"nodes[{i}]"
        if not isinstance(n, dict):
            raise ConfigError(f"{where}: expected a table")
        _unknown(where, n, _NODE_KEYS)
        nname = _get(where, n, "name", str)
        if not nname or "/" in nname or nname in (".", "..", "..."):
            raise ConfigError(f"{where}.name: {nname!r} is not a valid node name")
        addr = _get(where, n, "address", str)
        try:
            ipaddress.ip_address(addr)
        except ValueError:
            if not addr or " " in addr:
                raise ConfigError(f"{where}.address: {addr!r} is not an address") from None
        port = _get(where, n, "port", int)
        if not 0 < port < 65536:
            raise ConfigError(f"{where}.port: {port} out of range")
        nid = _get(where, n, "id", int)
        if not 0 < nid <= MAX_NODE_ID:
            raise ConfigError(f"{where}.id: {nid} out of range 1..{MAX_NODE_ID}")
        nodes.append(NodeConfig(nname, addr, port, NodeId(nid)))
    _no_duplicates("nodes", "name", [n.name for n in nodes])
    _no_duplicates("nodes", "id", [n.id for n in nodes])
    _no_duplicates("nodes", "address:port", [f"{n.address}:{n.port}" for n in nodes])
    names = {n.name for n in nodes}

    vols_raw = raw.get("volumes", [])
    if not isinstance(vols_raw, list):
        raise ConfigError("volumes: expected an array of tables")
    volumes: list[VolumeConfig] = []
    for i, v in enumerate(vols_raw):
        where = f"volumes[{i}]"
        if not isinstance(v, dict):
            raise ConfigError(f"{where}: expected a table")
        _unknown(where, v, _VOLUME_KEYS)
        vpath = _get(where, v, "path", str)
        if not vpath.startswith("/") or "//" in vpath or "/../" in vpath + "/":
            raise ConfigError(f"{where}.path: {vpath!r} must be an absolute, normal path")
        primary = _get(where, v, "primary", str)
        sites = _get(where, v, "sites", list)
        if not sites or not all(isinstance(s, str) for s in sites):
            raise ConfigError(f"{where}.sites: expected a non-empty list of node names")
        for s in [primary, *sites]:
            if s not in names:
                raise ConfigError(f"{where}: unknown node {s!r}")
        if primary not in sites:
            raise ConfigError(f"{where}: primary {primary!r} must be one of its sites")
        _no_duplicates(where, "sites", sites)
        volumes.append(VolumeConfig(vpath, primary, tuple(sites)))
    _no_duplicates("volumes", "path", [v.path for v in volumes])
    if volumes and "/" not in {v.path for v in volumes}:
        raise ConfigError('volumes: the root volume (path "/") is missing')
    if not volumes:
        # The root volume: first node primary, the first `replicas` nodes as sites.
        sites = tuple(n.name for n in nodes[:replicas])
        volumes.append(VolumeConfig("/", nodes[0].name, sites))
    return ClusterConfig(
        name, cid, secret_file, replicas, tuple(nodes), tuple(volumes), timeouts, path
    )


def _no_duplicates(where: str, what: str, items: list[Any]) -> None:
    seen: set[Any] = set()
    for x in items:
        if x in seen:
            raise ConfigError(f"{where}: duplicate {what} {x!r}")
        seen.add(x)


# --- writing a new configuration (``dfs init``) ----------------------------------------------


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(cfg: ClusterConfig, secret_name: str) -> str:
    lines = [
        "# dfs cluster configuration (see docs/OPERATIONS.md)",
        "[cluster]",
        f"name = {_toml_str(cfg.name)}",
        f"id = {_toml_str(cfg.id)}",
        f"secret_file = {_toml_str(secret_name)}",
        f"replicas = {cfg.replicas}",
        "",
        "[timeouts]",
        f"connect = {cfg.timeouts.connect}",
        f"call = {cfg.timeouts.call}",
        f"heartbeat = {cfg.timeouts.heartbeat}",
    ]
    for n in cfg.nodes:
        lines += [
            "",
            "[[nodes]]",
            f"name = {_toml_str(n.name)}",
            f"address = {_toml_str(n.address)}",
            f"port = {n.port}",
            f"id = {n.id}",
        ]
    for v in cfg.volumes:
        sites = ", ".join(_toml_str(s) for s in v.sites)
        lines += [
            "",
            "[[volumes]]",
            f"path = {_toml_str(v.path)}",
            f"primary = {_toml_str(v.primary)}",
            f"sites = [{sites}]",
        ]
    return "\n".join(lines) + "\n"


def init(
    path: Path,
    nodes: list[tuple[str, str, int]],
    *,
    name: str = "dfs",
    replicas: int = DEFAULT_REPLICAS,
    force: bool = False,
) -> ClusterConfig:
    """Write a new configuration for ``nodes`` (name, address, port) and a fresh secret.

    The secret goes to ``<path stem>.secret`` beside the file, created with
    mode 0600 before any byte is written.
    """
    if path.exists() and not force:
        raise ConfigError(f"{path}: already exists (use --force to overwrite)")
    secret_path = path.with_suffix(".secret")
    node_cfgs = tuple(NodeConfig(n, a, p, NodeId(i + 1)) for i, (n, a, p) in enumerate(nodes))
    raw_cfg = ClusterConfig(
        name=name,
        id=str(uuid.uuid4()),
        secret_file=secret_path,
        replicas=replicas,
        nodes=node_cfgs,
        volumes=(),
    )
    # Validate through the same parser users' files go through.
    text = render(raw_cfg, secret_path.name)
    cfg = parse(tomllib.loads(text), base=path.parent, path=path)
    text = render(cfg, secret_path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, secrets.token_hex(SECRET_BYTES).encode() + b"\n")
    finally:
        os.close(fd)
    path.write_text(text)
    return cfg
