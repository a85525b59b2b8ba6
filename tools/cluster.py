"""``dfs cluster``: a local cluster of dfs-mountd nodes on loopback or in network namespaces,
thin over tools/launcher.py (and tools/netns.py for ``--netns`` and ``partition``)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import click
from rich.text import Text

from . import netns
from .launcher import (
    EXIT_NOT_RUNNING,
    EXIT_OK,
    EXIT_USAGE,
    ClusterError,
    LaunchError,
    LocalCluster,
    NodeStatus,
    default_dir,
)
from .output import echo, table
from .status import peers_text

_DIR_HELP = "Cluster directory (default: $DFS_RUN/cluster, else ./run/cluster)."


def _dir_option(fn: Any) -> Any:
    return click.option(
        "--dir", "root", type=click.Path(path_type=Path, file_okay=False), help=_DIR_HELP
    )(fn)


def _cluster(root: Path | None) -> LocalCluster:
    return LocalCluster(root or default_dir(), say=lambda msg: click.echo(msg, err=True))


def _fail(exc: ClusterError) -> None:
    click.echo(f"dfs cluster: {exc}", err=True)
    if isinstance(exc, LaunchError) and exc.log_tail:
        click.echo(f"---- last lines of the log of {exc.node} ----", err=True)
        click.echo(exc.log_tail, err=True)
    sys.exit(exc.exit_code)


CALLER_DIR = "DFS_CALLER_DIR"  # set by ./dev: the directory its caller's shell is in


def _caller_path(path: str | Path) -> str:
    """``path`` as the caller's shell can use it: relative to the caller's directory when
    inside it (``./dev`` says where that is; else our own), absolute otherwise; quoted."""
    base = os.environ.get(CALLER_DIR) or os.getcwd()
    rel = os.path.relpath(os.path.abspath(path), base)
    if rel == ".." or rel.startswith("../"):
        return shlex.quote(os.path.abspath(path))
    return shlex.quote(rel if rel == "." or "/" in rel else f"./{rel}")


def dfs_command(argv0: str | None = None, which: str | None = None) -> str:
    """How to run this ``dfs`` again from the caller's shell, for commands we print.

    ``dfs`` when the ``dfs`` on PATH is this program; else the path of the one
    running (``.venv/bin/dfs`` from the repository: a fresh install is not on
    PATH), else ``python -m dfs_tools`` with this interpreter.
    """
    argv0 = sys.argv[0] if argv0 is None else argv0
    program: str | None = None
    if os.path.basename(argv0) == "dfs" and os.path.isfile(argv0):
        program = os.path.abspath(argv0)
    elif (Path(sys.executable).parent / "dfs").is_file():  # python -m dfs_tools, in a venv
        program = str(Path(sys.executable).parent / "dfs")
    if program is None:
        return f"{shlex.quote(sys.executable)} -m dfs_tools"
    found = shutil.which("dfs") if which is None else which
    if found and os.path.realpath(found) == os.path.realpath(program):
        return "dfs"
    return _caller_path(program)


def _dir_arg(c: LocalCluster, root: Path | None) -> str:
    return "" if root is None else f" --dir {_caller_path(c.root)}"


@click.group(name="cluster")
def cluster() -> None:
    """Run a local cluster: several nodes on this machine, for trying dfs out.

    \b
    dfs cluster up                   start 3 nodes on loopback (DIR/n1/mnt, DIR/n2/mnt, ...)
    dfs cluster status               nodes, PIDs, mounts and who reaches whom
    dfs cluster stop n2 --kill       crash a node; `dfs cluster start n2` restarts it
    dfs cluster down                 unmount and stop everything
    dfs cluster up --netns           each node in a network namespace of its own, so that
    dfs cluster partition n1 n2,n3   cuts n1 off from n2 and n3 (--heal joins them again)
    """


@cluster.command("up")
@_dir_option
@click.option(
    "--nodes", type=click.IntRange(1, 64), default=None, help="Number of nodes (first up: 3)."
)
@click.option(
    "--base-port",
    type=click.IntRange(1, 65000),
    default=None,
    help="Port of the first node; the others follow (first up: 7801).",
)
@click.option("--timeout", type=click.FloatRange(min=1), default=30.0, show_default=True)
@click.option(
    "--netns",
    "in_netns",
    is_flag=True,
    help="New cluster: each node in a network namespace of its own (for `partition`).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65000),
    default=None,
    help="New cluster: node i serves Prometheus metrics on this port + i - 1.",
)
def up_cmd(
    root: Path | None,
    nodes: int | None,
    base_port: int | None,
    timeout: float,
    in_netns: bool,
    metrics_port: int | None,
) -> None:
    """Start the local cluster and wait until every node is mounted and sees the others.

    The first `up` writes DIR/cluster.toml and a fresh secret; later ones reuse
    them and the nodes' data. With --netns (first `up`; remembered) each node
    runs in a network namespace of its own on a private bridge, with an address
    in 198.18.0.0/15, and `dfs cluster partition` can cut the network. Exit
    codes: 0 up (or already running), 1 a node did not come up (its log is
    shown; what was started is stopped again), 2 bad usage or configuration.
    """
    c = _cluster(root)
    try:
        result = c.up(
            nodes, base_port, timeout=timeout, in_netns=in_netns, metrics_port=metrics_port
        )
    except ClusterError as exc:
        _fail(exc)
        return
    if not result.started:
        click.echo(f"dfs cluster is already running in {c.root}: nothing started")
        for line in _node_lines(c):
            click.echo(line)
        return
    click.echo(f"dfs cluster is up: {len(c.nodes())} nodes in {c.root}")
    for line in _node_lines(c):
        click.echo(line)
    d = _dir_arg(c, root)
    dfs = dfs_command()
    first, second = c.nodes()[0], c.nodes()[-1]
    top = next(v for v in c.config().volumes if v.path == "/")
    sites = [n for n in top.sites if n != top.primary]
    site = sites[-1] if sites else second.name
    tries = [
        (f"{dfs} cluster status{d}", "nodes, PIDs, mounts, replication state"),
        (f"{dfs} status --mount {first.mountpoint}", "the cluster as a node sees it"),
        (f"echo hello > {second.mountpoint}/hello.txt", "write on one node..."),
        (f"cat {first.mountpoint}/hello.txt", "...read on another: one tree"),
        (f"{dfs} cluster stop {site} --kill{d}", "crash a storage site: updates go on"),
        (f"{dfs} cluster start {site}{d}", "bring it back: it catches up"),
        (f"mkdir {first.mountpoint}/proj", "a volume of its own, ordered by another node:"),
        (
            f"{dfs} volume create {first.mountpoint}/proj --primary {second.name}",
            "rename/link across volumes: EXDEV",
        ),
        (f"{dfs} cluster down{d}", "unmount and stop every node"),
    ]
    rest = [n.name for n in c.nodes()[1:]]
    if c.network() is not None and rest:
        tries[-1:-1] = [
            (
                f"{dfs} cluster partition {first.name} {','.join(rest)}{d}",
                f"cut {first.name} off from the others",
            ),
            (f"{dfs} cluster partition --heal{d}", "join them again"),
        ]
    width = max(len(cmd) for cmd, why in tries if why)
    click.echo(
        f"\nEvery mount shows the same tree. {first.name} is the primary of the root volume: it\n"
        "orders every update and replicates it to its storage sites before the update returns.\n"
        "Try:"
    )
    for cmd, why in tries:
        click.echo(f"  {cmd.ljust(width)}   # {why}" if why else f"  {cmd}")


def _node_lines(c: LocalCluster) -> list[str]:
    out = []
    for n in c.nodes():
        pid = c.daemon_pid(n)
        out.append(
            f"  {n.name}  {n.address}:{n.port}  {n.mountpoint}  "
            + (f"(pid {pid})" if pid else "(not running)")
        )
    return out


def _volumes_text(st: NodeStatus) -> str:
    """Each volume the node takes part in: ``/:primary``, ``/proj:site`` (``-nolease`` when
    its read lease lapsed); volumes it stores no replica of are left out."""
    parts = []
    for v in st.volumes:
        role = v.get("role")
        if role == "primary":
            parts.append(f"{v.get('path')}:primary")
        elif role == "site":
            parts.append(f"{v.get('path')}:site" + ("" if v.get("lease") else "-nolease"))
    return " ".join(parts) or "-"


def _peers_text(st: NodeStatus) -> str:
    if st.control_error:
        return f"control socket: {st.control_error}"
    return peers_text(st.peers)


@cluster.command("status")
@_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def status_cmd(root: Path | None, as_json: bool) -> None:
    """Show each node: address, mount point, PID, state, and which peers it reaches.

    A node is running when its daemon is alive; its mount is live, stale (the
    daemon died), none, or hung. Exit codes: 0 every node running with a live
    mount, 3 otherwise (also when there is no cluster in DIR), 2 bad usage.
    """
    c = _cluster(root)
    if not c.exists():
        if as_json:
            click.echo(json.dumps({"dir": str(c.root), "nodes": [], "exit_code": 3}))
        else:
            click.echo(f"no cluster in {c.root} (start one with `{dfs_command()} cluster up`)")
        sys.exit(EXIT_NOT_RUNNING)
    try:
        nodes = c.status()
        net = c.network()
    except ClusterError as exc:
        _fail(exc)
        return
    all_up = all(n.running for n in nodes)
    code = EXIT_OK if all_up else EXIT_NOT_RUNNING
    if as_json:
        doc = {
            "dir": str(c.root),
            "config": str(c.config_path),
            "nodes": [n.as_json() for n in nodes],
            "all_running": all_up,
            "network": _network_json(net),
            "exit_code": code,
        }
        click.echo(json.dumps(doc, indent=2))
    else:
        headers = ("NODE", "ADDRESS", "PID", "STATE", "MOUNT", "MOUNT POINT", "VOLUMES", "PEERS")
        rows = [
            (
                n.name,
                n.address,
                str(n.pid or "-"),
                Text(n.state, style="green" if n.state == "running" else "bold red"),
                Text(n.mount, style="green" if n.mount == "live" else "bold red"),
                n.mountpoint,
                _volumes_text(n) if n.pid else "-",
                _peers_text(n) if n.pid else "-",
            )
            for n in nodes
        ]
        echo(table(headers, rows, right=(2,)))
        if net is not None:
            up = "" if net.is_up() else " (removed: `up` makes them again)"
            click.echo(f"network namespaces dfs-{net.tag}-*, {net.subnet}{up}")
            click.echo(f"partition: {netns.describe(net.partition())}")
        if any(n.mount == "stale" for n in nodes):
            click.echo(
                f"stale mount: its daemon died; `{dfs_command()} cluster start NODE"
                f"{_dir_arg(c, root)}` recovers it"
            )
    sys.exit(code)


def _network_json(net: netns.Network | None) -> dict[str, Any] | None:
    if net is None:
        return None
    part = net.partition()
    return {
        "subnet": str(net.subnet),
        "namespaces": [net.switch, *(net.namespace(n) for n, _ in net.nodes)],
        "up": net.is_up(),
        "partition": part and [list(g) for g in part],
    }


@cluster.command("partition")
@click.argument("groups", nargs=-1)
@_dir_option
@click.option("--heal", is_flag=True, help="Restore full connectivity.")
@click.option("--show", is_flag=True, help="Print the partition in place (also with no GROUPS).")
def partition_cmd(root: Path | None, groups: tuple[str, ...], heal: bool, show: bool) -> None:
    """Cut the network between groups of nodes of a cluster started with `up --netns`.

    \b
    dfs cluster partition n1 n2,n3     n1 | n2,n3: traffic between the groups is dropped
    dfs cluster partition n2,n3        n1, named in no group, is isolated from all
    dfs cluster partition --heal       every node reaches every other again
    dfs cluster partition              print the partition in place

    Groups are separated by spaces, the nodes of a group by commas. Running
    nodes notice within a few heartbeats (`dfs cluster status`, PEERS). Exit
    codes: 0 done, 1 the rules could not be changed, 2 bad usage (unknown node,
    a cluster not started with --netns, its network not up).
    """
    c = _cluster(root)
    if sum((bool(groups), heal, show)) > 1:
        _fail(ClusterError("give GROUPS, --heal or --show, one of them", EXIT_USAGE))
    try:
        if groups or heal:
            part = c.partition(None if heal else list(groups))
        else:
            net = c.network() if c.exists() else None
            if net is None:
                raise ClusterError(f"no cluster in network namespaces in {c.root}")
            part = net.partition()
    except ClusterError as exc:
        _fail(exc)
        return
    click.echo(f"partition: {netns.describe(part)}")


@cluster.command("down")
@_dir_option
@click.option("--timeout", type=click.FloatRange(min=1), default=20.0, show_default=True)
def down_cmd(root: Path | None, timeout: float) -> None:
    """Stop every node this launcher started and unmount what they left; safe to repeat.

    Daemons get SIGTERM (they unmount cleanly), then SIGKILL after --timeout
    seconds; stale mounts of nodes that died are detached. Exit code 0.
    """
    c = _cluster(root)
    try:
        report = c.down(timeout=timeout)
    except ClusterError as exc:
        _fail(exc)
        return
    if not report:
        click.echo(f"no cluster in {c.root}: nothing to stop")
        return
    for line in report:
        click.echo(line)
    click.echo(f"dfs cluster in {c.root} is down")


@cluster.command("stop")
@click.argument("node")
@_dir_option
@click.option("--kill", is_flag=True, help="SIGKILL: a crash, leaving a stale mount behind.")
def stop_cmd(node: str, root: Path | None, kill: bool) -> None:
    """Stop one node: SIGTERM (it unmounts cleanly) or, with --kill, SIGKILL.

    Exit codes: 0 stopped or not running, 2 unknown node or no cluster.
    """
    c = _cluster(root)
    if not c.exists():
        _fail(ClusterError(f"no cluster in {c.root}"))
    try:
        stopped = c.stop(node, kill=kill)
    except ClusterError as exc:
        _fail(exc)
        return
    if not stopped:
        click.echo(f"{node} is not running")
    elif kill:
        click.echo(
            f"{node} killed; its mount is stale until "
            f"`{dfs_command()} cluster start {node}{_dir_arg(c, root)}`"
        )
    else:
        click.echo(f"{node} stopped")


@cluster.command("start")
@click.argument("node")
@_dir_option
@click.option("--timeout", type=click.FloatRange(min=1), default=30.0, show_default=True)
def start_cmd(node: str, root: Path | None, timeout: float) -> None:
    """Start one node again (a stale mount left by a crash is recovered).

    Returns once it is mounted and reaches every running node. Exit codes: 0
    started or already running, 1 it did not come up (its log is shown), 2
    unknown node or no cluster.
    """
    c = _cluster(root)
    if not c.exists():
        _fail(ClusterError(f"no cluster in {c.root}; use `{dfs_command()} cluster up`"))
    try:
        started = c.start(node, timeout=timeout)
    except ClusterError as exc:
        _fail(exc)
        return
    n = c.node(node)
    if not started:
        click.echo(f"{node} is already running (pid {c.daemon_pid(n)})")
    else:
        click.echo(f"{node} is up: {n.mountpoint} (pid {c.daemon_pid(n)})")
