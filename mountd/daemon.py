"""The node daemon: lock the data directory, open the stores, mount, serve, unmount.

Shutdown order (also on SIGTERM/SIGINT): leave the FUSE loop, unmount, purge
what the kernel no longer references, mark the store clean, close it, unlock.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pyfuse3
import trio

from dfs.data.store import DataStore
from dfs.errors import StoreError
from dfs.fs.vfs import Vfs
from dfs.lockfile import DataDirLock
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
    cluster_id: str | None = None  # required identity of DIR (None: whatever DIR holds)


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


READAHEAD_KB = 1024


def set_readahead(mountpoint: Path, kb: int) -> None:
    """Raise the mount's readahead window (the kernel default, 128 KiB, means
    one FUSE request per 128 KiB of a sequential read; 1 MiB requests cut the
    per-request cost eightfold). Needs root; without it the default stays."""
    dev = os.stat(mountpoint).st_dev
    path = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    try:
        path.write_text(f"{kb}\n")
    except OSError as exc:
        log.debug("cannot set readahead via %s: %s", path, exc)


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
        meta = MetaStore.open(opts.data_dir / "meta", cluster_id=opts.cluster_id)
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
        trio.run(_main_loop, opts.mountpoint, vfs)
        pyfuse3.close(unmount=True)
        unmounted = True
    finally:
        if not unmounted:
            pyfuse3.close(unmount=True)
        vfs.files.settle_all()
        vfs.lookups.clear()
        vfs.recover()
        meta.set_clean(True)
        log.info(
            "unmounted %s%s",
            opts.mountpoint,
            f" ({Counters.bugs} unexpected errors)" if Counters.bugs else "",
        )
    return EXIT_OK


SYNC_INTERVAL = 5.0


async def _main_loop(mountpoint: Path, vfs: Vfs) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal)
        nursery.start_soon(vfs.sync_periodically, SYNC_INTERVAL)
        # stat() of the mount point is answered by this very loop: run it in a thread.
        nursery.start_soon(
            partial(trio.to_thread.run_sync, set_readahead, mountpoint, READAHEAD_KB)
        )
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return
