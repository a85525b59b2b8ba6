"""Run dfs-mountd in a subprocess for tests: start, wait until live, kill, restart, unmount.

Every mount made here is unmounted in ``stop()`` whatever happened; the daemon's
log is kept so a failing test can print it, and a log containing an
unexpected exception fails the test that produced it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from dfs.errors import BUG_MARKER
from dfs.mounts import force_unmount, mount_points
from tests.waiting import DEADLINE, WaitTimeout, wait_until

MOUNTD = [sys.executable, "-m", "mountd"]
START_TIMEOUT = DEADLINE


class MountError(Exception):
    pass


class Mount:
    def __init__(self, data_dir: Path, path: Path, log_path: Path, extra: list[str] | None = None):
        self.data_dir = data_dir
        self.path = path
        self.log_path = log_path
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        if not self.is_mounted():  # a stale mount answers ENOTCONN: the daemon cleans it up
            self.path.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== start #{self.starts} ====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [*MOUNTD, "--data", str(self.data_dir), *self.extra, str(self.path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.wait_live()

    def wait_live(self) -> None:
        parent_dev = os.stat(self.path.parent).st_dev

        def serving() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise MountError(f"dfs-mountd exited with {self.proc.returncode}:\n{self.log()}")
            # A stale mount left by a killed daemon still answers stat() from the
            # kernel's attribute cache; only readdir proves a daemon is serving
            # (a stale connection says ENOTCONN).
            if os.stat(self.path).st_dev == parent_dev:
                return False
            os.listdir(self.path)
            return True

        try:
            wait_until("the mount to be served", serving, retry_on=(OSError,), limit=START_TIMEOUT)
        except WaitTimeout as exc:
            raise MountError(f"{exc}\n{self.log()}") from None

    def is_mounted(self) -> bool:
        return str(self.path) in mount_points()

    def kill(self) -> None:
        """SIGKILL the daemon (the mount goes stale until the next start)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def restart(self, *, kill: bool = False) -> None:
        if kill:
            self.kill()
        else:
            self.stop_daemon()
        self.start()

    def stop_daemon(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; returns the exit code (None if it had to be killed)."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return None

    def stop(self) -> None:
        """Unmount and end the daemon, whatever state they are in."""
        try:
            self.stop_daemon()
        finally:
            if self.is_mounted():
                with contextlib.suppress(Exception):  # best effort in teardown
                    force_unmount(self.path)

    # --- inspection --------------------------------------------------------------------

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def bugs(self) -> list[str]:
        return [
            line for line in self.log().splitlines() if BUG_MARKER in line or "Traceback" in line
        ]

    def fsck(self, repair: bool = False) -> subprocess.CompletedProcess[str]:
        """Run the offline checker on the data directory (daemon must be stopped)."""
        cmd = [sys.executable, "-m", "dfs_tools", "fsck", "--data", str(self.data_dir)]
        if repair:
            cmd.append("--repair")
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def mounts_under(scope: Path) -> set[str]:
    return {p for p in mount_points() if p == str(scope) or p.startswith(f"{scope}/")}


def mountd(*args: str | Path, scope: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run the daemon expecting it to exit by itself; it must leave no mount under ``scope``.

    Only mounts under ``scope`` (the test's own directory) are looked at or
    cleaned up: other tests on this machine have theirs.
    """
    before = mounts_under(scope)
    proc = subprocess.Popen(
        [*MOUNTD, *map(str, args)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        for path in mounts_under(scope) - before:
            force_unmount(Path(path))
        raise AssertionError(f"dfs-mountd {args} did not exit:\n{err}") from None
    leaked = mounts_under(scope) - before
    for path in leaked:
        force_unmount(Path(path))
    assert not leaked, f"dfs-mountd {args} left mounts behind: {leaked}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
