"""tools/launcher.py without FUSE: which recorded process is still the daemon we started."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from dfs_tools import daemons as D
from dfs_tools import launcher as L


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _ticks(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[19])  # starttime, in clock ticks since boot


def test_a_process_is_ours_only_with_the_start_time_we_recorded(
    child: subprocess.Popen[bytes],
) -> None:
    started = D.start_ticks(psutil.Process(child.pid))
    assert started == _ticks(child.pid)
    got = D.recorded_process(child.pid, started)
    assert got is not None and got.pid == child.pid
    assert D.recorded_process(child.pid, started + 1) is None  # a reused PID
    assert D.recorded_process(child.pid, started - 1) is None
    assert D.recorded_process(child.pid, None) is None
    assert D.recorded_process(child.pid, True) is None
    assert D.recorded_process(str(child.pid), started) is None
    assert D.recorded_process(0, started) is None


def test_the_start_time_does_not_move_with_the_boot_time(
    child: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel derives boot time from the wall clock; a step of it must not orphan a daemon."""
    started = D.start_ticks(psutil.Process(child.pid))
    wall = psutil.Process(child.pid).create_time()
    real = psutil._pslinux.boot_time  # type: ignore[attr-defined]
    monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: real() + 1.0)
    assert psutil.Process(child.pid).create_time() == wall + 1.0  # what used to be compared
    assert D.recorded_process(child.pid, started) is not None


def test_wall_clock_start_times_from_an_older_launcher_still_match(
    child: subprocess.Popen[bytes],
) -> None:
    wall = psutil.Process(child.pid).create_time()
    assert D.recorded_process(child.pid, wall) is not None
    assert D.recorded_process(child.pid, wall + 0.5) is not None  # boot time moved under it
    assert D.recorded_process(child.pid, wall + 5.0) is None


def test_the_exit_status_of_our_child_is_collected_once(child: subprocess.Popen[bytes]) -> None:
    assert D.wait_exit(child.pid) is None  # still running
    child.kill()
    assert D.wait_exit(child.pid, timeout=30) == -9
    child.returncode = -9  # reaped by psutil: tell Popen, so the fixture does not wait again
    assert D.wait_exit(child.pid) is None  # gone


def test_the_daemon_command_line_is_recognised(tmp_path: Path) -> None:
    c = L.LocalCluster(tmp_path)
    node = L.LocalNode("n2", "127.0.0.1", 7802, tmp_path / "n2")
    argv = c.daemon_argv(node)
    assert c._is_daemon_of(argv, node)
    assert not c._is_daemon_of(argv, L.LocalNode("n3", "127.0.0.1", 7803, tmp_path / "n3"))
    assert not c._is_daemon_of(["sleep", *argv[3:]], node)  # not a dfs-mountd
    other = L.LocalCluster(tmp_path / "other")
    assert not other._is_daemon_of(argv, node)  # another cluster's configuration


def test_a_daemon_still_in_execve_is_ours(
    tmp_path: Path, child: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Right after posix_spawn the child's /proc/PID/cmdline can read empty (its execve has
    not set up the new command line yet): it was reported as a dead daemon under load."""
    c = L.LocalCluster(tmp_path)
    node = L.LocalNode("n1", "127.0.0.1", 7801, tmp_path / "n1")
    ticks = D.start_ticks(psutil.Process(child.pid))
    c.started.record("n1", {"pid": child.pid, "start_time": ticks})
    assert c.daemon_pid(node) is None  # a python that is not a dfs-mountd of this cluster
    monkeypatch.setattr(psutil.Process, "cmdline", lambda self: [])
    assert c.daemon_pid(node) == child.pid


def test_metrics_ports_are_chosen_when_a_cluster_is_made(tmp_path: Path) -> None:
    c = L.LocalCluster(tmp_path)
    c._create(3, 27801, in_netns=False, metrics_port=27901)
    cfg = c.config()
    assert [cfg.metrics_at(n) for n in ("n1", "n2", "n3")] == [
        ("127.0.0.1", 27901),
        ("127.0.0.1", 27902),
        ("127.0.0.1", 27903),
    ]
    with pytest.raises(L.ClusterError, match="without --metrics-port 28000"):
        c.up(metrics_port=28000)  # refused before anything starts
    assert c.started.entries() == {}
