"""The cluster benchmark: the node workloads on a 3-node local cluster, and replication latency.

    .venv/bin/python -m bench.cluster [--quick] [--only NAME,...] [--json FILE]

In one run, each figure as a ratio to a local directory measured in the same
run on the same disk: (1) the workloads of bench/workloads.py on the mount of
n1, the primary of the root volume, and on the mount of n2, a non-primary
whose updates go through n1; with three copies on one disk, replicated
sequential writes are bound by a third of the local rate; (2) visibility:
the time from a change returning on n2 (close of a new file, rewrite of a
file, rename over a file) to its content being read on n3 and on n1, by one
polling process per observer, so that the writer does not delay the pollers.
Every sample has a deadline; a change that never shows is a timeout and
sampling stops after a few of them. The same sampling on the local dir gives
the floor of the method (about 1 ms: the poll period).

Sizes: a 512 MiB file, 10,000 random reads, 2,000 files for the metadata
workload, one copy of the stdlib tree (about 2,400 files), 3 rounds of meta
and tar, 200 samples of each of the 4 kinds of change with a 10 s bound;
--quick: 64 MiB, 2,000, 500, a 1,000-file tree, 1 round, 20 samples, 2 s.

The benchmark starts its own cluster in a new directory
DIR/dfs-cluster-bench-XXXX (default /tmp), with dfs_tools.launcher (what `dfs
cluster up --dir` runs) on free loopback ports, and always brings it down and
removes every file, after an error, Ctrl-C or SIGTERM too. The daemons run
under PR_SET_PDEATHSIG: if the benchmark is SIGKILLed they get SIGTERM and
unmount, and the next run removes the directory left behind. A watchdog
kills a hung workload and the daemons, so a run always ends.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dfs_tools.launcher import (  # noqa: E402
    ClusterError,
    LaunchError,
    LocalCluster,
    mountd_command,
)

from bench import sources  # noqa: E402
from bench.harness import (  # noqa: E402
    REPO,
    BenchTimeout,
    Caches,
    CpuMeter,
    CpuTimes,
    Watchdog,
    die_with_parent,
    fs_type,
    machine_info,
    process_cpu,
)
from bench.report import Figure  # noqa: E402
from bench.run import open_workdir  # noqa: E402
from bench.workloads import (  # noqa: E402
    DROP,
    MAKE,
    FigureSpec,
    MiB,
    Place,
    Sizes,
    Workload,
    catalogue,
)
from dfs.errors import BUG_MARKER  # noqa: E402
from dfs.mounts import is_mounted as mounted  # noqa: E402

PREFIX = "dfs-cluster-bench-"
NODES = ("n1", "n2", "n3")
PRIMARY, OTHER, OBSERVER = NODES
# The issue's figures for GlusterFS with a replica-3 volume on this machine.
GLUSTER_TAR_S, GLUSTER_TAR_LOCAL_S, GLUSTER_WRITE_MBS = 55.0, 0.55, 107.0
# Smaller than bench/run.py's FULL so that the full run, with three places, stays
# well under 10 minutes on 2 CPUs; one copy of the stdlib tree (about 2,400 files).
FULL = Sizes(512 * MiB, 10_000, 2_000, 3, 1, None)
QUICK = Sizes(64 * MiB, 2_000, 500, 1, 1, 1_000)
VISIBILITY = "visibility"
VIS_KINDS = {
    "dir": "new dir with a file: mkdir, create, write, close",
    "create": "new file: create, write, close",
    "overwrite": "rewrite a file: O_TRUNC, write, close",
    "rename": "rename a new file over a file",
}
LOCAL_OBSERVER = "local dir"  # changes on the local dir, seen there: the floor of the method
POLL_S = 0.001  # between two looks of a poller
GIVE_UP = 3  # samples with a timeout before a kind of change is given up
ANSWER_S = 5.0  # for a poller's first look (before the change): longer means its mount hangs


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse(argv: list[str] | None) -> argparse.Namespace:
    names = f"write, read, random, meta, tar, readtree, git, rm, {VISIBILITY}"
    ap = argparse.ArgumentParser(
        description="Benchmark a local 3-node dfs cluster against a local directory.",
        epilog=f"workloads: {names}. Run as root (the mounts, page cache drops).",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="small sizes for a smoke run (64 MiB file, 500 files, 1,000-file tree, 1 round, "
        "20 visibility samples of each kind with a 2 s bound)",
    )
    ap.add_argument("--only", metavar="NAME,...", help=f"run only these ({names})")
    ap.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--rounds", type=int, metavar="N", help="rounds of meta and tar (default 3)")
    ap.add_argument(
        "--dir",
        type=Path,
        default=Path("/tmp"),
        help="where to create the local dir and the cluster (default /tmp)",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="seconds before a hung workload is killed (default 600, quick 120)",
    )
    ap.add_argument(
        "--vis-samples",
        type=int,
        metavar="N",
        help="visibility samples of each kind of change (default 200, quick 20)",
    )
    ap.add_argument(
        "--vis-bound",
        type=float,
        metavar="S",
        help="seconds a change may take to show before it counts as a timeout "
        "(default 10, quick 2)",
    )
    ap.add_argument(
        "--base-port", type=int, metavar="P", help="first port of the nodes (default: free ones)"
    )
    return ap.parse_args(argv)


def _names() -> list[str]:
    return [w.name for w in catalogue(FULL, _no_tree())] + [VISIBILITY]


def _no_tree() -> sources.Tree:
    return sources.Tree(Path("/nonexistent"), "", 0, 0, 0, 0)


def wanted(only: str | None) -> set[str]:
    names = _names()
    if not only:
        return set(names)
    want = {w.strip() for w in only.split(",") if w.strip()}
    unknown = want - set(names)
    if unknown:
        raise SystemExit(f"unknown workload(s): {', '.join(sorted(unknown))}")
    return want


def free_base_port(n: int) -> int:
    """The first of ``n`` consecutive loopback TCP ports that are free now."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000)
        socks: list[socket.socket] = []
        try:
            for i in range(n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise SystemExit(f"found no {n} free consecutive ports on 127.0.0.1")


# --- the cluster ------------------------------------------------------------------------


class BenchCluster:
    """A LocalCluster whose daemons die with the benchmark; the watchdog's kill() target."""

    def __init__(self, root: Path) -> None:
        self.lc = LocalCluster(root, mountd=die_with_parent(mountd_command()), say=say)
        self.pids: list[int] = []

    def up(self, base_port: int) -> None:
        self.lc.up(len(NODES), base_port, timeout=60.0)
        self.pids = [p for n in self.lc.nodes() if (p := self.lc.daemon_pid(n)) is not None]

    def mount(self, name: str) -> Path:
        return self.lc.node(name).mountpoint

    def kill(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def down(self) -> list[str]:
        return self.lc.down() if self.lc.exists() else []

    def still_mounted(self) -> list[Path]:
        if not self.lc.exists():
            return []
        return [n.mountpoint for n in self.lc.nodes() if mounted(n.mountpoint)]

    def bugs(self) -> list[str]:
        out: list[str] = []
        if self.lc.exists():
            for n in self.lc.nodes():
                with contextlib.suppress(OSError):
                    text = n.log_path.read_text(errors="replace")
                    out += [f"{n.name}: {x}" for x in text.splitlines() if BUG_MARKER in x]
        return out

    def log_tails(self, lines: int = 15) -> str:
        out: list[str] = []
        if self.lc.exists():
            for n in self.lc.nodes():
                with contextlib.suppress(OSError):
                    tail = n.log_path.read_text(errors="replace").splitlines()[-lines:]
                    out += [f"---- tail of {n.name}'s daemon log ----", *tail]
        return "\n".join(out)


class ClusterMeter(CpuMeter):
    """CPU accounting where "daemon" is the sum of every node's daemon."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(None)
        self.pids = pids

    def snapshot(self) -> CpuTimes:
        return replace(super().snapshot(), daemon=sum(process_cpu(p) for p in self.pids))


def remove_stale(parent: Path) -> None:
    """Bring down and remove what an earlier run that was SIGKILLed left (its pid is gone)."""
    for d in parent.glob(PREFIX + "*"):
        try:
            os.kill(int((d / "pid").read_text()), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except (OSError, ValueError):
            continue
        c = BenchCluster(d / "cluster")
        try:
            c.down()
        except ClusterError as exc:
            say(f"warning: cannot bring down the cluster in {d}: {exc}")
            continue
        if c.still_mounted():
            say(f"warning: {d} still has mounts; left in place")
            continue
        say(f"removing {d}, left by an earlier run that was killed")
        shutil.rmtree(d, ignore_errors=True)


# --- visibility -------------------------------------------------------------------------


class VisError(Exception):
    pass


def _look(path: Path, want: bytes) -> str | None:
    """None if ``path`` holds ``want``, else what was there."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        return os.strerror(exc.errno or 0)
    try:
        got = os.read(fd, len(want) + 1)
    except OSError as exc:
        return f"read: {os.strerror(exc.errno or 0)}"
    finally:
        os.close(fd)
    return None if got == want else f"other content ({len(got)} bytes)"


def _send(out: IO[str], msg: dict[str, Any]) -> None:
    out.write(json.dumps(msg) + "\n")
    out.flush()


def poller_main(mount: str) -> None:
    """The polling process: one request per line on stdin, answers on stdout.

    Request {id, path, want (hex), bound}: look once and answer {id, ready}
    (the writer changes nothing before that), then look every POLL_S until
    the file holds ``want`` ({id, seen: CLOCK_MONOTONIC of that look's end}) or
    ``bound`` seconds passed ({id, timeout: what the last look found}).
    """
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the benchmark decides when we stop
    root = Path(mount)
    while line := sys.stdin.readline():
        req = json.loads(line)
        path, want = root / req["path"], bytes.fromhex(req["want"])
        deadline = time.monotonic() + float(req["bound"])
        state = _look(path, want)
        _send(sys.stdout, {"id": req["id"], "ready": True})
        while state is not None and time.monotonic() < deadline:
            time.sleep(POLL_S)
            state = _look(path, want)
        if state is None:
            _send(sys.stdout, {"id": req["id"], "seen": time.monotonic()})
        else:
            _send(sys.stdout, {"id": req["id"], "timeout": state})


_POLLER = (
    "import sys; sys.path.insert(0, sys.argv[1]); import bench.cluster as c; "
    "c.poller_main(sys.argv[2])"
)


class Poller:
    """The benchmark's end of one polling process (on one observer's mount)."""

    def __init__(self, name: str, mount: Path) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _POLLER, str(REPO), str(mount)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        self._buf = b""

    def send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(msg) + "\n").encode())
        self.proc.stdin.flush()

    def recv(self, deadline: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            ready = select.select([fd], [], [], max(left, 0))[0] if left > 0 else []
            if not ready:
                raise VisError(
                    f"the poller on {self.name} did not answer in time: its mount hangs?"
                )
            chunk = os.read(fd, 65536)
            if not chunk:
                raise VisError(f"the poller on {self.name} exited ({self.proc.wait()})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass
class VisStat:
    """Samples of one kind of change on the writer, as seen on one observer."""

    kind: str
    observer: str
    latencies: list[float] = field(default_factory=list)  # seconds after the change returned
    early: int = 0  # seen before the writer's call returned (counted as 0)
    timeouts: int = 0
    last_seen: set[str] = field(default_factory=set)  # what timed-out looks found
    stopped: str = ""  # why sampling stopped early

    @property
    def tried(self) -> int:
        return len(self.latencies) + self.timeouts


def _change(kind: str, d: Path, i: int, content: bytes) -> None:
    """Make the change of sample ``i`` on the writer's mount; returns when the call did."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    if kind == "dir":
        (d / f"D{i}").mkdir()
    path = d / (_target(kind, i) if kind != "rename" else f"t{i}")
    fd = os.open(path, (os.O_WRONLY | os.O_TRUNC) if kind == "overwrite" else flags, 0o644)
    try:
        os.write(fd, content)
    finally:
        os.close(fd)
    if kind == "rename":
        os.rename(path, d / "cur")


def _content(kind: str, i: int, rel: str) -> bytes:
    """What sample ``i`` writes: unique, and of one length for all samples of a kind."""
    return f"{kind} {i:06d} {rel}\n".encode()


def _target(kind: str, i: int) -> str:
    return {"dir": f"D{i}/f", "create": f"c{i}", "overwrite": "ow"}.get(kind, "cur")


def visibility(
    writer: Path,
    observers: list[Poller],
    samples: int,
    bound: float,
    budget: float,
    stats: list[VisStat],
) -> None:
    """Sample every kind of change on ``writer`` into ``stats``; ``budget`` seconds in all."""
    rel = f"vis-{os.urandom(4).hex()}"
    d = writer / rel
    d.mkdir()
    end = time.monotonic() + budget
    seq = 0
    ours: list[VisStat] = []
    for kind in VIS_KINDS:
        mine = {p.name: VisStat(kind, p.name) for p in observers}
        ours += mine.values()
        stats += mine.values()
        if seq and not any(s.latencies for s in ours):
            for s in mine.values():  # the other kinds would only time out too
                s.stopped = "not sampled: no change of the kinds above became visible"
            continue
        if kind in ("overwrite", "rename"):  # the file that the samples replace
            _change("create", d, 999_999, _content(kind, 999_999, rel))
            os.rename(d / _target("create", 999_999), d / _target(kind, 0))
        bad = 0
        for i in range(samples):
            if time.monotonic() > end:
                for s in mine.values():
                    s.stopped = f"out of time ({budget:.0f} s for all visibility samples)"
                break
            seq += 1
            want = _content(kind, i, rel)
            req = {"id": seq, "path": f"{rel}/{_target(kind, i)}", "want": want.hex()}
            for p in observers:
                p.send({**req, "bound": bound})
            for p in observers:
                if not p.recv(time.monotonic() + ANSWER_S).get("ready"):
                    raise VisError(f"the poller on {p.name} answered out of turn")
            try:
                _change(kind, d, i, want)
            except OSError as exc:
                raise VisError(f"{kind} sample {i} failed on the writer: {exc}") from None
            done = time.monotonic()
            timed_out = False
            for p in observers:
                r = p.recv(done + bound + ANSWER_S)
                s = mine[p.name]
                if "seen" in r:
                    s.latencies.append(max(r["seen"] - done, 0.0))
                    s.early += r["seen"] < done
                else:
                    s.timeouts += 1
                    s.last_seen.add(str(r.get("timeout")))
                    timed_out = True
            bad += timed_out
            if bad >= GIVE_UP:
                for s in mine.values():
                    s.stopped = f"gave up after {bad} samples with a timeout"
                break


# --- the run ----------------------------------------------------------------------------


@dataclass
class Row:
    """One figure on the primary and on the non-primary, each against the same local samples."""

    spec: FigureSpec
    primary: Figure
    other: Figure


@dataclass
class ClusterRun:
    base: Path
    cluster: BenchCluster | None = None
    watchdog: Watchdog | None = None
    pollers: list[Poller] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    vis: list[VisStat] = field(default_factory=list)
    vis_error: str = ""
    failures: list[str] = field(default_factory=list)
    facts: dict[str, object] = field(default_factory=dict)
    bugs: list[str] = field(default_factory=list)

    def execute(self, args: argparse.Namespace, sizes: Sizes) -> None:
        t_start = time.monotonic()
        want = wanted(args.only)
        needs_tree = bool(want & {"tar", "readtree", "git", "rm"})
        tree = sources.tree(sizes.tree_copies, sizes.tree_limit) if needs_tree else _no_tree()
        workloads = [w for w in catalogue(sizes, tree) if w.name in want]
        if needs_tree:
            self.facts["tree"] = tree.describe()
            say(f"tree: {tree.describe()}")
        caches = Caches()
        if not caches.works:
            say("warning: cannot drop the page cache (needs root): cold figures are not cold")
        local = self.base / "local"
        local.mkdir()
        cluster = self.cluster = BenchCluster(self.base / "cluster")
        watchdog = self.watchdog = Watchdog(cluster)
        watchdog.start()
        port = args.base_port or free_base_port(len(NODES))
        self.facts["ports"] = f"127.0.0.1:{port}-{port + len(NODES) - 1}"
        with watchdog.armed(120, "starting the cluster"):
            cluster.up(port)
        say(f"cluster up: {', '.join(NODES)} on {self.facts['ports']}")
        self.facts["fs"] = fs_type(local)
        data = cluster.lc.node(PRIMARY).data_dir
        self.facts["same_device"] = os.stat(local).st_dev == os.stat(data).st_dev
        meter = ClusterMeter(cluster.pids)
        roots, broken = {}, set()
        for name in (PRIMARY, OTHER):
            roots[name] = cluster.mount(name) / f"bench-{name}"
            try:
                roots[name].mkdir()
            except OSError as exc:
                broken.add(name)
                self.failures.append(f"every workload on {name}: mkdir {roots[name]}: {exc}")
                say(f"  {name}: FAILED: mkdir {roots[name]}: {exc}")
        places = [Place("local", local, sizes, tree, caches, meter, watchdog)] + [
            Place(name, roots[name], sizes, tree, caches, meter, watchdog)
            for name in (PRIMARY, OTHER)
        ]
        timeout = args.timeout or (120.0 if args.quick else 600.0)
        self._workloads(workloads, places, watchdog, timeout, broken)
        if "write" in want:
            with watchdog.armed(timeout, "the local disk with three copies"):
                self.facts["limit_mbs"] = three_copies(local, sizes.file_bytes, caches)
        if VISIBILITY in want:
            self._visibility(args, cluster, local, watchdog)
        self.facts["loadavg_end"] = os.getloadavg()
        self.facts["seconds"] = round(time.monotonic() - t_start, 1)

    def _workloads(
        self,
        workloads: list[Workload],
        places: list[Place],
        watchdog: Watchdog,
        timeout: float,
        broken: set[str],
    ) -> None:
        """Run them as bench/run.py does; one that fails on a place is noted and not retried."""
        failed = {(w.name, p) for w in workloads for p in broken}
        for i, w in enumerate(workloads):
            rounds = w.rounds(places[0].sizes)
            for r in range(rounds):
                for p in places:
                    if (w.name, p.name) in failed:
                        continue
                    t0 = time.monotonic()
                    try:
                        for need in w.needs:
                            if need not in p.have:
                                with watchdog.armed(timeout, f"preparing {need} on {p.name}"):
                                    MAKE[need](p)
                        with watchdog.armed(timeout, f"{w.name} on {p.name}"):
                            w.fn(p)
                    except (OSError, subprocess.SubprocessError) as exc:
                        watchdog.check()  # the watchdog killed the daemons: stop the run
                        failed.add((w.name, p.name))
                        self.failures.append(f"{w.name} on {p.name}: {_failure(exc)}")
                        say(f"  {w.name} on {p.name}: FAILED: {_failure(exc)}")
                        continue
                    tag = f" round {r + 1}/{rounds}" if rounds > 1 else ""
                    say(f"  {w.name}{tag} on {p.name}: {time.monotonic() - t0:.1f} s")
            later = {n for x in workloads[i + 1 :] for n in x.needs}
            for p in places:
                for res in sorted(p.have - later):
                    with contextlib.suppress(OSError):
                        DROP[res](p)
        local, primary, other = places
        caches_work = local.caches.works
        for w in workloads:
            for spec in w.figures:

                def of(p: Place, key: str = spec.key) -> list[Any]:
                    return [s for s in p.samples if s.key == key]

                row = Row(
                    spec, Figure(spec, of(local), of(primary)), Figure(spec, of(local), of(other))
                )
                for f in (row.primary, row.other):
                    if f.complete:
                        f.check_noise(caches_work)
                if row.primary.complete or row.other.complete:
                    self.rows.append(row)

    def _visibility(
        self, args: argparse.Namespace, cluster: BenchCluster, local: Path, w: Watchdog
    ) -> None:
        """Changes on the local dir seen there (the floor of the method), then on the cluster."""
        samples = args.vis_samples or (20 if args.quick else 200)
        bound = args.vis_bound or (2.0 if args.quick else 10.0)
        budget = 60.0 if args.quick else 180.0
        self.facts["vis"] = {"samples": samples, "bound_s": bound, "poll_ms": POLL_S * 1000}
        t0 = time.monotonic()
        try:
            with w.armed(2 * budget + bound + 60, "visibility sampling"):
                say(f"  visibility: changes on the local dir, seen there by {LOCAL_OBSERVER} ...")
                floor = [Poller(LOCAL_OBSERVER, local)]
                self.pollers += floor
                visibility(local, floor, samples, bound, budget, self.vis)
                say(f"  visibility: changes on {OTHER}, seen on {OBSERVER} and {PRIMARY} ...")
                nodes = [Poller(n, cluster.mount(n)) for n in (OBSERVER, PRIMARY)]
                self.pollers += nodes
                visibility(cluster.mount(OTHER), nodes, samples, bound, budget, self.vis)
        except VisError as exc:
            self.vis_error = str(exc)
            say(f"  visibility: stopped: {exc}")
        say(f"  visibility: {time.monotonic() - t0:.1f} s")

    def cleanup(self, rc: int) -> int:
        """Stop pollers, watchdog and cluster, remove every file; returns the exit code."""
        for p in self.pollers:
            p.close()
        if self.watchdog is not None:
            self.watchdog.stop()
        c = self.cluster
        if c is not None:
            if rc not in (0, 130):
                say(c.log_tails())
            try:
                for line in c.down():
                    say(f"  {line}")
            except ClusterError as exc:
                say(f"error bringing the cluster down: {exc}")
            self.bugs = c.bugs()
            left = c.still_mounted()
            if left:
                say(f"error: still mounted: {', '.join(map(str, left))}; left {self.base} in place")
                return rc or 1
        shutil.rmtree(self.base, ignore_errors=True)
        if self.base.exists():
            say(f"warning: could not remove all of {self.base}")
        return rc


def _failure(exc: BaseException) -> str:
    if isinstance(exc, subprocess.CalledProcessError):
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        last = err.strip().splitlines()[-1:] or [f"exit status {exc.returncode}"]
        return f"{exc.cmd[0] if isinstance(exc.cmd, list) else exc.cmd}: {last[0]}"
    return str(exc)


# --- report -----------------------------------------------------------------------------


def _num(v: float, unit: str) -> str:
    if unit == "s":
        return f"{v:.3f}" if v < 10 else f"{v:.1f}"
    return f"{v:,.0f}" if v >= 100 else f"{v:.2f}" if v < 10 else f"{v:.1f}"


def _ratio(f: Figure) -> str:
    if not f.complete:
        return "-"
    return f"{f.ratio:.1f}x" if f.spec.is_time else f"{f.ratio:.2f}"


def _dfs(f: Figure) -> str:
    return _num(f.value(f.dfs), f.spec.unit) if f.complete else "FAILED"


def _busy(f: Figure) -> str:
    return f"{f.daemon_busy * 100:.0f}%" if f.complete else "-"


def _columns(head: tuple[str, ...], rows: list[tuple[str, ...]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]

    def line(r: tuple[str, ...]) -> str:
        cells = (
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        return "  ".join(cells).rstrip()

    return [line(head), line(tuple("-" * w for w in widths)), *map(line, rows)]


def _md(head: tuple[str, ...], rows: list[tuple[str, ...]], right: set[int]) -> list[str]:
    align = tuple("--:" if i in right else "---" for i in range(len(head)))
    return [f"| {' | '.join(r)} |" for r in (head, align, *rows)]


def figure_rows(rows: list[Row]) -> tuple[tuple[str, ...], list[tuple[str, ...]], list[str]]:
    head = (
        "workload",
        "unit",
        "local",
        "n1 (primary)",
        "n1/local",
        "n2",
        "n2/local",
        "cpu n1",
        "cpu n2",
        "note",
    )
    out: list[tuple[str, ...]] = []
    notes: list[str] = []
    for r in rows:
        f1, f2 = r.primary, r.other
        mark = ""
        why = [n for n in f1.notes if n in f2.notes]
        why += [f"n1: {n}" for n in f1.notes if n not in why]
        why += [f"n2: {n}" for n in f2.notes if n not in why]
        if why:
            notes.append(f"[{len(notes) + 1}] {r.spec.label}: {'; '.join(why)}")
            mark = f"[{len(notes)}]"
        local = f1 if f1.complete else f2
        row = (r.spec.label, r.spec.unit, _num(local.value(local.local), r.spec.unit))
        out.append((*row, _dfs(f1), _ratio(f1), _dfs(f2), _ratio(f2), _busy(f1), _busy(f2), mark))
    return head, out, notes


def _ms(x: float) -> str:
    return f"{x * 1000:.1f}" if x < 10 else f"{x * 1000:,.0f}"


def _p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[max(math.ceil(0.99 * len(s)) - 1, 0)]


def vis_rows(stats: list[VisStat]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    kinds, seen_on = list(VIS_KINDS), [LOCAL_OBSERVER, OBSERVER, PRIMARY]
    for s in sorted(stats, key=lambda s: (kinds.index(s.kind), seen_on.index(s.observer))):
        lat = s.latencies
        tos = [str(s.timeouts)] if s.tried else []
        if s.timeouts:
            tos[0] += f" (last look: {', '.join(sorted(s.last_seen))})"
        if s.stopped:
            tos.append(s.stopped)
        out.append(
            (
                VIS_KINDS[s.kind],
                s.observer,
                f"{len(lat)}/{s.tried}",
                _ms(statistics.median(lat)) if lat else "-",
                _ms(_p99(lat)) if lat else "-",
                _ms(max(lat)) if lat else "-",
                str(s.early) if s.tried else "-",
                "; ".join(tos),
            )
        )
    return out


VIS_HEAD = (
    "change (on n2, or the local dir)",
    "seen on",
    "seen",
    "median ms",
    "p99 ms",
    "max ms",
    "before return",
    "timeouts",
)


def three_copies(local: Path, size: int, caches: Caches) -> float:
    """The issue's limit for replicated writes, measured: the local disk writing the file
    three times (three files, each fsynced, one after the other), as MB/s of one copy.
    The plain local write+fsync of one file says little here: on this VM the disk often
    takes one file at page-cache speed, and only the volume of three copies shows its rate."""
    buf = memoryview(random.Random(3).randbytes(1 << 20))
    caches.drop()
    t0 = time.perf_counter()
    for i in range(3):
        path = local / f"copy{i}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            left = size
            while left:
                left -= os.write(fd, buf[: min(left, len(buf))])
            os.fsync(fd)
        finally:
            os.close(fd)
    dt = time.perf_counter() - t0
    for i in range(3):
        (local / f"copy{i}").unlink()
    return size / dt / 1e6


def issue_lines(rows: list[Row], limit_mbs: float | None = None) -> list[tuple[str, ...]]:
    """(figure, n1, n2, GlusterFS replica 3) for the issue's two comparisons."""
    out: list[tuple[str, ...]] = []
    by = {r.spec.key: r for r in rows}
    if "write.fsync" in by:
        r = by["write.fsync"]
        limit = limit_mbs or statistics.median(x.value("MB/s") for x in r.primary.local) / 3
        cells = [
            f"{f.value(f.dfs):,.0f} MB/s = {f.ratio:.2f} of local, "
            f"{f.value(f.dfs) / limit:.2f} of the limit, "
            f"{f.value(f.dfs) / GLUSTER_WRITE_MBS:.1f}x GlusterFS"
            if f.complete
            else "FAILED"
            for f in (r.primary, r.other)
        ]
        out.append(
            (
                f"replicated seq write + fsync (limit: the local disk writing 3 copies, "
                f"{limit:,.0f} MB/s)"
                if limit_mbs
                else f"replicated seq write + fsync (limit local/3 = {limit:,.0f} MB/s)",
                *cells,
                f"{GLUSTER_WRITE_MBS:.0f} MB/s",
            )
        )
    if "tar.x" in by:
        r = by["tar.x"]
        g = GLUSTER_TAR_S / GLUSTER_TAR_LOCAL_S
        cells = [
            f"{f.ratio:.1f}x local; GlusterFS's {g:.0f}x is {g / f.ratio:.1f} times that"
            if f.complete
            else "FAILED"
            for f in (r.primary, r.other)
        ]
        out.append(
            (
                r.spec.label,
                *cells,
                f"{g:.0f}x local ({GLUSTER_TAR_S:g} s vs {GLUSTER_TAR_LOCAL_S:g} s)",
            )
        )
    return out


def env_lines(info: dict[str, object], args: argparse.Namespace, sizes: Sizes) -> list[str]:
    la = info["loadavg"]
    assert isinstance(la, tuple)
    return [
        f"dfs cluster benchmark, {info['date']}{' (quick)' if args.quick else ''}",
        f"machine: {info['nproc']} CPUs ({info['cpu']}), {info['memory_gib']} GiB, "
        f"kernel {info['kernel']}, Python {info['python']}",
        f"dfs: {info['dfs_commit']}",
        f"load average at start: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}",
        f"sizes: {sizes.file_bytes // MiB} MiB file, {sizes.random_reads:,} random reads, "
        f"{sizes.meta_files:,} files x{sizes.meta_rounds} rounds (meta and tar)",
    ]


def report(
    args: argparse.Namespace, info: dict[str, object], sizes: Sizes, run: ClusterRun
) -> None:
    f = run.facts
    end = f.get("loadavg_end", (0.0, 0.0, 0.0))
    assert isinstance(end, tuple)
    env = env_lines(info, args, sizes)
    same = "yes" if f.get("same_device") else "NO"
    where = (
        f"cluster: {len(NODES)} nodes on {f.get('ports')}, {PRIMARY} the primary; local dir "
        f"and the nodes' data under {args.dir} ({f.get('fs')}, same device: {same})"
    )
    extra = [f"load average at end: {end[0]:.2f} {end[1]:.2f} {end[2]:.2f}", where]
    if "tree" in f:
        extra.append(f"tree: {f['tree']}")
    extra.append(f"run time: {f.get('seconds')} s")
    print("\n".join(env + extra) + "\n")
    head, rows, notes = figure_rows(run.rows)
    cpu = "cpu: CPU time of all three daemons / wall time of the run on that node (100% = 1 core)"
    if rows:
        print("\n".join(_columns(head, rows, {2, 3, 4, 5, 6, 7, 8})))
        print(cpu)
        if notes:
            print("\nnotes:\n" + "\n".join(notes))
    vis, vis_text = vis_rows(run.vis), []
    if "vis" in f:
        v = f["vis"]
        assert isinstance(v, dict)
        vis_text.append(
            f"visibility: from the change returning on {OTHER} to its content read on "
            f"{OBSERVER} and {PRIMARY}, polled every {v['poll_ms']:g} ms by one process per "
            f"node; bound {v['bound_s']:g} s per sample, up to {v['samples']} samples per kind; "
            f"'{LOCAL_OBSERVER}': the same on the local dir, the floor of the method"
        )
        if run.vis_error:
            vis_text.append(f"visibility sampling stopped: {run.vis_error}")
        remote = [s for s in run.vis if s.observer != LOCAL_OBSERVER]
        if remote and not any(s.latencies for s in remote):
            vis_text.append("NOTHING became visible: the mounts do not share a tree")
        print("\n" + vis_text[0])
        if vis:
            print("\n".join(_columns(VIS_HEAD, vis, {2, 3, 4, 5, 6})))
        print("\n".join(vis_text[1:]))
    limit = run.facts.get("limit_mbs")
    issue = issue_lines(run.rows, limit if isinstance(limit, float) else None)
    if issue:
        print("\nagainst the issue (GlusterFS, replica-3 volume, this machine):")
        for fig, a, b, g in issue:
            print(f"  {fig}:\n    n1 {a}\n    n2 {b}\n    GlusterFS {g}")
    failed = ["FAILED (their figures are missing): " + "; ".join(run.failures)]
    if run.failures:
        print("\n" + failed[0])
    if run.bugs:
        print("\nWARNING: the daemons logged unexpected exceptions:\n" + "\n".join(run.bugs))
    print("\n---- markdown for the Cluster section of docs/PERFORMANCE.md ----\n")
    title = f"### Cluster{' (quick)' if args.quick else ''}, {info['date']}"
    md = [f"{title} (dfs {info['dfs_commit']})", "", "```", *env[1:], *extra, "```", ""]
    if rows:
        md += _md(head[:-1], [r[:-1] for r in rows], {2, 3, 4, 5, 6, 7, 8})
        md += ["", cpu + ".", ""]
    if vis_text:
        md += [vis_text[0] + ".", ""]
        if vis:
            md += _md(VIS_HEAD, vis, {2, 3, 4, 5, 6}) + [""]
        md += [f"{t}." for t in vis_text[1:]] + [""] * (len(vis_text) > 1)
    if issue:
        issue_head = ("against the issue", "n1 (primary)", "n2", "GlusterFS replica 3")
        md += _md(issue_head, issue, set()) + [""]
    if run.failures:
        md += [failed[0], ""]
    print("\n".join(md))
    if args.json:
        doc = {
            "machine": info,
            "quick": args.quick,
            "sizes": asdict(sizes),
            **f,
            "daemon_bugs": run.bugs,
            "figures": [_row_json(r) for r in run.rows],
            "visibility": [{**asdict(s), "last_seen": sorted(s.last_seen)} for s in run.vis],
            "visibility_error": run.vis_error,
            "failures": run.failures,
        }
        args.json.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        say(f"wrote {args.json}")


def _row_json(r: Row) -> dict[str, object]:
    u = r.spec.unit

    def side(f: Figure) -> dict[str, object]:
        if not f.complete:
            return {"failed": True}
        return {
            "value": f.value(f.dfs),
            "ratio": f.ratio,
            "daemons_busy": f.daemon_busy,
            "notes": f.notes,
            "values": [s.value(u) for s in f.dfs],
        }

    local = r.primary.local
    return {
        "key": r.spec.key,
        "label": r.spec.label,
        "unit": u,
        "local": statistics.median(s.value(u) for s in local),
        "local_values": [s.value(u) for s in local],
        "n1": side(r.primary),
        "n2": side(r.other),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    sizes = QUICK if args.quick else FULL
    if args.rounds is not None:
        sizes = replace(sizes, meta_rounds=max(args.rounds, 1))
    wanted(args.only)  # reject unknown names before starting anything
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark mounts dfs and drops the page cache")
    info = machine_info()
    for line in env_lines(info, args, sizes):
        say(line)
    run = ClusterRun(open_workdir(args.dir, PREFIX, remove_stale))
    rc = 0
    try:
        run.execute(args, sizes)
    except KeyboardInterrupt:
        say("\ninterrupted: cleaning up")
        rc = 130
    except (BenchTimeout, LaunchError) as exc:
        say(f"\nerror: {exc}")
        if isinstance(exc, LaunchError) and exc.log_tail:
            say(exc.log_tail)
        rc = 1
    except Exception:
        say("\nerror:\n" + traceback.format_exc())
        rc = 1
    finally:
        # Ctrl-C during clean-up must not leave mounts behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        rc = run.cleanup(rc)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if rc == 0:
        report(args, info, sizes, run)
    return 1 if rc == 0 and run.failures else rc


if __name__ == "__main__":
    sys.exit(main())
