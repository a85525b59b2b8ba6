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
    failover_after = 3.0           # elect a new primary after this long without the old one

    [[nodes]]
    name = "n1"
    address = "127.0.0.1"
    port = 7801
    id = 1                         # NodeId, 1..65535, unique; high bits of its inode ids

    [[volumes]]
    path = "/"
    primary = "n1"
    sites = ["n1", "n2", "n3"]

    [metrics]                      # optional: Prometheus metrics, off without it
    port = 9480                    # every node serves http://ADDRESS:9480/metrics
    address = ""                   # "": the node's own address; "0.0.0.0": every interface

A node's own ``metrics_port`` (in its ``[[nodes]]`` entry) overrides the port, and
turns metrics on for that node even without a ``[metrics]`` table: nodes that share
an address (a cluster on one machine) need one each. ``ClusterConfig.metrics_at``
says where a node serves them.

The file's layout is the msgspec Structs below (frozen, unknown fields
refused), so types, missing keys and unknown keys are checked by msgspec;
what a type cannot say (ranges, duplicates, nodes a volume names) is checked
after. Every problem is a ``ConfigError`` whose message names the file and
the key. ``dfs init`` writes the file with tomli-w, which escapes what TOML
requires.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import stat
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import tomli_w

from dfs.types import MAX_NODE_ID, NodeId

SECRET_BYTES = 32
DEFAULT_REPLICAS = 3
DEFAULT_PORT = 7800


class ConfigError(Exception):
    """The configuration file cannot be used; the message says which key and why."""


class _Table(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A table of the file: its keys are the fields; any other key is an error."""


class Timeouts(_Table, frozen=True, forbid_unknown_fields=True):
    """``[timeouts]``, in seconds."""

    connect: float = 2.0
    call: float = 5.0
    heartbeat: float = 1.0
    # A volume's sites elect a new primary when they have not heard theirs for this long.
    failover_after: float = 3.0


class NodeConfig(_Table, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One ``[[nodes]]`` entry."""

    name: str
    address: str
    port: int
    id: NodeId
    metrics_port: int | None = None  # overrides ``[metrics] port`` for this node


class MetricsConfig(_Table, frozen=True, forbid_unknown_fields=True):
    """``[metrics]``: where every node serves Prometheus metrics (dfs/metrics.py)."""

    port: int
    address: str = ""  # "": each node's own address


class VolumeConfig(_Table, frozen=True, forbid_unknown_fields=True):
    """One ``[[volumes]]`` entry."""

    path: str
    primary: str
    sites: tuple[str, ...]


class _ClusterTable(_Table, frozen=True, forbid_unknown_fields=True):
    """``[cluster]``."""

    name: str
    id: str
    secret_file: str
    replicas: int = DEFAULT_REPLICAS


class _File(_Table, frozen=True, forbid_unknown_fields=True):
    """The whole file."""

    cluster: _ClusterTable
    nodes: tuple[NodeConfig, ...]
    timeouts: Timeouts = Timeouts()
    volumes: tuple[VolumeConfig, ...] = ()
    metrics: MetricsConfig | None = None


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
    metrics: MetricsConfig | None = None

    def metrics_at(self, name: str) -> tuple[str, int] | None:
        """Where node ``name`` serves its metrics (address, port), or None: not at all."""
        n = self.node(name)
        m = self.metrics
        port = n.metrics_port if n.metrics_port is not None else m.port if m else None
        if port is None:
            return None
        return (m.address if m is not None and m.address else n.address), port

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


# msgspec's words for the types of a TOML document's values.
_TYPE_WORDS = {"object": "table", "array": "array"}
_MSGSPEC_ERROR = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<at>[^`]*)`)?$", re.DOTALL)


def _config_error(exc: msgspec.ValidationError) -> ConfigError:
    """msgspec's message, reworded to name the key as the file spells it (``nodes[0].port``)."""
    m = _MSGSPEC_ERROR.match(str(exc))
    assert m is not None  # the pattern matches any text
    what, at = m.group("what"), (m.group("at") or "").lstrip(".")
    where = at or "top level"
    if got := re.match(r"Object contains unknown field `(.*)`$", what):
        return ConfigError(f"{where}: unknown key(s) {got.group(1)}")
    if got := re.match(r"Object missing required field `(.*)`$", what):
        return ConfigError(f"{where}.{got.group(1)}: missing")
    if got := re.match(r"Expected `(.*)`, got `(.*)`$", what):
        want, was = (_TYPE_WORDS.get(t, t) for t in got.groups())
        return ConfigError(f"{where}: expected {want}, got {was}")
    return ConfigError(f"{where}: {what}")


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
    """Validate the parsed TOML document ``raw`` (relative paths are taken from ``base``)."""
    try:
        doc = msgspec.convert(raw, _File)
    except msgspec.ValidationError as exc:
        raise _config_error(exc) from None
    cl = doc.cluster
    if not cl.id:
        raise ConfigError("cluster.id: empty")
    secret_file = Path(cl.secret_file)
    if not secret_file.is_absolute():
        secret_file = base / secret_file
    if cl.replicas < 1:
        raise ConfigError("cluster.replicas: expected a positive integer")
    for k in msgspec.structs.fields(Timeouts):
        if getattr(doc.timeouts, k.name) <= 0:
            raise ConfigError(f"timeouts.{k.name}: must be positive")
    timeouts = doc.timeouts

    nodes = doc.nodes
    if not nodes:
        raise ConfigError("nodes: at least one node is needed")
    for i, n in enumerate(nodes):
        where = f"nodes[{i}]"
        if not n.name or "/" in n.name or n.name in (".", "..", "...") or n.name[0] == "@":
            # "@...": the names of the admin tools (dfs.cluster.survey.ADMIN)
            raise ConfigError(f"{where}.name: {n.name!r} is not a valid node name")
        try:
            ipaddress.ip_address(n.address)
        except ValueError:
            if not n.address or " " in n.address:
                raise ConfigError(f"{where}.address: {n.address!r} is not an address") from None
        if not 0 < n.port < 65536:
            raise ConfigError(f"{where}.port: {n.port} out of range")
        if not 0 < n.id <= MAX_NODE_ID:
            raise ConfigError(f"{where}.id: {n.id} out of range 1..{MAX_NODE_ID}")
        if n.metrics_port is not None and not 0 < n.metrics_port < 65536:
            raise ConfigError(f"{where}.metrics_port: {n.metrics_port} out of range")
    _no_duplicates("nodes", "name", [n.name for n in nodes])
    _no_duplicates("nodes", "id", [n.id for n in nodes])
    _no_duplicates("nodes", "address:port", [f"{n.address}:{n.port}" for n in nodes])
    names = {n.name for n in nodes}

    volumes = list(doc.volumes)
    for i, v in enumerate(volumes):
        where = f"volumes[{i}]"
        if not v.path.startswith("/") or "//" in v.path or "/../" in v.path + "/":
            raise ConfigError(f"{where}.path: {v.path!r} must be an absolute, normal path")
        if not v.sites:
            raise ConfigError(f"{where}.sites: expected a non-empty list of node names")
        for s in [v.primary, *v.sites]:
            if s not in names:
                raise ConfigError(f"{where}: unknown node {s!r}")
        if v.primary not in v.sites:
            raise ConfigError(f"{where}: primary {v.primary!r} must be one of its sites")
        _no_duplicates(where, "sites", list(v.sites))
    _no_duplicates("volumes", "path", [v.path for v in volumes])
    if volumes and "/" not in {v.path for v in volumes}:
        raise ConfigError('volumes: the root volume (path "/") is missing')
    if not volumes:
        # The root volume: first node primary, the first `replicas` nodes as sites.
        sites = tuple(n.name for n in nodes[: cl.replicas])
        volumes.append(VolumeConfig("/", nodes[0].name, sites))
    cfg = ClusterConfig(
        cl.name,
        cl.id,
        secret_file,
        cl.replicas,
        nodes,
        tuple(volumes),
        timeouts,
        path,
        doc.metrics,
    )
    _check_metrics(cfg)
    return cfg


def _check_metrics(cfg: ClusterConfig) -> None:
    """Every metrics endpoint can be bound: a valid address, a port in range, and no two
    endpoints (nor an endpoint and a node's RPC port) on the same address and port."""
    m = cfg.metrics
    if m is not None:
        if not 0 < m.port < 65536:
            raise ConfigError(f"metrics.port: {m.port} out of range")
        if m.address:
            try:
                ipaddress.ip_address(m.address)
            except ValueError:
                raise ConfigError(f"metrics.address: {m.address!r} is not an address") from None
    # Nodes at one address are on one machine: their ports must all differ.
    taken = {(n.address, n.port): f"the RPC port of node {n.name}" for n in cfg.nodes}
    for n in cfg.nodes:
        at = cfg.metrics_at(n.name)
        if at is None:
            continue
        clash = taken.get((n.address, at[1]))
        if clash is not None:
            raise ConfigError(
                f"node {n.name} would serve metrics on port {at[1]} of {n.address}, already "
                f"{clash}: give nodes that share an address a metrics_port each"
            )
        taken[n.address, at[1]] = f"the metrics port of node {n.name}"


def _no_duplicates(where: str, what: str, items: list[Any]) -> None:
    seen: set[Any] = set()
    for x in items:
        if x in seen:
            raise ConfigError(f"{where}: duplicate {what} {x!r}")
        seen.add(x)


# --- writing a new configuration (``dfs init``) ----------------------------------------------


HEADER = "# dfs cluster configuration (see docs/OPERATIONS.md)\n"


def render(cfg: ClusterConfig, secret_name: str) -> str:
    """The TOML text of ``cfg`` (its secret file named ``secret_name``), as ``dfs init`` writes it.

    tomli-w writes every value; the tables are laid out here, one ``[[nodes]]``
    and ``[[volumes]]`` block per entry as people write them (tomli-w would
    put short ones inline).
    """
    head = {
        "cluster": {
            "name": cfg.name,
            "id": cfg.id,
            "secret_file": secret_name,
            "replicas": cfg.replicas,
        },
        "timeouts": msgspec.structs.asdict(cfg.timeouts),
    }
    if cfg.metrics is not None:
        head["metrics"] = msgspec.structs.asdict(cfg.metrics)
    parts = [HEADER + tomli_w.dumps(head)]
    for kind, entries in (("nodes", cfg.nodes), ("volumes", cfg.volumes)):
        for e in entries:
            parts.append(f"[[{kind}]]\n" + tomli_w.dumps(msgspec.to_builtins(e)))
    return "\n".join(parts)


def init(
    path: Path,
    nodes: list[tuple[str, str, int]],
    *,
    name: str = "dfs",
    replicas: int = DEFAULT_REPLICAS,
    force: bool = False,
    metrics_port: int | None = None,
) -> ClusterConfig:
    """Write a new configuration for ``nodes`` (name, address, port) and a fresh secret.

    The secret goes to ``<path stem>.secret`` beside the file, created with
    mode 0600 before any byte is written. ``metrics_port``: every node serves
    metrics there (``[metrics] port``) — or, when nodes share an address, each
    node at its own port from ``metrics_port`` on (``metrics_port`` per node).
    """
    if path.exists() and not force:
        raise ConfigError(f"{path}: already exists (use --force to overwrite)")
    secret_path = path.with_suffix(".secret")
    shared = len({a for _, a, _ in nodes}) < len(nodes)
    each = metrics_port is not None and shared
    node_cfgs = tuple(
        NodeConfig(n, a, p, NodeId(i + 1), metrics_port + i if each and metrics_port else None)
        for i, (n, a, p) in enumerate(nodes)
    )
    raw_cfg = ClusterConfig(
        name=name,
        id=str(uuid.uuid4()),
        secret_file=secret_path,
        replicas=replicas,
        nodes=node_cfgs,
        volumes=(),
        metrics=MetricsConfig(metrics_port) if metrics_port is not None and not shared else None,
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
