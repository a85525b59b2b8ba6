"""``dfs-mountd``: run one node's daemon in the foreground."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from mountd.daemon import DaemonOptions, run


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--data",
    "data_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Data directory (metadata and contents); created on first use.",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@click.option(
    "--allow-other/--no-allow-other",
    default=None,
    help="Let every user of the machine use the mount (default: when run as root).",
)
@click.option(
    "--cluster-id",
    default=None,
    help="Cluster id the data directory must belong to (a new one is created with it).",
)
@click.argument("mountpoint", type=click.Path(path_type=Path))
def main(
    data_dir: Path,
    log_level: str,
    allow_other: bool | None,
    cluster_id: str | None,
    mountpoint: Path,
) -> None:
    """Mount a dfs node at MOUNTPOINT and serve it until SIGTERM/SIGINT or unmount.

    Without a cluster configuration the node is a standalone one-node cluster
    kept in --data. The command stays in the foreground and logs to stderr;
    the mount is ready when it logs "ready".

    Exit codes: 0 clean unmount, 1 failure, 2 bad usage, 3 unusable mount
    point, 4 unusable data directory (locked, other cluster or format).
    """
    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    opts = DaemonOptions(
        data_dir=data_dir.absolute(),
        mountpoint=mountpoint.absolute(),
        allow_other=allow_other,
        cluster_id=cluster_id,
    )
    sys.exit(run(opts))
