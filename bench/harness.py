"""What a benchmark run needs from the machine: the mount, caches, CPU accounting, a watchdog.

``BenchMount`` runs dfs-mountd in its own session (so Ctrl-C reaches only the
benchmark, which then unmounts in order) and asks the kernel to SIGTERM it if
the benchmark dies without cleaning up. ``Watchdog`` ends a workload that
hangs: it kills the running command and the daemon, which aborts every pending
FUSE request, so the benchmark always stops by itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from tests.mounting import MOUNTD, Mount

REPO = Path(__file__).resolve().parent.parent
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# Runs the daemon with PR_SET_PDEATHSIG: if the benchmark dies without cleaning up
# (SIGKILL), the kernel sends the daemon SIGTERM and it unmounts by itself. A
# wrapper that execs, rather than a preexec_fn, because the watchdog thread runs.
_DIE_WITH_PARENT = """
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)  # the benchmark is already gone
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def die_with_parent(cmd: list[str]) -> list[str]:
    """``cmd`` (a Python command line, interpreter first) run under the PR_SET_PDEATHSIG wrapper.

    Its process gets SIGTERM when the calling thread of this process exits.
    """
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd[1:]]


class BenchMount(Mount):
    """The test harness's Mount, in a session of its own and ended with the benchmark.

    ``counts``: run bench/countd.py (the daemon with per-request counters,
    written to that file on SIGUSR1) instead of the plain daemon.
    """

    def __init__(self, data_dir: Path, path: Path, log_path: Path, counts: Path | None = None):
        super().__init__(data_dir, path, log_path)
        self.counts = counts

    def start(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        wrapper = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid())]
        daemon = MOUNTD[1:] if self.counts is None else [str(Path(__file__).with_name("countd.py"))]
        env = None if self.counts is None else {**os.environ, "DFS_BENCH_COUNTS": str(self.counts)}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*wrapper, *daemon, "--data", str(self.data_dir), *self.extra, str(self.path)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.wait_live()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def request_totals(self) -> dict[str, tuple[int, int]]:
        """Cumulative (count, handler ns) per request type; {} unless counting."""
        pid = self.pid
        if self.counts is None or pid is None:
            return {}
        seen = -1
        with contextlib.suppress(OSError, ValueError):
            seen = json.loads(self.counts.read_text())["seq"]
        os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                d = json.loads(self.counts.read_text())
                if d["seq"] != seen:
                    return {k: (int(v[0]), int(v[1])) for k, v in d["totals"].items()}
            time.sleep(0.002)
        return {}


# --- page cache -------------------------------------------------------------------------


class Caches:
    """Drops the page, dentry and inode caches (the dfs mount's kernel caches included)."""

    def __init__(self) -> None:
        self.works = os.geteuid() == 0 and os.access(DROP_CACHES, os.W_OK)

    def drop(self) -> None:
        os.sync()
        if self.works:
            DROP_CACHES.write_text("3\n")


# --- CPU accounting ---------------------------------------------------------------------


@dataclass(frozen=True)
class CpuTimes:
    """CPU seconds: all CPUs busy, this process and its reaped children, the daemon."""

    machine: float
    mine: float
    daemon: float

    def __sub__(self, o: CpuTimes) -> CpuTimes:
        return CpuTimes(self.machine - o.machine, self.mine - o.mine, self.daemon - o.daemon)

    @property
    def foreign(self) -> float:
        """CPU seconds used by everything else (other processes, kernel threads)."""
        return max(self.machine - self.mine - self.daemon, 0.0)


def _machine_busy() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: busy is all but idle and iowait
    busy = sum(fields[:3]) + sum(fields[5:8])
    return busy / CLK_TCK


def process_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(rest[11]) + int(rest[12])) / CLK_TCK  # utime, stime


class CpuMeter:
    def __init__(self, daemon: BenchMount | None) -> None:
        self.daemon = daemon

    def snapshot(self) -> CpuTimes:
        t = os.times()
        mine = t.user + t.system + t.children_user + t.children_system
        pid = self.daemon.pid if self.daemon is not None else None
        return CpuTimes(_machine_busy(), mine, process_cpu(pid))


# --- hang protection --------------------------------------------------------------------


class BenchTimeout(Exception):
    pass


class Killable(Protocol):
    """What the watchdog kills besides the command: a daemon (BenchMount) or several."""

    def kill(self) -> None: ...


class Watchdog:
    """Kills the current command and the daemon when a workload overruns its deadline."""

    def __init__(self, mount: Killable | None) -> None:
        self.mount = mount
        self.fired: str | None = None
        self._deadline: float | None = None
        self._what = ""
        self._procs: set[subprocess.Popen[bytes]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="bench-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    @contextlib.contextmanager
    def armed(self, seconds: float, what: str) -> Iterator[None]:
        with self._lock:
            self._deadline = time.monotonic() + seconds
            self._what = what
        try:
            yield
        finally:
            with self._lock:
                self._deadline = None
        if self.fired is not None:
            raise BenchTimeout(f"{self.fired} did not finish within {seconds:.0f} s")

    def check(self) -> None:
        if self.fired is not None:
            raise BenchTimeout(f"{self.fired} overran its deadline")

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                late = self._deadline is not None and time.monotonic() > self._deadline
                procs = list(self._procs)
                what = self._what
            if not late or self.fired is not None:
                continue
            self.fired = what
            print(f"\n!! {what}: deadline passed; killing it and the dfs daemon", file=sys.stderr)
            for p in procs:
                with contextlib.suppress(OSError):
                    p.kill()
            if self.mount is not None:
                self.mount.kill()

    def run(
        self,
        cmd: list[str],
        cwd: Path,
        *,
        stdout: int | IO[bytes] | None = subprocess.DEVNULL,
        env: dict[str, str] | None = None,
        timeout: float = 3600.0,
    ) -> None:
        """Run ``cmd`` to completion; CalledProcessError on failure."""
        with self.popen(cmd, cwd, stdout=stdout, env=env) as p:
            _, err = p.communicate(timeout=timeout)
        self.check()
        if p.returncode != 0:
            raise subprocess.CalledProcessError(p.returncode, cmd, stderr=err)

    @contextlib.contextmanager
    def popen(
        self,
        cmd: list[str],
        cwd: Path,
        *,
        stdout: int | IO[bytes] | None,
        env: dict[str, str] | None = None,
    ) -> Iterator[subprocess.Popen[bytes]]:
        p = subprocess.Popen(
            cmd, cwd=cwd, stdout=stdout, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env
        )
        with self._lock:
            self._procs.add(p)
        try:
            yield p
        finally:
            with self._lock:
                self._procs.discard(p)
            if p.poll() is None:
                p.kill()
            p.wait()
            for f in (p.stdout, p.stderr):
                if f is not None:
                    f.close()


# --- sampling profiler ------------------------------------------------------------------


class Profiler:
    """py-spy attached to the daemon while a workload runs on dfs (one file per workload)."""

    def __init__(self, out_dir: Path, fmt: str, native: bool = False) -> None:
        self.out_dir = out_dir
        self.fmt = fmt
        self.native = native
        self.exe = Path(sys.executable).with_name("py-spy")
        if not self.exe.exists():
            raise SystemExit(f"--profile needs py-spy: {sys.executable} -m pip install py-spy")
        out_dir.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def attached(self, pid: int | None, name: str) -> Iterator[None]:
        if pid is None:
            yield
            return
        ext = {"flamegraph": "svg", "raw": "txt", "speedscope": "json"}.get(self.fmt, self.fmt)
        out = self.out_dir / f"{name}.{ext}"
        p = subprocess.Popen(
            [
                str(self.exe),
                "record",
                "--pid",
                str(pid),
                "--rate",
                "250",
                *(["--native"] if self.native else ["--nonblocking"]),
                "--format",
                self.fmt,
                "--output",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        time.sleep(0.5)  # let it attach
        try:
            yield
        finally:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# --- machine description ----------------------------------------------------------------


def _git(*args: str) -> str:
    r = subprocess.run(
        ["git", "--no-optional-locks", *args], cwd=REPO, capture_output=True, text=True
    )
    return r.stdout.strip() if r.returncode == 0 else ""


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def fs_type(path: Path) -> str:
    """The type of the file system holding ``path`` (longest matching mount point)."""
    best, kind = "", "?"
    target = str(path.resolve())
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            mp = parts[1].replace("\\040", " ")
            if (target == mp or target.startswith(mp.rstrip("/") + "/")) and len(mp) > len(best):
                best, kind = mp, parts[2]
    return kind


def machine_info() -> dict[str, object]:
    commit = _git("rev-parse", "--short", "HEAD") or "?"
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += " + uncommitted changes"
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "dfs_commit": commit,
        "loadavg": os.getloadavg(),
    }
