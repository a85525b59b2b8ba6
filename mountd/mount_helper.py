"""``mount.fuse.dfs``: the helper behind ``mount -t fuse.dfs`` and fstab lines.

mount(8) runs ``/sbin/mount.fuse.dfs SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS]``. SOURCE is
a node name of the cluster configuration (``config=FILE``, default
/etc/dfs/cluster.toml) or, for a standalone node, its data directory (a path with a
``/``). The helper starts ``dfs-mountd`` in the background, in a session of its own,
and returns once the daemon reports ready over the sd_notify protocol (the mount is
live then), or fails with the daemon's exit status and the end of its log.

A mount point that is already a live dfs mount of the same data directory is left as
it is (exit 0): that is how an fstab line with
``x-systemd.requires=dfs-mountd@NODE.service`` works, where the unit's daemon made
the mount before systemd's mount unit runs this helper.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from dfs.config import ConfigError
from mountd import sdnotify

DEFAULT_CONFIG = Path("/etc/dfs/cluster.toml")
LOG_DIR = Path("/var/log/dfs")
DEFAULT_TIMEOUT = 120.0

# mount(8)'s exit codes (mount(8), "RETURN CODES").
EXIT_USAGE = 1
EXIT_FAILURE = 32

# Options that mount(8), systemd or fstab conventions pass and that mean nothing to dfs.
_IGNORED = {
    "defaults", "rw", "auto", "noauto", "_netdev", "nofail", "user", "users", "nouser",
    "owner", "group", "exec", "noexec", "suid", "nosuid", "dev", "nodev", "atime",
    "noatime", "relatime", "strictatime", "lazytime", "async", "sync", "nodiratime",
}  # fmt: skip
_VALUED = {"config", "data", "log", "log_level", "timeout"}


class UsageError(Exception):
    pass


@dataclass(frozen=True)
class Request:
    """What to mount, from the helper's arguments."""

    source: str
    mountpoint: Path
    config: Path | None  # None: a standalone node whose data directory is ``source``
    data: Path | None
    log: Path | None
    log_level: str
    allow_other: bool | None
    timeout: float


def parse_options(source: str, mountpoint: Path, options: list[str], sloppy: bool) -> Request:
    values: dict[str, str] = {}
    allow_other: bool | None = None
    for group in options:
        for opt in filter(None, group.split(",")):
            key, sep, value = opt.partition("=")
            key = key.replace("-", "_")
            if key in _VALUED and sep:
                values[key] = value
            elif opt == "allow_other":
                allow_other = True
            elif opt == "noallow_other":
                allow_other = False
            elif opt == "ro":
                raise UsageError("read-only mounts are not supported (drop 'ro')")
            elif key in _IGNORED or opt.startswith(("x-", "comment=")):
                continue
            elif not sloppy:
                raise UsageError(f"unknown mount option {opt!r}")
    level = values.get("log_level", "info")
    if level not in ("debug", "info", "warning", "error"):
        raise UsageError(f"log_level={level}: expected debug, info, warning or error")
    try:
        timeout = float(values.get("timeout", DEFAULT_TIMEOUT))
    except ValueError:
        raise UsageError(f"timeout={values['timeout']}: not a number") from None
    standalone = "/" in source
    if standalone and "config" in values:
        raise UsageError("config= needs a node name as the source, not a data directory")
    return Request(
        source=source,
        mountpoint=mountpoint.absolute(),
        config=None if standalone else Path(values.get("config", str(DEFAULT_CONFIG))),
        data=Path(values["data"]) if "data" in values else (Path(source) if standalone else None),
        log=Path(values["log"]) if "log" in values else None,
        log_level=level,
        allow_other=allow_other,
        timeout=timeout,
    )


def daemon_command(req: Request) -> list[str]:
    cmd = [sys.executable, "-m", "mountd", "--log-level", req.log_level]
    if req.config is not None:
        cmd += ["--config", str(req.config.absolute()), "--node", req.source]
    if req.data is not None:
        cmd += ["--data", str(req.data.absolute())]
    if req.allow_other is not None:
        cmd.append("--allow-other" if req.allow_other else "--no-allow-other")
    return [*cmd, str(req.mountpoint)]


def data_dir(req: Request) -> Path:
    """The data directory the daemon will use (to recognise a mount it already made)."""
    if req.data is not None:
        return req.data.absolute()
    assert req.config is not None
    from mountd.daemon import default_data_dir, load_cluster

    return default_data_dir(load_cluster(req.config, req.source))


def _mount_source(mountpoint: Path) -> tuple[str, str] | None:
    """(file system type, source) of what is mounted at ``mountpoint``, from mountinfo."""
    want = str(mountpoint)
    for ch, esc in (("\\", "\\134"), (" ", "\\040"), ("\t", "\\011"), ("\n", "\\012")):
        want = want.replace(ch, esc)  # mountinfo's octal escapes
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            if parts[4] == want:
                found = (parts[sep + 1], parts[sep + 2])  # the last mount on top wins
    return found


def already_mounted(req: Request) -> bool:
    """Is ``req.mountpoint`` a live dfs mount of the same data directory?"""
    found = _mount_source(req.mountpoint)
    if found is None or found[0] != "fuse.dfs":
        return False
    if found[1] != f"dfs:{data_dir(req).resolve()}":
        raise UsageError(f"{req.mountpoint}: another dfs node ({found[1]}) is mounted here")
    try:
        os.listdir(req.mountpoint)  # a dead daemon's mount says ENOTCONN: start a new one
    except OSError:
        return False
    return True


def default_log(req: Request) -> Path | None:
    """Inherit stderr under systemd (it goes to the journal); else a file in /var/log/dfs."""
    if req.log is not None:
        return req.log
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        return None
    name = str(req.mountpoint).strip("/").replace("/", "-") or "root"
    return LOG_DIR / f"{name}.log"


def _tail(path: Path | None, lines: int = 20) -> str:
    if path is None:
        return "(see the journal)"
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def start(req: Request, verbose: bool) -> int:
    """Start the daemon and wait until it is ready or has exited; mount(8)'s exit code."""
    log_path = default_log(req)
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = daemon_command(req)
    if verbose:
        click.echo(f"mount.fuse.dfs: {' '.join(cmd)}", err=True)
    with sdnotify.Listener() as listener:
        out = open(log_path, "ab") if log_path is not None else None  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out if out is not None else None,
                stderr=subprocess.STDOUT if out is not None else None,
                env={**os.environ, **listener.env()},
                start_new_session=True,
            )
        finally:
            if out is not None:
                out.close()
        waited = 0.0
        while waited < req.timeout:
            msg = listener.receive(timeout=0.5)
            if msg is not None and msg.get("READY") == "1":
                if verbose:
                    click.echo(f"mount.fuse.dfs: ready, pid {proc.pid}", err=True)
                return 0
            if msg is None:
                waited += 0.5
            code = proc.poll()
            if code is not None:
                click.echo(
                    f"mount.fuse.dfs: dfs-mountd exited with status {code} before the mount "
                    f"was ready; its log ({log_path or 'journal'}):\n{_tail(log_path)}",
                    err=True,
                )
                return EXIT_FAILURE
        proc.terminate()
        click.echo(
            f"mount.fuse.dfs: the daemon was not ready after {req.timeout:g} s; stopped it. "
            f"Its log ({log_path or 'journal'}):\n{_tail(log_path)}",
            err=True,
        )
        return EXIT_FAILURE


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source")
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option("-o", "options", multiple=True, help="Comma-separated mount options.")
@click.option("-s", "sloppy", is_flag=True, help="Ignore unknown mount options.")
@click.option("-f", "fake", is_flag=True, help="Do everything but start the daemon.")
@click.option("-n", "no_mtab", is_flag=True, help="Ignored (there is no /etc/mtab to write).")
@click.option("-v", "verbose", is_flag=True, help="Say what is run.")
@click.option("-t", "fstype", default=None, hidden=True)
@click.option("-N", "namespace", default=None, hidden=True)
def main(
    source: str,
    mountpoint: Path,
    options: tuple[str, ...],
    sloppy: bool,
    fake: bool,
    no_mtab: bool,
    verbose: bool,
    fstype: str | None,
    namespace: str | None,
) -> None:
    """Mount dfs: the helper that `mount -t fuse.dfs SOURCE MOUNTPOINT` runs.

    \b
    Cluster node:  mount -t fuse.dfs n1 /mnt/dfs [-o config=/etc/dfs/cluster.toml]
    Standalone:    mount -t fuse.dfs /var/lib/dfs/solo /mnt/dfs
    fstab:         n1 /mnt/dfs fuse.dfs _netdev,x-systemd.requires=dfs-mountd@n1.service 0 0

    Options: config=FILE, data=DIR (default /var/lib/dfs/CLUSTER/NODE), log=FILE
    (default: the journal under systemd, else /var/log/dfs/MOUNTPOINT.log),
    log_level=debug|info|warning|error, allow_other, noallow_other, timeout=SECONDS
    (default 120). fstab's and systemd's own options (_netdev, nofail, x-*, ...) are
    ignored. Unmount with `umount MOUNTPOINT`: the daemon unmounts cleanly and exits.

    Exit codes (as mount(8)): 0 mounted (or already mounted by this node's daemon),
    1 bad usage, 32 the daemon failed (its log is printed).
    """
    if namespace is not None:
        click.echo("mount.fuse.dfs: -N (mount namespace) is not supported", err=True)
        sys.exit(EXIT_USAGE)
    try:
        req = parse_options(source, mountpoint, list(options), sloppy)
        if not req.mountpoint.is_dir():
            raise UsageError(f"{req.mountpoint}: mount point does not exist")
        data_dir(req)  # a configuration that cannot be used is bad usage, said now
        if already_mounted(req):
            if verbose:
                click.echo(f"mount.fuse.dfs: {req.mountpoint} is already mounted", err=True)
            sys.exit(0)
    except (UsageError, ConfigError) as exc:
        click.echo(f"mount.fuse.dfs: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    if fake:
        sys.exit(0)
    sys.exit(start(req, verbose))
