"""``dfs volume create|list|promote|rolled-back``: the volumes of the tree.

Both talk to the daemon of a local mount through its control socket
(``DATA_DIR/control.sock``, dfs/cluster/control.py). The daemon is found from
the mount: its source in the mount table is ``dfs:DATA_DIR`` (mountd sets it),
or ``--data DATA_DIR`` names it. ``create`` takes the directory as any path in
the tree (tools/paths.py: a path inside a mount, ``MNT/.../HOST/path`` or the
Newcastle form ``/../HOST/path``); the node that answers forwards the request
to the root volume's primary (dfs/cluster/service.py says what happens then).

Exit codes: 0 done; 1 the cluster refused (the message says why: not empty,
not a directory, a node unreachable...); 2 usage error or no daemon to ask.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from dfs.cluster.clusterview import site_mark
from dfs.cluster.control import ControlError, request, socket_path
from dfs.mounts import mount_at, read_mounts
from dfs.net.rpc import RemoteError

from .output import echo, table
from .paths import TreePath, TreePathError, choose_mount, resolve

EXIT_REFUSED = 1
EXIT_USAGE = 2


def data_dir_of(mount: Path, mountinfo: str | bytes | None = None) -> Path | None:
    """The data directory of the daemon serving ``mount``, from the mount's source."""
    try:
        table = read_mounts(mountinfo)
    except OSError:
        return None
    entry = mount_at(mount, table)
    if entry is None or not entry.source.startswith("dfs:"):
        return None
    return Path(entry.source[4:])


def _control(data: Path | None, tree: TreePath | None) -> Path:
    if data is None and tree is not None:
        data = data_dir_of(tree.mount)
    if data is None:
        raise click.UsageError(
            "cannot tell which daemon serves that mount: give its data directory with --data"
        )
    sock = socket_path(data)
    if not sock.exists():
        raise click.UsageError(f"no daemon runs on {data} (no {sock.name} there)")
    return sock


def _ask(sock: Path, method: str, args: dict[str, Any], timeout: float) -> Any:
    try:
        return request(sock, method, args, timeout=timeout)
    except RemoteError as exc:
        click.echo(f"dfs volume: {exc}", err=True)
        sys.exit(EXIT_REFUSED)
    except ControlError as exc:
        click.echo(f"dfs volume: {exc}", err=True)
        sys.exit(EXIT_USAGE)


@click.group()
def volume() -> None:
    """Create and list the volumes of the tree."""


@volume.command()
@click.argument("path")
@click.option("--primary", required=True, help="The node that orders the volume's updates.")
@click.option(
    "--sites",
    default="",
    help="Storage sites, comma-separated (the primary is always one).",
)
@click.option(
    "--failover-after",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds without its primary before its sites elect another "
    "(default: the cluster's [timeouts] failover_after).",
)
@click.option("--mount", "mount", default=None, help="Mount for the /../HOST/path form.")
@click.option("--data", type=click.Path(path_type=Path), default=None, help="Daemon data dir.")
@click.option("--json", "as_json", is_flag=True, help="Print the new volume as JSON.")
def create(
    path: str,
    primary: str,
    sites: str,
    failover_after: float | None,
    mount: str | None,
    data: Path | None,
    as_json: bool,
) -> None:
    """Make the empty directory PATH of the root volume a new volume.

    PATH is a path in the tree: inside a mount, MOUNT/.../HOST/path, or /../HOST/path.
    The new volume's updates are ordered by --primary and stored on --sites; nodes
    that are not sites read it from the primary. Exit: 0 done, 1 refused, 2 usage.
    """
    tree = resolve(path, mount=mount, env=os.environ)
    names = [s.strip() for s in sites.split(",") if s.strip()]
    sock = _control(data, tree)
    args: dict[str, Any] = {"path": tree.path, "primary": primary, "sites": names}
    if failover_after is not None:
        args["failover_after"] = float(failover_after)
    got = _ask(sock, "volume.create", args, timeout=60.0)
    if as_json:
        click.echo(json.dumps(got, indent=2))
        return
    click.echo(
        f"volume {got['vol']} at {got['path']}: primary {got['primary']}, "
        f"sites {', '.join(got['sites'])}"
    )
    n = len(got["sites"])
    if n > 1:
        need = n // 2 + 1
        what = "all of them" if need == n else f"{need} of them"
        hint = "; with one down it is read-only: 3 sites survive a failure" if n == 2 else ""
        click.echo(f"updates need a majority of its {n} sites ({what}) in sync{hint}")
        if got.get("failover_after") is not None:
            click.echo(
                f"its sites elect a new primary after {got['failover_after']:g} s without one"
            )


def _node_tree(path: str | None, mount: str | None, data: Path | None) -> TreePath | None:
    """Which node to ask: the one serving PATH, else the only (or --mount) dfs mount; None
    with --data (its control socket is asked directly)."""
    if path is not None:
        return resolve(path, mount=mount, env=os.environ)
    if data is not None:
        return None
    try:
        return TreePath(choose_mount(mount, os.environ), "/")
    except TreePathError as exc:
        raise click.UsageError(
            f"give a path in a dfs mount (any node's mount: each knows every volume), "
            f"--mount MOUNT or --data DIR ({exc.message})"
        ) from None


@volume.command(name="list")
@click.argument("path", required=False)
@click.option("--mount", "mount", default=None, help="Mount for the /../HOST/path form.")
@click.option("--data", type=click.Path(path_type=Path), default=None, help="Daemon data dir.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_(path: str | None, mount: str | None, data: Path | None, as_json: bool) -> None:
    """List the volumes, as the node serving PATH (default: the only dfs mount) knows them.

    Columns: volume id, path, primary, storage sites, this node's role (primary, site,
    none: reads it from the primary) and the last update this node applied.
    """
    vols = _ask(_control(data, _node_tree(path, mount, data)), "volume.list", {}, timeout=10.0)
    if as_json:
        click.echo(json.dumps(vols, indent=2))
        return
    rows = []
    for v in vols:
        role = v.get("role", "?")
        if role == "site":
            role += " (lease)" if v.get("lease") else " (no lease)"
        sites = []
        for st in v.get("sites_state", []):  # as the primary sees them
            mark = site_mark(st)
            lag = st.get("lag")
            sites.append(f"{st['site']}: {mark}" + (f" -{lag}" if lag else ""))
        rows.append(
            (
                str(v["vol"]),
                v["path"],
                v["primary"],
                str(v.get("epoch", 1)),
                ",".join(v["sites"]),
                role,
                str(v["applied"]),
                "; ".join(sites),
            )
        )
    headers = ("VOLUME", "PATH", "PRIMARY", "EPOCH", "SITES", "ROLE", "APPLIED", "SITE STATE")
    echo(table(headers, rows, right=(0, 3, 6)))


@volume.command()
@click.argument("path")
@click.argument("node")
@click.option("--mount", "mount", default=None, help="Mount for the /../HOST/path form.")
@click.option("--data", type=click.Path(path_type=Path), default=None, help="Daemon data dir.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
def promote(path: str, node: str, mount: str | None, data: Path | None, as_json: bool) -> None:
    """Make NODE the primary of the volume at PATH: a planned switch-over.

    NODE must be a storage site in sync (dfs volume list). The primary makes sure NODE has
    every update, steps down and hands over; NODE is elected in the next epoch. Updates
    made meanwhile wait (they are not refused), and nothing is lost; open files follow the
    new primary. Exit: 0 done, 1 refused (the message says why), 2 usage.
    """
    tree = resolve(path, mount=mount, env=os.environ)
    got = _ask(_control(data, tree), "volume.promote", {"path": tree.path, "to": node}, 60.0)
    if as_json:
        click.echo(json.dumps(got, indent=2))
        return
    if got["primary"] == got["was"]:
        click.echo(f"volume {got['vol']} at {got['path']}: {node} is its primary already")
        return
    click.echo(
        f"volume {got['vol']} at {got['path']}: primary {got['primary']} in epoch "
        f"{got['epoch']} (was {got['was']}); updates waited {got['held']:.2f} s"
    )


@volume.command(name="rolled-back")
@click.argument("path", required=False)
@click.option("--mount", "mount", default=None, help="Mount for the /../HOST/path form.")
@click.option("--data", type=click.Path(path_type=Path), default=None, help="Daemon data dir.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def rolled_back(path: str | None, mount: str | None, data: Path | None, as_json: bool) -> None:
    """List the updates the node serving PATH rolled back after a failover.

    An old primary that comes back keeps what it had made but nobody acknowledged under
    DATA/rolled-back/ (the records, copies of the files they touched, a manifest); this
    lists them: when, which volume and updates, the names they made (+) or removed (-).
    """
    tree = _node_tree(path, mount, data)
    got = _ask(_control(data, tree), "volume.rolledback", {}, timeout=10.0)
    if as_json:
        click.echo(json.dumps(got, indent=2))
        return
    if not got:
        click.echo("nothing rolled back on this node")
        return
    rows = [
        (
            m.get("when", "?"),
            str(m.get("volume", "?")),
            "..".join(str(u) for u in m.get("updates", [])),
            " ".join(m.get("entries", []))[:60],
            m["dir"],
        )
        for m in got
    ]
    echo(table(("WHEN", "VOLUME", "UPDATES", "ENTRIES", "KEPT IN"), rows, right=(1,)))
