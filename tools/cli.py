"""``dfs``: the admin command line (installed as the package ``dfs_tools``).

Thin by design: each command parses options, calls into ``dfs`` and prints.
The logic of ``dfs fsck`` lives in ``dfs/check``; ``dfs cluster`` is in
tools/cluster.py over tools/launcher.py.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from dfs.check.checker import Finding
from dfs.check.fsck import EXIT_OPERATIONAL, FsckError, FsckResult, fsck
from dfs.check.scan import Progress

from .cluster import cluster
from .output import ProgressBar, is_terminal
from .status import status
from .volume import volume
from .where import where


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Administer dfs nodes and their data directories."""


main.add_command(cluster)
main.add_command(where)
main.add_command(volume)
main.add_command(status)


def _finding_line(f: Finding) -> str:
    tag = "" if f.repairable else " [not repairable]"
    return f"{f.code} {f.ino:#x}: {f.message}{tag}"


def _finding_json(f: Finding) -> dict[str, Any]:
    return {
        "code": f.code,
        "ino": f.ino,
        "ino_hex": f"{f.ino:#x}",
        "message": f.message,
        "repairable": f.repairable,
    }


def _summary(r: FsckResult, repair: bool) -> str:
    n = len(r.findings)
    if not n:
        return f"{r.data_dir}: clean"
    if not repair:
        fixable = sum(f.repairable for f in r.findings)
        return (
            f"{r.data_dir}: {n} problem{'s' if n != 1 else ''} found "
            f"({fixable} repairable with --repair); nothing changed"
        )
    if not r.remaining:
        return f"{r.data_dir}: {n} problem{'s' if n != 1 else ''} found, all repaired"
    return f"{r.data_dir}: {n} problems found, {len(r.remaining)} left after repair"


@main.command(name="fsck")
@click.option(
    "--data",
    "data_dir",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Data directory of the node (its daemon must be stopped).",
)
@click.option("--repair", is_flag=True, help="Fix what can be fixed safely (default: only check).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option(
    "--no-data", is_flag=True, help="Skip reading file contents (no checksum verification)."
)
def fsck_cmd(data_dir: Path, repair: bool, as_json: bool, no_data: bool) -> None:
    """Check the consistency of a stopped node's data directory, and optionally repair it.

    Without --repair nothing is changed. Repairs never delete user data:
    unreachable files go to /lost+found, and a block whose checksum does not
    match is re-hashed and reported (its contents may be corrupt).

    Exit codes: 0 no problems, 1 problems found and all repaired, 4 problems
    left (not repaired, or not repairable), 8 operational error (in use by a
    running daemon, not a dfs directory, wrong format), 2 bad usage.
    """
    progress: Progress | None = ProgressBar() if is_terminal(sys.stderr) and not as_json else None
    try:
        result = fsck(data_dir, repair=repair, verify_data=not no_data, progress=progress)
    except FsckError as exc:
        _close(progress)
        click.echo(f"dfs fsck: {exc}", err=True)
        if as_json:
            click.echo(
                json.dumps(
                    {"data_dir": str(data_dir), "error": str(exc), "exit_code": EXIT_OPERATIONAL}
                )
            )
        sys.exit(EXIT_OPERATIONAL)
    except Exception as exc:  # noqa: BLE001 - a bug: say so, exit as an operational error
        _close(progress)
        traceback.print_exc()
        click.echo(f"dfs fsck: internal error (a bug in dfs): {exc}", err=True)
        sys.exit(EXIT_OPERATIONAL)
    _close(progress)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "data_dir": str(result.data_dir),
                    "clean_shutdown": result.clean_shutdown,
                    "findings": [_finding_json(f) for f in result.findings],
                    "repaired": result.repaired,
                    "remaining": [_finding_json(f) for f in result.remaining],
                    "exit_code": result.exit_code,
                },
                indent=2,
            )
        )
    else:
        if not result.clean_shutdown:
            click.echo("note: the last daemon did not stop cleanly; dfs-mountd recovers at start")
        for f in result.findings:
            click.echo(_finding_line(f))
        for line in result.repaired:
            click.echo(f"repaired: {line}")
        if repair:
            for f in result.remaining:
                click.echo(f"left: {_finding_line(f)}")
        click.echo(_summary(result, repair))
    sys.exit(result.exit_code)


def _close(progress: Progress | None) -> None:
    if isinstance(progress, ProgressBar):
        progress.close()


def _node_spec(spec: str, index: int, base_port: int) -> tuple[str, str, int]:
    """NAME, NAME=ADDRESS or NAME=ADDRESS:PORT (default 127.0.0.1 and base_port + index)."""
    name, _, where = spec.partition("=")
    address, _, port = where.partition(":")
    try:
        return name, address or "127.0.0.1", int(port) if port else base_port + index
    except ValueError:
        raise click.BadParameter(f"{spec!r}: port is not a number", param_hint="NODES") from None


@main.command("init")
@click.argument("nodes", nargs=-1, required=True)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("cluster.toml"),
    show_default=True,
    help="Where to write the configuration; the secret goes beside it (NAME.secret, mode 0600).",
)
@click.option("--name", default="dfs", show_default=True, help="Cluster name.")
@click.option(
    "--replicas",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Storage sites of the root volume.",
)
@click.option("--base-port", type=click.IntRange(1, 65000), default=7801, show_default=True)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65000),
    default=None,
    help="Serve Prometheus metrics on this port ([metrics]; nodes sharing an address get "
    "this port and the following ones). Default: no metrics.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing configuration.")
def init_cmd(
    nodes: tuple[str, ...],
    config_path: Path,
    name: str,
    replicas: int,
    base_port: int,
    metrics_port: int | None,
    force: bool,
) -> None:
    """Write a new cluster configuration for NODES with a fresh random secret.

    Each node is NAME, NAME=ADDRESS or NAME=ADDRESS:PORT; addresses default to
    127.0.0.1 and ports to --base-port, --base-port+1, ...

    \b
    Example:  dfs init n1 n2 n3 --config /etc/dfs/cluster.toml
    """
    from dfs import config as C

    specs = [_node_spec(s, i, base_port) for i, s in enumerate(nodes)]
    try:
        cfg = C.init(
            config_path,
            specs,
            name=name,
            replicas=replicas,
            force=force,
            metrics_port=metrics_port,
        )
    except C.ConfigError as exc:
        click.echo(f"dfs init: {exc}", err=True)
        sys.exit(2)
    click.echo(f"wrote {config_path} (cluster {cfg.name}, id {cfg.id})")
    click.echo(f"wrote {cfg.secret_file} (mode 0600: copy it to every node, keep it private)")
    for n in cfg.nodes:
        at = cfg.metrics_at(n.name)
        metrics = f", metrics on port {at[1]}" if at is not None else ""
        click.echo(f"  node {n.name}: {n.address}:{n.port} (id {n.id}{metrics})")
    for v in cfg.volumes:
        click.echo(f"  volume {v.path}: primary {v.primary}, sites {', '.join(v.sites)}")
