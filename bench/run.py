"""Run the dfs benchmarks: the same workloads on a local directory and a fresh dfs mount.

    .venv/bin/python bench/run.py [--quick] [--only NAME,...] [--json FILE] [--size-gb N]

Both directories live under one new directory on the same disk (default
/var/tmp), so the ratio dfs/local measures what dfs adds, not the disk. Each
workload runs on local then on dfs, round after round, and the table gives
medians, the ratio to local and the target of the issue. The mount is always
unmounted and every file removed, also after an error, Ctrl-C or SIGTERM; a
workload that hangs is killed after --timeout. See docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import sources  # noqa: E402
from bench.harness import (  # noqa: E402
    BenchMount,
    BenchTimeout,
    Caches,
    CpuMeter,
    Profiler,
    Watchdog,
    fs_type,
    machine_info,
)
from bench.report import Figure, requests_table, table, to_json  # noqa: E402
from bench.workloads import DROP, FULL, MAKE, QUICK, Place, Sizes, Workload, catalogue  # noqa: E402
from dfs.mounts import UnmountError, force_unmount, is_mounted  # noqa: E402

PREFIX = "dfs-bench-"


def parse(argv: list[str] | None) -> argparse.Namespace:
    names = "write, read, random, meta, tar, readtree, git, rm"
    ap = argparse.ArgumentParser(
        description="Benchmark a fresh dfs mount against a local directory on the same disk.",
        epilog=f"workloads: {names}. Run as root (page cache drops, the mount).",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="small sizes for a smoke run (128 MiB file, 1,000 files)",
    )
    ap.add_argument("--only", metavar="NAME,...", help=f"run only these workloads ({names})")
    ap.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    ap.add_argument(
        "--size-gb",
        type=float,
        metavar="N",
        help="size of the large file in GiB (default 1, quick 0.125)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        metavar="N",
        help="rounds of the metadata workload (median reported; default 3)",
    )
    ap.add_argument(
        "--dir",
        type=Path,
        default=Path("/var/tmp"),
        help="where to create the local dir and the dfs data dir (default /var/tmp)",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="seconds before a hung workload is killed (default 1800, quick 300)",
    )
    ap.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="attach py-spy to the daemon during each dfs run, one file per workload",
    )
    ap.add_argument(
        "--profile-format", default="flamegraph", choices=("flamegraph", "raw", "speedscope")
    )
    ap.add_argument(
        "--count-requests",
        action="store_true",
        help="count the FUSE requests of every dfs figure and time their handlers "
        "(bench/countd.py); prints a second table",
    )
    ap.add_argument(
        "--profile-native",
        action="store_true",
        help="with --profile: include C frames (pyfuse3, lmdb, syscalls); pauses the daemon "
        "at each sample, so the figures of a profiled run are slower",
    )
    return ap.parse_args(argv)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def remove_stale(parent: Path) -> None:
    """Remove what an earlier run that was SIGKILLed left behind (its pid is gone).

    Its daemon got SIGTERM from the kernel when it died and normally unmounted;
    a mount left anyway is detached without being looked into (a stale FUSE
    mount can block whoever stats it).
    """
    for d in parent.glob(PREFIX + "*"):
        try:
            pid = int((d / "pid").read_text())
            os.kill(pid, 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except (OSError, ValueError):
            continue
        mnt = d / "mnt"
        if is_mounted(mnt):
            try:
                force_unmount(mnt)
            except UnmountError as exc:
                say(f"warning: cannot clean up {d}: {exc}")
                continue
        say(f"removing {d}, left by an earlier run that was killed")
        shutil.rmtree(d, ignore_errors=True)


def open_workdir(
    parent: Path, prefix: str = PREFIX, cleanup: Callable[[Path], None] | None = None
) -> Path:
    """Make this run's directory under ``parent`` after ``cleanup`` (default ``remove_stale``)
    removed those of runs that died, with SIGTERM/SIGHUP turned into KeyboardInterrupt so
    the caller cleans up."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    (cleanup or remove_stale)(parent)
    base = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    (base / "pid").write_text(f"{os.getpid()}\n")
    say(f"working in {base}")
    return base


def select(workloads: list[Workload], only: str | None) -> list[Workload]:
    if not only:
        return workloads
    want = {w.strip() for w in only.split(",") if w.strip()}
    unknown = want - {w.name for w in workloads}
    if unknown:
        raise SystemExit(f"unknown workload(s): {', '.join(sorted(unknown))}")
    return [w for w in workloads if w.name in want]


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Run:
    """The state of one benchmark run, for the workloads and for clean-up."""

    base: Path
    mount: BenchMount | None = None
    watchdog: Watchdog | None = None
    figures: list[Figure] = field(default_factory=list)
    facts: dict[str, object] = field(default_factory=dict)  # printed and saved in the JSON
    bugs: list[str] = field(default_factory=list)

    def execute(self, args: argparse.Namespace, sizes: Sizes) -> None:
        names = {w.name for w in select(_names_only(), args.only)}
        needs_tree = bool(names & {"tar", "readtree", "git", "rm"})
        tree = sources.tree(sizes.tree_copies, sizes.tree_limit) if needs_tree else _no_tree()
        workloads = select(catalogue(sizes, tree), args.only)
        if needs_tree:
            self.facts["tree"] = tree.describe()
            say(f"tree: {tree.describe()}")
        caches = Caches()
        if not caches.works:
            say("warning: cannot drop the page cache (needs root): cold figures are not cold")
        local = self.base / "local"
        local.mkdir()
        counts = self.base / "requests.json" if args.count_requests else None
        mount = self.mount = BenchMount(
            self.base / "data", self.base / "mnt", self.base / "mountd.log", counts
        )
        watchdog = self.watchdog = Watchdog(mount)
        watchdog.start()
        with watchdog.armed(60, "mounting dfs"):
            mount.start()
        self.facts["fs"] = fs_type(local)
        self.facts["same_device"] = os.stat(local).st_dev == os.stat(self.base / "data").st_dev
        meter = CpuMeter(mount)
        places = [
            Place("local", local, sizes, tree, caches, meter, watchdog),
            Place("dfs", mount.path, sizes, tree, caches, meter, watchdog, mount.request_totals),
        ]
        profiler = (
            Profiler(args.profile, args.profile_format, args.profile_native)
            if args.profile
            else None
        )
        timeout = args.timeout or (300.0 if args.quick else 1800.0)
        for i, w in enumerate(workloads):
            rounds = w.rounds(sizes)
            for r in range(rounds):
                for p in places:
                    for need in w.needs:
                        if need not in p.have:
                            with watchdog.armed(timeout, f"preparing {need} on {p.name}"):
                                MAKE[need](p)
                    t0 = time.monotonic()
                    prof: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
                    if profiler is not None and p.name == "dfs" and r == 0:
                        prof = profiler.attached(mount.pid, w.name)
                    with watchdog.armed(timeout, f"{w.name} on {p.name}"), prof:
                        w.fn(p)
                    tag = f" round {r + 1}/{rounds}" if rounds > 1 else ""
                    say(f"  {w.name}{tag} on {p.name}: {time.monotonic() - t0:.1f} s")
            later = {n for x in workloads[i + 1 :] for n in x.needs}
            for p in places:
                for res in sorted(p.have - later):
                    DROP[res](p)
        for w in workloads:
            for spec in w.figures:
                f = Figure(
                    spec,
                    [s for s in places[0].samples if s.key == spec.key],
                    [s for s in places[1].samples if s.key == spec.key],
                )
                if f.complete:
                    f.check_noise(caches.works)
                    self.figures.append(f)
        self.facts["loadavg_end"] = os.getloadavg()

    def cleanup(self, rc: int) -> int:
        """Stop the watchdog and the daemon, unmount, remove every file; returns the exit code."""
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.mount is not None:
            try:
                self.mount.stop()
            except Exception as exc:  # noqa: BLE001 - keep going: report, then remove files
                say(f"error stopping the daemon: {exc}")
            self.bugs = self.mount.bugs()
            if rc != 0:
                tail = self.mount.log().splitlines()[-30:]
                say("---- tail of the daemon log ----\n" + "\n".join(tail))
            if self.mount.is_mounted():
                say(f"error: {self.mount.path} is still mounted; left {self.base} in place")
                return rc or 1
        shutil.rmtree(self.base, ignore_errors=True)
        if self.base.exists():
            say(f"warning: could not remove all of {self.base}")
        return rc


def _names_only() -> list[Workload]:
    return catalogue(FULL, _no_tree())


def _no_tree() -> sources.Tree:
    return sources.Tree(Path("/nonexistent"), "", 0, 0, 0, 0)


def header_lines(info: dict[str, object], quick: bool) -> list[str]:
    la = info["loadavg"]
    assert isinstance(la, tuple)
    lines = [
        f"dfs benchmark, {info['date']}{' (quick)' if quick else ''}",
        f"machine: {info['nproc']} CPUs ({info['cpu']}), {info['memory_gib']} GiB, "
        f"kernel {info['kernel']}, Python {info['python']}",
        f"dfs: {info['dfs_commit']}",
        f"load average at start: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    sizes = QUICK if args.quick else FULL
    if args.size_gb is not None:
        sizes = replace(sizes, file_bytes=max(int(args.size_gb * 2**30) // 2**20, 1) * 2**20)
    if args.rounds is not None:
        sizes = replace(sizes, meta_rounds=max(args.rounds, 1))
    select(_names_only(), args.only)  # reject unknown names before mounting anything
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark mounts dfs and drops the page cache")
    info = machine_info()
    for line in header_lines(info, args.quick):
        say(line)
    run = Run(open_workdir(args.dir))
    rc = 0
    try:
        run.execute(args, sizes)
    except KeyboardInterrupt:
        say("\ninterrupted: cleaning up")
        rc = 130
    except BenchTimeout as exc:
        say(f"\nerror: {exc}")
        rc = 1
    except Exception:
        say("\nerror:\n" + traceback.format_exc())
        rc = 1
    finally:
        # Ctrl-C during clean-up must not leave a mount behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        rc = run.cleanup(rc)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if rc == 0:
        report(args, info, sizes, run)
    return rc


def report(args: argparse.Namespace, info: dict[str, object], sizes: Sizes, run: Run) -> None:
    f = run.facts
    end = f["loadavg_end"]
    assert isinstance(end, tuple)
    print("\n".join(header_lines(info, args.quick)))
    print(f"load average at end: {end[0]:.2f} {end[1]:.2f} {end[2]:.2f}")
    same = "yes" if f.get("same_device") else "NO"
    print(f"dirs: local and dfs data under {args.dir} ({f.get('fs')}, same device: {same})")
    if "tree" in f:
        print(f"tree: {f['tree']}")
    print()
    print(table(run.figures))
    if args.count_requests:
        print()
        print(requests_table(run.figures))
    if run.bugs:
        print("\nWARNING: the daemon logged unexpected exceptions:\n" + "\n".join(run.bugs))
    if args.json:
        header = {"machine": info, "quick": args.quick, "sizes": asdict(sizes), **f}
        to_json(args.json, {**header, "daemon_bugs": run.bugs}, run.figures)
        say(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
