"""The mount is live, basic shell commands work, and SIGTERM unmounts cleanly."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.mounting import Mount
from tests.waiting import wait_until


def test_write_read_list(mnt: Path) -> None:
    (mnt / "hello").write_text("hello world\n")
    assert (mnt / "hello").read_text() == "hello world\n"
    (mnt / "sub").mkdir()
    assert sorted(p.name for p in mnt.iterdir()) == ["hello", "sub"]
    out = subprocess.run(["ls", "-l", str(mnt)], capture_output=True, text=True, check=True)
    assert "hello" in out.stdout


def test_sigterm_unmounts(node: Mount) -> None:
    (node.path / "f").write_bytes(b"x" * 100)
    assert node.stop_daemon() == 0
    assert not node.is_mounted()
    node.start()
    assert (node.path / "f").read_bytes() == b"x" * 100


def test_readahead_raised(node: Mount) -> None:
    """Sequential reads arrive as 1 MiB requests: the daemon raises the mount's readahead."""
    import os

    dev = os.stat(node.path).st_dev
    knob = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    wait_until("read_ahead_kb raised to 1024", lambda: knob.read_text().strip(), ok="1024".__eq__)
