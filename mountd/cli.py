"""``dfs-mountd``: run one node's daemon in the foreground."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from dfs.config import ConfigError
from mountd.daemon import (
    EXIT_USAGE,
    DaemonOptions,
    default_data_dir,
    load_cluster,
    run,
)

log = logging.getLogger("dfs.mountd")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--data",
    "data_dir",
    default=None,
    type=click.Path(path_type=Path),
    help="Data directory (metadata and contents); created on first use. Required without "
    "--config; with it the default is /var/lib/dfs/CLUSTER/NODE.",
)
@click.option(
    "--config",
    "config_path",
    default=None,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Cluster configuration (see `dfs init`); run as the node named by --node.",
)
@click.option("--node", "node_name", default=None, help="This node's name in --config.")
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
    help="Standalone only: cluster id the data directory must belong to (a new one is "
    "created with it).",
)
@click.argument("mountpoint", type=click.Path(path_type=Path))
def main(
    data_dir: Path | None,
    config_path: Path | None,
    node_name: str | None,
    log_level: str,
    allow_other: bool | None,
    cluster_id: str | None,
    mountpoint: Path,
) -> None:
    """Mount a dfs node at MOUNTPOINT and serve it until SIGTERM/SIGINT or unmount.

    \b
    Standalone:    dfs-mountd --data DIR MOUNTPOINT
    Cluster node:  dfs-mountd --config FILE --node NAME [--data DIR] MOUNTPOINT

    Standalone, the node is a one-node cluster of its own kept in --data. As a
    cluster node it listens for the other nodes on its configured address and
    port, checks that they hold the cluster secret, and answers local tools on
    DIR/control.sock. The command stays in the foreground and logs to stderr;
    the mount is ready when it logs "ready".

    Exit codes: 0 clean unmount, 1 failure (e.g. the node's port is taken), 2 bad
    usage or configuration (unknown node, secret file readable by others), 3
    unusable mount point, 4 unusable data directory (locked, other cluster or
    node, format).
    """
    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if config_path is None:
        if node_name is not None:
            raise click.UsageError("--node needs --config FILE")
        if data_dir is None:
            raise click.UsageError("Missing option '--data' (or give --config FILE --node NAME)")
        opts = DaemonOptions(
            data_dir=data_dir.absolute(),
            mountpoint=mountpoint.absolute(),
            allow_other=allow_other,
            cluster_id=cluster_id,
        )
        sys.exit(run(opts))
    if node_name is None:
        raise click.UsageError("--config needs --node NAME")
    if cluster_id is not None:
        raise click.UsageError("--cluster-id cannot be used with --config (it holds the id)")
    try:
        setup = load_cluster(config_path, node_name)
        data = data_dir if data_dir is not None else default_data_dir(setup)
    except ConfigError as exc:
        log.error("%s", exc)
        sys.exit(EXIT_USAGE)
    opts = DaemonOptions(
        data_dir=data.absolute(),
        mountpoint=mountpoint.absolute(),
        allow_other=allow_other,
        cluster_id=setup.config.id,
        cluster=setup,
    )
    sys.exit(run(opts))
