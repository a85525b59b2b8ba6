"""Run the offline checker on a stopped node's data directory; fail the test unless clean."""

from __future__ import annotations

from tests.mounting import Mount


def assert_fsck_clean(m: Mount) -> None:
    """``python -m dfs_tools fsck --data DIR`` must exit 0 (the daemon must be stopped)."""
    assert m.proc is None or m.proc.poll() is not None, "stop the daemon before fsck"
    r = m.fsck()
    if "No module named dfs_tools.__main__" in r.stderr or "No such command" in r.stderr:
        raise AssertionError(f"the offline checker is not available yet:\n{r.stderr}")
    assert r.returncode == 0, f"fsck of {m.data_dir} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
