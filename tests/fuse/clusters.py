"""A local cluster for tests: `dfs cluster ... --dir ROOT` run as a user would, always brought down.

``Launcher`` runs the CLI and remembers every daemon PID it saw; ``launched``
is the context manager behind the ``cluster`` fixtures: whatever happens it
runs ``dfs cluster down``, unmounts and kills what is left (only the daemons
of this configuration, by PID), and fails if anything was left or a daemon
logged an unexpected exception. ``snapshot``/``assert_same_everywhere`` compare
what several mounts show of one directory, entry by entry (names, type, mode,
owner, size, times, link counts, inode numbers, xattrs, symlink targets, contents).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from dfs.errors import BUG_MARKER
from dfs.mounts import force_unmount
from tests.mounting import mounts_under
from tests.waiting import wait_until

DFS = [sys.executable, "-m", "dfs_tools"]
HEARTBEAT = 1.0  # what dfs init writes


def need_fuse() -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")


def free_base_port(n: int) -> int:
    """A port P such that P..P+n-1 are free on 127.0.0.1 right now."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - n)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def is_our_daemon(pid: int, config: Path) -> bool:
    """Is ``pid`` a live (not zombie) process with ``config`` on its command line?"""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and str(config) in proc.cmdline()
    except psutil.Error:
        return False


class Launcher:
    """Runs ``dfs cluster ... --dir ROOT`` and remembers every daemon PID it saw."""

    def __init__(self, root: Path, base_port: int) -> None:
        self.root = root
        self.base_port = base_port
        self.seen_pids: set[int] = set()

    @property
    def config(self) -> Path:
        return self.root / "cluster.toml"

    def dfs(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*DFS, "cluster", *args, "--dir", str(self.root)],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def dfs_tool(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Another ``dfs`` command (``dfs volume ...``), as a user runs it."""
        return subprocess.run(
            [*DFS, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )

    def up(self, nodes: int = 3) -> subprocess.CompletedProcess[str]:
        return self.dfs("up", "--nodes", str(nodes), "--base-port", str(self.base_port))

    def status(self) -> tuple[int, dict[str, Any]]:
        r = self.dfs("status", "--json")
        doc = json.loads(r.stdout)
        assert doc["exit_code"] == r.returncode
        self.seen_pids |= {n["pid"] for n in doc["nodes"] if n["pid"]}
        return r.returncode, doc

    def nodes(self) -> dict[str, dict[str, Any]]:
        return {n["name"]: n for n in self.status()[1]["nodes"]}

    def wait(
        self, what: str, cond: Callable[[dict[str, dict[str, Any]]], bool]
    ) -> dict[str, dict[str, Any]]:
        """Wait until ``dfs cluster status`` shows ``cond``; the nodes as it last showed them."""
        return wait_until(what, self.nodes, ok=cond, every=0.1)

    def logs(self) -> str:
        out = []
        for log in sorted(self.root.glob("*/mountd.log")):
            out.append(f"---- {log} ----\n{log.read_text(errors='replace')}")
        return "\n".join(out)

    def bugs(self) -> list[str]:
        return [
            line
            for line in self.logs().splitlines()
            if BUG_MARKER in line or line.startswith("Traceback")
        ]


@contextlib.contextmanager
def launched(root: Path, nodes: int = 3, *, show_logs: Callable[[], bool]) -> Iterator[Launcher]:
    """A Launcher on ``root`` with free ports; always brought down and checked (see above)."""
    need_fuse()
    launcher = Launcher(root, free_base_port(nodes))
    failed = True
    try:
        yield launcher
        failed = False
    finally:
        down = launcher.dfs("down")
        leaked = mounts_under(root.parent)
        for path in leaked:
            with contextlib.suppress(Exception):
                force_unmount(Path(path))
        alive = [p for p in launcher.seen_pids if is_our_daemon(p, launcher.config)]
        for pid in alive:  # processes this test started (verified above): end them
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if failed or show_logs():
            print(launcher.logs())
        assert down.returncode == 0, down.stderr
        assert not leaked, f"left mounted after dfs cluster down: {leaked}"
        assert not alive, f"daemons left after dfs cluster down: {alive}"
        bugs = launcher.bugs()
        assert not bugs, "a daemon logged unexpected exceptions:\n" + "\n".join(bugs)


def module_cluster(factory: pytest.TempPathFactory, name: str) -> Iterator[Launcher]:
    """The body of a module-scoped 3-node cluster fixture: up, yielded, always brought down."""
    with launched(factory.mktemp(name) / "c", show_logs=lambda: False) as launcher:
        r = launcher.up()
        assert r.returncode == 0, r.stdout + r.stderr + launcher.logs()
        yield launcher


# --- comparing what the nodes show -----------------------------------------------------------


def run(cmd: str, cwd: Path) -> str:
    r = subprocess.run(cmd, shell=True, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{cmd}: {r.stdout}{r.stderr}"
    return r.stdout


def snapshot(top: Path) -> dict[str, tuple[Any, ...]]:
    """Everything a user can see of a tree, keyed by relative path."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = os.lstat(p)
            xattrs = {
                x: os.getxattr(p, x, follow_symlinks=False)
                for x in sorted(os.listxattr(p, follow_symlinks=False))
            }
            if os.path.islink(p):
                body: Any = os.readlink(p)
            elif p.is_file():
                body = p.read_bytes()
            else:
                body = None
            out[str(p.relative_to(top))] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_nlink,
                st.st_ino,
                st.st_size if not p.is_dir() else None,
                st.st_mtime_ns,
                st.st_ctime_ns,
                xattrs,
                body,
            )
    return out


def assert_same_everywhere(mnts: dict[str, Path], origin: str) -> dict[str, tuple[Any, ...]]:
    want = snapshot(mnts[origin])
    assert want, "the workload left nothing to compare"
    for node, path in mnts.items():
        if node == origin:
            continue
        got = snapshot(path)
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        assert not missing and not extra, f"{node}: missing {missing[:5]}, extra {extra[:5]}"
        diff = [k for k in want if want[k] != got[k]]
        first = diff[0] if diff else ""
        assert not diff, f"{node} differs at {diff[:5]}: {want[first]!r:.300} / {got[first]!r:.300}"
    return want


# A real source tree of a few hundred files: the standard library's email and json packages.
SOURCES = " ".join(str(Path(shutil.__file__).parent / p) for p in ("email", "json"))


def writes_while_a_site_is_killed(
    cluster: Launcher, top: Path, site: str, *, rename_every: int = 0
) -> list[str]:
    """Write fsync'ed files into ``top`` (renaming every ``rename_every``-th) while ``site`` is
    SIGKILLed and restarted; returns the names whose writes were acknowledged. Fails if
    updates stop while the site is down or any write fails."""
    done = threading.Event()
    acked: list[str] = []
    errors: list[str] = []

    def workload() -> None:
        i = 0
        while not done.is_set() and i < 2000:
            name = f"f{i:04d}"
            try:
                with open(top / name, "wb") as f:
                    f.write(os.urandom(100 + (i % 7) * 30000))
                    f.flush()
                    os.fsync(f.fileno())
                if rename_every and i % rename_every == 0:
                    os.rename(top / name, top / f"r{i:04d}")
                    name = f"r{i:04d}"
                acked.append(name)
            except OSError as exc:
                errors.append(f"{name}: {exc}")
                return
            i += 1

    def acked_past(n: int) -> Callable[[], bool]:
        def probe() -> bool:
            assert not errors, errors
            return len(acked) >= n

        return probe

    t = threading.Thread(target=workload)
    t.start()
    try:
        wait_until("the workload under way", acked_past(20))
        r = cluster.dfs("stop", site, "--kill")
        assert r.returncode == 0, r.stderr
        # The primary waits for the dead site's read lease (3 heartbeats) to run out, once.
        wait_until("updates while a storage site is down", acked_past(len(acked) + 20))
        r = cluster.dfs("start", site)
        assert r.returncode == 0, r.stdout + r.stderr
        wait_until("updates while the site catches up", acked_past(len(acked) + 20))
    finally:
        done.set()
        t.join(60)
    assert not errors, errors
    return acked
