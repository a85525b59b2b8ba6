"""The node daemon: lock the data directory, open the stores, mount, serve, unmount.

Shutdown order (also on SIGTERM/SIGINT): leave the FUSE loop, unmount, purge
what the kernel no longer references, mark the store clean, close it, unlock.
"""

from __future__ import annotations

import fcntl
import logging
import os
import resource
import signal
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from dfs.data.store import DataStore
from dfs.errors import StoreError
from dfs.fs.vfs import Vfs
from dfs.meta.store import MetaStore
from mountd.fuse_convert import Counters
from mountd.fuse_ops import DfsOperations
from mountd.mountpoint import MountPointError, prepare

log = logging.getLogger("dfs.mountd")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_MOUNTPOINT = 3
EXIT_DATADIR = 4


@dataclass(frozen=True)
class DaemonOptions:
    data_dir: Path
    mountpoint: Path
    allow_other: bool | None = None  # None: when running as root


class DataDirLock:
    """An exclusive flock on DIR/lock, holding the owner's pid for error messages."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "lock"
        self.fd = -1

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StoreError(
                f"{self.path.parent}: in use by another dfs-mountd (pid {owner}); "
                "stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def check_data_dir(data_dir: Path) -> None:
    if data_dir.exists() and not data_dir.is_dir():
        raise StoreError(f"{data_dir}: not a directory")
    if data_dir.is_dir():
        entries = set(os.listdir(data_dir))
        if entries and "meta" not in entries and entries != {"lock"}:
            raise StoreError(
                f"{data_dir}: not a dfs data directory (it holds other files); "
                "use an empty or new directory"
            )
    data_dir.mkdir(parents=True, exist_ok=True)


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(opts: DaemonOptions) -> int:
    try:
        recovered = prepare(opts.mountpoint)
    except MountPointError as exc:
        log.error("%s", exc)
        return EXIT_MOUNTPOINT
    if recovered:
        log.warning("%s: cleaned up a stale mount left by a daemon that died", opts.mountpoint)
    lock = DataDirLock(opts.data_dir)
    try:
        check_data_dir(opts.data_dir)
        lock.acquire()
        meta = MetaStore.open(opts.data_dir / "meta")
    except StoreError as exc:
        lock.release()
        log.error("%s", exc)
        return EXIT_DATADIR
    try:
        return _serve(opts, meta)
    finally:
        meta.close()
        lock.release()


def _serve(opts: DaemonOptions, meta: MetaStore) -> int:
    raise_fd_limit()
    was_clean = meta.set_clean(False)
    vfs = Vfs(meta, DataStore(opts.data_dir / "data"))
    orphans, resettled = vfs.recover()
    if not was_clean:
        log.warning(
            "previous daemon did not stop cleanly: reclaimed %d open-unlinked files, "
            "re-checksummed %d files",
            orphans,
            resettled,
        )
    options = set(pyfuse3.default_options)  # default_permissions
    options |= {"fsname=dfs", "subtype=dfs"}
    allow_other = os.geteuid() == 0 if opts.allow_other is None else opts.allow_other
    if allow_other:
        options.add("allow_other")
    ops = DfsOperations(vfs)
    try:
        pyfuse3.init(ops, str(opts.mountpoint), options)
    except RuntimeError as exc:
        log.error("%s: mount failed: %s", opts.mountpoint, exc)
        return EXIT_MOUNTPOINT
    log.info(
        "ready: %s mounted at %s (cluster %s, node %d)",
        opts.data_dir,
        opts.mountpoint,
        meta.identity.cluster_id,
        meta.identity.node_id,
    )
    unmounted = False
    try:
        trio.run(_main_loop)
        pyfuse3.close(unmount=True)
        unmounted = True
    finally:
        if not unmounted:
            pyfuse3.close(unmount=True)
        vfs.lookups.clear()
        vfs.recover()
        meta.set_clean(True)
        log.info("unmounted %s%s", opts.mountpoint,
                 f" ({Counters.bugs} unexpected errors)" if Counters.bugs else "")
    return EXIT_OK


async def _main_loop() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return
