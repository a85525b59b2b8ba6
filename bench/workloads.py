"""The workloads: the same code runs on the local directory and on the dfs mount.

Each workload is a function of a ``Place`` (one of the two directories) that
measures one or more figures with ``Place.measure``; ``catalogue()`` declares
every figure with its unit and its target (a bound on the ratio dfs/local:
at least ``target`` for rates, at most ``target`` for times). Workloads
declare what they need ("bigfile", "tree"); the runner creates it untimed
when an earlier workload has not, and removes it when no later one needs it.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import Caches, CpuMeter, CpuTimes, Watchdog
from bench.sources import Tree

MiB = 1 << 20
CHUNK = MiB
PAGE = 4096
# Cached work is so fast locally that one pass would be mostly timer noise.
STAT_PASSES = 10
WARM_PASSES = 4


@dataclass(frozen=True)
class Sizes:
    file_bytes: int
    random_reads: int
    meta_files: int
    meta_rounds: int
    tree_copies: int
    tree_limit: int | None


FULL = Sizes(1 << 30, 20_000, 5_000, 3, 2, None)
QUICK = Sizes(128 * MiB, 5_000, 1_000, 3, 1, 1_000)


@dataclass(frozen=True)
class FigureSpec:
    key: str
    label: str
    unit: str  # "MB/s", "ops/s" or "s"
    target: float | None = None
    cold: bool = False  # meaningful only when the page cache can be dropped

    @property
    def is_time(self) -> bool:
        return self.unit == "s"


@dataclass(frozen=True)
class Sample:
    key: str
    seconds: float
    amount: float  # bytes for MB/s, operations for ops/s, files of the tree for s
    cpu: CpuTimes
    requests: dict[str, tuple[int, int]]  # dfs with --count-requests: (count, handler ns)

    def value(self, unit: str) -> float:
        if unit == "s":
            return self.seconds
        per_s = self.amount / max(self.seconds, 1e-9)
        return per_s / 1e6 if unit == "MB/s" else per_s


@dataclass
class Place:
    """One side of the comparison: a directory and everything a workload may use."""

    name: str  # "local" or "dfs"
    root: Path
    sizes: Sizes
    tree: Tree
    caches: Caches
    meter: CpuMeter
    watchdog: Watchdog
    requests: Callable[[], dict[str, tuple[int, int]]] = dict
    have: set[str] = field(default_factory=set)
    samples: list[Sample] = field(default_factory=list)

    @contextmanager
    def measure(self, key: str, amount: float = 0.0) -> Iterator[None]:
        reqs = self.requests()
        before = self.meter.snapshot()
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        cpu = self.meter.snapshot() - before
        after = self.requests()
        diff = {
            k: (n - reqs.get(k, (0, 0))[0], ns - reqs.get(k, (0, 0))[1])
            for k, (n, ns) in after.items()
            if n != reqs.get(k, (0, 0))[0]
        }
        self.samples.append(Sample(key, dt, amount, cpu, diff))

    def run(self, cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        self.watchdog.run(cmd, cwd, env=env)

    @property
    def bigfile(self) -> Path:
        return self.root / "big"

    @property
    def tree_dir(self) -> Path:
        return self.root / "tree"


# --- large files ------------------------------------------------------------------------


def _pattern() -> bytes:
    return random.Random(1).randbytes(CHUNK)  # incompressible, the same every run


def write(p: Place) -> None:
    size = p.sizes.file_bytes
    buf = memoryview(_pattern())
    p.caches.drop()
    with p.measure("write.fsync", size):
        fd = os.open(p.bigfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            with p.measure("write.nosync", size):
                left = size
                while left:
                    left -= os.write(fd, buf[: min(left, CHUNK)])
            os.fsync(fd)
        finally:
            os.close(fd)
    p.have.add("bigfile")


def make_bigfile(p: Place) -> None:
    write(p)
    p.samples[:] = [s for s in p.samples if not s.key.startswith("write.")]


def _read_all(path: Path) -> int:
    buf = bytearray(CHUNK)
    n = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            got = f.readinto(buf)
            if not got:
                return n
            n += got


def read(p: Place) -> None:
    size = p.bigfile.stat().st_size
    p.caches.drop()
    with p.measure("read.cold", size):
        _read_all(p.bigfile)
    with p.measure("read.warm", size * WARM_PASSES):
        for _ in range(WARM_PASSES):
            _read_all(p.bigfile)


def _offsets(size: int, n: int) -> list[int]:
    rng = random.Random(2)
    return [rng.randrange(size // PAGE) * PAGE for _ in range(n)]


def random_reads(p: Place) -> None:
    size = p.bigfile.stat().st_size
    n = p.sizes.random_reads
    offsets = _offsets(size, n)
    _read_all(p.bigfile)  # the whole file in the page cache for the warm pass
    fd = os.open(p.bigfile, os.O_RDONLY)
    try:
        with p.measure("random.warm", n * WARM_PASSES):
            for _ in range(WARM_PASSES):
                for off in offsets:
                    os.pread(fd, PAGE, off)
    finally:
        os.close(fd)
    p.caches.drop()
    fd = os.open(p.bigfile, os.O_RDONLY)
    try:
        with p.measure("random.cold", n):
            for off in offsets:
                os.pread(fd, PAGE, off)
    finally:
        os.close(fd)


def drop_bigfile(p: Place) -> None:
    p.bigfile.unlink(missing_ok=True)
    p.have.discard("bigfile")


# --- metadata ---------------------------------------------------------------------------


def meta(p: Place) -> None:
    """create, stat, rename, stat (uncached), unlink of N empty files in one directory.

    The first stat pass after create is its own figure: on dfs every one still
    asks the daemon (with the writeback cache the kernel forgets a file's
    st_blocks at each close); the passes after it are served from the
    kernel's attribute cache.
    """
    n = p.sizes.meta_files
    d = p.root / "meta"
    d.mkdir()
    names = [f"f{i:06d}" for i in range(n)]
    moved = [f"g{i:06d}" for i in range(n)]
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        with p.measure("meta.create", n):
            for name in names:
                os.close(os.open(name, flags, 0o644, dir_fd=dfd))
        with p.measure("meta.stat_first", n):
            for name in names:
                os.stat(name, dir_fd=dfd)
        with p.measure("meta.stat", n * STAT_PASSES):
            for _ in range(STAT_PASSES):
                for name in names:
                    os.stat(name, dir_fd=dfd)
        with p.measure("meta.rename", n):
            for a, b in zip(names, moved, strict=True):
                os.rename(a, b, src_dir_fd=dfd, dst_dir_fd=dfd)
        p.caches.drop()
        with p.measure("meta.stat_cold", n):
            for name in moved:
                os.stat(name, dir_fd=dfd)
        with p.measure("meta.unlink", n):
            for name in moved:
                os.unlink(name, dir_fd=dfd)
    finally:
        os.close(dfd)
    d.rmdir()


# --- a source tree ----------------------------------------------------------------------


def tar_x(p: Place) -> None:
    if p.tree_dir.exists():  # a later round: start from an empty directory again
        drop_tree(p)
    # Start every round with no dirty pages queued, so that neither side pays for the
    # writeback of an earlier workload (the local figure varied 5x without this).
    os.sync()
    p.tree_dir.mkdir()
    with p.measure("tar.x", p.tree.files):
        p.run(["tar", "-xf", str(p.tree.tarball), "-C", str(p.tree_dir)], p.root)
    p.have.add("tree")


def make_tree(p: Place) -> None:
    tar_x(p)
    p.samples[:] = [s for s in p.samples if s.key != "tar.x"]


def _tar_c(p: Place) -> int:
    """Read every file of the tree (tar -c to a pipe: GNU tar skips reading for /dev/null)."""
    n = 0
    with p.watchdog.popen(["tar", "-cf", "-", "."], p.tree_dir, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(CHUNK):
            n += len(chunk)
        proc.wait()
    p.watchdog.check()
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, "tar -c")
    return n


def read_tree(p: Place) -> None:
    p.caches.drop()
    with p.measure("tree.read_cold", p.tree.files):
        _tar_c(p)
    with p.measure("tree.read_warm", p.tree.files):
        _tar_c(p)


GIT_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@localhost",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@localhost",
    "GIT_AUTHOR_DATE": "2000-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "2000-01-01T00:00:00Z",
}


def git(p: Place) -> None:
    env = {**os.environ, **GIT_ENV}
    git = ["git", "-c", "gc.auto=0", "-c", "maintenance.auto=false"]
    p.run([*git, "init", "-q"], p.tree_dir, env)
    with p.measure("git.add", p.tree.files):
        p.run([*git, "add", "-A"], p.tree_dir, env)
    with p.measure("git.commit", p.tree.files):
        p.run([*git, "commit", "-q", "-m", "bench"], p.tree_dir, env)
    with p.measure("git.status", p.tree.files):
        p.run([*git, "status", "--porcelain"], p.tree_dir, env)


def rm_tree(p: Place) -> None:
    with p.measure("tree.rm", p.tree.files):
        p.run(["rm", "-rf", str(p.tree_dir)], p.root)
    p.have.discard("tree")


def drop_tree(p: Place) -> None:
    shutil.rmtree(p.tree_dir, ignore_errors=True)
    p.have.discard("tree")


# --- the catalogue ----------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    fn: Callable[[Place], None]
    needs: tuple[str, ...]
    figures: tuple[FigureSpec, ...]
    rounds: Callable[[Sizes], int] = lambda s: 1


def _size(n: int) -> str:
    return f"{n / 2**30:g} GiB" if n >= 2**30 else f"{n // MiB} MiB"


def catalogue(s: Sizes, t: Tree) -> list[Workload]:
    big, n, files = _size(s.file_bytes), f"{s.meta_files:,}", f"{t.files:,} files"
    R = s.random_reads
    return [
        Workload(
            "write",
            write,
            (),
            (
                FigureSpec("write.fsync", f"seq write {big}, 1 MiB writes + fsync", "MB/s", 0.8),
                FigureSpec("write.nosync", f"seq write {big}, before fsync", "MB/s"),
            ),
        ),
        Workload(
            "read",
            read,
            ("bigfile",),
            (
                FigureSpec("read.cold", f"seq read {big} cold", "MB/s", cold=True),
                FigureSpec("read.warm", f"seq read {big} warm (x{WARM_PASSES})", "MB/s", 0.7),
            ),
        ),
        Workload(
            "random",
            random_reads,
            ("bigfile",),
            (
                FigureSpec("random.warm", f"random 4 KiB pread {R:,} x{WARM_PASSES} warm", "ops/s"),
                FigureSpec("random.cold", f"random 4 KiB pread {R:,} cold", "ops/s", cold=True),
            ),
        ),
        Workload(
            "meta",
            meta,
            (),
            (
                FigureSpec("meta.create", f"create {n} empty files", "ops/s"),
                FigureSpec("meta.stat_first", f"stat {n} files (first, after create)", "ops/s"),
                FigureSpec("meta.stat", f"stat {n} files x{STAT_PASSES} (cached)", "ops/s", 0.5),
                FigureSpec("meta.rename", f"rename {n} files", "ops/s"),
                FigureSpec("meta.stat_cold", f"stat {n} files (uncached)", "ops/s", cold=True),
                FigureSpec("meta.unlink", f"unlink {n} files", "ops/s"),
            ),
            rounds=lambda s: s.meta_rounds,
        ),
        Workload(
            "tar",
            tar_x,
            (),
            (FigureSpec("tar.x", f"tar x ({files})", "s", 6.0),),
            rounds=lambda s: s.meta_rounds,
        ),
        Workload(
            "readtree",
            read_tree,
            ("tree",),
            (
                FigureSpec("tree.read_cold", "read tree back (tar c) cold", "s", cold=True),
                FigureSpec("tree.read_warm", "read tree back (tar c) warm", "s"),
            ),
        ),
        Workload(
            "git",
            git,
            ("tree",),
            (
                FigureSpec("git.add", "git add -A", "s", 6.0),
                FigureSpec("git.commit", "git commit", "s"),
                FigureSpec("git.status", "git status (after commit)", "s"),
            ),
        ),
        Workload("rm", rm_tree, ("tree",), (FigureSpec("tree.rm", "rm -rf tree", "s"),)),
    ]


MAKE = {"bigfile": make_bigfile, "tree": make_tree}
DROP = {"bigfile": drop_bigfile, "tree": drop_tree}
