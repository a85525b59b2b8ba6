"""The node daemon: lock the data directory, open the stores, join the cluster, mount, serve.

Standalone (``--data DIR``) the node is a one-node cluster of its own. In
cluster mode (``--config FILE --node NAME``) the data directory must belong to
that cluster and node id, and the node's network side (``dfs.cluster.node``:
RPC server, peers, heartbeat, control socket) starts inside the trio run
before the file system is mounted: a port that is taken ends the daemon with
nothing mounted.

Shutdown order (also on SIGTERM/SIGINT/SIGHUP): leave the FUSE loop, stop
accepting RPC and control requests, unmount, close the connections to peers,
purge what the kernel no longer references, mark the store clean, close it,
unlock.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import resource
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from dfs.cluster.node import ClusterNode, StartError
from dfs.cluster.nodefs import NodeFs
from dfs.cluster.purge import OrphanPurge
from dfs.cluster.replication import Inval
from dfs.cluster.roles import VolumeRoles
from dfs.cluster.service import ClusterService, root_volume
from dfs.cluster.views import HostViews
from dfs.cluster.volumes import VolumeTable
from dfs.config import ClusterConfig, ConfigError, NodeConfig, VolumeConfig, load
from dfs.data.store import DataStore
from dfs.errors import StoreError
from dfs.fs.vfs import Vfs
from dfs.lockfile import DataDirLock
from dfs.meta.store import STANDALONE_NODE, MetaStore
from dfs.metrics import NodeMetrics
from mountd import sdnotify
from mountd.fuse_convert import Counters
from mountd.fuse_ops import DfsOperations
from mountd.mountpoint import MountPointError, fuse_device, prepare

log = logging.getLogger("dfs.mountd")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_MOUNTPOINT = 3
EXIT_DATADIR = 4

DEFAULT_DATA_ROOT = Path("/var/lib/dfs")


@dataclass(frozen=True)
class ClusterSetup:
    """What cluster mode needs: the configuration, this node in it, and the secret."""

    config: ClusterConfig
    node: NodeConfig
    secret: bytes

    @property
    def root(self) -> VolumeConfig:
        return next(v for v in self.config.volumes if v.path == "/")

    @property
    def role(self) -> str:
        """ "primary" or "site" of the root volume."""
        return "primary" if self.root.primary == self.node.name else "site"


def load_cluster(config_path: Path, node_name: str) -> ClusterSetup:
    """Read and check the configuration and the secret; ConfigError says what is wrong."""
    config = load(config_path)
    node = config.node(node_name)
    others = [v.path for v in config.volumes if v.path != "/"]
    if others:
        raise ConfigError(
            f"volumes {', '.join(others)}: only the root volume is configured in the file; "
            "make the others with `dfs volume create`"
        )
    return ClusterSetup(config, node, config.read_secret())


def default_data_dir(setup: ClusterSetup) -> Path:
    """``/var/lib/dfs/<cluster name>/<node name>``."""
    name = setup.config.name
    if not name or "/" in name or name in (".", ".."):
        raise ConfigError(
            f"cluster.name {name!r} cannot name a directory: give the data directory with --data"
        )
    return DEFAULT_DATA_ROOT / name / setup.node.name


@dataclass(frozen=True)
class DaemonOptions:
    data_dir: Path
    mountpoint: Path
    allow_other: bool | None = None  # None: when running as root
    cluster_id: str | None = None  # required identity of DIR (None: whatever DIR holds)
    cluster: ClusterSetup | None = None  # cluster mode


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


def fsname(data_dir: Path) -> str:
    """The mount's source as the mount table shows it: ``dfs:DATA_DIR``, so that tools
    find the daemon (its control socket) from a path in the mount; plain ``dfs`` when
    the path cannot travel in a mount option (not ASCII, or a comma or backslash)."""
    path = str(data_dir.resolve())
    if path.isascii() and path.isprintable() and not set(path) & {",", "\\", " "}:
        return f"dfs:{path}"
    return "dfs"


def set_readahead(mountpoint: Path, kb: int) -> None:
    """Raise the mount's readahead window (the kernel default, 128 KiB, means
    one FUSE request per 128 KiB of a sequential read; 1 MiB requests cut the
    per-request cost eightfold). Needs root; without it the default stays.

    The device comes from mountinfo, not stat(): a stat of the mount point is a
    request this daemon must answer, and after an unmount it would name the
    file system underneath."""
    dev = fuse_device(mountpoint)
    if dev is None:
        return
    path = Path(f"/sys/class/bdi/{dev}/read_ahead_kb")
    try:
        path.write_text(f"{kb}\n")
    except OSError as exc:
        log.debug("cannot set readahead via %s: %s", path, exc)


async def _raise_readahead(mountpoint: Path) -> None:
    """The kernel sets the readahead when it processes the reply to FUSE INIT, which
    this loop sends once it runs: set ours after that (twice, in case it was slow)."""
    for delay in (0.2, 2.0):
        await trio.sleep(delay)
        set_readahead(mountpoint, READAHEAD_KB)


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
        meta = _open_meta(opts)
    except StoreError as exc:
        lock.release()
        log.error("%s", exc)
        return EXIT_DATADIR
    try:
        return _serve(opts, meta)
    finally:
        meta.close()
        lock.release()


def _open_meta(opts: DaemonOptions) -> MetaStore:
    meta = MetaStore.open(
        opts.data_dir / "meta",
        cluster_id=opts.cluster_id,
        node_id=STANDALONE_NODE if opts.cluster is None else opts.cluster.node.id,
    )
    if opts.cluster is not None:
        node = opts.cluster.node
        have = meta.identity.node_id
        if have != node.id:
            meta.close()
            raise StoreError(
                f"{opts.data_dir}: holds the data of node id {have} of this cluster, "
                f"not of node {node.name} (id {node.id})"
            )
    return meta


def _serve(opts: DaemonOptions, meta: MetaStore) -> int:
    raise_fd_limit()
    was_clean = meta.set_clean(False)
    purge: OrphanPurge | None = None
    if opts.cluster is None:
        roles = VolumeRoles("", meta)
        vfs = Vfs(meta, DataStore(opts.data_dir / "data"), writeback_cache=True)
    else:
        me = opts.cluster.node.name
        root = root_volume(opts.cluster.config)
        roles = VolumeRoles(me, meta, VolumeTable(meta, root, local=root.stored_on(me)))
        purge = OrphanPurge()
        vfs = Vfs(
            meta,
            DataStore(opts.data_dir / "data"),
            replica=roles.is_replica,
            defer_purge=purge.defer,
        )
    orphans, resettled = vfs.recover()
    if not was_clean:
        log.warning(
            "previous daemon did not stop cleanly: reclaimed %d open-unlinked files, "
            "re-checksummed %d files",
            orphans,
            resettled,
        )
    options = set(pyfuse3.default_options)  # default_permissions
    options |= {f"fsname={fsname(opts.data_dir)}", "subtype=dfs"}
    allow_other = os.geteuid() == 0 if opts.allow_other is None else opts.allow_other
    if allow_other:
        options.add("allow_other")
    node = _Node(opts, meta, vfs, options, roles, purge)
    try:
        return trio.run(node.main)
    finally:
        if node.was_mounted:
            log.info(
                "unmounted %s%s",
                opts.mountpoint,
                f" ({Counters.bugs} unexpected errors)" if Counters.bugs else "",
            )
        meta.set_clean(True)


SYNC_INTERVAL = 5.0


class _Node:
    """One run of the daemon inside trio.

    Everything that is started is pushed on one ``AsyncExitStack``, so that it comes down in
    the reverse order, however the run ends (signal, unmount, failure): stop serving RPC and
    control requests, unmount, settle open files and purge what no kernel references (still
    replicated to the sites, which are connected), stop following commits (later ones are
    journaled only), close the connections to peers.
    """

    def __init__(
        self,
        opts: DaemonOptions,
        meta: MetaStore,
        vfs: Vfs,
        options: set[str],
        roles: VolumeRoles,
        purge: OrphanPurge | None,
    ) -> None:
        self.opts = opts
        self.roles = roles
        self.purge = purge
        self.meta = meta
        self.vfs = vfs
        self.fuse_options = options
        # Prometheus metrics, when cluster.toml gives this node an endpoint (dfs/metrics.py).
        setup = opts.cluster
        self.metrics = (
            NodeMetrics()
            if setup is not None and setup.config.metrics_at(setup.node.name) is not None
            else None
        )
        self.was_mounted = False
        self._fuse_running = False
        self._stopping = False
        self._startup = trio.CancelScope()

    async def main(self) -> int:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._stop_on_signal)
            try:
                async with contextlib.AsyncExitStack() as stack:
                    return await self._run(nursery, stack)
            finally:
                nursery.cancel_scope.cancel()

    async def _run(self, nursery: trio.Nursery, stack: contextlib.AsyncExitStack) -> int:
        opts = self.opts
        invalidator = _Invalidator()
        views: HostViews | None = None
        if opts.cluster is None:
            fs = NodeFs(self.vfs, self.roles)
            stack.callback(fs.detach)
        else:
            fs_views = await self._join_cluster(nursery, stack, invalidator)
            if fs_views is None:
                return EXIT_FAILURE
            fs, views = fs_views
        if self._stopping or self._startup.cancelled_caught:  # a signal during the start
            return EXIT_OK
        try:
            ops = DfsOperations(
                fs, views=views, metrics=None if self.metrics is None else self.metrics.fuse
            )
            pyfuse3.init(ops, str(opts.mountpoint), self.fuse_options)
        except RuntimeError as exc:
            log.error("%s: mount failed: %s", opts.mountpoint, exc)
            return EXIT_MOUNTPOINT
        self.was_mounted = True
        stack.callback(self._after_unmount)
        stack.callback(pyfuse3.close, unmount=True)
        if self._cluster is not None:
            stack.callback(self._cluster.stop_serving)
        self._fuse_running = True
        try:
            nursery.start_soon(self.vfs.sync_periodically, SYNC_INTERVAL)
            nursery.start_soon(_raise_readahead, opts.mountpoint)
            invalidator.start(ops.in_flight)
            self._log_ready()
            sdnotify.ready(f"mounted at {opts.mountpoint}")  # systemd Type=notify
            if not self._stopping:
                await pyfuse3.main()
        finally:
            self._fuse_running = False
        return EXIT_OK

    _cluster: ClusterNode | None = None

    async def _join_cluster(
        self, nursery: trio.Nursery, stack: contextlib.AsyncExitStack, invalidator: _Invalidator
    ) -> tuple[NodeFs, HostViews] | None:
        """Start the node's network side and its part in every volume (None: it could not)."""
        setup = self.opts.cluster
        assert setup is not None and self.purge is not None
        cluster = self._cluster = ClusterNode(
            setup.config,
            setup.node.name,
            setup.secret,
            data_dir=self.opts.data_dir,
            mountpoint=self.opts.mountpoint,
            metrics=self.metrics,
        )
        service = ClusterService(
            setup.config,
            setup.node,
            cluster,
            self.vfs,
            invalidator,
            self.roles,
            self.purge,
            None if self.metrics is None else self.metrics.replication,
        )
        stack.push_async_callback(_shielded, cluster.aclose)
        stack.callback(service.fs.detach)
        with self._startup:
            try:
                await cluster.start(nursery)
            except StartError as exc:
                log.error("%s", exc)
                return None
            stack.callback(cluster.stop_serving)
            await nursery.start(service.run)
        return service.fs, service.views

    def _after_unmount(self) -> None:
        """Settle what the kernel left open and purge what it no longer references, while the
        sites are still connected (the records reach them now)."""
        self.vfs.files.settle_all()
        self.vfs.lookups.clear()
        self.vfs.recover()

    def _log_ready(self) -> None:
        opts, identity = self.opts, self.meta.identity
        if opts.cluster is None:
            log.info(
                "ready: %s mounted at %s (cluster %s, node %d)",
                opts.data_dir,
                opts.mountpoint,
                identity.cluster_id,
                identity.node_id,
            )
            return
        setup = opts.cluster
        log.info(
            "ready: %s mounted at %s (cluster %s %s, node %s id %d, listening on %s:%d)",
            opts.data_dir,
            opts.mountpoint,
            setup.config.name,
            identity.cluster_id,
            setup.node.name,
            identity.node_id,
            setup.node.address,
            setup.node.port,
        )

    async def _stop_on_signal(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("received %s: unmounting", signal.Signals(signum).name)
                self._stopping = True
                if self._fuse_running:
                    pyfuse3.terminate()
                else:
                    self._startup.cancel()
                return


INVALIDATE_WAIT = 0.2


async def _shielded(fn: Callable[[], Awaitable[None]]) -> None:
    with trio.CancelScope(shield=True):
        await fn()


class _Invalidator:
    """Drops what the kernel caches about changes made on other nodes (a ``Notifier``).

    pyfuse3's notifications may block until the kernel can take the inode's
    locks or write back its dirty pages; a request of this node in progress on
    that directory or file (itself perhaps waiting for the primary, which waits
    for this node's answer) holds them. So they run in a thread of their own,
    fed by a queue, and ``flush`` — which an update's answer waits for, so that
    no kernel shows the old state once the update returned — gives up after
    INVALIDATE_WAIT: a bounded delay instead of a deadlock, in the rare case of
    such a conflict. Batches queued before the mount is live are dropped: the
    kernel has nothing cached yet.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[int, list[Inval]]] = queue.SimpleQueue()
        self._live = False
        self._issued = 0
        self._done = 0
        self._changed = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        # Whether the kernel may be making what an invalidation found missing (see
        # ``invalidate_one``); given by ``start``. Called in this thread.
        self._in_flight: Callable[[Inval], bool] = lambda item: False

    def put(self, batch: list[Inval]) -> int:
        if not self._live:
            return 0
        self._issued += 1
        self._queue.put((self._issued, batch))
        return self._issued

    async def flush(self, ticket: int) -> None:
        with trio.move_on_after(INVALIDATE_WAIT):
            while self._done < ticket:
                await self._changed.wait()

    def _progress(self, done: int) -> None:
        self._done = max(self._done, done)
        self._changed.set()
        self._changed = trio.Event()

    def start(self, in_flight: Callable[[Inval], bool]) -> None:
        """Start invalidating (the mount is live); ``in_flight``: ``DfsOperations.in_flight``."""
        self._in_flight = in_flight
        self._token = trio.lowlevel.current_trio_token()
        self._live = True
        threading.Thread(target=self._run, name="dfs-invalidate", daemon=True).start()

    def _run(self) -> None:
        assert self._token is not None
        while True:
            ticket, batch = self._queue.get()
            while True:
                try:
                    ticket, more = self._queue.get_nowait()
                except queue.Empty:
                    break
                batch = batch + more
            _invalidate_batch(batch, self._in_flight)
            try:
                self._token.run_sync_soon(self._progress, ticket)
            except trio.RunFinishedError:
                return


def _notify(item: Inval) -> None:
    if item[0] == "e":
        pyfuse3.invalidate_entry(
            pyfuse3.InodeT(item[1]),
            item[2],  # type: ignore[misc]
        )
    else:
        pyfuse3.invalidate_inode(pyfuse3.InodeT(item[1]), attr_only=item[0] == "i")


def _invalidate_batch(
    batch: list[Inval],
    in_flight: Callable[[Inval], bool] = lambda item: False,
    notify: Callable[[Inval], None] = _notify,
) -> None:
    seen: set[Inval] = set()
    for item in batch:
        if item in seen:
            continue
        seen.add(item)
        invalidate_one(item, in_flight, notify)


INFLIGHT_RETRY = 0.001
INFLIGHT_WAIT = 0.05


def invalidate_one(
    item: Inval,
    in_flight: Callable[[Inval], bool],
    notify: Callable[[Inval], None],
    *,
    wait: float = INFLIGHT_WAIT,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Tell the kernel to drop ``item``; when it has nothing to drop yet but is about to
    (``in_flight``), try again until it has, for at most ``wait`` seconds.

    The race: this node answered a lookup (an inode with its attributes, or "no such
    name"), and the kernel makes the inode or the negative entry from that answer only
    when the task that asked runs again. An invalidation of a change committed in between
    finds nothing (ENOENT) and is lost, and the kernel would then cache the answer from
    before the change for the whole attribute or entry timeout. ``in_flight`` says when
    that can be the case: the kernel holds references to the inode (it has it, or is
    making it), or this node recently answered that name negatively.
    """
    deadline = clock() + wait
    while True:
        try:
            notify(item)
            return
        except OSError as exc:
            if exc.errno == errno.ENOENT and in_flight(item) and clock() < deadline:
                sleep(INFLIGHT_RETRY)
                continue
            if exc.errno not in (errno.ENOENT, errno.EBADF):
                log.warning("cannot invalidate the kernel's cache of %r: %s", item[:2], exc)
            return
