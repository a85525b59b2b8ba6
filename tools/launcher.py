"""The local cluster launcher: N dfs-mountd nodes on loopback, each with its own data and mount.

What ``dfs cluster up|status|down|stop|start`` do; the CLI (tools/cluster.py)
only prints. Everything lives in one directory DIR::

    DIR/cluster.toml, cluster.secret   written by dfs.config.init on the first `up`
    DIR/state.json                     the daemons this launcher started: name -> pid, start time
    DIR/launcher.lock                  flock: one launcher command at a time per DIR
    DIR/<node>/data                    the node's data directory (and data/control.sock)
    DIR/<node>/mnt                     its mount point
    DIR/<node>/mountd.log              its daemon's output, appended across starts

Each daemon runs ``python -m mountd --config DIR/cluster.toml --node NAME --data
DIR/NAME/data DIR/NAME/mnt`` in a session of its own, so it outlives the
launcher. A node is *running* when its recorded daemon is alive; it is *up*
when, besides, its mount is live (``st_dev`` differs from the parent's and
readdir works) and its control socket answers. ``up`` and ``start`` return
once every node they wait for is up and sees every other running node as
reachable, or fail after a deadline, stopping what they started.

Signals go only to PIDs recorded in state.json that are still a dfs-mountd for
this configuration and node (their command line) and started when recorded
(their start time, both from psutil), never to processes found by name. Every
check of a mount runs in a helper thread with a deadline, so a hung daemon
makes a command report "hung", not hang.

With ``up --netns`` (remembered in DIR/network.json) each node runs in a
network namespace of its own on a private bridge, and ``partition`` cuts the
network between groups of nodes: tools/netns.py owns all of that; here it is
only made before daemons start (``daemon_argv`` enters the namespace) and
removed by ``down``.

This is deployment code (subprocesses, mounts, signals), so it lives with the
tools, not in the core package ``dfs``.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from dfs.cluster.control import ControlError, request, socket_path
from dfs.config import ClusterConfig, ConfigError, init, load
from dfs.errors import FsError
from dfs.mounts import UnmountError, force_unmount, is_mounted

from . import netns
from .daemons import (
    PROBE_TIMEOUT,
    Started,
    mount_state,
    recorded_process,
    start_ticks,
    tail,
    wait_exit,
)

CLUSTER_NAME = "local"
DEFAULT_NODES = 3
DEFAULT_BASE_PORT = 7801
UP_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
POLL = 0.1

# Exit codes of the CLI, kept with the errors that lead to them.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3


def default_dir() -> Path:
    """``$DFS_RUN/cluster``, by default ``./run/cluster``."""
    return Path(os.environ.get("DFS_RUN", "run")) / "cluster"


def mountd_command() -> list[str]:
    return [sys.executable, "-m", "mountd"]


class ClusterError(Exception):
    """A launcher command cannot be carried out; ``exit_code`` is what the CLI exits with."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


EXIT_GRACE = 2.0  # seconds to wait for the exit status of a daemon that is going


class LaunchError(ClusterError):
    """A node did not come up; ``log_tail`` is the end of its log."""

    def __init__(self, node: str, reason: str, log_tail: str) -> None:
        super().__init__(f"node {node}: {reason}", EXIT_FAILED)
        self.node = node
        self.reason = reason
        self.log_tail = log_tail


@dataclass(frozen=True, slots=True)
class LocalNode:
    name: str
    address: str
    port: int
    home: Path  # DIR/<name>

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def mountpoint(self) -> Path:
        return self.home / "mnt"

    @property
    def log_path(self) -> Path:
        return self.home / "mountd.log"

    @property
    def control_path(self) -> Path:
        return socket_path(self.data_dir)


@dataclass(slots=True)
class NodeStatus:
    name: str
    address: str
    mountpoint: str
    pid: int | None  # of the running daemon
    state: str  # "running" or "dead"
    mount: str  # "live", "stale", "none", "hung" or "error"
    peers: list[dict[str, Any]] = field(default_factory=list)  # from its control socket
    control_error: str | None = None
    # Its part in each volume (role, lease, last update applied), from its control socket.
    volumes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def running(self) -> bool:
        """The daemon is alive and its mount live (what `status` exits 0 for)."""
        return self.state == "running" and self.mount == "live"

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "address": self.address,
            "mountpoint": self.mountpoint,
            "pid": self.pid,
            "state": self.state,
            "mount": self.mount,
            "peers": self.peers,
            "control_error": self.control_error,
            "volumes": self.volumes,
        }


@dataclass(frozen=True, slots=True)
class UpResult:
    started: list[str]
    already_running: list[str]


# --- processes -----------------------------------------------------------------------------------


def _follows(argv: Sequence[str], first: str, second: str) -> bool:
    return any(a == first and b == second for a, b in zip(argv, argv[1:], strict=False))


@contextmanager
def _net_errors() -> Iterator[None]:
    """tools/netns.py's errors as the CLI's: bad requests exit 2, failures 1."""
    try:
        yield
    except netns.NetnsUsage as exc:
        raise ClusterError(str(exc), EXIT_USAGE) from None
    except netns.NetnsError as exc:
        raise ClusterError(f"network namespaces: {exc}", EXIT_FAILED) from None


# --- the launcher --------------------------------------------------------------------------------


class LocalCluster:
    """The cluster in ``root``; every command that changes something takes its launcher lock."""

    def __init__(
        self,
        root: Path,
        *,
        mountd: Sequence[str] | None = None,
        say: Callable[[str], None] = lambda _msg: None,
    ) -> None:
        self.root = Path(os.path.abspath(root))
        self.mountd = list(mountd or mountd_command())
        self.say = say
        self._exit_status: dict[int, int] = {}  # of our children that we reaped
        self.started = Started(self.state_path, self.config_path, ClusterError)

    def _collect(self, pid: int, timeout: float = 0) -> int | None:
        """Reap ``pid`` if it is our child and exits within ``timeout``; its exit status."""
        code = wait_exit(pid, timeout)
        if code is not None:
            self._exit_status[pid] = code
        return self._exit_status.get(pid)

    @property
    def config_path(self) -> Path:
        return self.root / "cluster.toml"

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    def exists(self) -> bool:
        return self.config_path.exists()

    def config(self) -> ClusterConfig:
        try:
            return load(self.config_path)
        except ConfigError as exc:
            raise ClusterError(str(exc)) from None

    def nodes(self) -> list[LocalNode]:
        cfg = self.config()
        return [LocalNode(n.name, n.address, n.port, self.root / n.name) for n in cfg.nodes]

    def network(self) -> netns.Network | None:
        """The cluster's namespaces when it was made with ``--netns``, else None."""
        if not netns.state_path(self.root).exists():
            return None
        with _net_errors():
            return netns.load(self.root, [(n.name, n.address) for n in self.nodes()])

    def _ensure_network(self) -> None:
        net = self.network()
        if net is not None:
            with _net_errors():
                net.ensure()

    def node(self, name: str) -> LocalNode:
        for n in self.nodes():
            if n.name == name:
                return n
        known = ", ".join(n.name for n in self.nodes())
        raise ClusterError(f"no node named {name!r} in {self.config_path} (nodes: {known})")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "launcher.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def daemon_pid(self, node: LocalNode) -> int | None:
        """The PID of ``node``'s daemon if it is alive and is the one we recorded."""
        entry = self.started.entries().get(node.name)
        if not entry:
            return None
        proc = recorded_process(entry.get("pid"), entry.get("start_time"))
        if proc is None:
            return None
        try:
            if proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                self._collect(proc.pid)
                return None
            argv = proc.cmdline()
        except psutil.Error:  # gone, or a zombie, since we looked
            return None
        if not argv:
            # Still inside execve(2): posix_spawn returns once the child has dropped the
            # launcher's memory, a moment before the kernel has its new command line (so
            # /proc/PID/cmdline reads empty). The start time says it is the one we spawned.
            return proc.pid
        return proc.pid if self._is_daemon_of(argv, node) else None

    def _is_daemon_of(self, argv: Sequence[str], node: LocalNode) -> bool:
        """Is ``argv`` the command line of a dfs-mountd for ``node`` of this cluster?"""
        mountd = _follows(argv, "-m", "mountd") or any(
            os.path.basename(a) == "dfs-mountd" for a in argv
        )
        return (
            mountd
            and _follows(argv, "--config", str(self.config_path))
            and _follows(argv, "--node", node.name)
        )

    # --- starting ------------------------------------------------------------------------------

    def _create(
        self, nodes: int, base_port: int, *, in_netns: bool, metrics_port: int | None = None
    ) -> None:
        if nodes < 1:
            raise ClusterError("--nodes must be at least 1")
        if base_port + nodes - 1 > 65535:
            raise ClusterError(f"ports {base_port}..{base_port + nodes - 1} out of range")
        addresses = ["127.0.0.1"] * nodes
        if in_netns:  # recorded first: a config with these addresses is never without it
            with _net_errors():
                addresses = netns.create(self.root, nodes)
        specs = [(f"n{i + 1}", addresses[i], base_port + i) for i in range(nodes)]
        try:
            init(self.config_path, specs, name=CLUSTER_NAME, metrics_port=metrics_port)
        except ConfigError as exc:
            if in_netns:
                netns.state_path(self.root).unlink(missing_ok=True)
            raise ClusterError(str(exc)) from None
        where = f"network namespaces, {addresses[0]}..{addresses[-1]}" if in_netns else "loopback"
        self.say(f"created cluster {CLUSTER_NAME!r} with {nodes} nodes in {self.root} ({where})")

    def daemon_argv(self, node: LocalNode) -> list[str]:
        """The command that runs ``node``'s daemon (``_is_daemon_of`` recognises it)."""
        net = self.network()
        return [
            *(net.enter(node.name) if net is not None else []),
            *self.mountd,
            "--config",
            str(self.config_path),
            "--node",
            node.name,
            "--data",
            str(node.data_dir),
            str(node.mountpoint),
        ]

    def _spawn(self, node: LocalNode) -> int:
        node.data_dir.mkdir(parents=True, exist_ok=True)
        if not is_mounted(node.mountpoint):  # a stale mount: the daemon recovers it
            node.mountpoint.mkdir(parents=True, exist_ok=True)
        argv = self.daemon_argv(node)
        fd = os.open(node.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} start ====\n".encode())
            pid = os.posix_spawn(
                argv[0],
                argv,
                dict(os.environ),
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, fd, 1),
                    (os.POSIX_SPAWN_DUP2, fd, 2),
                ],
                setsid=True,
            )
        finally:
            os.close(fd)
        try:
            start_time: int | None = start_ticks(psutil.Process(pid))
        except psutil.Error:  # gone already: _wait_up reports its exit status
            start_time = None
        self.started.record(node.name, {"pid": pid, "start_time": start_time})
        return pid

    def up(
        self,
        nodes: int | None = None,
        base_port: int | None = None,
        timeout: float = UP_TIMEOUT,
        *,
        in_netns: bool = False,
        metrics_port: int | None = None,
    ) -> UpResult:
        """Start every node that is not running and wait until all are up and see each other.

        ``in_netns`` (for a new cluster) puts each node in a network namespace of its own;
        ``metrics_port`` (for a new cluster) makes node i serve Prometheus metrics on port
        ``metrics_port + i - 1`` (on loopback; in a namespace, all on that port).
        """
        with self._locked():
            if not self.exists():
                self._create(
                    nodes or DEFAULT_NODES,
                    base_port or DEFAULT_BASE_PORT,
                    in_netns=in_netns,
                    metrics_port=metrics_port,
                )
            else:
                have = len(self.config().nodes)
                if nodes is not None and nodes != have:
                    raise ClusterError(
                        f"{self.root} holds a cluster of {have} nodes; for another size, "
                        f"`dfs cluster down` and remove {self.root} (or use another --dir)"
                    )
                cfg = self.config()
                if metrics_port is not None and cfg.metrics_at(cfg.nodes[0].name) != (
                    cfg.nodes[0].address,
                    metrics_port,
                ):
                    raise ClusterError(
                        f"{self.root} holds a cluster made without --metrics-port {metrics_port}: "
                        "it is read from its cluster.toml (edit it, or `dfs cluster down` and "
                        f"remove {self.root})"
                    )
                if in_netns and self.network() is None:
                    raise ClusterError(
                        f"{self.root} holds a cluster on loopback; for one in network namespaces, "
                        f"`dfs cluster down` and remove {self.root} (or use another --dir)"
                    )
            every = self.nodes()
            running = [n.name for n in every if self.daemon_pid(n) is not None]
            todo = [n for n in every if n.name not in running]
            if not todo:
                return UpResult(started=[], already_running=running)
            pids: dict[str, int] = {}
            try:
                self._ensure_network()
                for node in todo:
                    pids[node.name] = self._spawn(node)
                    self.say(f"started {node.name} (pid {pids[node.name]})")
                self._wait_up(every, pids, timeout)
            except BaseException:
                self._stop_nodes([n for n in todo if n.name in pids], signal.SIGTERM)
                if not running:  # nothing of this cluster runs: leave no namespace behind
                    with suppress(ClusterError):  # `down` tries again; report the first error
                        self._remove_network()
                raise
            return UpResult(started=[n.name for n in todo], already_running=running)

    def start(self, name: str, timeout: float = UP_TIMEOUT) -> bool:
        """Start one node; False if it was running already."""
        with self._locked():
            node = self.node(name)
            if self.daemon_pid(node) is not None:
                return False
            others = [n for n in self.nodes() if n.name != name and self.daemon_pid(n)]
            self._ensure_network()
            pid = self._spawn(node)
            try:
                self._wait_up([node, *others], {name: pid}, timeout)
            except BaseException:
                self._stop_nodes([node], signal.SIGTERM)
                raise
            return True

    def _wait_up(self, nodes: list[LocalNode], pids: dict[str, int], timeout: float) -> None:
        """Until every node in ``nodes`` is up and reachable from the others in ``nodes``."""
        names = {n.name for n in nodes}
        deadline = time.monotonic() + timeout
        while True:
            waiting: dict[str, str] = {}
            for node in nodes:
                pid = pids.get(node.name)
                if pid is not None and self.daemon_pid(node) is None:
                    # Our child may be in the middle of exiting (its command line is gone
                    # before it is a zombie): give it a moment to report its status.
                    code = self._collect(pid, EXIT_GRACE)
                    how = f"exited with status {code}" if code is not None else "died"
                    raise LaunchError(node.name, f"dfs-mountd {how}", tail(node.log_path))
                why = self._not_up(node, names)
                if why:
                    waiting[node.name] = why
            if not waiting:
                return
            if time.monotonic() > deadline:
                name, why = next(iter(waiting.items()))
                more = "" if len(waiting) == 1 else f" (also waiting for {', '.join(waiting)})"
                raise LaunchError(
                    name,
                    f"not up after {timeout:g}s: {why}{more}",
                    tail(self.node(name).log_path),
                )
            time.sleep(POLL)

    def _not_up(self, node: LocalNode, names: set[str]) -> str | None:
        """Why ``node`` is not up yet, or None."""
        state = mount_state(node.mountpoint)
        if state != "live":
            return f"mount is {state}"
        try:
            status = request(node.control_path, "status", timeout=PROBE_TIMEOUT)
        except (ControlError, FsError) as exc:
            return f"control socket: {exc}"
        missing = [
            f"{p['name']} ({p.get('error_kind') or p.get('state')})"
            for p in status.get("peers", [])
            if p.get("name") in names and p.get("state") != "reachable"
        ]
        if missing:
            return f"does not reach {', '.join(missing)}"
        return None

    # --- looking -------------------------------------------------------------------------------

    def status(self) -> list[NodeStatus]:
        """Each node's state; read-only, so it does not wait for the launcher lock."""
        out = []
        for node in self.nodes():
            pid = self.daemon_pid(node)
            st = NodeStatus(
                name=node.name,
                address=f"{node.address}:{node.port}",
                mountpoint=str(node.mountpoint),
                pid=pid,
                state="running" if pid is not None else "dead",
                mount=mount_state(node.mountpoint),
            )
            if pid is not None:
                try:
                    info = request(node.control_path, "status", timeout=PROBE_TIMEOUT)
                    st.peers = list(info.get("peers", []))
                    repl = info.get("replication")
                    if isinstance(repl, dict) and isinstance(repl.get("volumes"), list):
                        st.volumes = [v for v in repl["volumes"] if isinstance(v, dict)]
                except (ControlError, FsError) as exc:
                    st.control_error = str(exc)
            out.append(st)
        return out

    # --- stopping ------------------------------------------------------------------------------

    def stop(self, name: str, *, kill: bool = False, timeout: float = STOP_TIMEOUT) -> bool:
        """Stop one node (SIGTERM, or SIGKILL with ``kill``); False if it was not running.

        After SIGKILL its mount is left stale, as after a crash: ``start`` recovers it.
        """
        with self._locked():
            node = self.node(name)
            if self.daemon_pid(node) is None:
                self.started.record(name, None)
                return False
            sig = signal.SIGKILL if kill else signal.SIGTERM
            self._stop_nodes([node], sig, timeout=timeout, unmount=not kill)
            return True

    def down(self, timeout: float = STOP_TIMEOUT) -> list[str]:
        """Stop every daemon we started, unmount what they left and remove the cluster's
        network namespaces (also those a failed start left); what was done."""
        if not self.exists():
            return self._remove_network()
        with self._locked():
            report = self._stop_nodes(self.nodes(), signal.SIGTERM, timeout=timeout)
            return report + self._remove_network()

    def _remove_network(self) -> list[str]:
        with _net_errors():
            return [f"network namespace {ns} removed" for ns in netns.remove_all(self.root)]

    def partition(self, groups: Sequence[str] | None) -> netns.Partition | None:
        """Cut the network between ``groups`` ("n1,n2", "n3"), or heal it with None."""
        with self._locked():
            net = self.network() if self.exists() else None
            if net is None:
                raise ClusterError(
                    f"no cluster in network namespaces in {self.root}: partitions need one "
                    "started with `dfs cluster up --netns`"
                )
            with _net_errors():
                return net.cut(groups)

    def _stop_nodes(
        self,
        nodes: list[LocalNode],
        sig: signal.Signals,
        *,
        timeout: float = STOP_TIMEOUT,
        unmount: bool = True,
    ) -> list[str]:
        report: dict[str, str] = {}
        pids: dict[str, int] = {}
        for node in nodes:
            pid = self.daemon_pid(node)
            if pid is None:
                report[node.name] = "not running"
                continue
            with suppress(ProcessLookupError):
                os.kill(pid, sig)
            pids[node.name] = pid
            report[node.name] = f"stopped (pid {pid}, {sig.name})"
        deadline = time.monotonic() + timeout
        by_name = {n.name: n for n in nodes}
        while pids and time.monotonic() < deadline:
            pids = {k: p for k, p in pids.items() if self.daemon_pid(by_name[k]) is not None}
            if pids:
                time.sleep(POLL)
        for name, pid in pids.items():  # did not stop in time
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            report[name] = f"killed (pid {pid}): did not stop within {timeout:g}s of SIGTERM"
        kill_deadline = time.monotonic() + 10
        while pids and time.monotonic() < kill_deadline:
            pids = {k: p for k, p in pids.items() if self.daemon_pid(by_name[k]) is not None}
            if pids:
                time.sleep(POLL)
        for node in nodes:
            if node.name not in pids:
                self.started.record(node.name, None)
            if unmount and mount_state(node.mountpoint) in ("stale", "hung", "error"):
                if node.name in pids or self.daemon_pid(node) is not None:
                    continue  # still served by a daemon we could not stop
                try:
                    force_unmount(node.mountpoint)
                    report[node.name] += "; stale mount removed"
                except UnmountError as exc:
                    report[node.name] += f"; {exc}"
        return [f"{name}: {what}" for name, what in report.items()]
